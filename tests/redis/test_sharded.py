"""`ShardedSubscriber` on a real 3-master Redis Cluster: finish.lua's `SPUBLISH` reaches it, and
a subscription lost to a slot move or a dropped connection is taken again (a fast path only:
while it is lost the kernel adds results to the client's bell)."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis

from controlplane.ops.redis_server import RedisClusterProcess
from controlplane.protocol.jobs import REPLY_TTL_MS, encode_job
from controlplane.protocol.keys import Keys
from controlplane.redis import sharded
from controlplane.redis.connect import AsyncRedisCluster, connect
from controlplane.redis.scripts import jobs
from controlplane.redis.scripts.call import preloading
from controlplane.redis.sharded import ShardedSubscriber

pytestmark = [pytest.mark.integration, pytest.mark.redis_cluster, pytest.mark.timeout(60)]

KEYS = Keys()


def _client(url: str) -> AsyncRedisCluster:
    client = connect(url)
    assert isinstance(client, AsyncRedisCluster)
    return client


async def _heard(messages: list[str], n: int) -> None:
    deadline = time.monotonic() + 5
    while len(messages) < n:
        assert time.monotonic() < deadline, f"{len(messages)} of {n} messages came"
        await asyncio.sleep(0.01)


async def _finish_one(r: AsyncRedisCluster, cluster: str, job_id: str, reply: str) -> int:
    """Queue, claim and finish one job on kernel k0 of `cluster` (records written by hand):
    finish.lua's answer, with `publish` on as a kernel on a cluster sends it."""
    await r.hset(KEYS.kernel(cluster, "k0"), mapping={"state": "running", "epoch": "1"})
    channel = preloading(r, jobs.ENQUEUE, jobs.CLAIM, jobs.FINISH)
    try:
        now = int(time.time() * 1000)
        payload = encode_job({"type": "PING"}, job_try=1, enqueue_ms=now)
        enqueue = jobs.enqueue(
            KEYS, cluster, "k0", job_id=job_id, payload=payload, reply_key=reply,
            now_ms=now, deadline_ms=now + 10_000, ttl_ms=60_000, strategy="random",
        )  # fmt: skip
        assert isinstance(await enqueue.run(channel), jobs.Enqueued)
        assert isinstance(await jobs.claim(KEYS, cluster, "k0", epoch=1).run(channel), jobs.Claimed)
        finish = jobs.finish(
            KEYS, cluster, "k0", job_id=job_id, epoch=1, reply_key=reply, message=f"result-{job_id}",
            success=True, latency_ms=1, reply_ttl_ms=REPLY_TTL_MS, publish=True,
        )  # fmt: skip
        return await finish.run(channel)
    finally:
        await channel.aclose()


async def test_finish_publishes_to_a_subscriber_and_says_whether_one_heard(redis_cluster_url: str) -> None:
    r = _client(redis_cluster_url)
    heard: list[str] = []
    shards = ShardedSubscriber(r, lambda channel, message: heard.append(f"{channel} {message}"))
    reply = KEYS.reply("web", "client-1")
    try:
        assert await _finish_one(r, "web", "j1", reply) == jobs.DELIVERED, "nobody subscribed yet"
        assert await shards.subscribe(reply) and await shards.subscribe(reply), "once, then at once"
        assert await _finish_one(r, "web", "j2", reply) == jobs.PUBLISHED
        await _heard(heard, 1)
        assert heard == [f"{reply} result-j2"]
        assert await r.lrange(reply, 0, -1) == ["result-j1", "result-j2"], "the list keeps both"
        rejected = jobs.finish(
            KEYS, "web", "k0", job_id="j2", epoch=1, reply_key=reply, message="again",
            success=True, latency_ms=1, reply_ttl_ms=REPLY_TTL_MS, publish=True,
        )  # fmt: skip
        assert await rejected.run(r) == 0
        await asyncio.sleep(0.2)
        assert heard == [f"{reply} result-j2"], "a rejected result is not published"
    finally:
        await shards.aclose()
        await r.aclose()


async def test_a_subscription_lost_to_a_slot_move_is_taken_again_on_the_new_master(
    redis_cluster: RedisClusterProcess, redis_cluster_url: str
) -> None:
    r = _client(redis_cluster_url)
    heard: list[str] = []
    shards = ShardedSubscriber(r, lambda _, message: heard.append(message))
    reply = KEYS.reply("moving", "client-1")
    slot = redis_cluster.keyslot(reply)
    home = redis_cluster.master_of_slot(slot)
    target = next(m for m in redis_cluster.masters() if m is not home)
    try:
        assert await shards.subscribe(reply)
        redis_cluster.move_slot(slot, target)  # Redis unsubscribes the slot's shard channels
        deadline = time.monotonic() + 5
        while await _finish_one(r, "moving", f"m{len(heard)}-{time.monotonic()}", reply) == jobs.PUBLISHED:
            assert time.monotonic() < deadline, "still subscribed on the old master"
            await asyncio.sleep(0.05)
        # the channels above followed MOVED, so the slot table names the new master
        assert r.get_node_from_key(reply).port == target.port
        assert await shards.subscribe(reply), "subscribed again, on the new master"
        assert await _finish_one(r, "moving", "after", reply) == jobs.PUBLISHED
        await _heard(heard, 1)
        assert heard[-1] == "result-after"
    finally:
        await shards.aclose()
        await r.aclose()
        redis_cluster.move_slot(slot, home)


async def test_a_dropped_connection_is_subscribed_again_after_the_backoff(
    redis_cluster: RedisClusterProcess, redis_cluster_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sharded, "BACKOFF_SECONDS", 0.5)
    r = _client(redis_cluster_url)
    shards = ShardedSubscriber(r, lambda _, message: None)
    reply = KEYS.reply("dropped", "client-1")
    master = redis_cluster.master_of_key(reply)
    try:
        assert await shards.subscribe(reply)
        with redis.Redis.from_url(master.url) as plain:
            assert plain.execute_command("CLIENT", "KILL", "TYPE", "pubsub") == 1
        deadline = time.monotonic() + 5
        while await _finish_one(r, "dropped", f"d{time.monotonic()}", reply) == jobs.PUBLISHED:
            assert time.monotonic() < deadline, "the subscription outlived its connection"
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.05)  # the reader saw its connection go
        assert not await shards.subscribe(reply), "within the backoff: not tried again"
        await asyncio.sleep(0.5)
        assert await shards.subscribe(reply)
        assert await _finish_one(r, "dropped", "after", reply) == jobs.PUBLISHED
    finally:
        await shards.aclose()
        await r.aclose()
