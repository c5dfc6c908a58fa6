"""Malformed entries written straight into Redis while a real system runs.

`kcp serve` and two agents (with their kernel processes) run against a private Redis while
a client dispatches real work. Meanwhile the fuzzer writes garbage where those processes
read: load records, assignment hashes, job hashes pushed onto the kernels' queues (without a
wake token: the kernels find them at their next claim), kernels' wake keys of the wrong type,
cluster, kernel and agent records, stats hashes, and bus entries (consumed by an `InterKernelBus` in
this process). Afterwards: no process crashed or restarted, every dispatch got its correct
result, every valid bus message arrived, and the garbage jobs were answered or dropped.

The fuzzer runs for ``KCP_FUZZ_SECONDS`` (default 4; `make fuzz` sets more).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from typing import Any

import pytest
from conftest import ProcessStack
from redis.asyncio import Redis as AsyncRedis

from controlplane import BusMessage, BusTopic, InterKernelBus, KcpClient, Settings
from controlplane.protocol.keys import Keys

SECONDS = float(os.environ.get("KCP_FUZZ_SECONDS", "4"))
pytestmark = [pytest.mark.system, pytest.mark.timeout(180 + 2 * SECONDS)]

KEYS = Keys()
AGENTS = ("fz-a", "fz-b")
CLUSTER = "fz"
SINK = KEYS.reply(CLUSTER, "fuzz-sink")


def garbage(rng: random.Random) -> str:
    return rng.choice(
        [
            "",
            "nan",
            "-inf",
            "1e400",
            "-1",
            "\x00\xff",
            "x" * rng.choice([10, 1000, 200_000]),
            "[" * 5000,
            '{"t":1}',
            json.dumps({"t": 1, "f": "PING", "a": [], "k": [1, 2], "et": 1}),
            json.dumps(
                {"t": 1, "f": "READ", "a": [], "k": {"type": "READ", "address": -5, "size": 1}, "et": 1}
            ),
            json.dumps({"t": 1, "f": "X", "a": [], "k": {"type": "NOSUCH"}, "et": "soon"}),
            json.dumps(
                {"t": 1, "f": "W", "a": [], "k": {"type": "WRITE", "address": 2**80, "data": "x"}, "et": 1}
            ),
            str(rng.randrange(-(2**40), 2**40)),
        ]
    )


class Fuzzer:
    def __init__(self, redis: AsyncRedis, kernels: list[dict[str, str]], seed: int) -> None:
        self.r = redis
        self.kernels = kernels  # {name, agent, epoch}
        self.rng = random.Random(seed)
        self.writes = 0
        self.jobs: list[str] = []

    async def step(self) -> None:
        rng, r = self.rng, self.r
        k = rng.choice(self.kernels)
        n = self.writes
        kind = rng.randrange(8)
        if kind == 0:  # load records: of real kernels and of none
            key = KEYS.load(k["agent"], CLUSTER, k["name"] if rng.random() < 0.5 else f"ghost-{n % 5}")
            await r.hset(key, mapping={rng.choice(["cpu", "memory", "queue_depth", "x"]): garbage(rng)})
        elif kind == 1:  # assignment hashes: junk fields next to the real ones
            field = rng.choice(["bad", f"{CLUSTER}/worker-0\n", "a/b/c", "*/x", "x" * 300, f"{CLUSTER}/"])
            await r.hset(
                KEYS.agent_kernels(rng.choice(AGENTS)), field, rng.choice(["run", "drain", garbage(rng)])
            )
        elif kind in (2, 3):  # job hashes on a real kernel's queue: corrupt payloads and fields
            job_id = f"fuzz{n}"
            fields = {
                "kernel": k["name"],
                "epoch": k["epoch"] if rng.random() < 0.7 else rng.choice(["", "abc", "1.5", "-"]),
                "job": garbage(rng),
                "reply": SINK,
                "deadline_ms": str(int(time.time() * 1000) + 60_000) if rng.random() < 0.8 else garbage(rng),
                "attempt": "0" if rng.random() < 0.8 else garbage(rng),
            }
            for name in rng.sample(sorted(fields), rng.randrange(2)):  # sometimes a field is missing
                del fields[name]
            now = int(time.time() * 1000)
            async with r.pipeline(transaction=True) as pipe:
                pipe.hset(KEYS.job(CLUSTER, job_id), mapping=fields)
                pipe.pexpire(KEYS.job(CLUSTER, job_id), 120_000)
                pipe.zadd(KEYS.inflight(CLUSTER, k["name"]), {job_id: now})
                pipe.zadd(KEYS.queue(CLUSTER, k["name"]), {job_id: now})
                await pipe.execute()
            self.jobs.append(job_id)
        elif kind == 4:  # an id on a queue with no job behind it; a kernel's wake key of another type
            await r.zadd(KEYS.queue(CLUSTER, k["name"]), {f"nojob{n}": time.time() * 1000})
            if rng.random() < 0.2:
                await r.set(KEYS.kernel_wake(CLUSTER, k["name"]), garbage(rng))
        elif kind == 5:  # records that do not parse: a cluster, a kernel of ours, an agent
            which = rng.randrange(3)
            if which == 0:
                await r.hset(KEYS.cluster(f"junk{n % 3}"), mapping={"name": "junk", "config": garbage(rng)})
                await r.sadd(KEYS.clusters(), f"junk{n % 3}")
            elif which == 1:
                await r.hset(
                    KEYS.kernel(CLUSTER, f"junk-{n % 3}"), mapping={"state": garbage(rng), "agent": "?"}
                )
                await r.sadd(KEYS.cluster_kernels(CLUSTER), f"junk-{n % 3}")
            else:
                await r.hset(KEYS.agent(f"ghost{n % 3}"), mapping={"slots": garbage(rng), "name": "ghost"})
                await r.sadd(KEYS.agents(), f"ghost{n % 3}")
        elif kind == 6:  # extra fields in stats hashes that kernels, agents and clients read
            key = rng.choice([KEYS.kernel_stats(CLUSTER, k["name"]), KEYS.cluster_stats(CLUSTER)])
            await r.hset(key, f"junk{n % 4}", garbage(rng))
        else:  # bus entries that are not messages
            stream = rng.choice([KEYS.bus_inbox("fz-bus"), KEYS.bus_topic(BusTopic.EVENTS.value)])
            names = ["payload", "topic", "from", "ts", "seq", "to", "kind", "deadline"]
            await r.xadd(stream, {f: garbage(rng) for f in rng.sample(names, rng.randrange(1, len(names)))})
        self.writes += 1


async def _kernels(redis: AsyncRedis) -> list[dict[str, str]]:
    out = []
    for name in sorted(await redis.smembers(KEYS.cluster_kernels(CLUSTER))):
        record = await redis.hgetall(KEYS.kernel(CLUSTER, name))
        if record.get("state") == "running":
            out.append(
                {"name": name, "agent": record["agent"], "epoch": record["epoch"], "pid": record["pid"]}
            )
    return out


async def test_garbage_in_redis_crashes_nothing_and_loses_nothing(
    stack: ProcessStack, redis: AsyncRedis, redis_url: str
) -> None:
    stack.serve()
    for name in AGENTS:
        stack.agent(name, 3)
    settings = Settings(redis_url=redis_url)
    received: list[dict[str, Any]] = []

    async def on_message(message: BusMessage) -> None:
        received.append(message.payload)

    bus = InterKernelBus(settings)
    bus.register("fz-bus", on_message)
    bus.subscribe("fz-bus", BusTopic.EVENTS, on_message)
    await bus.start()
    async with KcpClient(settings) as kcp:
        for _ in range(300):
            if await redis.scard(KEYS.agents()) >= 2:
                break
            await asyncio.sleep(0.1)
        info = await kcp.create_cluster(CLUSTER, 4, {"max_kernels": 4}, wait=30)
        assert info.running == 4, info
        before = await _kernels(redis)
        fuzzer = Fuzzer(redis, before, seed=int(os.environ.get("KCP_FUZZ_SEED", "1234")))
        deadline = time.monotonic() + SECONDS
        dispatched: list[tuple[int, float]] = []
        sent_bus = 0

        async def fuzz() -> None:
            while time.monotonic() < deadline:
                await fuzzer.step()
                await asyncio.sleep(0)

        async def work(worker: int) -> None:
            nonlocal sent_bus
            i = 0
            while time.monotonic() < deadline:
                value = worker * 1_000_000 + i
                res = await kcp.dispatch(CLUSTER, {"type": "COMPUTE", "op": "sum", "data": [value, 0.5]})
                dispatched.append((value, res.result["result"]))
                if i % 10 == 0:
                    await bus.publish(
                        BusMessage(from_kernel="fz-src", topic=BusTopic.EVENTS, payload={"n": value})
                    )
                    await bus.send_direct("fz-src", "fz-bus", {"n": -value - 1})
                    sent_bus += 2
                i += 1

        await asyncio.gather(fuzz(), *(work(w) for w in range(6)))
        # every accepted job got its own, correct result
        assert dispatched and all(result == value + 0.5 for value, result in dispatched)
        # the garbage jobs were each answered (to the sink) or dropped, and none is left behind
        for _ in range(100):
            left = [j for j in fuzzer.jobs if await redis.exists(KEYS.job(CLUSTER, j))]
            if not left:
                break
            await asyncio.sleep(0.1)
        assert left == [], [await redis.hgetall(KEYS.job(CLUSTER, j)) for j in left[:3]]
        answers = [json.loads(x) for x in await redis.lrange(SINK, 0, -1)]
        assert all(a["r"]["error_type"] for a in answers if not a["s"])
        # no process died, no kernel restarted (same pid and epoch), none was replaced
        assert all(p.poll() is None for p in stack.procs), [p.returncode for p in stack.procs]
        after = await _kernels(redis)
        assert after == before
        # every valid bus message arrived; the garbage entries did not reach the handler
        for _ in range(100):
            if len(received) >= sent_bus:
                break
            await asyncio.sleep(0.1)
        assert sorted(p["n"] for p in received) == sorted(
            [v for v, _ in dispatched if (v % 1_000_000) % 10 == 0]
            + [-v - 1 for v, _ in dispatched if (v % 1_000_000) % 10 == 0]
        )
        print(
            f"fuzz: {fuzzer.writes} malformed writes in {SECONDS:.0f}s, {len(fuzzer.jobs)} corrupt jobs "
            f"({len(answers)} answered with an error), {len(dispatched)} dispatches all correct, "
            f"{len(received)} bus messages delivered"
        )
        await kcp.destroy_cluster(CLUSTER, wait=30)
    await bus.aclose()
