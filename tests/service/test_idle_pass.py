"""The leader reacts to changes: an idle pass costs the same few commands whatever the fleet's
size, and what changes (a lease, a version, a kernel process) brings the cluster back into view."""

from __future__ import annotations

import asyncio
import time

import pytest
from redis.asyncio import Redis as AsyncRedis

from controlplane.protocol.keys import Keys
from controlplane.protocol.models import ClusterConfig, ClusterStatus, KernelState
from controlplane.protocol.records import AgentLease, AgentRecord
from controlplane.redis.state import State
from controlplane.service import reconciler as reconciler_module
from controlplane.service.leader import LeaderLease
from controlplane.service.reconciler import Reconciler
from controlplane.settings import Settings

KEYS = Keys()
pytestmark = pytest.mark.integration


async def _redis_ms(redis: AsyncRedis) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def _beat(redis: AsyncRedis, agents: list[str], version: str = "1") -> None:
    now = await _redis_ms(redis)
    async with redis.pipeline(transaction=False) as pipe:
        for name in agents:
            pipe.set(KEYS.agent_lease(name), AgentLease(now, version).encode(), px=60_000)
        await pipe.execute()


async def _calls(redis: AsyncRedis) -> int:
    info = await redis.info("commandstats")
    return sum(int(v["calls"]) for v in info.values())


#: No sweep slice in the way of the command counts.
SETTINGS = Settings(full_sweep_interval=3600)
#: The same with short leases: a kernel's death and a new leader's blind window (lease TTL plus
#: heartbeat) take 0.5 s, not 2 s. The agents' leases are written to last a minute either way.
SHORT_LEASES = Settings(full_sweep_interval=3600, heartbeat_interval=0.1, lease_ttl=0.4)


async def _fleet(
    redis: AsyncRedis, agents: int, clusters: int, size: int, settings: Settings = SETTINGS
) -> tuple[Reconciler, State]:
    """`agents` registered agents and `clusters` clusters of `size`, placed and running (the
    kernels' starts done by hand, as kernel_start.lua would, with their processes listed)."""
    state = State(redis, KEYS)
    lease = LeaderLease(redis, KEYS, ttl=30)
    assert await lease.acquire()
    names = [f"a{i}" for i in range(agents)]
    for name in names:
        await redis.hset(KEYS.agent(name), mapping=AgentRecord(name=name, slots=size * clusters).to_fields())
        await redis.sadd(KEYS.agents(), name)
    await _beat(redis, names)
    for c in range(clusters):
        await state.create_cluster(f"c{c}", ClusterConfig(), size)
    reconciler = Reconciler(state, settings, lease)
    await reconciler.reconcile_all()  # places everything
    for c in range(clusters):
        for k in await state.kernels(f"c{c}"):
            await redis.hset(
                KEYS.kernel(k.cluster, k.name),
                mapping={"state": KernelState.RUNNING.value, "started_at": f"{time.time() - 60:.3f}"},
            )
            await redis.hset(KEYS.agent_running(k.agent), f"{k.cluster}/{k.name}", "1")
            await redis.incr(KEYS.cluster_version(k.cluster))
    await _beat(redis, names, version="2")  # the running records changed
    for _ in range(3):  # settle: statuses written, versions seen
        await reconciler.reconcile_all()
    assert {c.status for c in await state.list_clusters()} == {ClusterStatus.RUNNING}
    return reconciler, state


async def _idle_pass_cost(redis: AsyncRedis, reconciler: Reconciler) -> int:
    before = await _calls(redis)
    await reconciler.reconcile_all()
    return await _calls(redis) - before - 1  # less the INFO of `before`


@pytest.mark.timeout(60)
async def test_an_idle_pass_costs_the_same_few_commands_whatever_the_fleet(redis: AsyncRedis) -> None:
    small, _ = await _fleet(redis, agents=2, clusters=1, size=2)
    small_cost = await _idle_pass_cost(redis, small)
    assert small.reconciled == 0, "a settled fleet: no cluster looked at"
    await redis.flushall()
    big, _ = await _fleet(redis, agents=12, clusters=6, size=8)
    big_cost = await _idle_pass_cost(redis, big)
    assert big.reconciled == 0
    # one MGET of the leases, one of the versions, the clock now and then: not per kernel
    assert big_cost == small_cost <= 4, (small_cost, big_cost)
    print(f"\nidle pass: {small_cost} commands at 2 agents x 2 kernels, {big_cost} at 12 agents x 48")


@pytest.mark.timeout(60)
@pytest.mark.redis_cluster
async def test_a_pass_is_bounded_and_the_rest_waits_for_the_next(
    redis: AsyncRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    reconciler, state = await _fleet(redis, agents=2, clusters=5, size=1)
    monkeypatch.setattr(reconciler_module, "MAX_CLUSTERS_PER_PASS", 2)
    for name in ("c0", "c1", "c2", "c3", "c4"):
        await state.update_cluster(name, desired=2)
    await reconciler.reconcile_all()
    assert reconciler.reconciled == 2
    await reconciler.reconcile_all()
    await reconciler.reconcile_all()
    sizes = [len(await state.kernels(f"c{i}")) for i in range(5)]
    assert sizes == [2] * 5, "every one, in 3 passes"


@pytest.mark.timeout(60)
@pytest.mark.redis_cluster
async def test_changes_bring_clusters_back_into_view(redis: AsyncRedis) -> None:
    reconciler, state = await _fleet(redis, agents=3, clusters=3, size=2, settings=SHORT_LEASES)
    await reconciler.reconcile_all()
    assert reconciler.reconciled == 0

    # a client's write to one cluster (its version moves): that cluster, and only it
    await state.update_cluster("c1", desired=3)
    await reconciler.reconcile_all()
    assert reconciler.reconciled == 1
    assert len(await state.kernels("c1")) == 3

    # a kernel process exits on a live agent (its running record and version change): its
    # cluster is watched at every pass, and the kernel is declared dead after a lease TTL
    victim = (await state.kernels("c0"))[0]
    await redis.hdel(KEYS.agent_running(victim.agent), f"c0/{victim.name}")
    await _beat(redis, [victim.agent], version="3")
    await reconciler.reconcile_all()
    assert reconciler.detector.missing == {f"c0/{victim.name}"}
    await asyncio.sleep(reconciler.detector.window + 0.1)  # the new leader's blind window, too
    await _beat(redis, ["a0", "a1", "a2"], version="3")
    await reconciler.reconcile_all()
    await reconciler.reconcile_all()
    again = {k.name: k for k in await state.kernels("c0")}[victim.name]  # the lowest free name
    assert again.placed_at != victim.placed_at, "the dead kernel was removed and placed again"
    assert again.agent != victim.agent, "not back onto the agent it died on, while others have room"
    assert int(await redis.hget(KEYS.reliability(), "kernels_dead_total") or 0) == 1


@pytest.mark.timeout(60)
@pytest.mark.redis_cluster
async def test_a_kernel_death_is_confirmed_from_the_agents_record(redis: AsyncRedis) -> None:
    """The leader's copy of a running record follows the agent's beats; a kernel listed again
    before the next beat (a slow beat, a restart) must not be declared dead on the old copy."""
    reconciler, state = await _fleet(redis, agents=2, clusters=1, size=2, settings=SHORT_LEASES)
    victim = (await state.kernels("c0"))[0]
    ref = f"c0/{victim.name}"
    await redis.hdel(KEYS.agent_running(victim.agent), ref)
    await _beat(redis, [victim.agent], version="3")
    await reconciler.reconcile_all()
    assert reconciler.detector.missing == {ref}
    await redis.hset(KEYS.agent_running(victim.agent), ref, "2")  # back, but no beat since
    await asyncio.sleep(reconciler.detector.window + 0.1)
    await _beat(redis, ["a0", "a1"], version="3")  # the same version: the copy stays stale
    await reconciler.reconcile_all()
    await reconciler.reconcile_all()
    assert not await redis.hget(KEYS.reliability(), "kernels_dead_total")
    assert reconciler.detector.missing == set()
