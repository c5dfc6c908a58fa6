"""Dispatch speed: kcp against a raw Redis floor and arq, in one run, on one private Redis.

    .venv/bin/python bench/dispatch.py [--repeat 3] [--n 1000] [--load 5000]

Four systems, each with 3 workers in separate processes, on the same redis-server:
  floor       hand-written: the client LPUSHes a request naming its reply list, a worker
              BLPOPs it and LPUSHes the reply, the client BLPOPs that (two round trips)
  arq default arq's Worker and Job.result() with their defaults (0.5 s polling)
  arq tuned   both polling every 10 ms
  kcp         `KcpClient.dispatch` of PING to a cluster of 3 kernels (1 agent)
For each: sequential round-trip latency from one client (p50, p99), throughput with 100
dispatches in flight from one client process, and the Redis commands per second an idle
worker costs (from INFO commandstats; for kcp's kernels, the commands MONITOR shows coming
from their own connections over 15 s). Prints the median over `--repeat` runs (arq's slow
default configuration runs once, on fewer requests) and every ratio to the floor.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from multiprocessing.context import SpawnProcess
from typing import Any

import psutil
import redis
import redis.asyncio as aioredis

from controlplane import KcpClient, Settings
from controlplane.ops.stack import LocalStack
from kernel_agent.kernel.worker import IDLE_BLOCK

WORKERS = 3
IN_FLIGHT = 100
ARQ_TUNED_POLL = 0.010
IDLE_SECONDS = 5.0
#: kcp's idle kernels block for IDLE_BLOCK (8 s) at a time: watch them for three of those
KCP_IDLE_SECONDS = 3 * IDLE_BLOCK


# ------------------------------------------------------------------ worker processes
def _floor_worker(url: str) -> None:
    r = redis.Redis.from_url(url)
    while True:
        _, msg = r.blpop(["bench:floor:req"])
        if msg == b"stop":
            return
        r.lpush(msg, b"ok")  # the message is the client's reply list


async def _arq_ping(ctx: dict[str, Any]) -> dict[str, bool]:
    return {"pong": True}


def _arq_worker(url: str, queue: str, poll_delay: float | None) -> None:
    from arq.connections import RedisSettings
    from arq.worker import Worker, func

    options: dict[str, Any] = {} if poll_delay is None else {"poll_delay": poll_delay}
    Worker(
        functions=[func(_arq_ping, name="ping")],
        redis_settings=RedisSettings.from_dsn(url),
        queue_name=queue,
        handle_signals=False,
        **options,
    ).run()


def _start(target: Callable[..., None], *args: object) -> list[SpawnProcess]:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=target, args=args, daemon=True) for _ in range(WORKERS)]
    for p in procs:
        p.start()
    return procs


def _stop(procs: list[SpawnProcess]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.join(5)


# ------------------------------------------------------------------ measurements
Call = Callable[[], Awaitable[object]]


async def sequential(call: Call, n: int) -> tuple[float, float]:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - t0) * 1000)
    q = statistics.quantiles(samples, n=100)
    return q[49], q[98]


async def throughput(call: Call, n: int, in_flight: int = IN_FLIGHT) -> float:
    todo = iter(range(n))

    async def lane() -> None:
        for _ in todo:
            await call()

    t0 = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(in_flight)))
    return n / (time.perf_counter() - t0)


async def command_rate(r: aioredis.Redis, seconds: float = IDLE_SECONDS) -> tuple[float, dict[str, float]]:
    """Commands/s Redis processed over `seconds` (minus our own INFO calls), and per command."""

    async def stats() -> tuple[int, dict[str, int]]:
        info = await r.info("commandstats")
        per = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items()}
        return sum(per.values()), per

    total0, per0 = await stats()
    await asyncio.sleep(seconds)
    total1, per1 = await stats()
    per = {k: (v - per0.get(k, 0)) / seconds for k, v in per1.items() if v != per0.get(k, 0)}
    per["info"] = max(per.get("info", 0.0) - 1 / seconds, 0.0)
    return (total1 - total0 - 1) / seconds, per


async def commands_from(url: str, pids: list[int], seconds: float) -> float:
    """Commands/s that the processes `pids` sent to Redis over `seconds`, per process: every
    command MONITOR shows from one of their TCP connections (commands a script runs inside
    Redis show as `lua` and are not counted)."""
    ports = {c.laddr.port for pid in pids for c in psutil.Process(pid).net_connections(kind="tcp")}
    r = aioredis.Redis.from_url(url, decode_responses=True)
    count = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    async with r.monitor() as monitor:
        while (left := deadline - loop.time()) > 0:
            try:
                command = await asyncio.wait_for(monitor.next_command(), left)
            except TimeoutError:
                break
            if command["client_type"] == "tcp" and int(command["client_port"]) in ports:
                count += 1
    await r.aclose()
    return count / seconds / len(pids)


@dataclass
class Figures:
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    rate: list[float] = field(default_factory=list)
    idle: float | None = None  # Redis commands/s per idle worker
    idle_with_agent: float | None = None  # kcp: the whole stack's, per kernel
    runs: int = 0

    async def measure(self, call: Call, n: int, load: int) -> None:
        p50, p99 = await sequential(call, n)
        self.p50.append(p50)
        self.p99.append(p99)
        self.rate.append(await throughput(call, load))
        self.runs += 1

    def median(self, name: str) -> float:
        values: list[float] = getattr(self, name)
        return statistics.median(values)


# ------------------------------------------------------------------ the systems
class Floor:
    def __init__(self, url: str) -> None:
        self.r = aioredis.Redis.from_url(url, max_connections=IN_FLIGHT + 10)
        self.n = 0

    async def call(self) -> None:
        self.n += 1
        reply = f"bench:floor:rep:{self.n}"
        await self.r.lpush("bench:floor:req", reply)
        await self.r.blpop([reply])


class Arq:
    def __init__(self, queue: str, poll_delay: float) -> None:
        self.queue, self.poll_delay = queue, poll_delay
        self.pool: Any = None

    async def connect(self, url: str) -> None:
        from arq import create_pool
        from arq.connections import RedisSettings

        self.pool = await create_pool(RedisSettings.from_dsn(url), default_queue_name=self.queue)

    async def call(self) -> None:
        job = await self.pool.enqueue_job("ping")
        await job.result(poll_delay=self.poll_delay)


async def run(url: str, repeat: int, n: int, load: int) -> dict[str, Figures]:
    r = aioredis.Redis.from_url(url, decode_responses=True)
    out = {name: Figures() for name in ("floor", "arq default", "arq tuned", "kcp")}

    # idle cost of kcp's kernels: the whole stack with a 3-kernel cluster against it without
    no_cluster, _ = await command_rate(r)
    async with KcpClient(Settings(redis_url=url)) as kcp:
        await kcp.create_cluster("bench", WORKERS)
        for _ in range(200):  # warm up
            await kcp.dispatch("bench", {"type": "PING"})
        await asyncio.sleep(1.0)
        pids = [k.pid for k in (await kcp.get_cluster("bench")).kernels]
        (with_cluster, _), out["kcp"].idle = await asyncio.gather(
            command_rate(r, KCP_IDLE_SECONDS), commands_from(url, pids, KCP_IDLE_SECONDS)
        )
        out["kcp"].idle_with_agent = (with_cluster - no_cluster) / WORKERS
        background = with_cluster

        floor_procs = _start(_floor_worker, url)
        floor = Floor(url)

        async def dispatch() -> None:
            await kcp.dispatch("bench", {"type": "PING"})

        await sequential(floor.call, 100)  # warm up
        out["floor"].idle = 0.0  # a BLPOP without timeout: no command until work comes
        for i in range(repeat):
            print(f"  run {i + 1}/{repeat}: floor, kcp", flush=True)
            await out["floor"].measure(floor.call, n, 2 * load)
            await out["kcp"].measure(dispatch, n, load)
        await r.lpush("bench:floor:req", *(["stop"] * WORKERS))
        _stop(floor_procs)
        await floor.r.aclose()
        await kcp.destroy_cluster("bench")

    for name, poll, runs, seq_n, tput_n in (
        ("arq tuned", ARQ_TUNED_POLL, repeat, 200, 2000),
        ("arq default", None, 1, 20, 500),
    ):
        queue = f"bench:arq:{name.split()[1]}"
        procs = _start(_arq_worker, url, queue, poll)
        await asyncio.sleep(3.0)  # workers up and polling
        total, _ = await command_rate(r)
        out[name].idle = max(total - background, 0.0) / WORKERS
        client = Arq(queue, poll if poll is not None else 0.5)
        await client.connect(url)
        for i in range(runs):
            print(f"  run {i + 1}/{runs}: {name}", flush=True)
            await out[name].measure(client.call, seq_n, tput_n)
        await client.pool.aclose()
        _stop(procs)
    await r.aclose()
    return out


def report(out: dict[str, Figures]) -> None:
    floor = out["floor"]
    f50, f99, frate = floor.median("p50"), floor.median("p99"), floor.median("rate")
    print(
        f"\nDispatch of a no-op, {WORKERS} workers, one private redis-server; medians over runs\n"
        f"  {'':<13}{'runs':>5}{'p50 ms':>9}{'p99 ms':>9}{'x floor':>9}{'x floor':>9}"
        f"{'jobs/s @100':>13}{'x floor':>9}{'idle cmd/s':>12}\n"
        f"  {'':<13}{'':>5}{'':>9}{'':>9}{'(p50)':>9}{'(p99)':>9}{'':>13}{'':>9}{'per worker':>12}"
    )
    for name in ("floor", "arq default", "arq tuned", "kcp"):
        f = out[name]
        p50, p99, rate = f.median("p50"), f.median("p99"), f.median("rate")
        print(
            f"  {name:<13}{f.runs:>5}{p50:9.3f}{p99:9.3f}{p50 / f50:9.2f}{p99 / f99:9.2f}"
            f"{rate:13.0f}{rate / frate:9.2f}{f.idle or 0:12.2f}"
        )
    kcp, tuned = out["kcp"], out["arq tuned"]
    print(
        f"\n  kcp throughput / arq tuned: {kcp.median('rate') / tuned.median('rate'):.1f}x; "
        f"kcp p50 / arq tuned p50: {kcp.median('p50') / tuned.median('p50'):.2f}\n"
        f"  kcp idle cost per kernel: {kcp.idle:.2f} cmd/s sent by the kernel (MONITOR); "
        f"{kcp.idle_with_agent:.2f} cmd/s for the whole stack (agent, control plane, client)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--n", type=int, default=1000, help="sequential requests per run")
    parser.add_argument("--load", type=int, default=5000, help="kcp requests per throughput run")
    args = parser.parse_args()
    with LocalStack(Settings(), agents=1, own_redis=True) as stack:
        report(asyncio.run(run(stack.redis_url, args.repeat, args.n, args.load)))


if __name__ == "__main__":
    main()
