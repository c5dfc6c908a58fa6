"""What observability costs: finish.lua with histogram buckets, and one `/metrics` scrape.

    .venv/bin/python bench/observability.py [--jobs 2000] [--repeat 5] [--clusters 10] [--kernels 4]

(a) finish.lua, pipelined (so the server-side script time dominates): the original 7 ARGV
against the 10 ARGV kcp kernels now send (queue wait + one latency and one queue bucket).
(b) one scrape (`exporter.exposition`: snapshot + rendering) of `--clusters` clusters with
`--kernels` kernels each, against one PING round trip. Both on one private redis-server.
Prints medians over `--repeat` runs and the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import redis.asyncio as aioredis

from controlplane.ops.exporter.core import exposition
from controlplane.ops.redis_server import start_redis_server
from controlplane.protocol import stats
from controlplane.protocol.jobs import REPLY_TTL_MS
from controlplane.protocol.keys import Keys
from controlplane.protocol.models import ClusterConfig
from controlplane.redis.scripts import jobs as scripts
from controlplane.redis.state import State
from controlplane.settings import Settings

KEYS = Keys()


async def finish_run(r: aioredis.Redis, jobs: int, buckets: bool, tag: str) -> float:
    """Microseconds per finish.lua call, pipelined in batches of 500."""
    await r.script_load(scripts.FINISH.source)
    async with r.pipeline(transaction=False) as pipe:
        for i in range(jobs):
            pipe.hset(KEYS.job("c", f"{tag}{i}"), mapping={"kernel": "k", "epoch": "1"})
        await pipe.execute()
    t0 = time.perf_counter()
    for start in range(0, jobs, 500):
        async with r.pipeline(transaction=False) as pipe:
            for i in range(start, min(start + 500, jobs)):
                call = scripts.finish(
                    KEYS,
                    "c",
                    "k",
                    job_id=f"{tag}{i}",
                    epoch="1",
                    reply_key=KEYS.reply("c", "b"),
                    message="{}",
                    success=True,
                    latency_ms=1.234,
                    reply_ttl_ms=REPLY_TTL_MS,
                    queue_ms=1 if buckets else None,
                    buckets=(
                        (stats.bucket_field(stats.LATENCY, 0.0012), stats.bucket_field(stats.QUEUE, 0.0005))
                        if buckets
                        else ()
                    ),
                )
                pipe.execute_command(*call.command)
            await pipe.execute()
    elapsed = time.perf_counter() - t0
    await r.delete(KEYS.reply("c", "b"))
    return elapsed / jobs * 1e6


async def server_us(r: aioredis.Redis) -> float:
    """Redis's own time per EVALSHA since the last CONFIG RESETSTAT, microseconds."""
    info = await r.info("commandstats")
    return float(info["cmdstat_evalsha"]["usec_per_call"])


async def seed(r: aioredis.Redis, clusters: int, kernels: int) -> None:
    state = State(r, KEYS)
    await r.hset(KEYS.agent("a"), mapping={"name": "a", "slots": "1000"})
    await r.sadd(KEYS.agents(), "a")
    await r.set(KEYS.agent_lease("a"), "1")
    for c in range(clusters):
        name = f"c{c}"
        await state.create_cluster(name, ClusterConfig(max_kernels=kernels), kernels)
        for k in range(kernels):
            kernel = f"worker-{k}"
            await r.hset(KEYS.kernel(name, kernel), mapping={"cluster": name, "name": kernel, "agent": "a"})
            await r.sadd(KEYS.cluster_kernels(name), kernel)
            await r.hset(KEYS.load("a", name, kernel), mapping={"cpu": "0.1", "memory": "0.01"})
            fields = {stats.bucket_field(stats.LATENCY, b): 3 for b in stats.BUCKETS}
            # the cluster's dispatch counters are its kernels' summed when read (protocol/stats.py)
            await r.hset(KEYS.kernel_stats(name, kernel), mapping={"dispatches:adaptive": 45, **fields})


async def scrape_run(r: aioredis.Redis, settings: Settings, n: int) -> tuple[float, float, int]:
    """Median ms of a scrape and of a PING; and the size of the exposition."""
    scrapes, pings, size = [], [], 0
    for _ in range(n):
        t0 = time.perf_counter()
        size = len(await exposition(r, settings))
        scrapes.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        await r.ping()
        pings.append((time.perf_counter() - t0) * 1000)
    return statistics.median(scrapes), statistics.median(pings), size


async def main(args: argparse.Namespace) -> None:
    with start_redis_server(data_dir=Path(tempfile.mkdtemp(prefix="kcp-bench-"))) as server:
        r = aioredis.Redis.from_url(server.url, decode_responses=True)
        runs: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
        for i in range(args.repeat):
            for buckets in (False, True):
                await r.config_resetstat()
                client = await finish_run(r, args.jobs, buckets, f"{i}-{buckets}-")
                runs[buckets].append((client, await server_us(r)))
        (pc, ps), (ec, es) = (
            (statistics.median(x[0] for x in runs[b]), statistics.median(x[1] for x in runs[b]))
            for b in (False, True)
        )
        print(f"finish.lua, pipelined, {args.jobs} calls x {args.repeat} runs (median us/call)")
        print("                                 client+net   in Redis")
        print(f"  without buckets (7 ARGV)      {pc:8.2f}   {ps:8.2f}")
        print(f"  with queue wait + 2 buckets   {ec:8.2f}   {es:8.2f}   ratios {ec / pc:.2f} / {es / ps:.2f}")
        await r.flushall()
        await seed(r, args.clusters, args.kernels)
        scrape, ping, size = await scrape_run(r, Settings(redis_url=server.url), args.repeat * 4)
        what = f"{args.clusters} clusters x {args.kernels} kernels ({size} bytes)"
        print(f"scrape of {what}, median of {args.repeat * 4}")
        print(f"  PING round trip               {ping:8.3f} ms")
        print(f"  exposition (read + render)    {scrape:8.3f} ms   ratio {scrape / ping:.0f}x a PING")
        await r.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--clusters", type=int, default=10)
    parser.add_argument("--kernels", type=int, default=4)
    asyncio.run(main(parser.parse_args()))
