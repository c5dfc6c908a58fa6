"""controlplane/redis/portable.py: the same calls on one Redis and on a Redis Cluster
(`pytest --redis-cluster` runs these against the session's 3-master cluster)."""

from __future__ import annotations

from typing import Any

import pytest

from controlplane.ops.redis_server import RedisClusterProcess
from controlplane.redis import portable
from controlplane.redis.connect import AsyncPipeline, AsyncRedisCluster, connect
from controlplane.redis.errors import amap_redis_errors

pytestmark = [pytest.mark.integration, pytest.mark.redis_cluster, pytest.mark.timeout(60)]

#: keys that fall in many slots (on a cluster: on every master)
KEYS = [f"kcp:agent:a{i}:lease" for i in range(12)]


async def test_mget_reads_keys_of_every_slot_in_order(redis: Any) -> None:
    for i, key in enumerate(KEYS[::2]):
        await redis.set(key, str(i))
    async with amap_redis_errors():
        values = await portable.mget(redis, KEYS)
    assert values == [str(i // 2) if i % 2 == 0 else None for i in range(len(KEYS))]
    assert await portable.mget(redis, []) == []


async def test_delete_each_and_in_order_across_slots(redis: Any) -> None:
    for key in KEYS:
        await redis.set(key, "x")
    seen: list[int] = []

    def first(pipe: AsyncPipeline) -> None:
        assert portable.delete_each(pipe, KEYS[:6]) == 6
        pipe.sadd("kcp:agents", "a0")

    def then(pipe: AsyncPipeline) -> None:
        seen.append(1)
        pipe.get(KEYS[0])
        pipe.exists(KEYS[7])

    replies = await portable.in_order(redis, first, then)
    assert replies == [1] * 6 + [1, None, 1]
    assert seen == [1]
    assert await redis.exists(*KEYS) == 6


async def test_a_publish_reaches_a_subscriber_wherever_it_listens(redis: Any) -> None:
    """On a cluster every node (masters and replicas) in turn: a classic PUBLISH sent to one node
    is forwarded to all of them."""
    nodes = 1
    if isinstance(redis, AsyncRedisCluster):
        await redis.initialize()
        nodes = len(redis.get_nodes())
    for attempt in range(nodes):
        async with portable.subscribed(redis, "kcp:notify", attempt=attempt) as pubsub:
            await portable.publish(redis, "kcp:notify", f"web{attempt}")
            got = []
            for _ in range(40):  # an earlier attempt's message may reach this node late (the cluster bus)
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.25)
                got += [message["data"]] if message else []
                if f"web{attempt}" in got:
                    break
            assert f"web{attempt}" in got, (attempt, got)


async def test_drop_connections_then_the_client_reconnects(redis: Any) -> None:
    await redis.set("k", "v")
    await portable.drop_connections(redis)
    assert await redis.get("k") == "v"


async def test_a_node_subscription_carries_the_clusters_acl_user(
    redis_cluster: RedisClusterProcess, redis_cluster_url: str
) -> None:
    from redis import Redis as SyncRedis

    for node in redis_cluster.nodes:
        with SyncRedis.from_url(node.url) as admin:
            admin.acl_setuser(
                "sub", enabled=True, passwords=["+pw"], commands=["+@all"], keys=["*"], channels=["*"]
            )
    client = connect(redis_cluster_url.replace("redis+cluster://", "redis+cluster://sub:pw@"))
    try:
        async with portable.subscribed(client, "kcp:notify") as pubsub:
            assert pubsub.connection is not None
            assert pubsub.connection.username == "sub"
            await portable.publish(client, "kcp:notify", "web")
            message = None
            for _ in range(40):
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.25)
                if message:
                    break
            assert message is not None and message["data"] == "web"
    finally:
        await client.aclose()
        for node in redis_cluster.nodes:
            with SyncRedis.from_url(node.url) as admin:
                admin.acl_deluser("sub")
