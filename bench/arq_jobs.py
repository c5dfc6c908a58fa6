"""arq jobs: the same WorkerSettings (examples/arq_worker.py) under arq's Worker and on kcp.

    .venv/bin/python bench/arq_jobs.py [--n 300]

One private redis-server. For each system, `enqueue_job("add", 1, 2)` then `job.result()`,
one job at a time (p50, p99 of the round trip, ms):
  arq default  arq's Worker and Job.result() with their defaults (0.5 s polling)
  arq tuned    both polling every 10 ms (the baseline: the ratios are to it)
  kcp          `KcpClient.enqueue_job` on a cluster of 2 kernels of one agent started with
               --arq-settings; the result is pushed to the client, nothing polls
  kcp dispatch the same call through `KcpClient.dispatch` (the caller waits; no result kept)
and, for deferred jobs (`_defer_by=0.2`), how late each started after its time (ms): arq tuned
against kcp (the enqueuing client routes it when due).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, TypeVar

from controlplane import KcpClient, Settings
from controlplane.ops.stack import LocalStack

ROOT = str(Path(__file__).resolve().parents[1])
SETTINGS = "examples.arq_worker.WorkerSettings"
TUNED_POLL = 0.010
DEFER_S = 0.2
T = TypeVar("T")


def present(value: T | None, what: str) -> T:
    """`value`, or a RuntimeError saying what was missing (arq and kcp answer None for a job they
    did not enqueue, its id being taken, and for a result they do not hold)."""
    if value is None:
        raise RuntimeError(f"{what} is None")
    return value


def dumps(obj: object) -> bytes:
    return json.dumps(obj).encode()


def _arq_worker(url: str, queue: str, poll_delay: float | None) -> None:
    sys.path.insert(0, ROOT)
    from arq.connections import RedisSettings
    from arq.worker import Worker, get_kwargs

    from examples.arq_worker import WorkerSettings

    options: dict[str, Any] = {} if poll_delay is None else {"poll_delay": poll_delay}
    Worker(  # the example's class is no `WorkerSettingsBase` (no cron_jobs): its attributes, as a dict
        **{**get_kwargs(dict(vars(WorkerSettings))), **options},
        redis_settings=RedisSettings.from_dsn(url),
        queue_name=queue,
        handle_signals=False,
        job_serializer=dumps,
        job_deserializer=json.loads,
    ).run()


def quantiles(samples: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(samples, n=100)
    return q[49], q[98]


async def arq_figures(url: str, poll: float | None, n: int, deferred: int) -> tuple[list[float], list[float]]:
    from arq import create_pool
    from arq.connections import RedisSettings

    queue = f"bench:arq:{poll}"
    proc = multiprocessing.get_context("spawn").Process(
        target=_arq_worker, args=(url, queue, poll), daemon=True
    )
    proc.start()
    pool = await create_pool(
        RedisSettings.from_dsn(url),
        default_queue_name=queue,
        job_serializer=dumps,
        job_deserializer=json.loads,
    )
    delay = poll if poll is not None else 0.5
    try:
        warm = present(await pool.enqueue_job("add", 0, 0), "arq's enqueue_job (warm-up)")
        await warm.result(timeout=30, poll_delay=delay)  # worker up
        trips = []
        for _ in range(n):
            t0 = time.perf_counter()
            job = present(await pool.enqueue_job("add", 1, 2), "arq's enqueue_job")
            assert await job.result(poll_delay=delay) == 3
            trips.append((time.perf_counter() - t0) * 1000)
        late = []
        for _ in range(deferred):
            due = time.time() + DEFER_S
            job = present(
                await pool.enqueue_job("add", 1, 2, _defer_by=DEFER_S), "arq's enqueue_job (deferred)"
            )
            await job.result(poll_delay=delay)
            info = present(await job.result_info(), "arq's result_info (deferred)")
            late.append((info.start_time.timestamp() - due) * 1000)
        return trips, late
    finally:
        await pool.aclose()
        proc.terminate()
        proc.join(5)


async def kcp_figures(url: str, n: int, deferred: int) -> tuple[list[float], list[float], list[float]]:
    async with KcpClient(Settings(redis_url=url)) as kcp:
        await kcp.create_cluster("arqbench", 2, config={"capabilities": ["arq"]}, wait=60)
        for _ in range(50):  # warm up
            job = present(await kcp.enqueue_job("arqbench", "add", 0, 0), "kcp's enqueue_job (warm-up)")
            await job.result(timeout=30)
        trips = []
        for _ in range(n):
            t0 = time.perf_counter()
            job = present(await kcp.enqueue_job("arqbench", "add", 1, 2), "kcp's enqueue_job")
            assert await job.result() == 3
            trips.append((time.perf_counter() - t0) * 1000)
        calls = []  # the same call as a dispatch: the caller waits, nothing is kept
        for _ in range(n):
            t0 = time.perf_counter()
            got = await kcp.dispatch("arqbench", {"type": "ADD", "args": [1, 2], "kwargs": {}})
            assert got.result == {"result": 3}
            calls.append((time.perf_counter() - t0) * 1000)
        late = []
        for _ in range(deferred):
            due = time.time() + DEFER_S
            job = present(
                await kcp.enqueue_job("arqbench", "add", 1, 2, _defer_by=DEFER_S),
                "kcp's enqueue_job (deferred)",
            )
            await job.result()
            info = present(await job.result_info(), "kcp's result_info (deferred)")
            late.append((info.start_time.timestamp() - due) * 1000)
        await kcp.destroy_cluster("arqbench")
        return trips, late, calls


async def run(url: str, n: int) -> None:
    deferred = 20
    trips, late, calls = await kcp_figures(url, n, deferred)
    rows = {
        "arq default": await arq_figures(url, None, max(n // 15, 10), 5),
        "arq tuned": await arq_figures(url, TUNED_POLL, n, deferred),
        "kcp": (trips, late),
    }
    base50, _ = quantiles(rows["arq tuned"][0])
    base_late = statistics.median(rows["arq tuned"][1])
    load = os.getloadavg()[0]
    print(f"\nenqueue_job + result() of `add`, one at a time; one private redis-server (load {load:.2f})")
    print(
        f"  {'':<13}{'jobs':>6}{'p50 ms':>9}{'p99 ms':>9}{'x tuned':>9}{'deferred late ms':>18}{'x tuned':>9}"
    )
    for name, (trips, late) in rows.items():
        p50, p99 = quantiles(trips)
        lateness = statistics.median(late)
        print(
            f"  {name:<13}{len(trips):>6}{p50:9.2f}{p99:9.2f}{p50 / base50:9.2f}"
            f"{lateness:18.1f}{lateness / base_late if base_late else float('nan'):9.2f}"
        )
    p50, p99 = quantiles(calls)
    row = f"  {'kcp dispatch':<13}{len(calls):>6}{p50:9.2f}{p99:9.2f}{p50 / base50:9.2f}"
    print(f"{row}   (the same call, waited for)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=300, help="sequential jobs per system")
    args = parser.parse_args()
    with LocalStack(Settings(), agents=0, own_redis=True) as stack:
        cli = (sys.executable, "-m", "controlplane.ops.cli", "--redis-url", stack.redis_url)
        agent = subprocess.Popen(
            [
                *cli,
                "--log-level",
                "WARNING",
                "agent",
                "--name",
                "arq-bench",
                "--slots",
                "2",
                "--arq-settings",
                SETTINGS,
            ],
            env={**os.environ, "PYTHONPATH": ROOT},
        )
        try:
            asyncio.run(run(stack.redis_url, args.n))
        finally:
            agent.terminate()
            agent.wait(30)


if __name__ == "__main__":
    main()
