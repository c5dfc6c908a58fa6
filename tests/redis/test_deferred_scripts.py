"""Contract tests of the arq scripts (`lua/defer.lua`, `undefer.lua`, `abort.lua`, and finish.lua
keeping a result), through the calls production code makes (`controlplane/redis/scripts/deferred.py`).

Every test runs on the private redis-server (`integration`) and on fakeredis (`unit`)."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio import Redis as AsyncRedis

from controlplane.protocol.keys import Keys
from controlplane.redis.scripts import deferred, jobs

C = "c1"
NOW = 1_700_000_000_000
KEYS = Keys()
REPLY = KEYS.reply(C, "client-1")


@pytest.fixture(
    params=[
        pytest.param("real", marks=pytest.mark.integration),
        pytest.param("fake", marks=pytest.mark.unit),
    ]
)
def r(request: pytest.FixtureRequest) -> AsyncRedis:
    client: AsyncRedis = request.getfixturevalue("redis" if request.param == "real" else "fake_redis")
    return client


async def defer_new(r: AsyncRedis, job_id: str = "j1", *, due: int = NOW + 1000, payload: str = "p1") -> int:
    call = deferred.defer(
        KEYS,
        C,
        job_id,
        payload=payload,
        now_ms=NOW,
        due_ms=due,
        ttl_extra_ms=60_000,
        reply_key=REPLY,
        deadline_ms=NOW + 86_400_000,
        strategy="adaptive",
    )
    return await call.run(r)


async def snapshot(r: AsyncRedis) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in sorted(await r.keys("*")):
        kind = await r.type(key)
        if kind == "hash":
            out[key] = await r.hgetall(key)
        elif kind == "zset":
            out[key] = await r.zrange(key, 0, -1, withscores=True)
        else:
            out[key] = await r.get(key)
    return out


async def test_defer_writes_a_deferred_job_and_refuses_an_id_in_use(r: AsyncRedis) -> None:
    assert await defer_new(r) == deferred.DEFERRED
    assert await r.zrange(KEYS.cluster_deferred(C), 0, -1, withscores=True) == [("j1", NOW + 1000)]
    assert await r.hgetall(KEYS.job_deferred(C, "j1")) == {
        "job": "p1",
        "reply": REPLY,
        "enqueued_ms": str(NOW),
        "due_ms": str(NOW + 1000),
        "deadline_ms": str(NOW + 86_400_000),
        "strategy": "adaptive",
    }
    before = await snapshot(r)
    assert await defer_new(r, payload="other") == deferred.DUPLICATE
    assert await snapshot(r) == before
    # a queued job, or a kept result, holds its id as well
    await r.hset(KEYS.job(C, "j2"), mapping={"job": "x", "kernel": "k1"})
    await r.set(KEYS.job_result(C, "j3"), "done")
    assert await defer_new(r, "j2") == deferred.DUPLICATE
    assert await defer_new(r, "j3") == deferred.DUPLICATE


async def test_a_retry_is_fenced_and_moves_the_running_job_back(r: AsyncRedis) -> None:
    job = {"job": "p1", "reply": REPLY, "kernel": "k1", "epoch": "4", "state": "running"}
    await r.hset(
        KEYS.job(C, "j1"), mapping={**job, "enqueued_ms": NOW, "deadline_ms": NOW + 9000, "strategy": "rr"}
    )
    await r.zadd(KEYS.inflight(C, "k1"), {"j1": NOW})

    def retry(epoch: int) -> Any:
        return deferred.defer(
            KEYS,
            C,
            "j1",
            payload="p2",
            now_ms=NOW + 50,
            due_ms=NOW + 250,
            ttl_extra_ms=1000,
            retry_of=("k1", epoch),
        )

    before = await snapshot(r)
    assert await retry(3).run(r) == deferred.NOT_OURS  # a zombie incarnation
    assert await snapshot(r) == before
    assert await retry(4).run(r) == deferred.DEFERRED
    assert not await r.exists(KEYS.job(C, "j1"))
    assert await r.zcard(KEYS.inflight(C, "k1")) == 0
    assert await r.zscore(KEYS.cluster_deferred(C), "j1") == NOW + 250
    kept = await r.hgetall(KEYS.job_deferred(C, "j1"))
    assert (kept["job"], kept["reply"], kept["enqueued_ms"], kept["deadline_ms"], kept["strategy"]) == (
        "p2",
        REPLY,
        str(NOW),
        str(NOW + 9000),
        "rr",
    )


async def test_undefer_takes_a_due_job_once_under_a_lease(r: AsyncRedis) -> None:
    await defer_new(r)

    def take(now: int) -> Any:
        return deferred.undefer(KEYS, C, "j1", now_ms=now, lease_ms=5000).run(r)

    assert await take(NOW + 999) == deferred.NotDue("later", NOW + 1000)
    due = await take(NOW + 1000)
    assert due == deferred.Due("p1", REPLY, NOW, NOW + 86_400_000, "adaptive", NOW + 6000)
    assert await take(NOW + 1001) == deferred.NotDue("later", NOW + 6000)  # another mover: later
    # a mover that died holding it: after the lease the next one takes it again
    again = await take(NOW + 6000)
    assert isinstance(again, deferred.Due) and again.lease == NOW + 11_000
    assert await deferred.undefer(KEYS, C, "j1", now_ms=NOW, done=due.lease).run(r) is False  # not ours now
    assert await deferred.undefer(KEYS, C, "j1", now_ms=NOW, done=again.lease).run(r) is True
    assert await snapshot(r) == {}
    assert await take(NOW + 20_000) == deferred.NotDue("gone")


async def test_undefer_cleans_up_a_job_already_routed_and_drops_an_expired_one(r: AsyncRedis) -> None:
    await defer_new(r, "j1")
    await r.hset(KEYS.job(C, "j1"), mapping={"job": "p1", "kernel": "k1"})  # routed, mover died after
    assert await deferred.undefer(KEYS, C, "j1", now_ms=NOW + 2000, lease_ms=5000).run(r) == deferred.NotDue(
        "moved"
    )
    assert await r.zcard(KEYS.cluster_deferred(C)) == 0 and not await r.exists(KEYS.job_deferred(C, "j1"))
    await defer_new(r, "j2")
    late = NOW + 86_400_001
    assert await deferred.undefer(KEYS, C, "j2", now_ms=late, lease_ms=5000).run(r) == deferred.NotDue(
        "expired"
    )
    assert not await r.exists(KEYS.job_deferred(C, "j2"), KEYS.cluster_deferred(C))


async def abort(r: AsyncRedis, job_id: str, kernel: str = "", now: int = NOW) -> str:
    call = deferred.abort(KEYS, C, job_id, kernel=kernel, message="aborted!", keep_ms=60_000, now_ms=now)
    return await call.run(r)


async def test_abort_stops_a_deferred_or_queued_job_but_not_a_running_one(r: AsyncRedis) -> None:
    await defer_new(r, "j1")
    assert await abort(r, "j1") == "aborted"
    assert await snapshot(r) == {KEYS.job_result(C, "j1"): "aborted!"}
    assert 0 < await r.pttl(KEYS.job_result(C, "j1")) <= 60_000

    await defer_new(r, "j2")
    await deferred.undefer(KEYS, C, "j2", now_ms=NOW + 1000, lease_ms=5000).run(r)
    assert await abort(r, "j2", now=NOW + 1001) == "moved"  # a client routes it now: read again

    await r.hset(KEYS.job(C, "j3"), mapping={"job": "p", "kernel": "k1", "state": "queued"})
    await r.zadd(KEYS.queue(C, "k1"), {"j3": NOW})
    await r.zadd(KEYS.inflight(C, "k1"), {"j3": NOW})
    assert await abort(r, "j3", "k2") == "moved"  # it is on another kernel than the caller read
    assert await abort(r, "j3", "k1") == "aborted"
    assert not await r.exists(KEYS.job(C, "j3"), KEYS.queue(C, "k1"), KEYS.inflight(C, "k1"))
    assert await r.get(KEYS.job_result(C, "j3")) == "aborted!"

    await r.hset(KEYS.job(C, "j4"), mapping={"job": "p", "kernel": "k1", "state": "running"})
    assert await abort(r, "j4", "k1") == "running"
    assert await r.hget(KEYS.job(C, "j4"), "state") == "running"
    assert await abort(r, "nope") == "done"


@pytest.mark.parametrize("keep_ms", [0, 30_000])
async def test_finish_keeps_an_arq_result_when_asked(r: AsyncRedis, keep_ms: int) -> None:
    await r.hset(KEYS.job(C, "j1"), mapping={"job": "p", "reply": REPLY, "kernel": "k1", "epoch": "1"})
    await r.zadd(KEYS.inflight(C, "k1"), {"j1": 1})
    call = jobs.finish(
        KEYS,
        C,
        "k1",
        job_id="j1",
        epoch=1,
        reply_key=REPLY,
        message="the result",
        success=True,
        latency_ms=1,
        reply_ttl_ms=60_000,
        queue_ms=3,
        buckets=("latency_le_0.005",),
        keep_ms=keep_ms,
    )
    assert await call.run(r) == jobs.DELIVERED
    assert await r.lrange(REPLY, 0, -1) == ["the result"]
    assert await r.get(KEYS.job_result(C, "j1")) == ("the result" if keep_ms else None)
    if keep_ms:
        assert 0 < await r.pttl(KEYS.job_result(C, "j1")) <= keep_ms
    stats = await r.hgetall(KEYS.kernel_stats(C, "k1"))
    # the ARGV after keep_ms
    assert (stats["queue_ms_sum"], stats["dispatches:unknown|latency_le_0.005"]) == ("3", "1")
