"""kcp on a 3-master Redis Cluster (the session's `redis_cluster` fixture, in every run): `kcp
serve` and two `kcp agent` processes, three kcp clusters whose keys live on three different
masters, every kernel placed on an agent and running."""

from __future__ import annotations

import time

import pytest
from conftest import ProcessStack, wait_for

from controlplane import KcpClient, Settings
from controlplane.errors import RedisUnavailable
from controlplane.ops.redis_server import RedisClusterProcess
from controlplane.protocol import stats
from controlplane.protocol.keys import Keys
from controlplane.protocol.models import KernelState
from controlplane.redis.connect import connect
from controlplane.redis.errors import amap_redis_errors
from controlplane.redis.state import State

pytestmark = [pytest.mark.system, pytest.mark.redis_cluster, pytest.mark.timeout(120)]

KEYS = Keys()
KERNELS = 2  # per kcp cluster: 6 kernels on 2 agents of 4 slots


def names_on_every_master(redis_cluster: RedisClusterProcess) -> list[str]:
    """Three kcp cluster names whose slots (their `{name}` hash tag) are on three different masters."""
    chosen: dict[int, str] = {}
    for i in range(1000):
        name = f"c{i}"
        chosen.setdefault(redis_cluster.master_of_key(KEYS.cluster(name)).port, name)
        if len(chosen) == len(redis_cluster.masters()):
            break
    assert len(chosen) == 3
    return sorted(chosen.values())


@pytest.fixture
def cluster_stack(redis_cluster_url: str) -> ProcessStack:
    return ProcessStack(redis_cluster_url)


async def _placed(state: State, names: list[str]) -> bool:
    for name in names:
        kernels = await state.kernels(name)
        if len(kernels) != KERNELS or not all(k.agent in ("a1", "a2") for k in kernels):
            return False
    assigned = {}
    for agent in ("a1", "a2"):
        assigned.update(await state.redis.hgetall(KEYS.agent_kernels(agent)))
    return len(assigned) == KERNELS * len(names)


async def _place_three_clusters(
    redis_cluster: RedisClusterProcess, url: str, stack: ProcessStack, state: State
) -> list[str]:
    """`kcp serve`, agents a1 and a2 (4 slots each), three clusters of `KERNELS` kernels on three
    masters; returns their names once every kernel is placed."""
    names = names_on_every_master(redis_cluster)
    stack.serve()
    stack.agent("a1", 4)
    stack.agent("a2", 4)

    async def both_agents() -> bool:
        return {a.name for a, alive in await state.agents() if alive} == {"a1", "a2"}

    await wait_for(both_agents, 30, "both agents to register with live leases")
    async with KcpClient(Settings(redis_url=url)) as kcp:
        for name in names:
            await kcp.create_cluster(name, KERNELS, wait=0.0)
    await wait_for(lambda: _placed(state, names), 30, "every kernel placed on an agent")
    return names


async def test_serve_and_two_agents_place_kernels_of_clusters_on_every_master(
    redis_cluster: RedisClusterProcess, redis_cluster_url: str, cluster_stack: ProcessStack
) -> None:
    redis = connect(redis_cluster_url)
    state = State(redis, KEYS)
    try:
        names = await _place_three_clusters(redis_cluster, redis_cluster_url, cluster_stack, state)
        homes = {redis_cluster.master_of_key(KEYS.kernel(n, "worker-0")).port for n in names}
        assert len(homes) == 3, "each cluster's kernels live on its own master"
        agents = {k.agent for n in names for k in await state.kernels(n)}
        assert agents == {"a1", "a2"}, "the kernels are spread over both agents"
        assert await state.has_leader()
        listed = {c.name for c in await state.list_clusters()}
        assert listed == set(names)
    finally:
        cluster_stack.stop()
        await redis.aclose()


async def test_every_placed_kernel_runs(
    redis_cluster: RedisClusterProcess, redis_cluster_url: str, cluster_stack: ProcessStack
) -> None:
    redis = connect(redis_cluster_url)
    state = State(redis, KEYS)
    try:
        names = await _place_three_clusters(redis_cluster, redis_cluster_url, cluster_stack, state)

        async def running() -> bool:
            states = [k.state for n in names for k in await state.kernels(n)]
            return states == [KernelState.RUNNING] * (KERNELS * len(names))

        await wait_for(running, 30, "every kernel running")
    finally:
        cluster_stack.stop()
        await redis.aclose()


@pytest.mark.timeout(150)
async def test_the_control_plane_survives_a_master_failover_and_places_again(
    redis_cluster: RedisClusterProcess, redis_cluster_url: str, cluster_stack: ProcessStack
) -> None:
    """SIGKILL the master of the leader key's slot (its replica has AOF always) while `kcp serve`
    and two agents run: a leader again, both agents alive again, and a kcp cluster created after
    the promotion is placed. Says how long each took (no job runs on a cluster yet)."""
    redis = connect(redis_cluster_url)
    state = State(redis, KEYS)
    victim = redis_cluster.master_of_key(KEYS.leader())
    try:
        names = await _place_three_clusters(redis_cluster, redis_cluster_url, cluster_stack, state)
        redis_cluster.kill(victim)
        killed = time.monotonic()

        async def settled() -> bool:
            try:
                async with amap_redis_errors():
                    alive = {a.name for a, ok in await state.agents() if ok}
                    return alive == {"a1", "a2"} and await state.has_leader()
            except RedisUnavailable:
                return False

        await wait_for(settled, 30, "a leader and both agents alive after the failover")
        settled_after = time.monotonic() - killed
        later = next(n for n in (f"d{i}" for i in range(100)) if n not in names)
        async with KcpClient(Settings(redis_url=redis_cluster_url)) as kcp:
            await kcp.create_cluster(later, KERNELS, wait=0.0)
        await wait_for(lambda: _placed(state, [*names, later]), 30, "the new cluster placed")
        placed_after = time.monotonic() - killed
        back, placed = f"{settled_after:.2f}s", f"{placed_after:.2f}s"
        print(f"\nfailover: leader and agents back {back}, new cluster placed {placed} after the kill")
        assert victim not in redis_cluster.masters()
        dead = await redis.hget(KEYS.reliability(), stats.AGENTS_DEAD)
        assert int(dead or 0) == 0, "the outage of one master is no agent's death"
    finally:
        cluster_stack.stop()
        await redis.aclose()
        redis_cluster.restart(victim)
