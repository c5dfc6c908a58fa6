"""The client's cached kernel records (`ClusterViews`): checked by the cluster's version every
`VIEW_TTL`, read again only when it moved (issue 19), dropped at once by a notification."""

from __future__ import annotations

import asyncio
import time

import pytest
from conftest import wait_for
from redis.asyncio import Redis as AsyncRedis

from controlplane.client import dispatch
from controlplane.client.dispatch import ClusterViews
from controlplane.errors import RedisUnavailable
from controlplane.ops.redis_server import RedisClusterProcess
from controlplane.protocol.keys import Keys
from controlplane.protocol.records import KernelRecord
from controlplane.redis import portable
from controlplane.redis.connect import AsyncRedisCluster, connect
from controlplane.redis.errors import amap_redis_errors
from controlplane.redis.state import State

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

KEYS = Keys()


async def hgetalls(r: AsyncRedis) -> int:
    """HGETALLs served so far (on a Redis Cluster: by all its masters)."""
    if isinstance(r, AsyncRedisCluster):
        every = await r.info("commandstats", target_nodes=AsyncRedisCluster.PRIMARIES)
        return sum(int(stats.get("cmdstat_hgetall", {}).get("calls", 0)) for stats in every.values())
    stats = await r.info("commandstats")
    return int(stats.get("cmdstat_hgetall", {}).get("calls", 0))


async def put_kernel(r: AsyncRedis, name: str, state: str = "running") -> None:
    record = KernelRecord(cluster="c", name=name, agent="a", state=state, epoch=1)
    await r.hset(KEYS.kernel("c", name), mapping=record.to_fields())
    await r.sadd(KEYS.cluster_kernels("c"), name)


@pytest.mark.redis_cluster
async def test_records_are_read_again_only_when_the_version_moved(
    redis: AsyncRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dispatch, "VIEW_TTL", 0.0)  # every get checks the version
    await put_kernel(redis, "k0")
    views = ClusterViews(State(redis, KEYS))
    try:
        kernels, _ = await views.get("c")
        assert [k.name for k in kernels] == ["k0"]
        reads = await hgetalls(redis)
        await put_kernel(redis, "k1")  # without a version change the view does not see it
        for _ in range(5):
            kernels, _ = await views.get("c")
        assert [k.name for k in kernels] == ["k0"]
        assert await hgetalls(redis) == reads
        await redis.incr(KEYS.cluster_version("c"))
        kernels, _ = await views.get("c")
        assert [k.name for k in kernels] == ["k0", "k1"]
        assert await hgetalls(redis) == reads + 2
        views.invalidate("c")  # a notification, or a failed attempt: read at once
        await put_kernel(redis, "k2")
        kernels, _ = await views.get("c")
        assert [k.name for k in kernels] == ["k0", "k1", "k2"]
    finally:
        await views.stop()


@pytest.mark.integration
@pytest.mark.timeout(60)
async def test_on_a_redis_cluster_the_notify_watcher_moves_to_another_node_when_its_node_dies(
    redis_cluster: RedisClusterProcess, redis_cluster_url: str
) -> None:
    redis = connect(redis_cluster_url)
    assert isinstance(redis, AsyncRedisCluster)
    await redis.initialize()
    names = sorted(n.name for n in redis.get_nodes())  # the masters (what the client knows)
    node = next(n for n in redis_cluster.masters() if f"127.0.0.1:{n.port}" in names)
    views = ClusterViews(State(redis, KEYS))
    views._attempt = names.index(f"127.0.0.1:{node.port}") - 1  # its first subscription: on `node`

    async def subscribed_on_the_node() -> bool:
        plain = AsyncRedis.from_url(node.url, decode_responses=True)
        try:
            return int((await plain.pubsub_numsub(KEYS.notify()))[0][1]) == 1
        finally:
            await plain.aclose()

    async def changed_after_a_publish() -> bool:
        waiting = asyncio.ensure_future(views.wait_change(0.3))
        await asyncio.sleep(0.05)
        try:
            async with amap_redis_errors():
                await portable.publish(redis, KEYS.notify(), "c")
        except RedisUnavailable:  # the killed master was the one published to: the next try
            return False
        finally:
            await waiting
        return views._changed.is_set()

    try:
        views._watch_notifications()
        await wait_for(subscribed_on_the_node, 10, "the watcher to subscribe on the chosen master")
        assert await changed_after_a_publish()
        redis_cluster.kill(node)  # its replica takes over after the node timeout
        killed = time.monotonic()
        await wait_for(changed_after_a_publish, 20, "a notification through another node")
        print(f"\nnotify watcher: notified again {time.monotonic() - killed:.2f}s after its node was killed")
    finally:
        await views.stop()
        await redis.aclose()
        redis_cluster.restart(node)  # it rejoins as its successor's replica
