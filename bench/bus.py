"""Bus throughput and latency: kcp's InterKernelBus against raw Redis Streams, in the same run.

    .venv/bin/python bench/bus.py [--n 50000] [--repeat 3] [--latency-seconds 3]

On one private redis-server (no persistence), each figure for (a) raw redis-py on the same
streams and fields (pipelined XADD; XREADGROUP COUNT 1000 BLOCK + one XACK per batch, no
decoding) and (b) kcp (`publish_many` in batches of 1000, or overlapping `publish()` calls;
subscribers are `InterKernelBus` kernels with an async handler):

1. publish throughput (messages/s appended, nobody reading);
2. end-to-end delivered throughput with 1 and with 4 subscriber groups, each subscriber its
   own OS process: messages/s from the first publish until the group handled the last one;
3. publish-to-handler latency at 1,000 messages/s (one `publish()` per millisecond, the
   subscriber process computes handler time - message timestamp), p50 and p99.

Prints the median over `--repeat` runs (latency: the medians of the runs' p50 and p99, each run
`--latency-seconds` long).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import statistics
import tempfile
import time
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.typing import EncodableT, FieldT

from controlplane import BusMessage, BusTopic, InterKernelBus, Settings
from controlplane.ops.redis_server import start_redis_server

PAYLOAD = {"kernel": "worker-1", "cpu": 0.42, "memory": 0.31, "queue_depth": 3}
BATCH = 1000


def _fields(i: int) -> dict[FieldT, EncodableT]:  # what XADD takes
    return {"seq": i, "from": "bench", "topic": "metrics", "ts": repr(time.time()), "payload": '{"x":1}'}


# ------------------------------------------------------------------ subscriber processes
async def _raw_sub(url: str, stream: str, group: str, n: int, ready: Event, out: Any, latency: bool) -> None:
    r = aioredis.Redis.from_url(url, decode_responses=True)
    await r.xgroup_create(stream, group, "$", mkstream=True)
    ready.set()
    got, samples = 0, []
    while got < n:
        for _, entries in await r.xreadgroup(group, group, {stream: ">"}, count=BATCH, block=1000) or []:
            now = time.time()
            if latency:
                samples += [now - float(f["ts"]) for _, f in entries]
            got += len(entries)
            await r.xack(stream, group, *[e[0] for e in entries])
    out.put((time.time(), samples))
    await r.aclose()


async def _kcp_sub(url: str, prefix: str, kernel: str, n: int, ready: Event, out: Any, latency: bool) -> None:
    done = asyncio.Event()
    samples: list[float] = []
    got = 0

    async def handler(message: BusMessage) -> None:
        nonlocal got
        if latency:
            samples.append(time.time() - message.timestamp)
        got += 1
        if got == n:
            done.set()

    async with InterKernelBus(Settings(redis_url=url, prefix=prefix)) as bus:
        bus.subscribe(kernel, BusTopic.METRICS, handler)
        ready.set()
        await done.wait()
        out.put((time.time(), samples))


def _subscriber(
    kind: str, url: str, key: str, name: str, n: int, ready: Event, out: Any, latency: bool
) -> None:
    sub = _raw_sub if kind == "raw" else _kcp_sub
    asyncio.run(sub(url, key, name, n, ready, out, latency))


def _start_subs(
    kind: str, url: str, key: str, groups: int, n: int, latency: bool = False
) -> tuple[list[Any], Any]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = []
    for g in range(groups):
        ready = ctx.Event()
        p = ctx.Process(
            target=_subscriber, args=(kind, url, key, f"g{g}", n, ready, out, latency), daemon=True
        )
        p.start()
        procs.append((p, ready))
    for _, ready in procs:
        if not ready.wait(30):
            raise RuntimeError("subscriber did not start")
    return [p for p, _ in procs], out


def _collect(procs: list[Any], out: Any) -> list[tuple[float, list[float]]]:
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(10)
    return results


# ------------------------------------------------------------------ publishers
async def raw_publish(r: aioredis.Redis, stream: str, n: int) -> float:
    t0 = time.perf_counter()
    for start in range(0, n, BATCH):
        pipe = r.pipeline(transaction=False)
        for i in range(start, min(n, start + BATCH)):
            pipe.xadd(stream, _fields(i))
        await pipe.execute()
    return time.perf_counter() - t0


async def kcp_publish(bus: InterKernelBus, n: int, *, single: bool = False) -> float:
    t0 = time.perf_counter()
    for _ in range(0, n, BATCH):
        batch = [
            BusMessage(from_kernel="bench", topic=BusTopic.METRICS, payload=PAYLOAD) for _ in range(BATCH)
        ]
        if single:  # overlapping publish() calls: the bus batches them itself
            await asyncio.gather(*(bus.publish(m) for m in batch))
        else:
            await bus.publish_many(batch)
    return time.perf_counter() - t0


async def delivered(kind: str, url: str, run: int, groups: int, n: int) -> float:
    """Messages/s per group, end to end (median over the groups)."""
    key = f"bench:raw:{run}:{groups}" if kind == "raw" else f"b{run}x{groups}:"
    procs, out = _start_subs(kind, url, key, groups, n)
    t0 = time.time()
    if kind == "raw":
        r = aioredis.Redis.from_url(url)
        await raw_publish(r, key, n)
        await r.aclose()
    else:
        async with InterKernelBus(Settings(redis_url=url, prefix=key)) as bus:
            await kcp_publish(bus, n)
    ends = [end for end, _ in _collect(procs, out)]
    return statistics.median(n / (end - t0) for end in ends)


async def latency(kind: str, url: str, seconds: float) -> tuple[float, float]:
    n = int(seconds * 1000)
    key = "bench:lat" if kind == "raw" else "blat:"
    procs, out = _start_subs(kind, url, key, 1, n, latency=True)
    r = aioredis.Redis.from_url(url)
    bus = await InterKernelBus(Settings(redis_url=url, prefix="blat:")).start()
    loop = asyncio.get_running_loop()
    next_t = loop.time()
    for i in range(n):
        next_t += 0.001
        await asyncio.sleep(max(0.0, next_t - loop.time()))
        if kind == "raw":
            await r.xadd(key, _fields(i))
        else:
            await bus.publish(BusMessage(from_kernel="bench", topic=BusTopic.METRICS, payload=PAYLOAD))
    [(_, samples)] = _collect(procs, out)
    await bus.aclose()
    await r.aclose()
    q = statistics.quantiles(samples[n // 10 :], n=100)  # the first tenth is warm-up
    return q[49] * 1000, q[98] * 1000


def _row(label: str, raw: float, kcp: float, unit: str, fmt: str = ",.0f") -> str:
    return f"  {label:<44}{format(raw, fmt):>12}{format(kcp, fmt):>12}{kcp / raw:>8.2f}  {unit}"


async def main(n: int, repeat: int, seconds: float) -> None:
    with tempfile.TemporaryDirectory() as tmp, start_redis_server(data_dir=Path(tmp)) as server:
        url = server.url
        r = aioredis.Redis.from_url(url)
        pub: dict[str, list[float]] = {"raw": [], "many": [], "single": []}
        for run in range(repeat):
            pub["raw"].append(n / await raw_publish(r, f"bench:pub:{run}", n))
            async with InterKernelBus(Settings(redis_url=url, prefix=f"p{run}:")) as bus:
                pub["many"].append(n / await kcp_publish(bus, n))
                pub["single"].append(n / await kcp_publish(bus, n // 2, single=True) * 0.5)
            await r.flushall()
        e2e: dict[tuple[str, int], list[float]] = {}
        for groups in (1, 4):
            for run in range(repeat):
                for kind in ("raw", "kcp"):
                    e2e.setdefault((kind, groups), []).append(await delivered(kind, url, run, groups, n))
                await r.flushall()
        runs: dict[str, list[tuple[float, float]]] = {"raw": [], "kcp": []}
        for _ in range(repeat):
            for kind in ("raw", "kcp"):
                runs[kind].append(await latency(kind, url, seconds))
                await r.flushall()
        await r.aclose()
    lat = {kind: [statistics.median(q) for q in zip(*v, strict=True)] for kind, v in runs.items()}
    med = {k: statistics.median(v) for k, v in pub.items()}
    print(
        f"bus: {n:,} messages per run, median of {repeat} runs "
        f"(latency: of {repeat} runs of {seconds:.0f} s at 1,000/s)"
    )
    print(f"  {'':<44}{'raw Redis':>12}{'kcp':>12}{'kcp/raw':>8}")
    print(_row("publish, batches of 1000 (publish_many)", med["raw"], med["many"], "msg/s"))
    print(_row("publish, 1000 overlapping publish() calls", med["raw"], med["single"], "msg/s"))
    for groups in (1, 4):
        raw, kcp = (statistics.median(e2e[(kind, groups)]) for kind in ("raw", "kcp"))
        print(_row(f"delivered end to end, {groups} group(s), per group", raw, kcp, "msg/s"))
    print(_row("latency publish -> handler, p50", lat["raw"][0], lat["kcp"][0], "ms", ".3f"))
    print(_row("latency publish -> handler, p99", lat["raw"][1], lat["kcp"][1], "ms", ".3f"))
    print(
        "  targets (kcp): >= 50,000 msg/s delivered to 1 group; >= 30,000 msg/s per group with 4; p99 <= 2 ms"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--latency-seconds", type=float, default=3.0)
    args = parser.parse_args()
    asyncio.run(main(args.n, args.repeat, args.latency_seconds))
