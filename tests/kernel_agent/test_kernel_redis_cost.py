"""What a running kernel costs Redis: one connection, and sibling records read only when the
cluster's version moved (issue 19). A real `KernelProcess` runs in the test's event loop against
the private redis-server; jobs are enqueued with enqueue.lua as a client would."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from redis.asyncio import Redis as AsyncRedis

from controlplane.protocol.jobs import encode_job
from controlplane.protocol.keys import Keys
from controlplane.protocol.models import ClusterConfig
from controlplane.protocol.records import ClusterRecord, KernelRecord
from controlplane.redis.connect import connect
from controlplane.redis.scripts import jobs
from kernel_agent.kernel import siblings
from kernel_agent.kernel.worker import KernelProcess
from kernel_agent.syscalls import builtin_registry
from tests.conftest import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

KEYS = Keys()
CLUSTER = "c"


async def calls(r: AsyncRedis, command: str) -> int:
    """How many times the server ran `command` (Lua's inner calls included)."""
    stats = await r.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


async def connections(r: AsyncRedis) -> int:
    return len(await r.client_list())


async def put_cluster(r: AsyncRedis, kernels: int) -> None:
    record = ClusterRecord(name=CLUSTER, config=ClusterConfig(), desired=kernels)
    await r.hset(KEYS.cluster(CLUSTER), mapping=record.to_fields())
    for i in range(kernels):
        name = f"k{i}"
        state = "pending" if i == 0 else "running"  # k0 is the one this test starts
        fields = KernelRecord(cluster=CLUSTER, name=name, agent="a", state=state, epoch=100 + i).to_fields()
        await r.hset(KEYS.kernel(CLUSTER, name), mapping={**fields, "syscalls": "PING", "capabilities": ""})
        await r.sadd(KEYS.cluster_kernels(CLUSTER), name)


@pytest_asyncio.fixture
async def kernel(redis: AsyncRedis, redis_url: str) -> AsyncIterator[KernelProcess]:
    """Kernel k0 of a 3-kernel cluster, running (its siblings are records only)."""
    await put_cluster(redis, 3)
    own = connect(redis_url)
    process = KernelProcess(own, KEYS, cluster=CLUSTER, name="k0", agent="a", registry=builtin_registry())
    task = asyncio.create_task(process.run())

    async def running() -> bool:
        return await redis.hget(KEYS.kernel(CLUSTER, "k0"), "state") == "running"

    await wait_for(running, 10, "the kernel's start")
    yield process
    process.drain()
    await asyncio.wait_for(task, 20)
    await own.aclose()


async def ping(r: AsyncRedis, n: int) -> None:
    """Enqueue job `n` on k0 and wait for its result on the reply list."""
    now = int(time.time() * 1000)
    call = jobs.enqueue(
        KEYS,
        CLUSTER,
        "k0",
        job_id=f"j{n}",
        payload=encode_job({"type": "PING"}, job_try=1, enqueue_ms=now),
        reply_key="reply",
        now_ms=now,
        deadline_ms=now + 10_000,
        ttl_ms=60_000,
        strategy="random",
    )
    assert isinstance(await call.run(r), jobs.Enqueued)
    popped = await r.blpop(["reply"], 10)
    assert popped is not None and json.loads(popped[1])["id"] == f"j{n}"


async def test_a_kernel_holds_one_connection(redis: AsyncRedis, kernel: KernelProcess) -> None:
    await ping(redis, 0)
    before = await connections(redis)  # ours and the kernel's, which has started and worked
    for n in range(1, 4):
        await ping(redis, n)
    assert await connections(redis) == before
    # ours (one: every call above is sequential) and the kernel's
    assert before == 2


async def test_siblings_are_read_again_only_when_the_version_moves(
    redis: AsyncRedis, kernel: KernelProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(siblings, "SIBLINGS_TTL", 0.0)  # every claim after a job asks for the version
    for n in range(3):  # the first claims return the version: the list is read once
        await ping(redis, n)
    await wait_for(lambda: _listed(kernel, 2), 5, "the sibling list")
    reads = await calls(redis, "hgetall")
    for n in range(3, 10):
        await ping(redis, n)
    assert await calls(redis, "hgetall") == reads, "re-read although the version did not move"

    await redis.hset(KEYS.kernel(CLUSTER, "k2"), "state", "stopped")
    await redis.incr(KEYS.cluster_version(CLUSTER))  # as every write of a kernel's state does
    for n in range(10, 13):
        await ping(redis, n)
    await wait_for(lambda: _listed(kernel, 1), 5, "the sibling list without the stopped k2")
    assert kernel.siblings.for_claim() == [("k1", 101)]
    assert await calls(redis, "hgetall") == reads + 3  # the cluster record and the two siblings'


async def _listed(kernel: KernelProcess, n: int) -> bool:
    return len(kernel.siblings.for_claim()) == n


@pytest.mark.parametrize("inside", [True, False], ids=["one-redis", "cluster-order"])
async def test_a_result_reaches_its_clients_bell_once_on_the_list(
    redis: AsyncRedis, kernel: KernelProcess, inside: bool
) -> None:
    """The kernel adds its reply to the client's bell (issue 20, Replies) once it is on the
    list: in finish.lua on one Redis, sent after finish.lua's reply where the bell may be on
    another node (`_bell_inside` False, as on a Redis Cluster). The bell holds the reply itself,
    the list its copy."""
    kernel._bell_inside = inside
    reply, bell = KEYS.reply(CLUSTER, "cl1"), KEYS.reply_bell("cl1")
    now = int(time.time() * 1000)
    for n in range(2):
        call = jobs.enqueue(
            KEYS,
            CLUSTER,
            "k0",
            job_id=f"r{n}",
            payload=encode_job({"type": "PING"}, job_try=1, enqueue_ms=now),
            reply_key=reply,
            now_ms=now,
            deadline_ms=now + 10_000,
            ttl_ms=60_000,
            strategy="random",
        )
        assert isinstance(await call.run(redis), jobs.Enqueued)
        await wait_for(lambda: _rung(redis, bell), 10, "the reply on the bell, with its TTL")
        [(member, score)] = await redis.zpopmin(bell)
        assert json.loads(member)["id"] == f"r{n}" and score == 0
        assert await redis.lpop(reply) == member, "the list keeps the reply's copy"


async def _rung(redis: AsyncRedis, bell: str) -> bool:
    return 0 < await redis.pttl(bell) <= 60_000
