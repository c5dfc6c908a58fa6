"""The reply listener after an outage learns each waiting job's fate from Redis: a reply whose
take was lost with the connection is delivered from the taken list, a job still queued is
waited for, and a job gone without a result ends its attempt at once (it never ran). Its bell
holds replies, delivered as popped, or rings naming the clusters to take from; a reply whose
ring was lost is still delivered."""

from __future__ import annotations

import asyncio
import time

import pytest
from redis.asyncio import Redis as AsyncRedis

from controlplane.client import dispatch
from controlplane.client.dispatch import Dispatcher, _Vanished
from controlplane.errors import RedisUnavailable
from controlplane.protocol.jobs import Outcome, encode_result
from controlplane.protocol.keys import Keys
from controlplane.redis.connect import connect

pytestmark = [pytest.mark.integration, pytest.mark.timeout(20), pytest.mark.redis_cluster]

KEYS = Keys()


def result(job_id: str) -> str:
    return encode_result(
        job_id=job_id,
        function="PING",
        kernel="worker-0",
        queue="q",
        attempt=1,
        enqueue_ms=1,
        start_ms=2,
        finish_ms=3,
        value={"job": job_id},
        epoch=4,
    )


async def test_after_an_outage_the_listener_reads_each_jobs_fate(redis: AsyncRedis, redis_url: str) -> None:
    client = connect(redis_url)
    dispatcher = Dispatcher(client, KEYS)
    loop = asyncio.get_running_loop()
    futures: dict[str, asyncio.Future[Outcome]] = {}
    for job_id in ("taken", "listed", "queued", "vanished"):
        futures[job_id] = dispatcher._waiting[job_id] = loop.create_future()
        dispatcher._queued[job_id] = "c"
    # `taken` finished and its reply was moved to the taken list by a take whose answer the
    # crash lost; `listed` finished and its reply waits; `queued` still waits for a kernel;
    # `vanished` is gone (its enqueue was lost with a failover) and no reply will come
    dispatcher.reply_key("c")  # handed out with the enqueues
    await redis.rpush(KEYS.reply_taken("c", dispatcher.client_id), result("taken"))
    await redis.rpush(KEYS.reply("c", dispatcher.client_id), result("listed"))
    await redis.hset(KEYS.job("c", "queued"), mapping={"state": "queued"})
    await dispatcher._lost(RedisUnavailable("connection lost"))
    dispatcher._listen_for_replies()
    try:
        done, _ = await asyncio.wait(
            [futures[j] for j in ("taken", "listed", "vanished")],
            timeout=5,
            return_when=asyncio.ALL_COMPLETED,
        )
        assert len(done) == 3
        assert futures["taken"].result().value == {"job": "taken"}
        assert futures["taken"].result().epoch == 4
        assert futures["listed"].result().value == {"job": "listed"}
        assert isinstance(futures["vanished"].exception(), _Vanished)
        assert not futures["queued"].done(), "a job still in Redis is waited for"
        # every reply taken is dropped at the next take: nothing is left behind
        await redis.rpush(KEYS.reply("c", dispatcher.client_id), result("queued"))
        await redis.zadd(KEYS.reply_bell(dispatcher.client_id), {"c": 1})
        assert (await asyncio.wait_for(futures["queued"], 5)).value == {"job": "queued"}
        for _ in range(50):
            if not await redis.exists(KEYS.reply("c", dispatcher.client_id)):
                break
            await asyncio.sleep(0.02)
        assert await redis.llen(KEYS.reply("c", dispatcher.client_id)) == 0
    finally:
        await dispatcher.stop()
        await client.aclose()
    assert await redis.keys("kcp:reply:*") == [], "stop deletes the bell and every list it used"


async def _waiting(dispatcher: Dispatcher, job_id: str, cluster: str) -> asyncio.Future[Outcome]:
    fut: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
    dispatcher._waiting[job_id] = fut
    dispatcher._queued[job_id] = cluster
    dispatcher.reply_key(cluster)
    return fut


async def test_rings_of_two_clusters_deliver_both_at_once(redis: AsyncRedis, redis_url: str) -> None:
    """Replies of two kcp clusters, each rung: both delivered well before any sweep."""
    client = connect(redis_url)
    dispatcher = Dispatcher(client, KEYS)
    try:
        futures = {c: await _waiting(dispatcher, f"j-{c}", c) for c in ("web", "train")}
        dispatcher._listen_for_replies()
        await asyncio.sleep(0.2)  # the listener blocks on its bell
        started = time.monotonic()
        for cluster in ("web", "train"):
            await redis.rpush(KEYS.reply(cluster, dispatcher.client_id), result(f"j-{cluster}"))
            await redis.zadd(KEYS.reply_bell(dispatcher.client_id), {cluster: 1})
        done = await asyncio.wait_for(asyncio.gather(*futures.values()), 3)
        assert [o.value for o in done] == [{"job": "j-web"}, {"job": "j-train"}]
        assert time.monotonic() - started < 1.0, "rung: no sweep needed"
        assert await redis.zcard(KEYS.reply_bell(dispatcher.client_id)) == 0
    finally:
        await dispatcher.stop()
        await client.aclose()


async def test_replies_on_the_bell_are_delivered_and_their_copies_taken_later(
    redis: AsyncRedis, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replies added to the bell (as a kernel does) are delivered off it, many in one pop, with
    no take; their copies leave the cluster's list once `DRAIN_AFTER` of them came, so the list
    does not grow while the client keeps dispatching."""
    monkeypatch.setattr(dispatch, "DRAIN_AFTER", 4)
    client = connect(redis_url)
    dispatcher = Dispatcher(client, KEYS)
    reply, bell = KEYS.reply("web", dispatcher.client_id), KEYS.reply_bell(dispatcher.client_id)
    try:
        first = await _waiting(dispatcher, "j0", "web")
        dispatcher._listen_for_replies()
        await asyncio.sleep(0.2)  # the listener blocks on its bell
        await redis.rpush(reply, result("j0"))
        await redis.zadd(bell, {result("j0"): 0})
        assert (await asyncio.wait_for(first, 3)).value == {"job": "j0"}
        assert await redis.lrange(reply, 0, -1) == [result("j0")], "its copy waits for a take"

        futures = [await _waiting(dispatcher, f"j{n}", "web") for n in range(1, 6)]
        await redis.rpush(reply, *(result(f"j{n}") for n in range(1, 6)))
        await redis.zadd(bell, {result(f"j{n}"): 0 for n in range(1, 6)})
        done = await asyncio.wait_for(asyncio.gather(*futures), 3)
        assert [o.value for o in done] == [{"job": f"j{n}"} for n in range(1, 6)]
        deadline = time.monotonic() + 3
        while await redis.exists(reply):  # 6 delivered >= DRAIN_AFTER: the copies are taken
            assert time.monotonic() < deadline, "the list still holds delivered copies"
            await asyncio.sleep(0.02)
        assert dispatcher._copies == {}
    finally:
        await dispatcher.stop()
        await client.aclose()


async def test_copies_of_published_replies_are_taken_while_the_listener_blocks(
    redis: AsyncRedis, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replies that come by shard channel (a Redis Cluster) reach the client while its listener
    blocks on a quiet bell: once `DRAIN_AFTER` copies wait, the client rings its own bell, and
    the listener takes them well before its pop's idle timeout."""
    monkeypatch.setattr(dispatch, "DRAIN_AFTER", 3)
    client = connect(redis_url)
    dispatcher = Dispatcher(client, KEYS)
    reply = KEYS.reply("web", dispatcher.client_id)
    try:
        futures = [await _waiting(dispatcher, f"p{n}", "web") for n in range(4)]
        dispatcher._listen_for_replies()
        await asyncio.sleep(0.2)  # the listener blocks on its bell (5 s)
        await redis.rpush(reply, *(result(f"p{n}") for n in range(4)))
        started = time.monotonic()
        for n in range(4):
            dispatcher._published(result(f"p{n}"))  # as its shard subscription hands them over
        assert [o.value for o in await asyncio.wait_for(asyncio.gather(*futures), 1)] == [
            {"job": f"p{n}"} for n in range(4)
        ]
        while await redis.exists(reply):
            assert time.monotonic() - started < 2, "the copies waited for the pop's idle timeout"
            await asyncio.sleep(0.02)
    finally:
        await dispatcher.stop()
        await client.aclose()


@pytest.mark.parametrize("busy_bell", [False, True], ids=["idle", "other-cluster-ringing"])
async def test_a_reply_whose_ring_was_lost_is_delivered_by_the_sweep(
    redis: AsyncRedis, redis_url: str, monkeypatch: pytest.MonkeyPatch, busy_bell: bool
) -> None:
    """No ring for `train`'s reply (the pusher died between its push and its ring): the sweep
    takes from every cluster with a job waiting, at the bell pop's idle timeout, or every
    `SWEEP_SECONDS` while another cluster keeps the bell ringing."""
    monkeypatch.setattr(dispatch, "MAX_BLOCK_SECONDS", 1)
    monkeypatch.setattr(dispatch, "SWEEP_SECONDS", 1.0)
    client = connect(redis_url)
    dispatcher = Dispatcher(client, KEYS)
    ringing = True

    async def ring_web() -> None:
        while ringing:
            await redis.zadd(KEYS.reply_bell(dispatcher.client_id), {"web": time.time()})
            await asyncio.sleep(0.05)

    ringer = asyncio.create_task(ring_web()) if busy_bell else None
    try:
        await _waiting(dispatcher, "other", "web")
        lost = await _waiting(dispatcher, "lost", "train")
        dispatcher._listen_for_replies()
        await asyncio.sleep(0.2)
        await redis.rpush(KEYS.reply("train", dispatcher.client_id), result("lost"))
        started = time.monotonic()
        assert (await asyncio.wait_for(lost, 4)).value == {"job": "lost"}
        assert 0.3 < time.monotonic() - started < 2.5, "delivered by the sweep, not by a ring"
    finally:
        ringing = False
        if ringer is not None:
            await ringer
        await dispatcher.stop()
        await client.aclose()
