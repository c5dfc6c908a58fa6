"""Routing strategies under load on real kernels, against round robin and a perfect-knowledge oracle.

    .venv/bin/python bench/routing.py [--measure 10] [--scenarios half,stuck,...,sequential,light,scaleup]

A private redis-server, `kcp serve` and 8 agents of one slot each (so each kernel has its own
agent, and stopping one agent stops exactly one kernel's load reports); heartbeats every 1 s.
Kernels run `examples/sim_service.py`: a request sleeps for its service time (exponential,
mean 50 ms at normal speed), so two cores do not limit the result. 4 router processes send
open-loop Poisson arrivals (the same arrival times and service times for every strategy of a
scenario) at a share of the scenario's capacity. Scenarios:

- half:      8 kernels, 2 of them at half speed (capacity 7 kernels), loads 0.5 / 0.7 / 0.9
- stuck:     one kernel takes 2 s per request for 30 s (capacity 7 kernels), load 0.7
- failing:   one kernel fails 50 % of its requests at once (capacity 7 kernels), load 0.7
- heartbeat: one kernel's agent is stopped (SIGSTOP): its load report freezes while the
             kernel keeps serving (capacity 8 kernels), load 0.7

Light load, on a cluster of 5 equal kernels (after the others, on the same agents):

- sequential: one client sends one request after another (nothing ever queues)
- light:      4 router processes at 0.2 load
- scaleup:    one sequential client while the cluster scales from 3 to 5 kernels, 3 s into the
              measurement; reports how many dispatches each new kernel waited for its first job
              after it turned running

These compare the routing strategies alone: the cluster's `work_stealing` is off, so a job
runs where the router sent it. Then `half` at 0.9 and `stuck` run again with work stealing on
(the default: an idle kernel takes over the oldest job queued on a busy sibling), to show
what the whole system does.

Latency is from the scheduled arrival to the result (retries included); a request that ends in
an error counts in the error rate and not in the latency quantiles. The oracle is a
discrete-event simulation of the same arrivals on the same kernels that sends each request to
the kernel that will finish it first, knowing every service time and every fault in advance
(it never uses the failing kernel): a reference lower bound, with no dispatch overhead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import redis

from controlplane import ClusterConfig, KcpClient, OrchestrationConfig, OrchestrationEngine, Settings
from controlplane.errors import DispatchError
from controlplane.ops.redis_server import start_redis_server
from controlplane.protocol.keys import Keys
from kernel_agent.kernel.siblings import SIBLINGS_TTL

ROOT = Path(__file__).resolve().parents[1]
KERNELS = 8
ROUTERS = 4
MEAN_MS = 50.0
TIMEOUT_MS = 2000
WARMUP_S = 3.0
CLUSTER = "routing"
LIGHT = "light"  # the light-load scenarios' cluster
LIGHT_KERNELS = 5
SCALE_FROM = 3
SCALE_AT_S = 3.0  # into the measurement
ENV = {"KCP_HEARTBEAT_INTERVAL": "1", "KCP_LEASE_TTL": "120"}  # a stopped agent stays "alive"

RR, RANDOM, LL, ADAPTIVE = "round_robin", "random", "least_loaded", "adaptive"
ALL = ("half", "stuck", "failing", "heartbeat", "stealing", "sequential", "light", "scaleup")
ADAPTIVE_2 = "adaptive(d=2)"


@dataclass
class Scenario:
    name: str
    load: float
    measure_s: float
    speeds: dict[str, float] = field(default_factory=dict)
    fail: dict[str, float] = field(default_factory=dict)
    stuck: str = ""  # kernel stuck at 2 s per request for 30 s after the warm-up
    frozen: str = ""  # kernel whose agent is stopped after the warm-up
    strategies: tuple[str, ...] = (RR, RANDOM, LL, ADAPTIVE)
    stealing: bool = False  # the cluster's work_stealing during the runs
    seed: int = 0  # of the arrival and service times
    cluster: str = CLUSTER
    kernels: int = KERNELS
    sequential: bool = False  # one client, one request after another (else open-loop arrivals)
    scale_to: int = 0  # scale from `kernels` to this many, SCALE_AT_S into the measurement

    overhead_ms: float = 0.0  # per-job cost of the real system beyond the sleep (calibrated)

    def service_s(self, kernel: str, ms: float) -> float:
        """What a request of base `ms` really occupies `kernel` for, seconds."""
        return (ms / self.speeds.get(kernel, 1.0) + self.overhead_ms) / 1000

    @property
    def capacity(self) -> float:
        """Requests per second the kernels can serve, not counting a stuck or failing one."""
        names = [f"worker-{i}" for i in range(self.kernels)]
        healthy = [k for k in names if k != self.stuck and k not in self.fail]
        return sum(1 / self.service_s(k, MEAN_MS) for k in healthy)


def scenarios(measure: float, names: Collection[str]) -> list[Scenario]:
    half = {"worker-2": 0.5, "worker-5": 0.5}
    out: list[Scenario] = []
    if "half" in names:
        for load in (0.5, 0.7, 0.9):
            extra = (ADAPTIVE_2,) if load == 0.9 else ()
            out.append(
                Scenario(
                    "half",
                    load,
                    2 * measure if load == 0.9 else measure,
                    speeds=half,
                    strategies=(RR, RANDOM, LL, ADAPTIVE, *extra),
                )
            )
    few = (RR, LL, ADAPTIVE)
    if "stuck" in names:
        out.append(Scenario("stuck", 0.7, 32.0, stuck="worker-3", strategies=few))
    if "failing" in names:
        out.append(Scenario("failing", 0.7, measure, fail={"worker-4": 0.5}, strategies=few))
    if "heartbeat" in names:
        out.append(Scenario("heartbeat", 0.7, measure, frozen="worker-1", strategies=few))
    if "stealing" in names:
        both = (RR, ADAPTIVE)
        out.append(Scenario("half", 0.9, 2 * measure, speeds=half, strategies=both, stealing=True))
        out.append(Scenario("stuck", 0.7, 32.0, stuck="worker-3", strategies=both, stealing=True))
    every = (RR, RANDOM, LL, ADAPTIVE)
    if "sequential" in names:
        out.append(
            Scenario(
                "sequential",
                0.0,
                measure,
                strategies=every,
                cluster=LIGHT,
                kernels=LIGHT_KERNELS,
                sequential=True,
            )
        )
    if "light" in names:
        out.append(Scenario("light", 0.2, measure, strategies=every, cluster=LIGHT, kernels=LIGHT_KERNELS))
    if "scaleup" in names:
        out.append(
            Scenario(
                "scaleup",
                0.0,
                measure,
                strategies=every,
                cluster=LIGHT,
                kernels=SCALE_FROM,
                sequential=True,
                scale_to=LIGHT_KERNELS,
            )
        )
    return out


def shown(sc: Scenario) -> int:
    """Kernels in the scenario's tables."""
    return max(sc.kernels, sc.scale_to)


# ------------------------------------------------------------------ arrivals and the oracle


def schedule(sc: Scenario, seed: int) -> list[tuple[float, float]]:
    """(arrival offset s, base service ms) of every request, warm-up included."""
    rng = random.Random(seed)
    t, end = 0.0, WARMUP_S + sc.measure_s
    out: list[tuple[float, float]] = []
    if sc.sequential:  # service times only; a request starts when the previous one is done
        return [(0.0, rng.expovariate(1 / MEAN_MS)) for _ in range(int(end * 1000 / MEAN_MS))]
    rate = sc.load * sc.capacity
    while True:
        t += rng.expovariate(rate)
        if t >= end:
            return out
        out.append((t, rng.expovariate(1 / MEAN_MS)))


def oracle(sc: Scenario, arrivals: list[tuple[float, float]]) -> list[float]:
    """Latencies (ms) of the measured requests when each goes where it finishes first."""
    if sc.sequential:  # nothing queues: every request's own service time on an idle kernel
        return [sc.service_s("worker-0", ms) * 1000 for _, ms in arrivals]
    free = {f"worker-{i}": 0.0 for i in range(sc.kernels) if f"worker-{i}" not in sc.fail}
    stuck_from, stuck_to = WARMUP_S, WARMUP_S + 30.0
    out = []
    for t, ms in arrivals:
        best, best_end = "", math.inf
        for k, f in free.items():
            start = max(f, t)
            stuck = k == sc.stuck and stuck_from <= start < stuck_to
            service = 2.0 + sc.overhead_ms / 1000 if stuck else sc.service_s(k, ms)
            if start + service < best_end:
                best, best_end = k, start + service
        free[best] = best_end
        if t >= WARMUP_S:
            out.append((best_end - t) * 1000)
    return out


# ------------------------------------------------------------------ routers (one process each)


def router_main(conn: Connection, url: str) -> None:
    asyncio.run(_router(conn, url))


async def _router(conn: Connection, url: str) -> None:
    async with KcpClient(Settings(redis_url=url)) as kcp:
        await kcp.dispatch(CLUSTER, {"type": "PING"})
        conn.send("ready")
        while (msg := await asyncio.to_thread(conn.recv)) is not None:
            config, arrivals, t0, cluster, sequential = msg
            engine = OrchestrationEngine(OrchestrationConfig.model_validate(config))
            run = _sequential if sequential else _run
            conn.send(await run(kcp, engine, cluster, arrivals, t0))


Row = tuple[float, float, str, str]  # (offset s, latency ms, kernel or '', error type or '')


async def _one(
    kcp: KcpClient, engine: OrchestrationEngine, cluster: str, offset: float, ms: float, t0: float
) -> Row:
    try:
        res = await kcp.dispatch(cluster, {"type": "SIM", "requires": ["sim"], "ms": ms}, engine=engine)
        return offset, (time.time() - t0 - offset) * 1000, res.kernel, ""
    except DispatchError as exc:
        return offset, (time.time() - t0 - offset) * 1000, getattr(exc, "kernel", ""), type(exc).__name__


async def _run(
    kcp: KcpClient, engine: OrchestrationEngine, cluster: str, arrivals: list[tuple[float, float]], t0: float
) -> list[Row]:
    """Open loop: each request at its arrival offset."""
    tasks = []
    for offset, ms in arrivals:
        delay = t0 + offset - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(_one(kcp, engine, cluster, offset, ms, t0)))
    return list(await asyncio.gather(*tasks))


async def _sequential(
    kcp: KcpClient, engine: OrchestrationEngine, cluster: str, arrivals: list[tuple[float, float]], t0: float
) -> list[Row]:
    """Closed loop: one request after another from t0 (offset: when it was sent)."""
    await asyncio.sleep(max(t0 - time.time(), 0))
    return [await _one(kcp, engine, cluster, time.time() - t0, ms, t0) for _, ms in arrivals]


# ------------------------------------------------------------------ the stack


class Bench:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.profile = tmp / "profile.json"
        self.write_profile({})
        self.server = start_redis_server(data_dir=tmp)
        self.url = self.server.url
        self.r = redis.Redis.from_url(self.url, decode_responses=True)
        env = {
            **os.environ,
            **ENV,
            "KCP_REDIS_URL": self.url,
            "KCP_SIM_PROFILE": str(self.profile),
            "PYTHONPATH": str(ROOT),
        }
        base = [sys.executable, "-m", "controlplane.ops.cli", "--log-level", "WARNING"]
        self.procs = [subprocess.Popen([*base, "serve"], env=env)]
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        for i in range(KERNELS):
            cmd = [
                *base,
                "agent",
                "--name",
                f"agent-{i}",
                "--slots",
                "1",
                "--handlers",
                "examples.sim_service",
            ]
            self.agents[f"agent-{i}"] = subprocess.Popen(cmd, env=env)
        self.procs += self.agents.values()
        self.routers: list[tuple[mp.process.BaseProcess, Connection]] = []

    def write_profile(self, profile: dict[str, Any]) -> None:
        tmp = self.profile.with_suffix(".tmp")
        tmp.write_text(json.dumps(profile))
        tmp.replace(self.profile)

    async def create_cluster(self, name: str = CLUSTER, count: int = KERNELS) -> dict[str, str]:
        async with KcpClient(Settings(redis_url=self.url)) as kcp:
            info = await kcp.create_cluster(name, count, {"max_kernels": KERNELS}, wait=60)
            if info.running != count:
                raise SystemExit(f"only {info.running} of {count} kernels came up")
            return {k.name: k.agent for k in info.kernels}

    async def destroy_cluster(self, name: str) -> None:
        async with KcpClient(Settings(redis_url=self.url)) as kcp:
            await kcp.destroy_cluster(name, wait=60)

    async def scale(self, name: str, count: int) -> None:
        async with KcpClient(Settings(redis_url=self.url)) as kcp:
            await kcp.scale_cluster(name, count, wait=60)

    async def calibrate(self) -> float:
        """Per-job overhead, ms, under full load: every kernel kept busy with MEAN_MS requests
        (two outstanding each) for 4 s; the time per job beyond MEAN_MS."""
        async with KcpClient(Settings(redis_url=self.url)) as kcp:
            done, began = 0, time.monotonic()

            async def loop(kernel: str) -> None:
                nonlocal done
                while time.monotonic() - began < 4.0:
                    req = {"type": "SIM", "requires": ["sim"], "ms": MEAN_MS}
                    await kcp.dispatch(CLUSTER, req, kernel=kernel)
                    done += 1

            await asyncio.gather(*(loop(f"worker-{i}") for i in range(KERNELS) for _ in range(2)))
            per_job = (time.monotonic() - began) * 1000 * KERNELS / done
            return max(per_job - MEAN_MS, 0.0)

    def start_routers(self) -> None:
        ctx = mp.get_context("spawn")
        for _ in range(ROUTERS):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=router_main, args=(child, self.url), daemon=True)
            proc.start()
            self.routers.append((proc, parent))
        for _, conn in self.routers:
            if conn.recv() != "ready":
                raise SystemExit("a router failed to start")

    def run(
        self, sc: Scenario, config: dict[str, Any], arrivals: list[tuple[float, float]], t0: float
    ) -> list[Any]:
        routers = self.routers[:1] if sc.sequential else self.routers
        shares: list[list[tuple[float, float]]] = [[] for _ in routers]
        for i, a in enumerate(arrivals):
            shares[i % len(routers)].append(a)  # a Poisson stream split round robin
        for (_, conn), share in zip(routers, shares, strict=True):
            conn.send((config, share, t0, sc.cluster, sc.sequential))
        return [row for _, conn in routers for row in conn.recv()]

    def drain(self, sc: Scenario, keys: Keys, timeout: float = 30.0) -> None:
        """Wait until no kernel holds a job, so one run's backlog does not slow the next."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not any(self.r.zcard(keys.inflight(sc.cluster, f"worker-{i}")) for i in range(shown(sc))):
                return
            time.sleep(0.2)
        print(f"  (jobs still in flight after {timeout:.0f}s; the next run starts anyway)", flush=True)

    def set_stealing(self, sc: Scenario, keys: Keys) -> None:
        """Turn the cluster's work stealing on or off; kernels re-read it within SIBLINGS_TTL
        of their next claim, which the warm-up covers."""
        record = self.r.hget(keys.cluster(sc.cluster), "config")
        config = ClusterConfig.model_validate_json(str(record)).model_copy(
            update={"work_stealing": sc.stealing}
        )
        self.r.hset(keys.cluster(sc.cluster), "config", config.model_dump_json())
        self.r.incr(keys.cluster_version(sc.cluster))  # the kernels re-read their siblings by it

    def reset_routing_state(self, sc: Scenario, keys: Keys) -> None:
        for i in range(shown(sc)):
            self.r.delete(keys.kernel_health(sc.cluster, f"worker-{i}"))
        self.r.delete(keys.cluster_ejected(sc.cluster), keys.cluster_rr(sc.cluster))

    def started_at(self, sc: Scenario, keys: Keys) -> dict[str, float]:
        """Each kernel's last start (unix s), from its record."""
        out = {}
        for i in range(shown(sc)):
            started = self.r.hget(keys.kernel(sc.cluster, f"worker-{i}"), "started_at")
            if started:
                out[f"worker-{i}"] = float(str(started))
        return out

    def stop(self) -> None:
        for _, conn in self.routers:
            conn.send(None)
        for proc, _ in self.routers:
            proc.join(10)
        for p in self.agents.values():
            p.send_signal(signal.SIGCONT)
        for p in reversed(self.procs):
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        self.r.close()
        self.server.stop()


# ------------------------------------------------------------------ one scenario


def config_of(strategy: str) -> dict[str, Any]:
    base = {"timeout_ms": TIMEOUT_MS, "retry_count": 2, "max_concurrent": 10_000}
    if strategy.startswith("adaptive(d="):  # e.g. adaptive(d=2): a different number of choices
        return {**base, "strategy": ADAPTIVE, "adaptive_choices": int(strategy[11:-1])}
    return {**base, "strategy": strategy}


def q(values: list[float], p: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    return s[min(int(p * len(s)), len(s) - 1)]


def run_scenario(bench: Bench, sc: Scenario, kernel_agent: dict[str, str]) -> list[dict[str, Any]]:
    keys = Keys()
    arrivals = schedule(sc, sc.seed)
    best = oracle(sc, arrivals)
    rows = [
        {
            "strategy": "oracle",
            "p50": q(best, 0.5),
            "p99": q(best, 0.99),
            "p999": q(best, 0.999),
            "errors": 0.0,
            "share": {},
        }
    ]
    bench.set_stealing(sc, keys)
    time.sleep(SIBLINGS_TTL)
    for strategy in sc.strategies:
        if sc.scale_to:
            asyncio.run(bench.scale(sc.cluster, sc.kernels))
        bench.reset_routing_state(sc, keys)
        t0 = time.time() + 1.0
        profile: dict[str, Any] = {k: {"speed": v} for k, v in sc.speeds.items()}
        profile |= {k: {"fail": p} for k, p in sc.fail.items()}
        if sc.stuck:
            profile[sc.stuck] = {
                "stuck_ms": 2000,
                "stuck_from": t0 + WARMUP_S,
                "stuck_until": t0 + WARMUP_S + 30,
            }
        bench.write_profile(profile)
        stopper = None
        if sc.frozen:
            agent = bench.agents[kernel_agent[sc.frozen]]
            stopper = asyncio_timer(t0 + WARMUP_S, lambda a=agent: a.send_signal(signal.SIGSTOP))
        scaler = None
        if sc.scale_to:
            scale_up = lambda: asyncio.run(bench.scale(sc.cluster, sc.scale_to))  # noqa: E731
            scaler = asyncio_timer(t0 + WARMUP_S + SCALE_AT_S, scale_up)
        started = time.monotonic()
        results = bench.run(sc, config_of(strategy), arrivals, t0)
        first = {}
        if scaler is not None:
            scaler.join()
            first = first_jobs(results, t0, t0 + WARMUP_S + SCALE_AT_S, bench.started_at(sc, keys))
        if stopper is not None:
            stopper.join()
            bench.agents[kernel_agent[sc.frozen]].send_signal(signal.SIGCONT)
        measured = [r for r in results if r[0] >= WARMUP_S]
        ok = [r[1] for r in measured if not r[3]]
        shares: dict[str, int] = {}
        errors: dict[str, int] = {}
        for r in measured:
            if r[2]:
                shares[r[2]] = shares.get(r[2], 0) + 1
            if r[3]:
                errors[r[3]] = errors.get(r[3], 0) + 1
        rows.append(
            {
                "strategy": strategy,
                "p50": q(ok, 0.5),
                "p99": q(ok, 0.99),
                "p999": q(ok, 0.999),
                "errors": 1 - len(ok) / len(measured) if measured else math.nan,
                "share": {k: v / len(measured) for k, v in shares.items()},
                "first": first,
            }
        )
        print(
            f"  {sc.name} load {sc.load}{' +stealing' if sc.stealing else ''} {strategy:<14} "
            f"n={len(measured)} p50={rows[-1]['p50']:.0f} "
            f"p99={rows[-1]['p99']:.0f} err={rows[-1]['errors']:.2%} "
            f"{' '.join(f'{k}={v}' for k, v in sorted(errors.items()))} ({time.monotonic() - started:.0f}s)"
            f"{' first jobs after ' + str(first) if first else ''}",
            flush=True,
        )
        bench.drain(sc, keys)
    return rows


def first_jobs(results: list[Row], t0: float, scaled: float, started: dict[str, float]) -> dict[str, Any]:
    """For each kernel that started after `scaled`: how many dispatches, counted from the first
    one sent after it turned running, it took until one ran on it ('-': none did)."""
    rows = sorted(results)
    out: dict[str, Any] = {}
    for name, at in sorted(started.items()):
        if at < scaled:
            continue
        after = [r for r in rows if t0 + r[0] >= at]
        out[name] = next((i for i, r in enumerate(after, 1) if r[2] == name), "-")
    return out


def asyncio_timer(at: float, action: Any) -> Any:
    import threading

    t = threading.Timer(max(at - time.time(), 0), action)
    t.start()
    return t


def table(sc: Scenario, rows: list[dict[str, Any]]) -> str:
    rr = next(r for r in rows if r["strategy"] == RR)
    orc = rows[0]
    stealing = "work stealing on" if sc.stealing else "routing alone"
    n = shown(sc)
    if sc.sequential:
        rate = "1 sequential client" + (f", {sc.kernels} -> {sc.scale_to} kernels" if sc.scale_to else "")
        load = f"{sc.name}, {n} kernels"
    else:
        rate = f"{sc.load * sc.capacity:.0f} req/s"
        load = f"{sc.name}, load {sc.load}" + (f", {n} kernels" if n != KERNELS else "")
    extra = " new kernels: dispatches to their first job |" if sc.scale_to else ""
    head = (
        f"{load}, {stealing} ({rate}, {sc.measure_s:.0f} s measured, seed {sc.seed})\n"
        "| strategy | p50 ms | p99 ms | p99.9 ms | errors | p50/RR | p99/RR | p99/oracle "
        f"| share per kernel, % (worker-0..{n - 1}) |{extra}\n"
        f"|---|---:|---:|---:|---:|---:|---:|---:|---|{'---|' if extra else ''}\n"
    )
    lines = []
    for r in rows:
        share = (
            " ".join(f"{100 * r['share'].get(f'worker-{i}', 0):.0f}" for i in range(n)) if r["share"] else "-"
        )
        firsts = " ".join(f"{k}: {v}" for k, v in r.get("first", {}).items()) or "-"
        lines.append(
            f"| {r['strategy']} | {r['p50']:.0f} | {r['p99']:.0f} | {r['p999']:.0f} | {r['errors']:.2%} | "
            f"{r['p50'] / rr['p50']:.2f} | {r['p99'] / rr['p99']:.2f} | "
            f"{r['p99'] / orc['p99']:.2f} | {share} |{f' {firsts} |' if extra else ''}"
        )
    return head + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--measure", type=float, default=10.0, help="measured seconds per run (half at 0.9: twice)"
    )
    parser.add_argument("--scenarios", default=",".join(ALL))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--strategies", help="comma-separated subset (default: each scenario's set)")
    parser.add_argument("--loads", help="comma-separated subset of the half scenario's loads")
    args = parser.parse_args()
    chosen = scenarios(args.measure, args.scenarios.split(","))
    if args.loads:
        chosen = [sc for sc in chosen if sc.name != "half" or str(sc.load) in args.loads.split(",")]
    if args.strategies:
        wanted = args.strategies.split(",")
        for sc in chosen:
            sc.strategies = tuple(dict.fromkeys([RR, *wanted]))
    began = time.monotonic()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the stack on `timeout` too
    with tempfile.TemporaryDirectory(prefix="kcp-routing-") as tmp:
        bench = Bench(Path(tmp))
        try:
            kernel_agent = asyncio.run(bench.create_cluster())
            overhead = asyncio.run(bench.calibrate())
            for sc in chosen:
                sc.overhead_ms = overhead
            bench.start_routers()
            print(
                f"stack up in {time.monotonic() - began:.0f}s: {KERNELS} kernels, {ROUTERS} routers; "
                f"per-job overhead {overhead:.2f} ms on top of the {MEAN_MS:.0f} ms mean service time",
                flush=True,
            )
            # one arrival sequence per scenario and load, the same whatever subset runs
            every = list(dict.fromkeys((sc.name, sc.load) for sc in scenarios(args.measure, ALL)))
            out = []
            for sc in chosen:
                if sc.cluster == LIGHT and kernel_agent:  # the light cluster takes the agents over
                    asyncio.run(bench.destroy_cluster(CLUSTER))
                    kernel_agent = {}
                    asyncio.run(bench.create_cluster(LIGHT, LIGHT_KERNELS))
                sc.seed = args.seed + every.index((sc.name, sc.load))
                out.append(table(sc, run_scenario(bench, sc, kernel_agent)))
        finally:
            bench.stop()
    print()
    print("\n".join(out))
    print(f"total {time.monotonic() - began:.0f}s")


if __name__ == "__main__":
    main()
