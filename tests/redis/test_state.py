"""State and the leader's cluster lifecycle on one Redis and on a Redis Cluster (`pytest
--redis-cluster`): create, get, list, scale and destroy kcp clusters whose keys are on several
masters, with agents placed by the reconciler (no kernel process: their starts are written by hand)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from controlplane.errors import ClusterExists
from controlplane.protocol.keys import Keys
from controlplane.protocol.models import ClusterConfig, ClusterStatus, KernelState
from controlplane.protocol.records import AgentLease, AgentRecord
from controlplane.redis.connect import AsyncRedisCluster
from controlplane.redis.state import State, clock_offset
from controlplane.service.leader import LeaderLease
from controlplane.service.reconciler import Reconciler
from controlplane.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.redis_cluster, pytest.mark.timeout(60)]

KEYS = Keys()
NAMES = [f"c{i}" for i in range(6)]


async def _agents(redis: Any, names: list[str]) -> None:
    seconds, micros = await redis.time()
    now = int(seconds) * 1000 + int(micros) // 1000
    for name in names:
        await redis.hset(KEYS.agent(name), mapping=AgentRecord(name=name, slots=8).to_fields())
        await redis.sadd(KEYS.agents(), name)
        await redis.set(KEYS.agent_lease(name), AgentLease(now, "1").encode(), px=60_000)


async def _run_kernels(redis: Any, state: State, name: str) -> None:
    """What kernel_start.lua and the agent would write for each placed kernel."""
    for k in await state.kernels(name):
        await redis.hset(
            KEYS.kernel(name, k.name),
            mapping={"state": KernelState.RUNNING.value, "started_at": f"{time.time() - 60:.3f}"},
        )
        await redis.hset(KEYS.agent_running(k.agent), f"{name}/{k.name}", "1")
        await redis.incr(KEYS.cluster_version(name))


async def test_clusters_are_created_read_scaled_and_destroyed(redis: Any) -> None:
    if isinstance(redis, AsyncRedisCluster):
        await redis.initialize()
        homes = {redis.get_node_from_key(KEYS.cluster(n)).name for n in NAMES}
        assert len(homes) >= 2, "the clusters' keys are on several masters"
    state = State(redis, KEYS)
    lease = LeaderLease(redis, KEYS, ttl=30)
    assert await lease.acquire()
    assert await state.has_leader()
    await _agents(redis, ["a1", "a2"])
    for name in NAMES:
        await state.create_cluster(name, ClusterConfig(), 2)
    with pytest.raises(ClusterExists):
        await state.create_cluster("c0", ClusterConfig(), 1)
    assert [c.name for c in await state.list_clusters()] == NAMES
    assert [c.name for c in await state.clusters(["c3", "nope", "c1"])] == ["c3", "c1"]
    reconciler = Reconciler(state, Settings(full_sweep_interval=3600), lease)
    await reconciler.reconcile_all()
    for name in NAMES:
        kernels = await state.kernels(name)
        assert len(kernels) == 2 and {k.agent for k in kernels} <= {"a1", "a2"}
        await _run_kernels(redis, state, name)
    for _ in range(3):
        await reconciler.reconcile_all()
    assert {c.status for c in await state.list_clusters()} == {ClusterStatus.RUNNING}
    # the clusters' kernels in one read, across the masters on a Redis Cluster
    many = await state.kernels_of([*NAMES, "nope"])
    assert many == {**{n: await state.kernels(n) for n in NAMES}, "nope": []}
    assert [k.name for k in many["c0"]] == ["worker-0", "worker-1"], "ordered by index"
    assert {a.name for a, alive in await state.agents() if alive} == {"a1", "a2"}
    assert abs(await clock_offset(redis) + time.monotonic() * 1000 - time.time() * 1000) < 5_000

    # scale c0 up (the reconciler places a third kernel), then destroy c1
    await state.update_cluster("c0", desired=3)
    await reconciler.reconcile_all()
    assert len(await state.kernels("c0")) == 3
    await state.update_cluster("c1", status=ClusterStatus.STOPPED.value, stopped_at=f"{time.time() - 60:.3f}")
    for _ in range(3):
        await reconciler.reconcile_all()
    assert await state.get_cluster("c1") is None
    assert [c.name for c in await state.list_clusters()] == [n for n in NAMES if n != "c1"]
    left = [key async for key in redis.scan_iter(match="kcp:*{c1}*")]
    assert left == [KEYS.cluster_term("c1")], "only the fencing term stays"
