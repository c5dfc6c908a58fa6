"""Converge every cluster on its desired kernel count.

Idempotent, and driven by changes: a pass reconciles the clusters that may need it, and only
those. A cluster is looked at when its version (`cluster:{name}:version`, bumped by every write
that changes its record, kernel set or a kernel's state) moved, when an agent hosting one of
its kernels died, came back or saw a kernel process exit, while it has not settled (kernels
pending, draining or missing, orphaned jobs, a shortfall, a status to write, autoscaling), and
in the rolling sweep, which reaches every cluster and agent once per `full_sweep_interval`
(the safety net for a lost announcement). At idle a pass costs one MGET of the agents' leases
and one of the clusters' versions, whatever the fleet's size.

Each decision's writes to a cluster are one fence.lua call in the cluster's slot, refused once
a newer leader took over (`LeaderLease.commit`), so a control plane killed mid-pass leaves
nothing half-written in a cluster, a deposed one cannot write to it, and the next leader reads
everything afresh and carries on. The fleet-wide writes that go with a decision (an agent's
assignment and wake list, the lapsed lists) follow it, only once it was written; why a deposed
leader's late one is harmless is in docs/reliability.md ("Fencing").
"""

from __future__ import annotations

import heapq
import logging
import math
import time
from collections import Counter
from collections.abc import Iterable

from controlplane.errors import RedisUnavailable
from controlplane.protocol import stats
from controlplane.protocol.jobs import REPLY_TTL_MS, encode_result
from controlplane.protocol.keys import ASSIGN_DRAIN, ASSIGN_RUN, Keys
from controlplane.protocol.models import ACTIVE_KERNEL_STATES, ClusterStatus, KernelState
from controlplane.protocol.records import AgentRecord, ClusterRecord, JobRecord, KernelRecord, LapsedRecord
from controlplane.redis import portable
from controlplane.redis.connect import AsyncPipeline
from controlplane.redis.errors import amap_redis_errors
from controlplane.redis.retry import best_effort
from controlplane.redis.scripts.fenced import Fence
from controlplane.redis.scripts.jobs import ring
from controlplane.redis.scripts.kernels import rebind, reply_fields
from controlplane.redis.state import State, now_ms
from controlplane.service.autoscaler import Autoscaler
from controlplane.service.detector import FailureDetector, Fleet
from controlplane.service.leader import LeaderLease, NotLeader
from controlplane.settings import Settings

logger = logging.getLogger(__name__)

#: How long a destroyed cluster's kernels may take to finish what they run, seconds.
TEARDOWN_GRACE = 10.0
#: Clusters one pass reconciles at most (the rest at the next passes): a pass stays short, so
#: deaths are seen on time while a big fleet settles (a leader's first pass, a mass placement).
MAX_CLUSTERS_PER_PASS = 64
#: Orphaned jobs of a cluster one pass hands over (the rest at the next)
ORPHANS_PER_PASS = 1024


__all__ = ["Fleet", "Reconciler"]


class Reconciler:
    def __init__(self, state: State, settings: Settings, lease: LeaderLease) -> None:
        self.state = state
        self.redis = state.redis
        self.keys: Keys = state.keys
        self.settings = settings
        self.lease = lease
        self.detector = FailureDetector(state, settings)
        self.autoscaler = Autoscaler(state, lease, settings)
        #: `service:wake` messages since the last pass (`ControlPlane` hands them over)
        self.announced: list[str] = []
        self._names: list[str] | None = None  # the cluster set as last read
        self._versions: dict[str, str | None] = {}
        self._unsettled: set[str] = set()
        self._reconciled_at: dict[str, int] = {}  # cluster -> the pass that last reconciled it
        self._passes = 0
        self._cursor = 0  # the rolling sweep's position (passes since the set was read)
        self._termed: set[str] = set()  # clusters whose term we lifted to `_term`
        self._term = 0
        #: clusters reconciled by the latest pass (tests and `bench/fleet.py` read it)
        self.reconciled = 0

    def invalidate(self) -> None:
        """Read every agent and cluster again at the next pass (leadership just taken, or Redis
        was away: announcements may have been lost meanwhile)."""
        self._names = None
        self.detector.invalidate()

    def _slices(self) -> int:
        return max(math.ceil(self.settings.full_sweep_interval / self.settings.reconcile_interval), 1)

    async def reconcile_all(self) -> None:
        """One pass over the clusters that may need it. Stops early (quietly) when the leader
        lease is lost."""
        try:
            messages, self.announced = self.announced, []
            full = self._names is None
            slices = self._slices()
            swept_agents = self._slice(sorted(self.detector.records), slices)
            if full:
                self.detector.invalidate()
            touched = {m.partition(" ")[2] for m in messages if m.startswith("agent ")}
            fleet = await self.detector.fleet(touched=touched | set(swept_agents))
            if full or self._cursor >= slices or any(not m.startswith("agent ") for m in messages):
                async with amap_redis_errors():
                    self._names = sorted(await self.redis.smembers(self.keys.clusters()))
                if self._cursor >= slices:
                    self._cursor = 0
            names = self._names or []
            urgent = self._changed_clusters(fleet)  # a death, a kernel process gone: first
            dirty = set(names) if full else urgent | self._unsettled
            dirty |= set(self._slice(names, slices))
            self._cursor += 1
            if names:
                async with amap_redis_errors():
                    versions = await portable.mget(self.redis, [self.keys.cluster_version(n) for n in names])
                for name, version in zip(names, versions, strict=True):
                    if self._versions.get(name, "") != version:
                        dirty.add(name)
                    self._versions[name] = version
            dirty &= set(names)
            self._unsettled &= set(names)
            # a bounded pass, so the leases are read again soon: what is left waits for the next
            # (urgent ones first, then the least recently reconciled, so none starves)
            done = self._reconciled_at
            order = sorted(dirty, key=lambda n: (n not in urgent, done.get(n, -1), n))
            dirty, later = set(order[:MAX_CLUSTERS_PER_PASS]), order[MAX_CLUSTERS_PER_PASS:]
            self._unsettled |= set(later)
            self._passes += 1
            for name in dirty:
                done[name] = self._passes
            # lift the terms first: what a deposed leader sends from now on is refused
            if self._term != self.lease.term:
                self._termed, self._term = set(), self.lease.term
            await self.lease.raise_terms(sorted(dirty - self._termed))
            self._termed |= dirty
            clusters = await self.state.clusters(sorted(dirty))
            # what every cluster of the pass holds, read at once (a few round trips for all of
            # them, not a few each): the pass acts on it with fenced writes, and whatever moves
            # meanwhile moves the cluster's version, so the next pass looks again
            live = [c.name for c in clusters if c.status is not ClusterStatus.STOPPED]
            kernels = await self.state.kernels_of(live)
            orphans = await self._orphans(live)
            self.reconciled = len(clusters)
            for name in dirty - {c.name for c in clusters}:  # gone (destroyed, or malformed)
                self._unsettled.discard(name)
                self._reconciled_at.pop(name, None)
            for cluster in clusters:
                settled = False
                try:
                    async with amap_redis_errors():
                        if cluster.status is ClusterStatus.STOPPED:
                            await self._teardown(cluster, fleet)
                        else:
                            settled = await self._reconcile(
                                cluster, fleet, kernels[cluster.name], orphans[cluster.name]
                            )
                except NotLeader:
                    raise
                except RedisUnavailable as exc:  # e.g. its master is failing over (a Redis Cluster)
                    logger.warning("reconciling cluster %s: %s; again at the next pass", cluster.name, exc)
                except Exception:  # one broken cluster must not stop the others
                    logger.exception("reconciling cluster %s failed", cluster.name)
                if settled:
                    self._unsettled.discard(cluster.name)
                else:
                    self._unsettled.add(cluster.name)
            await self._forget_dead_agents(fleet)
        except NotLeader as exc:
            logger.warning("reconcile pass stopped: %s", exc)
            self.invalidate()

    def _slice(self, names: list[str], slices: int) -> list[str]:
        """The names the rolling sweep reaches at this pass: each once per `slices` passes."""
        n, i = len(names), self._cursor % slices
        # spread evenly over the round: the j-th name at pass floor(j * slices / n)
        return names[-(-i * n // slices) : -(-(i + 1) * n // slices)]

    def _changed_clusters(self, fleet: Fleet) -> set[str]:
        """Clusters with a kernel on an agent whose liveness, record or running kernels changed,
        or with a kernel missing from its agent's running record."""
        refs: Iterable[str] = (
            ref for agent in fleet.changed for ref in self.detector.assignments.get(agent, ())
        )
        return {ref.partition("/")[0] for ref in refs} | {
            ref.partition("/")[0] for ref in self.detector.missing
        }

    # ------------------------------------------------------------ one cluster
    async def _reconcile(
        self, cluster: ClusterRecord, fleet: Fleet, current: list[KernelRecord], orphans: list[str]
    ) -> bool:
        """Converge one cluster, whose kernel records and orphaned job ids were read at the start
        of the pass; True when it is settled (nothing to look at until a change)."""
        name = cluster.name
        changed = False
        kernels: list[KernelRecord] = []
        dead = {k.name for k in await self.detector.dead_kernels(current, fleet)}
        for k in current:
            if k.state is KernelState.STOPPED or not fleet.hosts(k.agent) or k.name in dead:
                if k.state is not KernelState.STOPPED:
                    logger.warning(
                        "kernel %s/%s lost with agent %s; failing its work over", name, k.name, k.agent
                    )
                    await self.redis.hincrby(self.keys.cluster_stats(name), stats.KERNELS_LOST, 1)
                await self._remove_kernel(
                    k, wake_agent=k.name in dead, lapsed=k.state is not KernelState.STOPPED
                )
                fleet.assigned[k.agent] -= 1
                changed = True
            else:
                kernels.append(k)
        changed |= await self._repair_assignments(name, kernels, fleet)
        cluster = await self.autoscaler.evaluate(cluster, kernels)
        active = [k for k in kernels if k.state in ACTIVE_KERNEL_STATES]
        reason = ""
        if len(active) < cluster.desired:
            # not back onto an agent whose kernel just died under it: its restart back-off for
            # that name could hold the replacement (it goes there only when nowhere else fits)
            avoid = {k.agent for k in current if k.name in dead}
            placed, reason = await self._place(cluster, kernels, cluster.desired - len(active), fleet, avoid)
            changed |= placed > 0
        elif len(active) > cluster.desired:
            surplus = sorted(active, key=lambda k: k.index, reverse=True)[: len(active) - cluster.desired]
            for k in surplus:
                await self._drain(k)
            changed = True
        running = [k for k in kernels if k.state is KernelState.RUNNING]
        orphaned = await self._adopt_orphans(name, orphans, running)
        now = await self.state.kernels(name) if changed else kernels
        status = await self._set_status(cluster, now, reason)
        if changed:
            await portable.publish(self.redis, self.keys.notify(), name)
        missing = self.detector.missing
        return (
            not changed
            and not orphaned
            and not reason
            and not cluster.config.auto_scale  # its load moves: looked at every pass
            and status is ClusterStatus.RUNNING
            and len(now) == cluster.desired
            and all(k.state is KernelState.RUNNING and fleet.hosts(k.agent) for k in now)
            and not any(f"{name}/{k.name}" in missing for k in now)
        )

    async def _repair_assignments(self, cluster: str, kernels: list[KernelRecord], fleet: Fleet) -> bool:
        """Make the agents' assignments match the kernel records: a decision's fleet-wide writes
        follow its fenced one, so a leader killed or deposed between the two leaves one missing,
        stray, or still `run` under a draining record (docs/reliability.md, "Fencing"). True when
        something was rewritten."""
        want = {f"{cluster}/{k.name}": k for k in kernels}
        # a cluster's assignments change only while it is reconciled, which is now
        held = self.detector.assigned_in(cluster)
        stray = sorted((a, ref) for a, ref in held if ref not in want or want[ref].agent != a)
        missing = [k for ref, k in want.items() if (k.agent, ref) not in held]
        undrained = await self._undrained(cluster, [k for k in kernels if k not in missing])
        if not stray and not missing and not undrained:
            return False

        def write(pipe: AsyncPipeline) -> None:
            for agent, ref in stray:
                pipe.hdel(self.keys.agent_kernels(agent), ref)
            for k in missing:
                mode = ASSIGN_DRAIN if k.state is KernelState.DRAINING else ASSIGN_RUN
                pipe.hset(self.keys.agent_kernels(k.agent), f"{cluster}/{k.name}", mode)
            for k in undrained:
                pipe.hset(self.keys.agent_kernels(k.agent), f"{cluster}/{k.name}", ASSIGN_DRAIN)

        wakes = [(a, "remove") for a, _ in stray] + [(k.agent, "place") for k in missing]
        await self._fleet_write(write, wakes + [(k.agent, "drain") for k in undrained])
        for agent, ref in stray:
            self.detector.unassign(agent, ref)
            fleet.assigned[agent] -= 1
        for k in missing:
            self.detector.assign(k.agent, f"{cluster}/{k.name}")
            fleet.assigned[k.agent] += 1
        logger.warning(
            "cluster %s: rewrote %d assignment(s) the kernel records did not match",
            cluster,
            len(stray) + len(missing) + len(undrained),
        )
        return True

    async def _undrained(self, cluster: str, kernels: list[KernelRecord]) -> list[KernelRecord]:
        """Of `kernels`, the draining ones whose agent's assignment still says run: a leader
        stopped between the fenced drain and the assignment leaves the process running under a
        draining record, which nothing else would ever stop."""
        draining = [k for k in kernels if k.state is KernelState.DRAINING]
        if not draining:
            return []
        async with amap_redis_errors(), self.redis.pipeline(transaction=False) as pipe:
            for k in draining:
                pipe.hget(self.keys.agent_kernels(k.agent), f"{cluster}/{k.name}")
            modes = await pipe.execute()
        return [k for k, mode in zip(draining, modes, strict=True) if mode != ASSIGN_DRAIN]

    async def _place(
        self,
        cluster: ClusterRecord,
        kernels: list[KernelRecord],
        count: int,
        fleet: Fleet,
        avoid: set[str] | frozenset[str] = frozenset(),
    ) -> tuple[int, str]:
        """Place `count` kernels on agents with free slots and the required capabilities."""
        required = set(cluster.config.capabilities)
        here = Counter(k.agent for k in kernels)
        used = {k.name for k in kernels}
        names = (
            f"worker-{i}" for i in range(self.settings.max_kernels_per_cluster) if f"worker-{i}" not in used
        )
        placed = 0
        eligible = [
            a
            for a in fleet.agents.values()
            if a.name in fleet.alive
            and not a.draining
            and required <= a.capability_set
            and fleet.assigned[a.name] < a.slots
        ]
        # not onto an avoided agent unless nowhere else fits; then the fewest of this cluster's
        # kernels, then the least loaded: a heap, so each placement costs O(log agents)
        heap = [
            (a.name in avoid, here[a.name], fleet.assigned[a.name] / max(a.slots, 1), a.name, a)
            for a in eligible
        ]
        heapq.heapify(heap)
        for _ in range(count):
            if not heap:
                return placed, shortfall(cluster.desired, count - placed, required, fleet)
            avoided, _, _, _, agent = heapq.heappop(heap)
            kernel = next(names, None)
            if kernel is None:
                return placed, "no free kernel name"
            record = KernelRecord(
                cluster=cluster.name,
                name=kernel,
                agent=agent.name,
                max_deliveries=self.settings.max_deliveries,
                placed_at=round(time.time(), 6),
            )
            write = self.lease.write(cluster.name)
            write.delete(self.keys.kernel(cluster.name, kernel))
            write.hset(self.keys.kernel(cluster.name, kernel), record.to_fields())
            write.sadd(self.keys.cluster_kernels(cluster.name), kernel)
            write.incr(self.keys.cluster_version(cluster.name))
            await self.lease.commit(write)
            ref = f"{cluster.name}/{kernel}"

            def assign(pipe: AsyncPipeline, agent: str = agent.name, ref: str = ref) -> None:
                pipe.hset(self.keys.agent_kernels(agent), ref, ASSIGN_RUN)
                pipe.hdel(self.keys.lapsed_kernels(), ref)

            await self._fleet_write(assign, [(agent.name, "place")])
            logger.info("placed %s/%s on agent %s", cluster.name, kernel, agent.name)
            here[agent.name] += 1
            fleet.assigned[agent.name] += 1
            self.detector.assign(agent.name, f"{cluster.name}/{kernel}")
            placed += 1
            if fleet.assigned[agent.name] < agent.slots:
                entry = (avoided, here[agent.name], fleet.assigned[agent.name] / max(agent.slots, 1))
                heapq.heappush(heap, (*entry, agent.name, agent))
        return placed, ""

    async def _drain(self, k: KernelRecord) -> None:
        """Take no new work on `k`; its process finishes its queue and stops."""
        if k.state is KernelState.PENDING:  # never started, so it holds no work
            await self._remove_kernel(k)
            return
        write = self.lease.write(k.cluster)
        write.hset(self.keys.kernel(k.cluster, k.name), KernelRecord.fields(state=KernelState.DRAINING))
        write.incr(self.keys.cluster_version(k.cluster))
        await self.lease.commit(write)

        def drain(pipe: AsyncPipeline) -> None:
            pipe.hset(self.keys.agent_kernels(k.agent), f"{k.cluster}/{k.name}", ASSIGN_DRAIN)

        await self._fleet_write(drain, [(k.agent, "drain")])
        logger.info("draining %s/%s on agent %s", k.cluster, k.name, k.agent)

    async def _fleet_write(self, write: portable.Step, wakes: Iterable[tuple[str, str]] = ()) -> None:
        """The fleet-wide writes that follow a committed decision, then the wake-ups of the
        agents they concern (`wakes`: agent, why), in that order (`portable.in_order`: one round
        trip on one Redis), so a woken agent reads its new assignment. Not a transaction: the
        keys are in several slots, and each write is idempotent and repaired by the next pass if
        a crash cuts them short (docs/reliability.md)."""
        wakes = list(wakes)

        def wake(pipe: AsyncPipeline) -> None:
            for agent, why in wakes:
                self._wake(pipe, agent, why)

        await portable.in_order(self.redis, write, wake)  # an empty step sends nothing

    def _wake(self, pipe: AsyncPipeline, agent: str, why: str) -> None:
        pipe.lpush(self.keys.agent_wake(agent), why)
        pipe.pexpire(self.keys.agent_wake(agent), 60_000)

    def _lapse(self, pipe: AsyncPipeline, key: str, name: str, record: LapsedRecord | None) -> None:
        """List `name` in the lapsed hash `key` (shown as down until the retention passes), or,
        with None, drop it from there (removed on purpose, or placed again)."""
        retention = self.settings.down_retention
        if record is None or retention <= 0:
            pipe.hdel(key, name)
            return
        pipe.hset(key, name, record.encode())
        pipe.pexpire(key, int(retention * 1000))  # the newest entry's retention bounds the hash

    def _lapsed(self, last_seen: float, agent: str = "", host: str = "", slots: int = 0) -> LapsedRecord:
        until = time.time() + self.settings.down_retention
        return LapsedRecord(last_seen=max(last_seen, 0.0), until=until, agent=agent, host=host, slots=slots)

    async def _remove_kernel(
        self, k: KernelRecord, *, wake_agent: bool = False, lapsed: bool = False
    ) -> None:
        """Delete a stopped or lost kernel; whatever it still held goes to the cluster's orphans.
        A `lapsed` kernel (its lease or its agent's expired) stays listed as down for a while."""
        keys = self.keys
        inflight = keys.inflight(k.cluster, k.name)
        orphans = keys.cluster_orphans(k.cluster)
        write = self.lease.write(k.cluster).zunionstore_min(orphans, orphans, inflight)
        # its dispatch counters stay in the cluster's totals (protocol/stats.py)
        write.hfold(keys.kernel_stats(k.cluster, k.name), keys.cluster_stats(k.cluster))
        write.delete(
            keys.kernel(k.cluster, k.name),
            keys.queue(k.cluster, k.name),
            inflight,
            keys.kernel_wake(k.cluster, k.name),
            keys.kernel_lease(k.cluster, k.name),
            keys.load(k.agent, k.cluster, k.name),
        )
        write.srem(keys.cluster_kernels(k.cluster), k.name)
        write.incr(keys.cluster_version(k.cluster))
        await self.lease.commit(write)
        last_seen = time.time() - self.settings.lease_ttl
        entry = self._lapsed(last_seen, k.agent, k.host) if lapsed else None

        def unassign(pipe: AsyncPipeline) -> None:
            pipe.hdel(keys.agent_kernels(k.agent), f"{k.cluster}/{k.name}")
            self._lapse(pipe, keys.lapsed_kernels(), f"{k.cluster}/{k.name}", entry)

        # it still runs: let it drop the kernel at once
        await self._fleet_write(unassign, [(k.agent, "remove")] if wake_agent else [])
        self.detector.unassign(k.agent, f"{k.cluster}/{k.name}")

    async def _orphans(self, clusters: list[str]) -> dict[str, list[str]]:
        """Of each of `clusters`, the first `ORPHANS_PER_PASS` ids of its orphaned jobs."""
        async with amap_redis_errors(), self.redis.pipeline(transaction=False) as pipe:
            for cluster in clusters:
                pipe.zrange(self.keys.cluster_orphans(cluster), 0, ORPHANS_PER_PASS - 1)
            return dict(zip(clusters, await pipe.execute(), strict=True))

    async def _adopt_orphans(self, cluster: str, ids: list[str], running: list[KernelRecord]) -> bool:
        """Hand jobs of lost kernels (`ids`, as read at the start of the pass) to running ones,
        spread evenly; True while some are left."""
        orphans = self.keys.cluster_orphans(cluster)
        if not ids or not running:
            return bool(ids)
        share = -(-len(ids) // len(running))
        for i, k in enumerate(running):
            chunk = ids[i * share : (i + 1) * share]
            if not chunk:
                break
            async with self.redis.pipeline(transaction=False) as pipe:
                for command in reply_fields(self.keys, cluster, chunk):
                    pipe.execute_command(*command)
                replies = await pipe.execute()
            call = rebind(self.keys, cluster, k.name, source=orphans, job_ids=chunk, replies=replies)
            rebound = await call.run(self.redis)
            await self._ring(cluster, rebound.answered)
            moved = rebound.moved
            if moved > 0:
                await self.redis.hincrby(self.keys.cluster_stats(cluster), stats.JOBS_REQUEUED, moved)
                logger.info("moved %s orphaned job(s) of %s to %s", moved, cluster, k.name)
                await self.redis.hincrby(self.keys.reliability(), stats.JOBS_FAILED_OVER, moved)
        return True  # looked at again at the next pass: what is left, or what was moved

    async def _set_status(
        self, cluster: ClusterRecord, kernels: list[KernelRecord], reason: str
    ) -> ClusterStatus:
        """Write the status the kernels give the cluster (if it changed); returns it."""
        running = sum(k.state is KernelState.RUNNING for k in kernels)
        settled = running == cluster.desired and len(kernels) == cluster.desired
        if settled:
            status = ClusterStatus.RUNNING
        elif reason and running == 0:
            status = ClusterStatus.ERROR
        elif cluster.status is ClusterStatus.INITIALIZING:
            status = ClusterStatus.INITIALIZING
        else:
            status = ClusterStatus.SCALING
        if status is cluster.status and reason == cluster.reason:
            return status
        key = self.keys.cluster(cluster.name)
        # guarded in the script: a destroy (status `stopped`, or the record gone) that landed
        # during the pass wins
        write = self.lease.write(cluster.name).guard(key, ClusterRecord.STATUS, ClusterStatus.STOPPED.value)
        write.hset(key, ClusterRecord.fields(status=status, reason=reason))
        write.incr(self.keys.cluster_version(cluster.name))
        if await self.lease.commit(write) is Fence.GUARDED:
            return ClusterStatus.STOPPED
        await portable.publish(self.redis, self.keys.notify(), cluster.name)
        logger.info("cluster %s: %s%s", cluster.name, status.value, f" ({reason})" if reason else "")
        return status

    # ------------------------------------------------------------ destroy
    async def _teardown(self, cluster: ClusterRecord, fleet: Fleet) -> None:
        """Stop the kernels, fail what was still queued, then delete every key of the cluster."""
        name = cluster.name
        kernels = await self.state.kernels(name)
        stopped_at = float(await self.redis.hget(self.keys.cluster(name), ClusterRecord.STOPPED_AT) or 0)
        waiting = [
            k
            for k in kernels
            if k.state is not KernelState.STOPPED
            and k.state is not KernelState.PENDING
            and fleet.hosts(k.agent)
        ]
        for k in kernels:
            await self._fail_queued(name, self.keys.queue(name, k.name), "cluster destroyed")
            if k in waiting and k.state is not KernelState.DRAINING:
                await self._drain(k)
        if waiting and time.time() - stopped_at < TEARDOWN_GRACE:
            return
        for k in kernels:
            await self._remove_kernel(k)
        await self._fail_queued(name, self.keys.cluster_orphans(name), "cluster destroyed")
        leftovers = [key async for key in self.redis.scan_iter(match=self.keys.job_pattern(name), count=500)]
        leftovers += [
            key async for key in self.redis.scan_iter(match=self.keys.kernel_pattern(name), count=500)
        ]
        # the term stays (it only orders leaders); the version goes with the cluster: one
        # created again under the name starts at the clock
        write = self.lease.write(name).delete(
            self.keys.cluster(name),
            self.keys.cluster_kernels(name),
            self.keys.cluster_stats(name),
            self.keys.cluster_orphans(name),
            self.keys.cluster_deferred(name),
            self.keys.cluster_rr(name),
            self.keys.cluster_ejected(name),
            self.keys.collector_values(name),
            self.keys.collector_kernels(name),
            self.keys.collector_types(name),
            self.keys.cluster_version(name),
            *leftovers,
        )
        await self.lease.commit(write)
        await self.redis.srem(self.keys.clusters(), name)
        await portable.publish(self.redis, self.keys.notify(), name)
        if self._names is not None and name in self._names:
            self._names.remove(name)
        logger.info("cluster %s destroyed", name)

    async def _fail_queued(self, cluster: str, source: str, why: str) -> None:
        """Answer every job still waiting in `source` with an error, and drop it."""
        while ids := await self.redis.zrange(source, 0, 255):
            answered: set[str] = set()
            async with self.redis.pipeline(transaction=False) as pipe:
                for job_id in ids:
                    pipe.hget(self.keys.job(cluster, job_id), JobRecord.REPLY)
                replies = await pipe.execute()
            now = now_ms()
            write = self.lease.write(cluster)
            for job_id, reply in zip(ids, replies, strict=True):
                write.zrem(source, job_id)
                write.delete(self.keys.job(cluster, job_id))
                if reply:  # the reply list is in the cluster's slot (kcp:reply:{c}:CLIENT)
                    write.rpush(
                        reply,
                        encode_result(
                            job_id=job_id,
                            function="?",
                            kernel="",
                            queue=source,
                            attempt=0,
                            enqueue_ms=now,
                            start_ms=now,
                            finish_ms=now,
                            value=None,
                            error=why,
                            error_type="ClusterDestroyed",
                        ),
                    )
                    write.pexpire(reply, REPLY_TTL_MS)
                    answered.add(reply)
            await self.lease.commit(write)
            await self._ring(cluster, answered)

    async def _ring(self, cluster: str, reply_keys: Iterable[str]) -> None:
        """Ring the bells of the clients whose reply lists of `cluster` were just pushed to (each
        bell is in its client's slot: rung once the push is done). Best effort: a lost ring
        only delays the reply until the listener's next sweep."""
        rings = [
            c for key in reply_keys for c in ring(self.keys, cluster, key, now_ms(), ttl_ms=REPLY_TTL_MS)
        ]
        if rings:
            async with best_effort(), self.redis.pipeline(transaction=False) as pipe:
                for command in rings:
                    pipe.execute_command(*command)
                await pipe.execute()

    async def _forget_dead_agents(self, fleet: Fleet) -> None:
        """Deregister agents whose lease is gone (dead, or left with their record still there)
        once none of their kernels is left."""
        for agent in fleet.agents.values():
            if agent.name in fleet.alive or fleet.assigned[agent.name] > 0:
                continue
            await self._forget(agent)

    async def _forget(self, record: AgentRecord) -> None:
        """Deregister `record`'s agent, unless its lease came back. Its keys are fleet-wide (no
        cluster's term fences them): the lease is checked just before (docs/reliability.md)."""
        agent = record.name
        await self.lease.check()
        if await self.redis.exists(self.keys.agent_lease(agent)):
            return
        # an agent that stopped on purpose said so (draining) and is simply gone
        entry = None
        if not record.draining:
            last_seen = self.detector.last_seen(agent) or time.time() - self.settings.lease_ttl
            entry = self._lapsed(last_seen, host=record.host, slots=record.slots)

        def forget(pipe: AsyncPipeline) -> None:
            self._lapse(pipe, self.keys.lapsed_agents(), agent, entry)
            keys = (self.keys.agent(agent), self.keys.agent_kernels(agent))
            portable.delete_each(pipe, (*keys, self.keys.agent_wake(agent), self.keys.agent_running(agent)))
            pipe.srem(self.keys.agents(), agent)
            pipe.hdel(self.keys.heartbeats(), agent)

        await self._fleet_write(forget)
        await self.detector.forget(agent)
        logger.info("forgot agent %s (%s)", agent, "it left" if record.draining else "lease expired")


def shortfall(desired: int, missing: int, required: set[str], fleet: Fleet) -> str:
    """Why `missing` of a cluster's `desired` kernels have no agent: the cluster's `reason`,
    e.g. "6 of 12 placed: no agent has a free slot; free slots: 0 on 2 agents"."""
    placed = f"{desired - missing} of {desired} placed"
    live = [a for a in fleet.agents.values() if a.name in fleet.alive and not a.draining]
    if not live:
        return f"{placed}: no live agent (start one with `kcp agent`)"
    capable = [a for a in live if required <= a.capability_set]
    if not capable:
        offered = frozenset().union(*(a.capability_set for a in live))
        absent = sorted(required - offered)
        if absent:
            return f"{placed}: no agent offers capability {', '.join(absent)}"
        return f"{placed}: no agent offers capabilities {', '.join(sorted(required))} together"
    free = sum(max(a.slots - fleet.assigned[a.name], 0) for a in capable)
    which = f" with capabilities {', '.join(sorted(required))}" if required else ""
    agents = f"{len(capable)} agent{'s' if len(capable) != 1 else ''}"
    return f"{placed}: no agent{which} has a free slot; free slots: {free} on {agents}"
