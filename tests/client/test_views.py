"""The client's cached kernel records (`ClusterViews`): checked by the cluster's version every
`VIEW_TTL`, read again only when it moved (issue 19), dropped at once by a notification."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis as AsyncRedis

from controlplane.client import dispatch
from controlplane.client.dispatch import ClusterViews
from controlplane.protocol.keys import Keys
from controlplane.protocol.records import KernelRecord
from controlplane.redis.connect import AsyncRedisCluster
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
