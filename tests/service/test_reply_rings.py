"""The control plane's answers to waiting clients (rebind.lua's errors when it hands orphans over,
`_fail_queued`'s at a cluster's teardown) go to the client's reply list of the cluster, and ring
the client's bell once written, so its listener takes them at once (issue 20, Replies)."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis as AsyncRedis

from controlplane import ClusterConfig, Settings
from controlplane.protocol.jobs import decode_result
from controlplane.protocol.keys import Keys
from controlplane.protocol.models import KernelState
from controlplane.protocol.records import KernelRecord
from controlplane.protocol.stats import PINNED
from controlplane.redis.scripts import jobs
from controlplane.redis.state import State, now_ms
from controlplane.service.leader import LeaderLease
from controlplane.service.reconciler import Reconciler

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

KEYS = Keys()
CLIENT = "c0ffee"


async def _reconciler(redis: AsyncRedis) -> Reconciler:
    lease = LeaderLease(redis, KEYS, ttl=3.0, token="t")
    assert await lease.acquire()
    await lease.raise_terms(["web"])
    return Reconciler(State(redis, KEYS), Settings(), lease)


async def _enqueue(redis: AsyncRedis, job_id: str, kernel: str, *, strategy: str = "adaptive") -> None:
    now = now_ms()
    queued = await jobs.enqueue(
        KEYS,
        "web",
        kernel,
        job_id=job_id,
        payload='{"t":1,"f":"PING"}',
        reply_key=KEYS.reply("web", CLIENT),
        now_ms=now,
        deadline_ms=now + 10_000,
        ttl_ms=60_000,
        strategy=strategy,
    ).run(redis)
    assert isinstance(queued, jobs.Enqueued)


async def test_orphans_answered_on_rebind_ring_their_clients_bell(redis: AsyncRedis) -> None:
    reconciler = await _reconciler(redis)
    await State(redis, KEYS).create_cluster("web", ClusterConfig(), 2)
    for name, epoch in (("k1", 1), ("k2", 5)):
        await redis.hset(
            KEYS.kernel("web", name), mapping={"state": "running", "epoch": epoch, "agent": "a1"}
        )
    await _enqueue(redis, "pin", "k1", strategy=PINNED)  # k1 dies: its pinned job cannot move
    await _enqueue(redis, "free", "k1")
    await redis.zadd(KEYS.cluster_orphans("web"), {"pin": 1, "free": 2})
    k2 = KernelRecord(cluster="web", name="k2", agent="a1", state=KernelState.RUNNING, epoch=5)

    ids = (await reconciler._orphans(["web"]))["web"]
    await reconciler._adopt_orphans("web", ids, [k2])

    (raw,) = await redis.lrange(KEYS.reply("web", CLIENT), 0, -1)
    assert (decode_result(raw).job_id, decode_result(raw).error_type) == ("pin", "KernelGone")
    assert list(await redis.zrange(KEYS.reply_bell(CLIENT), 0, -1)) == ["web"]
    assert 0 < await redis.pttl(KEYS.reply_bell(CLIENT)) <= 60_000, "a dead client's bell expires"
    assert (await redis.hgetall(KEYS.job("web", "free")))["kernel"] == "k2"


async def test_a_moved_job_rings_no_bell(redis: AsyncRedis) -> None:
    reconciler = await _reconciler(redis)
    await State(redis, KEYS).create_cluster("web", ClusterConfig(), 1)
    await redis.hset(KEYS.kernel("web", "k2"), mapping={"state": "running", "epoch": 5, "agent": "a1"})
    await _enqueue(redis, "free", "k2")
    await redis.zadd(KEYS.cluster_orphans("web"), {"free": 2})
    k2 = KernelRecord(cluster="web", name="k2", agent="a1", state=KernelState.RUNNING, epoch=5)
    ids = (await reconciler._orphans(["web"]))["web"]
    await reconciler._adopt_orphans("web", ids, [k2])
    assert await redis.exists(KEYS.reply_bell(CLIENT), KEYS.reply("web", CLIENT)) == 0


async def test_jobs_failed_at_teardown_ring_their_clients_bell(redis: AsyncRedis) -> None:
    reconciler = await _reconciler(redis)
    await State(redis, KEYS).create_cluster("web", ClusterConfig(), 1)
    await redis.hset(KEYS.kernel("web", "k1"), mapping={"state": "running", "epoch": 1, "agent": "a1"})
    await _enqueue(redis, "j1", "k1")
    await _enqueue(redis, "j2", "k1")

    await reconciler._fail_queued("web", KEYS.queue("web", "k1"), "cluster destroyed")

    replies = [decode_result(r) for r in await redis.lrange(KEYS.reply("web", CLIENT), 0, -1)]
    assert [(r.job_id, r.error_type) for r in replies] == [
        ("j1", "ClusterDestroyed"),
        ("j2", "ClusterDestroyed"),
    ]
    assert list(await redis.zrange(KEYS.reply_bell(CLIENT), 0, -1)) == ["web"], "one ring for the cluster"
