"""Failure handling: leader fencing, the failure detector, the redelivery budget, a leader
killed mid-reconcile, and `redis+sentinel://` URLs."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections import Counter

import pytest
from conftest import ProcessStack, wait_for
from redis.asyncio import Redis as AsyncRedis

from controlplane import ClusterConfig, KcpClient, KernelError, KernelGone, OrchestrationConfig, Settings
from controlplane.protocol.keys import ASSIGN_DRAIN, ASSIGN_RUN, Keys
from controlplane.protocol.models import ClusterStatus, KernelState
from controlplane.protocol.records import AgentLease, AgentRecord, ClusterRecord
from controlplane.redis.connect import parse_sentinel_url
from controlplane.redis.state import State
from controlplane.service.detector import FailureDetector, Fleet
from controlplane.service.leader import LeaderLease, NotLeader
from controlplane.service.reconciler import Reconciler
from kernel_agent.agent.daemon import Agent, AgentConfig, _Child
from kernel_agent.agent.heartbeat import Heartbeat

KEYS = Keys()


# ---------------------------------------------------------------- unit


@pytest.mark.unit
def test_sentinel_urls_parse_and_bad_ones_say_why() -> None:
    spec = parse_sentinel_url("redis+sentinel://:secret@10.0.0.1:26379,[::1]:26380/kcp-main/2")
    assert spec.sentinels == (("10.0.0.1", 26379), ("::1", 26380))
    assert (spec.service, spec.db, spec.password) == ("kcp-main", 2, "secret")
    for bad, why in [
        ("redis+sentinel://h/m", "host:port"),
        ("redis+sentinel://h:1", "service_name"),
        ("redis+sentinel://h:1/m/zero", "service_name"),
        ("redis://h:1/m", "not a redis\\+sentinel"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse_sentinel_url(bad)


@pytest.mark.unit
def test_settings_refuse_a_lease_shorter_than_two_heartbeats() -> None:
    with pytest.raises(ValueError, match="twice heartbeat_interval"):
        Settings(heartbeat_interval=1.0, lease_ttl=1.5)
    assert Settings().lease_ttl <= 2.0, "the default detects a dead agent within 2 s"


# ---------------------------------------------------------------- integration (real Redis)


async def _web_on_one_agent(redis: AsyncRedis, kernels: int) -> State:
    """Cluster `web` of `kernels` created, and agent `a1` (4 slots) registered with a fresh lease."""
    state = State(redis, KEYS)
    await state.create_cluster("web", ClusterConfig(), kernels)
    await redis.hset(KEYS.agent("a1"), mapping=AgentRecord(name="a1", slots=4).to_fields())
    await redis.sadd(KEYS.agents(), "a1")
    seconds, micros = await redis.time()
    await redis.set(
        KEYS.agent_lease("a1"), AgentLease(seconds * 1000 + micros // 1000, "1").encode(), px=10_000
    )
    return state


async def _lead(redis: AsyncRedis, token: str, ttl: float) -> Reconciler:
    lease = LeaderLease(redis, KEYS, ttl=ttl, token=token)
    assert await lease.acquire()
    return Reconciler(State(redis, KEYS), Settings(), lease)


@pytest.mark.integration
@pytest.mark.timeout(30)
@pytest.mark.redis_cluster
async def test_a_deposed_leaders_writes_are_refused_once_a_new_one_leads(redis: AsyncRedis) -> None:
    state = State(redis, KEYS)
    await state.create_cluster("web", ClusterConfig(), 2)
    await redis.hset(KEYS.agent("a1"), mapping=AgentRecord(name="a1", slots=4).to_fields())
    old = await _lead(redis, "old", ttl=0.3)
    await old.lease.raise_terms(["web"])
    cluster = await state.get_cluster("web")
    assert cluster is not None
    fleet = Fleet(agents={"a1": AgentRecord(name="a1", slots=4)}, alive=frozenset({"a1"}), assigned=Counter())
    assert (await old._place(cluster, [], 1, fleet))[0] == 1, "the leader writes"
    (kernel,) = await state.kernels("web")

    # the old leader pauses; its lease lapses and another instance takes over, in a newer term
    await asyncio.sleep(0.4)
    new = await _lead(redis, "new", ttl=3.0)
    assert new.lease.term > old.lease.term
    await new.lease.raise_terms(["web"])  # what the new leader's first pass does before reading
    before = await redis.hgetall(KEYS.cluster("web")), await redis.smembers(KEYS.cluster_kernels("web"))

    old.lease._renewed_at = time.monotonic()  # it resumes believing it still leads
    with pytest.raises(NotLeader):
        await old._place(cluster, [kernel], 1, fleet)
    assert not old.lease.leading, "refused once, it stops leading"
    for attempt in (old._set_status(cluster, [kernel], "a stale reason"), old._remove_kernel(kernel)):
        old.lease.term, old.lease._renewed_at = 1, time.monotonic()  # and tries again, still deposed
        with pytest.raises(NotLeader):
            await attempt
    after = await redis.hgetall(KEYS.cluster("web")), await redis.smembers(KEYS.cluster_kernels("web"))
    assert after == before, "nothing of a deposed leader's placement, status or removal was written"
    assert await state.kernels("web") == [kernel]
    assert not await redis.hexists(KEYS.agent_kernels("a1"), "web/worker-1"), "nor its agent writes"
    assert await redis.hget(KEYS.reliability(), "leader_fenced_writes_total") == "3"

    # the new leader writes; a status guard (a destroy landed meanwhile) refuses its write
    assert await new._set_status(cluster, [kernel], "waiting") is ClusterStatus.ERROR
    assert await redis.hget(KEYS.cluster("web"), "reason") == "waiting"
    await redis.hset(KEYS.cluster("web"), ClusterRecord.STATUS, ClusterStatus.STOPPED.value)
    assert await new._set_status(cluster, [kernel], "x") is ClusterStatus.STOPPED
    assert await redis.hget(KEYS.cluster("web"), "reason") == "waiting", "nothing written over a destroy"


@pytest.mark.integration
@pytest.mark.timeout(30)
@pytest.mark.redis_cluster
async def test_an_assignment_lost_after_the_fenced_write_is_repaired(redis: AsyncRedis) -> None:
    state = await _web_on_one_agent(redis, 1)
    first = await _lead(redis, "first", ttl=3.0)
    await first.reconcile_all()
    assert await redis.hgetall(KEYS.agent_kernels("a1")) == {"web/worker-0": ASSIGN_RUN}

    # the leader dies between the kernel's (fenced) record and its agent's assignment, and a
    # stray assignment of a kernel it never kept is left behind
    await redis.delete(KEYS.agent_kernels("a1"))
    await redis.hset(KEYS.agent_kernels("a1"), "web/worker-7", ASSIGN_RUN)
    await first.lease.release()
    second = await _lead(redis, "second", ttl=3.0)
    await second.reconcile_all()
    assert await redis.hgetall(KEYS.agent_kernels("a1")) == {"web/worker-0": ASSIGN_RUN}
    assert [k.name for k in await state.kernels("web")] == ["worker-0"], "repaired, not replaced"


@pytest.mark.integration
@pytest.mark.redis_cluster
async def test_a_drain_whose_assignment_was_lost_is_written_again(redis: AsyncRedis) -> None:
    """A leader stopped between a drain's fenced write (the record says draining) and the agent's
    assignment (still run) left a process nothing would stop: the next leader writes the drain."""
    await _web_on_one_agent(redis, 2)
    first = await _lead(redis, "first", ttl=3.0)
    await first.reconcile_all()
    await redis.hset(KEYS.kernel("web", "worker-1"), "state", KernelState.DRAINING.value)  # fenced, landed
    await first.lease.release()  # ... and the assignment's "drain" never written
    second = await _lead(redis, "second", ttl=3.0)
    await second.reconcile_all()
    assert await redis.hgetall(KEYS.agent_kernels("a1")) == {
        "web/worker-0": ASSIGN_RUN,
        "web/worker-1": ASSIGN_DRAIN,
        "web/worker-2": ASSIGN_RUN,  # its replacement: a draining kernel is not counted
    }
    assert "drain" in await redis.lrange(KEYS.agent_wake("a1"), 0, -1), "the agent is woken to read it"


@pytest.mark.integration
@pytest.mark.redis_cluster
async def test_a_kernel_removed_in_a_pass_is_not_taken_for_a_stray_assignment(
    redis: AsyncRedis, caplog: pytest.LogCaptureFixture
) -> None:
    """The repair compares with the assignments as the pass began, less what the pass removed
    since: a drained kernel's removal (its assignment deleted) is no stray to rewrite."""
    await _web_on_one_agent(redis, 2)
    leader = await _lead(redis, "only", ttl=3.0)
    await leader.reconcile_all()
    assert len(await redis.hgetall(KEYS.agent_kernels("a1"))) == 2
    await redis.hset(KEYS.kernel("web", "worker-1"), "state", KernelState.STOPPED.value)  # drained
    await redis.incr(KEYS.cluster_version("web"))  # as the kernel's stop script does
    caplog.clear()
    await leader.reconcile_all()
    # removed, and its name placed again (a new record)
    assert await redis.hgetall(KEYS.agent_kernels("a1")) == {
        "web/worker-0": ASSIGN_RUN,
        "web/worker-1": ASSIGN_RUN,
    }
    assert await redis.hget(KEYS.kernel("web", "worker-1"), "state") == KernelState.PENDING.value
    assert not [r for r in caplog.records if "rewrote" in r.getMessage()], "nothing to repair"


@pytest.mark.integration
@pytest.mark.timeout(10)
async def test_detector_holds_each_clusters_assignments_as_the_agents_do(redis: AsyncRedis) -> None:
    """The reconciler reads a cluster's assignments from the detector's index by cluster: it must
    follow every way the agents' assignments change (a read, the leader's own writes, a
    deregistration, a forgotten agent)."""
    detector = FailureDetector(State(redis, KEYS), Settings())

    def by_agent(cluster: str) -> set[tuple[str, str]]:
        held = detector.assignments.items()
        return {(a, ref) for a, refs in held for ref in refs if ref.partition("/")[0] == cluster}

    for agent, refs in {"a1": ["web/k0", "db/k0"], "a2": ["web/k1"]}.items():
        await redis.hset(KEYS.agent(agent), mapping={"name": agent, "slots": "4"})
        await redis.sadd(KEYS.agents(), agent)
        await redis.hset(KEYS.agent_kernels(agent), mapping=dict.fromkeys(refs, ASSIGN_RUN))
    await detector.fleet()
    assert detector.assigned_in("web") == {("a1", "web/k0"), ("a2", "web/k1")} == by_agent("web")
    assert detector.assigned_in("db") == {("a1", "db/k0")}

    detector.assign("a2", "db/k1")
    detector.unassign("a1", "web/k0")
    assert detector.assigned_in("web") == {("a2", "web/k1")} == by_agent("web")
    assert detector.assigned_in("db") == {("a1", "db/k0"), ("a2", "db/k1")} == by_agent("db")

    # a re-read replaces what was held of the agent (the sweep reaches it)
    await redis.delete(KEYS.agent_kernels("a1"))
    await redis.hset(KEYS.agent_kernels("a1"), "cache/k0", ASSIGN_RUN)
    await detector.fleet(touched=["a1"])
    assert detector.assigned_in("db") == {("a2", "db/k1")} == by_agent("db")
    assert detector.assigned_in("cache") == {("a1", "cache/k0")}

    await redis.delete(KEYS.agent("a1"))  # deregistered: gone from the fleet at its next read
    await detector.fleet(touched=["a1"])
    assert detector.assigned_in("cache") == set() == by_agent("cache")
    await detector.forget("a2")
    assert detector.assigned_in("web") == detector.assigned_in("db") == set()
    assert detector._by_cluster == {}, "no empty entry left behind per cluster"


@pytest.mark.integration
@pytest.mark.redis_cluster
async def test_detector_suspects_then_declares_dead_and_spares_blind_periods(redis: AsyncRedis) -> None:
    settings = Settings(heartbeat_interval=0.1, lease_ttl=0.4)
    state = State(redis, KEYS)
    for name in ("fresh", "late", "gone"):
        await redis.hset(KEYS.agent(name), mapping={"name": name, "slots": "2"})
        await redis.sadd(KEYS.agents(), name)
    detector = FailureDetector(state, settings)
    assert detector.window == pytest.approx(0.5)

    # a new detector (a new leader) has not seen Redis yet: its first read opens the window
    fleet = await detector.fleet()
    assert fleet.alive == {"fresh", "late", "gone"}, "no lease renewed since we looked: no death"
    await asyncio.sleep(detector.window + 0.05)

    # Redis lost for longer than the window: the window opens when Redis answers, not at the
    # failure (nobody could renew meanwhile)
    detector.grace()
    await asyncio.sleep(detector.window + 0.05)
    fleet = await detector.fleet()
    assert fleet.alive == {"fresh", "late", "gone"}, "a lease that lapsed during the outage is no death"
    await asyncio.sleep(detector.window + 0.05)

    seconds, micros = await redis.time()
    now_ms = seconds * 1000 + micros // 1000  # leases carry the beat in Redis's clock
    await redis.set(KEYS.agent_lease("fresh"), AgentLease(now_ms, "1").encode(), px=400)
    await redis.set(KEYS.agent_lease("late"), AgentLease(now_ms - 250, "1").encode(), px=400)  # overdue
    await redis.set(KEYS.agent_lease("gone"), AgentLease(now_ms - 1200, "1").encode(), px=400)
    fleet = await detector.fleet()
    assert fleet.alive == {"fresh", "late", "gone"} and fleet.suspect == {"late", "gone"}
    await redis.delete(KEYS.agent_lease("gone"))
    fleet = await detector.fleet()
    assert fleet.alive == {"fresh", "late"} and fleet.suspect == {"late"}
    assert fleet.changed == {"gone"}, "a death is a change the reconciler looks at"
    stats = await redis.hgetall(KEYS.reliability())
    assert stats["agents_dead_total"] == "1" and int(stats["detection_ms_last"]) >= 1200
    await detector.fleet()
    assert (await redis.hgetall(KEYS.reliability()))["agents_dead_total"] == "1", "each death counts once"

    # a running kernel on a live agent, missing from the agent's running record for longer
    # than a lease TTL, is dead
    old = f"{time.time() - 10:.3f}"
    for kernel in ("worker-0", "worker-1"):
        await redis.hset(
            KEYS.kernel("c", kernel),
            mapping={"cluster": "c", "name": kernel, "agent": "fresh", "state": "running", "started_at": old},
        )
        await redis.sadd(KEYS.cluster_kernels("c"), kernel)
    await redis.hset(KEYS.agent_running("fresh"), "c/worker-0", "1")
    await redis.set(KEYS.agent_lease("fresh"), AgentLease(now_ms, "2").encode(), px=1000)  # a new version
    detector.grace()
    fleet = await detector.fleet()  # Redis answers: the window opens; the running record is read
    assert fleet.running["fresh"] == {"c/worker-0"}
    assert await detector.dead_kernels(await state.kernels("c"), fleet) == [], "missing, not dead yet"
    assert detector.missing == {"c/worker-1"}
    await asyncio.sleep(detector.window + 0.05)
    await redis.set(KEYS.agent_lease("fresh"), AgentLease(now_ms, "2").encode(), px=1000)
    fleet = await detector.fleet()
    dead = await detector.dead_kernels(await state.kernels("c"), fleet)
    assert [k.name for k in dead] == ["worker-1"]


@pytest.mark.integration
@pytest.mark.timeout(30)
@pytest.mark.redis_cluster
async def test_heartbeat_thread_renews_leases_and_stops_when_the_agent_stalls(
    redis: AsyncRedis, redis_url: str
) -> None:
    beat = Heartbeat(
        redis_url=redis_url,
        keys=KEYS,
        agent="a1",
        interval=0.1,
        ttl=0.5,
        version=lambda: "7.3",
        stall_after=1.0,
    )
    beat.start()
    try:
        await asyncio.sleep(0.6)  # longer than the TTL: only renewals keep the key
        lease = AgentLease.decode(await redis.get(KEYS.agent_lease("a1")))
        seconds, micros = await redis.time()
        assert lease is not None and lease.version == "7.3"
        # the beat is Redis's clock as the heartbeat estimates it (its offset taken at the middle
        # of a TIME round trip, on a cluster from another node than this TIME): within a few ms
        assert -5 <= seconds * 1000 + micros / 1000 - lease.beat_ms < 300, "the beat is in Redis's clock"

        async def lapsed() -> bool:  # nobody called touch(): the main loop looks wedged
            return not await redis.exists(KEYS.agent_lease("a1"))

        # stalled 1 s after the start, the lease renewed last then lapses 0.5 s later
        await wait_for(lapsed, 2.0, "a stalled agent to let its lease lapse")
    finally:
        await asyncio.to_thread(beat.stop)


@pytest.mark.integration
@pytest.mark.redis_cluster
async def test_agent_starts_a_replaced_kernel_afresh(redis: AsyncRedis, redis_url: str) -> None:
    """Removed and placed again under the same name between two agent ticks, a kernel must not
    inherit the old one's state (finished for good, or a long restart back-off)."""
    agent = Agent(redis, Settings(redis_url=redis_url), AgentConfig(name="a1"))
    now = time.monotonic()
    agent.children = {
        "c/worker-0": _Child("c", "worker-0", done=True, placement="100.0"),  # drained, then re-placed
        "c/worker-1": _Child("c", "worker-1", restarts=6, next_start=now + 10, placement="100.0"),
        "c/worker-2": _Child("c", "worker-2", restarts=6, next_start=now + 10, placement="200.0"),
    }
    for name, placed in (("worker-0", "300.0"), ("worker-1", "300.0"), ("worker-2", "200.0")):
        await redis.hset(KEYS.kernel("c", name), mapping={"agent": "a1", "placed_at": placed})
    assigned = {f"c/worker-{i}": ASSIGN_RUN for i in range(3)}
    await agent._renew_replaced(assigned, now)
    fresh = agent.children
    assert not fresh["c/worker-0"].done and fresh["c/worker-0"].restarts == 0
    assert fresh["c/worker-1"].restarts == 0 and fresh["c/worker-1"].next_start == 0
    assert fresh["c/worker-2"].restarts == 6, "the same placement keeps its crash back-off"


# ---------------------------------------------------------------- system (processes)


@pytest.mark.system
@pytest.mark.timeout(90)
@pytest.mark.redis_cluster
async def test_request_that_kills_every_kernel_ends_in_a_clear_error(
    stack: ProcessStack, redis: AsyncRedis, redis_url: str
) -> None:
    stack.serve()
    for name in ("host-0", "host-1"):
        stack.agent(name, 2, "--handlers", "tests.chaos.handlers")
    await wait_for(lambda: _count(redis, KEYS.agents(), 2), 30, "agents")
    patient = OrchestrationConfig(timeout_ms=60_000, retry_count=0)  # only the budget can stop it
    async with KcpClient(Settings(redis_url=redis_url), orchestration=patient) as kcp:
        await kcp.create_cluster("fragile", 2)
        started = time.monotonic()
        with pytest.raises(KernelError) as caught:
            await kcp.dispatch("fragile", {"type": "CRASH"})
        took = time.monotonic() - started
        assert caught.value.error_type == "RedeliveryExhausted"
        assert "3 times" in str(caught.value)
        print(f"\nCRASH ended with RedeliveryExhausted after {took:.1f}s")
        # the cluster is whole again and serves the next request
        await wait_for(lambda: _running(kcp, "fragile", 2), 30, "kernels back")
        assert (await kcp.dispatch("fragile", {"type": "PING"})).result["pong"] is True
    assert not [k async for k in redis.scan_iter(match=KEYS.job_pattern("fragile"))], "the job is gone"


@pytest.mark.system
@pytest.mark.timeout(90)
@pytest.mark.redis_cluster
async def test_kernel_down_longer_than_its_lease_is_replaced_and_its_jobs_move(
    stack: ProcessStack, redis: AsyncRedis, redis_url: str
) -> None:
    """The agent lives but keeps its crash-looping kernel down (restart back-off): the kernel's own
    lease lapses and the leader declares it dead. A job pinned to it (queued for the dead
    incarnation) fails with KernelGone, or, queued after the restart, runs on the new one: never
    on another kernel."""
    stack.serve()
    for name in ("host-0", "host-1"):
        stack.agent(name, 2, "--handlers", "tests.chaos.handlers")
    await wait_for(lambda: _count(redis, KEYS.agents(), 2), 30, "agents")
    patient = OrchestrationConfig(timeout_ms=20_000, retry_count=0)  # one attempt: the job must move
    async with KcpClient(Settings(redis_url=redis_url), orchestration=patient) as kcp:
        await kcp.create_cluster("flaky", 2)
        # each crash doubles the agent's restart delay (0.2 s, 0.4 s, ...): once it exceeds the
        # lease, the leader declares the kernel dead before the agent brings it back
        lease_ttl = float(stack.ENV["KCP_LEASE_TTL"])
        gone = 0
        for crash in range(8):
            # the back-off this crash starts (0.2 s doubling): while it is shorter than the lease
            # the kernel is back before it could be declared dead, so it is killed again at once
            if 0.2 * 2**crash > lease_ttl:
                await asyncio.sleep(lease_ttl)  # past the start-up grace of the kernel lease
            victim = (await kcp.get_cluster("flaky")).kernels[0]
            os.kill(victim.pid, signal.SIGKILL)
            try:
                result = await asyncio.wait_for(
                    kcp.dispatch("flaky", {"type": "SLEEP", "ms": 1, "tag": f"c{crash}"}, kernel=victim.name),
                    25,
                )
            except KernelGone as exc:
                assert (exc.kernel, exc.epoch) == (victim.name, victim.epoch)
                gone += 1
            else:
                assert result.result["tag"] == f"c{crash}"
                assert result.kernel == victim.name and result.epoch > victim.epoch
            await wait_for(lambda: _running(kcp, "flaky", 2), 30, "a whole cluster again")
            if int(await redis.hget(KEYS.reliability(), "kernels_dead_total") or 0):
                break
        print(
            f"\nkernel declared dead by its lease after {crash + 1} crashes; {gone} pinned call(s) KernelGone"
        )
        assert int(await redis.hget(KEYS.reliability(), "kernels_dead_total") or 0) >= 1
        assert int(await redis.hget(KEYS.reliability(), "agents_dead_total") or 0) == 0
        await wait_for(lambda: _running(kcp, "flaky", 2), 30, "a whole cluster again")


@pytest.mark.system
@pytest.mark.timeout(120)
# single Redis only, for `make test`'s budget (10 s): on the cluster run, the fenced writes and
# the next leader's repair are the integration tests above (each write one script in its slot)
async def test_leader_killed_mid_reconcile_leaves_no_half_placed_kernel(
    stack: ProcessStack, redis: AsyncRedis, redis_url: str
) -> None:
    serves = {p.pid: p for p in (stack.serve(), stack.serve())}
    for name in ("host-0", "host-1"):
        stack.agent(name, 6)
    await wait_for(lambda: _count(redis, KEYS.agents(), 2), 30, "agents")
    rng = random.Random(7)
    kills = 0
    async with KcpClient(Settings(redis_url=redis_url, ready_timeout=40)) as kcp:
        await kcp.create_cluster("churn", 1, {"max_kernels": 10})

        async def live_leader() -> bool:
            token = await redis.get(KEYS.leader())
            return bool(token) and int(token.split(":")[1]) in serves

        for desired in (9, 2, 8, 1, 6):
            await wait_for(live_leader, 20, "a live leader")
            await redis.hset(KEYS.cluster("churn"), "desired", desired)
            await redis.lpush(KEYS.service_wake(), "test")
            await asyncio.sleep(rng.uniform(0.0, 0.15))  # somewhere inside the pass that acts on it
            victim = serves.pop(int((await redis.get(KEYS.leader())).split(":")[1]))
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            kills += 1
            new = stack.serve()
            serves[new.pid] = new
            # the cluster's keys are whole at once (one script); an assignment written after
            # them is repaired by the next leader's first pass
            await wait_for(lambda: _consistent(redis, "churn"), 20, "every kernel whole")
        await wait_for(lambda: _running(kcp, "churn", 6), 40, "convergence on 6 kernels")
        await _assert_consistent(redis, "churn")
        assert (await kcp.dispatch("churn", {"type": "PING"})).result["pong"] is True
    print(f"\nkilled the leader {kills} times mid-reconcile")
    assert kills == 5


async def _consistent(redis: AsyncRedis, cluster: str) -> bool:
    try:
        await _assert_consistent(redis, cluster)
    except AssertionError:
        return False
    return True


async def _assert_consistent(redis: AsyncRedis, cluster: str) -> None:
    """Every kernel is whole: in the cluster set, with a record, and assigned to its agent."""
    names = await redis.smembers(KEYS.cluster_kernels(cluster))
    assignments: dict[str, str] = {}
    for agent in await redis.smembers(KEYS.agents()):
        for ref in await redis.hkeys(KEYS.agent_kernels(agent)):
            if ref.startswith(f"{cluster}/"):
                assignments[ref.partition("/")[2]] = agent
    for name in names:
        record = await redis.hgetall(KEYS.kernel(cluster, name))
        assert record.get("agent"), f"{name} is in the cluster but has no record"
        assert assignments.get(name) == record["agent"], f"{name} is not assigned to its agent"
    stray = set(assignments) - names
    assert not stray, f"assigned but not in the cluster: {stray}"


async def _count(redis: AsyncRedis, key: str, n: int) -> bool:
    return bool(await redis.scard(key) >= n)


async def _running(kcp: KcpClient, cluster: str, n: int) -> bool:
    info = await kcp.get_cluster(cluster)
    return info.running == n == len(info.kernels)
