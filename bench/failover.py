"""Failure detection and recovery after an agent is SIGKILLed: kcp's defaults against the
previous timings (heartbeat 1 s, lease 3 s), measured in the same run.

    .venv/bin/python bench/failover.py [--kills 5]

For each timing, a local stack (private redis-server, `kcp serve`, 3 agents with 3 slots) runs
a 6-kernel cluster. Each round starts a 300 ms job on a kernel of one agent, SIGKILLs that agent
50 ms later (its kernels die with it), then measures from the kill:

- detection: until the leader declares the agent dead (`kcp:reliability` agents_dead_total);
- job: until the in-flight job's result reaches the caller (re-run on another kernel);
- recovery: until the cluster has 6 running kernels again, none on the dead agent.

The agent is restarted between rounds. Prints each series and its median, and the ratio of
the old timings' median to the defaults'.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import time
from pathlib import Path

from controlplane import KcpClient, OrchestrationConfig, OrchestrationEngine, RoutingStrategy, Settings
from controlplane.ops.stack import LocalStack
from controlplane.protocol.keys import Keys

ROOT = Path(__file__).resolve().parents[1]
KEYS = Keys()
KERNELS = 6


async def _until(predicate, limit: float = 30.0) -> float:  # type: ignore[no-untyped-def]
    start = time.monotonic()
    while not await predicate():
        if time.monotonic() - start > limit:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


async def measure(kills: int, env: dict[str, str]) -> dict[str, list[float]]:
    os.environ.update(env)
    settings = Settings()
    stack = LocalStack(settings, agents=3, slots=3, own_redis=True, handlers=("tests.chaos.handlers",))
    os.chdir(ROOT)  # the agents find tests.chaos.handlers through PYTHONPATH=cwd
    stack.start()
    series: dict[str, list[float]] = {"detection": [], "job": [], "recovery": []}
    try:
        async with KcpClient(Settings(redis_url=stack.redis_url, ready_timeout=60)) as kcp:
            redis = kcp.redis

            async def registered() -> bool:
                return bool(await redis.scard(KEYS.agents()) >= 3)

            await _until(registered)
            await kcp.create_cluster("bench", KERNELS, {"max_kernels": 9})
            for round_ in range(kills):
                info = await kcp.get_cluster("bench")
                agents = sorted({k.agent for k in info.kernels})
                victim = agents[round_ % len(agents)]
                kernel = next(k.name for k in info.kernels if k.agent == victim)
                proc = stack.procs[1 + int(victim.split("-")[1])]
                dead = int(await redis.hget(KEYS.reliability(), "agents_dead_total") or 0)
                # sent to the victim's kernel but not pinned (a pinned job would fail with
                # KernelGone instead of running elsewhere): `primary_fallback` with it as primary
                there = OrchestrationEngine(
                    OrchestrationConfig(strategy=RoutingStrategy.PRIMARY_FALLBACK, primary=kernel)
                )
                job = asyncio.create_task(
                    kcp.dispatch("bench", {"type": "SLEEP", "ms": 300, "tag": "t"}, engine=there)
                )
                await asyncio.sleep(0.05)
                proc.kill()
                proc.wait()
                killed = time.monotonic()

                async def declared(before: int = dead) -> bool:
                    return int(await redis.hget(KEYS.reliability(), "agents_dead_total") or 0) > before

                async def whole(gone: str = victim) -> bool:
                    info = await kcp.get_cluster("bench")
                    return info.running == KERNELS and all(k.agent != gone for k in info.kernels)

                await _until(declared)
                series["detection"].append(time.monotonic() - killed)
                await job
                series["job"].append(time.monotonic() - killed)
                await _until(whole)
                series["recovery"].append(time.monotonic() - killed)
                # the stack passes the URL in the environment, not argv: restart with the same
                env = {**os.environ, "KCP_REDIS_URL": stack.redis_url, "PYTHONPATH": str(ROOT)}
                stack.procs[1 + int(victim.split("-")[1])] = await asyncio.to_thread(
                    subprocess.Popen, proc.args, env=env
                )

                async def back(name: str = victim) -> bool:
                    return bool(await redis.exists(KEYS.agent_lease(name)))

                await _until(back)
    finally:
        stack.stop()
    return series


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=5)
    args = parser.parse_args()
    runs = {
        "previous (heartbeat 1.0 s, lease 3.0 s)": {"KCP_HEARTBEAT_INTERVAL": "1.0", "KCP_LEASE_TTL": "3.0"},
        "default  (heartbeat 0.5 s, lease 1.5 s)": {"KCP_HEARTBEAT_INTERVAL": "0.5", "KCP_LEASE_TTL": "1.5"},
    }
    medians: dict[str, dict[str, float]] = {}
    for label, env in runs.items():
        series = asyncio.run(measure(args.kills, env))
        medians[label] = {name: statistics.median(values) for name, values in series.items()}
        print(f"{label}, {args.kills} agent SIGKILLs:")
        for name, values in series.items():
            shown = " ".join(f"{v:.2f}" for v in values)
            print(f"  {name:9s} median {medians[label][name]:.2f} s   ({shown})")
    old, new = medians.values()
    print("ratio previous / default: " + ", ".join(f"{n} {old[n] / new[n]:.2f}x" for n in new))


if __name__ == "__main__":
    main()
