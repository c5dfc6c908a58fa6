"""Down means 0, not gone: the leader lists agents and kernels it removed because a lease lapsed
(`kcp:lapsed:*`), and only those; what is placed or registered again leaves the list."""

from __future__ import annotations

import asyncio
import time

import pytest
from redis.asyncio import Redis as AsyncRedis

from controlplane import Settings
from controlplane.protocol.keys import ASSIGN_RUN, Keys
from controlplane.protocol.models import ClusterConfig
from controlplane.protocol.records import AgentLease, AgentRecord, KernelRecord, LapsedRecord
from controlplane.redis.snapshot import read_snapshot
from controlplane.redis.state import State
from controlplane.service.leader import LeaderLease
from controlplane.service.reconciler import Reconciler

KEYS = Keys()


async def agent(redis: AsyncRedis, name: str, *, alive: bool, draining: bool = False) -> None:
    record = AgentRecord(name=name, host=f"host-{name}", slots=3, draining=draining)
    await redis.hset(KEYS.agent(name), mapping=record.to_fields())
    await redis.sadd(KEYS.agents(), name)
    seconds, micros = await redis.time()
    beat = seconds * 1000 + micros // 1000 - 4000  # its last heartbeat, 4 s ago
    await redis.set(KEYS.agent_lease(name), AgentLease(beat, "1").encode(), px=60_000 if alive else 100)


@pytest.mark.integration
@pytest.mark.timeout(30)
@pytest.mark.redis_cluster
async def test_the_leader_lists_what_lapsed_and_forgets_what_left_on_purpose(
    redis: AsyncRedis, redis_url: str
) -> None:
    # short leases (a blind window of 0.5 s, not 2 s): both agents' last beats are 4 s old
    settings = Settings(redis_url=redis_url, down_retention=60, heartbeat_interval=0.1, lease_ttl=0.4)
    state = State(redis, KEYS)
    lease = LeaderLease(redis, KEYS, ttl=10)
    assert await lease.acquire()
    reconciler = Reconciler(state, settings, lease)
    # a new leader declares no death until its blind window (lease TTL + heartbeat) has passed
    # since its first read of Redis (docs/reliability.md, "The decision rule")
    await reconciler.detector.fleet()
    await asyncio.sleep(reconciler.detector.window)
    await agent(redis, "crashed", alive=False)  # lease lapsed: killed, or its host is gone
    await agent(redis, "stopped", alive=False, draining=True)  # said goodbye (ACL: record stays)
    await state.create_cluster("c", ClusterConfig(), 1)
    kernel = KernelRecord(cluster="c", name="worker-0", agent="crashed", state="running", host="host-crashed")
    await redis.hset(KEYS.kernel("c", "worker-0"), mapping=kernel.to_fields())
    await redis.sadd(KEYS.cluster_kernels("c"), "worker-0")
    await redis.hset(KEYS.agent_kernels("crashed"), "c/worker-0", ASSIGN_RUN)
    reconciler.detector.invalidate()
    await reconciler.detector.fleet()  # the leader saw their last beats
    await asyncio.sleep(0.15)  # then their leases lapsed

    await reconciler.reconcile_all()
    assert await redis.smembers(KEYS.agents()) == set()  # both forgotten
    counted = await redis.hgetall(KEYS.reliability())
    assert (counted["agents_dead_total"], counted["agents_departed_total"]) == ("1", "1"), "stopped: no death"
    lapsed = await redis.hgetall(KEYS.lapsed_agents())
    assert set(lapsed) == {"crashed"}
    entry = LapsedRecord.decode(lapsed["crashed"], "test")
    assert entry is not None and entry.host == "host-crashed" and entry.slots == 3
    assert time.time() - 6 < entry.last_seen < time.time() - 3  # its last heartbeat
    assert 50 < entry.until - time.time() <= 60
    assert 50_000 < await redis.pttl(KEYS.lapsed_agents()) <= 60_000
    lost = await redis.hgetall(KEYS.lapsed_kernels())
    assert set(lost) == {"c/worker-0"}
    snap = await read_snapshot(state)
    assert [g.name for g in snap.lapsed_agents] == ["crashed"]
    assert [(g.name, g.record.agent) for g in snap.clusters[0].lapsed] == [("worker-0", "crashed")]

    # an agent with room comes: worker-0 is placed again, and is no longer listed as lost
    await agent(redis, "fresh", alive=True)
    reconciler.announced.append("agent fresh")  # as its registration does (`service:wake`)
    await reconciler.reconcile_all()
    assert (await state.kernels("c"))[0].agent == "fresh"
    assert await redis.hgetall(KEYS.lapsed_kernels()) == {}
    assert (await read_snapshot(state)).clusters[0].lapsed == []
