"""Sequential dispatch latency: kcp against a hand-written Redis round trip, in the same run.

    .venv/bin/python bench/dispatch.py [--n 1000] [--repeat 3]

(a) floor: a worker process BLPOPs a request list and LPUSHes the reply to a reply list the
client BLPOPs; (b) kcp: `KcpClient.dispatch` of PING to a cluster of 3 kernels. Both on one
private redis-server. Prints the median over repeats of each run's p50/p99 and their ratios.
(The full comparison with arq and throughput under load is issue 5's benchmark.)
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import time

import redis
import redis.asyncio as aioredis

from controlplane import KcpClient, Settings
from controlplane.stack import LocalStack


def _floor_worker(url: str) -> None:
    r = redis.Redis.from_url(url)
    while True:
        _, msg = r.blpop(["bench:req"])  # type: ignore[misc]
        if msg == b"stop":
            return
        r.lpush("bench:rep", msg)


def _quantiles(samples: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(samples, n=100)
    return q[49], q[98]


async def floor_run(url: str, n: int) -> tuple[float, float]:
    r = aioredis.Redis.from_url(url)
    samples = []
    for i in range(n):
        t0 = time.perf_counter()
        await r.lpush("bench:req", i)
        await r.blpop(["bench:rep"])
        samples.append((time.perf_counter() - t0) * 1000)
    await r.aclose()
    return _quantiles(samples)


async def kcp_run(kcp: KcpClient, n: int) -> tuple[float, float]:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        await kcp.dispatch("bench", {"type": "PING"})
        samples.append((time.perf_counter() - t0) * 1000)
    return _quantiles(samples)


async def main(url: str, n: int, repeat: int) -> None:
    floor_runs, kcp_runs = [], []
    worker = multiprocessing.Process(target=_floor_worker, args=(url,), daemon=True)
    worker.start()
    async with KcpClient(Settings(redis_url=url)) as kcp:
        await kcp.create_cluster("bench", 3)
        await kcp_run(kcp, 100)  # warm up
        for _ in range(repeat):
            floor_runs.append(await floor_run(url, n))
            kcp_runs.append(await kcp_run(kcp, n))
        await kcp.destroy_cluster("bench")
    redis.Redis.from_url(url).lpush("bench:req", "stop")
    worker.join(5)
    f50, f99 = (statistics.median(r[i] for r in floor_runs) for i in (0, 1))
    k50, k99 = (statistics.median(r[i] for r in kcp_runs) for i in (0, 1))
    print(f"sequential round trip, {n} requests x {repeat} runs (median of runs), ms")
    print(f"  {'':<22}{'p50':>8}{'p99':>8}")
    print(f"  {'raw Redis floor':<22}{f50:8.3f}{f99:8.3f}")
    print(f"  {'kcp dispatch (PING)':<22}{k50:8.3f}{k99:8.3f}")
    print(f"  {'ratio kcp / floor':<22}{k50 / f50:8.2f}{k99 / f99:8.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with LocalStack(Settings(), agents=1, own_redis=True) as stack:
        asyncio.run(main(stack.redis_url, args.n, args.repeat))
