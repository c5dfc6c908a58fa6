"""Failure detection: agent leases, read by the leader at every pass with one MGET.

An agent's heartbeat thread renews its lease (`agent:{name}:lease`, TTL `lease_ttl`) every
`heartbeat_interval` with one SET whose value (`records.AgentLease`) is the beat's time in
Redis's clock and the agent's state version. The detector keeps the fleet in memory and, at
every pass, reads every known lease at once (one MGET, whatever the fleet's size):

- **alive**: the lease exists and its beat is recent;
- **suspect**: the lease exists but at least one renewal is overdue (nothing is moved yet);
- **dead**: the lease is gone and the agent did not say it was leaving. The reconciler then
  removes its kernels and fails their work over;
- **departed**: the lease is gone and the agent said it was leaving: its record, read again when
  the lease is found gone, no longer exists (it deregistered) or says `draining` (an agent sets
  it first thing when it stops on purpose: SIGTERM, `Agent.stop`). Its kernels are removed and
  placed elsewhere as a dead agent's are, but it is no death: not logged as one, not counted in
  `agents_dead_total` (in `agents_departed_total` instead), not listed as lapsed.

It re-reads an agent's record and running kernels (`agent:{name}:running`) only when its lease's
version moved, when the agent announced itself (`service:wake`), or when the rolling sweep
reaches it (every agent once per `full_sweep_interval`).

A kernel is dead when its agent is alive but the kernel has been missing from the agent's
running record for longer than `lease_ttl` (its process exited and the agent has not brought
it back: the agent rewrites the record as soon as a process exits or starts).

**Blind window.** A missing lease is a death only once every live agent has been able to renew
it: after the detector could not read Redis (an outage, a restart still loading its data, a
failover, or the detector's own start, e.g. a new leader), no death is declared until one lease
TTL plus one heartbeat interval has passed *since the first read that succeeded again*. Agents
retry a failed renewal at least once per heartbeat interval, so an agent that is alive renews
within that window (docs/reliability.md, "The decision rule").

Detection times and counters go to the `reliability` hash (see docs/reliability.md).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from controlplane.protocol import stats
from controlplane.protocol.keys import Keys
from controlplane.protocol.models import KernelState
from controlplane.protocol.records import AgentLease, AgentRecord, KernelRecord, parse_assignment
from controlplane.redis import portable
from controlplane.redis.connect import AsyncRedis
from controlplane.redis.errors import amap_redis_errors
from controlplane.redis.state import State, clock_offset
from controlplane.settings import Settings

logger = logging.getLogger(__name__)

#: How often the leader re-measures its offset to Redis's clock, seconds.
CLOCK_RESYNC = 60.0


@dataclass(frozen=True, slots=True)
class Fleet:
    """The agents as seen at the start of a pass."""

    agents: dict[str, AgentRecord]
    alive: frozenset[str]
    assigned: Counter[str]  # agent -> kernels assigned (all clusters)
    suspect: frozenset[str] = field(default_factory=frozenset)
    #: agent -> ``cluster/kernel`` of the kernel processes it runs (absent: not known)
    running: Mapping[str, frozenset[str]] = field(default_factory=dict)
    #: agents whose liveness, record or running kernels changed since the last pass
    changed: frozenset[str] = field(default_factory=frozenset)

    def hosts(self, agent: str) -> bool:
        return agent in self.alive


class FailureDetector:
    """Reads the leases; remembers which agents it already reported, so each death counts once."""

    def __init__(self, state: State, settings: Settings) -> None:
        self.redis: AsyncRedis = state.redis
        self.keys: Keys = state.keys
        self.state = state
        self.ttl_ms = int(settings.lease_ttl * 1000)
        self.interval_ms = int(settings.heartbeat_interval * 1000)
        self.lease_ttl = settings.lease_ttl
        self._suspects: set[str] = set()
        self._declared: set[str] = set()
        self._departed: set[str] = set()  # lease gone under a `draining` record, already reported
        self._left: set[str] = set()  # records gone (deregistered) since the last report
        self._next_expiry = time.monotonic() + settings.lease_ttl
        self.window = settings.lease_ttl + settings.heartbeat_interval
        self._unseen = True  # no read has succeeded yet: the blind window opens with the first
        self._blind_until = 0.0
        # the fleet as last read; `_loaded` False: read it all at the next pass
        self._loaded = False
        self.records: dict[str, AgentRecord] = {}
        self.assignments: dict[str, set[str]] = {}  # agent -> ``cluster/kernel`` assigned to it
        # the same inverted: cluster -> (agent, ``cluster/kernel``), so a pass that reconciles a few
        # clusters reads theirs without walking every assignment of the fleet
        self._by_cluster: dict[str, set[tuple[str, str]]] = {}
        self._running: dict[str, frozenset[str]] = {}
        self._versions: dict[str, str] = {}
        self._beats: dict[str, int] = {}  # agent -> its last beat seen, Redis-clock ms
        self._alive: set[str] = set()
        self._missing: dict[str, float] = {}  # ``cluster/kernel`` -> monotonic time first seen missing
        self._offset_ms: float | None = None
        self._synced_at = 0.0

    def grace(self) -> None:
        """We could not see Redis (it was down, restarting, loading, failing over): the leases may
        have lapsed because nobody could renew them, not because the agents died. The blind window
        opens again at the next read that succeeds (`fleet`), not now: however long Redis stays
        away, every agent gets a full window to renew once it answers. What we hold of the fleet
        is read again in full then."""
        self._unseen = True
        self._loaded = False

    def invalidate(self) -> None:
        """Read the whole fleet again at the next pass (e.g. leadership was just taken)."""
        self._loaded = False

    @property
    def blind(self) -> bool:
        """Whether deaths are withheld: Redis not seen yet, or seen again less than `window` ago."""
        return self._unseen or time.monotonic() < self._blind_until

    def next_check_in(self) -> float:
        """Seconds until the earliest live lease would expire (if not renewed), at least 10 ms."""
        return max(self._next_expiry - time.monotonic(), 0.01)

    @property
    def missing(self) -> frozenset[str]:
        """``cluster/kernel`` of running kernels missing from their live agent's running record,
        not dead yet (the reconciler looks at their clusters again at the next pass)."""
        return frozenset(self._missing)

    def assign(self, agent: str, ref: str) -> None:
        self.assignments.setdefault(agent, set()).add(ref)
        self._index(agent, [ref])

    def unassign(self, agent: str, ref: str) -> None:
        self.assignments.get(agent, set()).discard(ref)
        self._unindex(agent, [ref])

    def assigned_in(self, cluster: str) -> set[tuple[str, str]]:
        """(agent, ``cluster/kernel``) of `cluster`'s assignments as held now."""
        return set(self._by_cluster.get(cluster, ()))

    def _reassign(self, agent: str, refs: set[str] | None) -> None:
        """Hold `refs` as `agent`'s assignments (None: it has none any more)."""
        self._unindex(agent, self.assignments.pop(agent, ()))
        if refs is not None:
            self.assignments[agent] = refs
            self._index(agent, refs)

    def _index(self, agent: str, refs: Iterable[str]) -> None:
        for ref in refs:
            self._by_cluster.setdefault(ref.partition("/")[0], set()).add((agent, ref))

    def _unindex(self, agent: str, refs: Iterable[str]) -> None:
        for ref in refs:
            cluster = ref.partition("/")[0]
            held = self._by_cluster.get(cluster)
            if held is not None:
                held.discard((agent, ref))
                if not held:
                    del self._by_cluster[cluster]

    async def _redis_now(self) -> float:
        now = time.monotonic()
        if self._offset_ms is None or now - self._synced_at > CLOCK_RESYNC:
            self._offset_ms = await clock_offset(self.redis)
            self._synced_at = now
        return time.monotonic() * 1000 + self._offset_ms

    async def fleet(self, *, touched: Iterable[str] = ()) -> Fleet:
        """The fleet now: one MGET of the leases, plus the records of the agents in `touched`
        (announced, or due in the rolling sweep) and of those whose state version moved."""
        full = not self._loaded
        if full:
            async with amap_redis_errors():
                names = set(await self.redis.smembers(self.keys.agents()))
            self.records = {n: r for n, r in self.records.items() if n in names}
            reread = names
        else:
            reread = set(touched)
        differs = await self._reread(reread, assignments=True)
        names_sorted = sorted(self.records)
        leases: list[AgentLease | None] = []
        if names_sorted:
            async with amap_redis_errors():
                raw = await portable.mget(self.redis, [self.keys.agent_lease(n) for n in names_sorted])
            leases = [AgentLease.decode(v) for v in raw]
        now_redis = await self._redis_now()
        moved = {
            n
            for n, lease in zip(names_sorted, leases, strict=True)
            if lease is not None and lease.version != self._versions.get(n) and n not in reread
        }
        if moved:  # their record or running kernels changed: read those again
            differs |= await self._reread(moved, assignments=False)
        self._loaded = True
        now = time.monotonic()
        if self._unseen:  # the first read since an outage (or since we started): the window opens
            self._unseen = False
            self._blind_until = now + self.window
            logger.info("Redis answers: no death declared for %.1fs, so every agent can renew", self.window)
        alive: set[str] = set()
        suspect: set[str] = set()
        departed: set[str] = set()
        soonest = self.lease_ttl
        blind = self.blind
        if not blind:  # a lease newly gone: whether its agent said it was leaving, its record says
            seen = self._declared | self._departed | reread
            lapsed = [
                n for n, lease in zip(names_sorted, leases, strict=True) if lease is None and n not in seen
            ]
            differs |= await self._reread(lapsed, assignments=False)
        for name, lease in zip(names_sorted, leases, strict=True):
            if name not in self.records:  # its record vanished on the re-read
                continue
            if lease is None:
                if blind:  # no lease: dead, unless nobody could renew it
                    alive.add(name)
                elif self.records[name].draining:  # it stopped on purpose: a departure
                    departed.add(name)
                continue
            alive.add(name)
            self._versions[name] = lease.version
            if lease.beat_ms > 0:  # 0: registered, no beat yet
                self._beats[name] = lease.beat_ms
                age = now_redis - lease.beat_ms
                soonest = min(soonest, max(self.ttl_ms - age, 0) / 1000)
                # a renewal is overdue once more than 1.5 heartbeat periods passed since the last
                if age > 1.5 * self.interval_ms:
                    suspect.add(name)
        self._next_expiry = now + soonest + 0.005
        changed = (alive ^ self._alive) | differs | (set(self.records) if full else set())
        self._alive = alive
        assigned = Counter({n: len(self.assignments.get(n, ())) for n in self.records})
        await self._report(alive, suspect, departed, set(self.records), assigned, now_redis)
        return Fleet(
            agents=dict(self.records),
            alive=frozenset(alive),
            assigned=assigned,
            suspect=frozenset(suspect),
            running={n: self._running[n] for n in self.records if n in self._running},
            changed=frozenset(changed),
        )

    async def _reread(self, names: Iterable[str], *, assignments: bool) -> set[str]:
        """Read the record and running kernels of `names` (and their assignments: the leader is
        their only writer, so only a fresh start, an announcement or the sweep needs them).
        Returns the names whose record, running kernels or assignment differ from what we held."""
        names = sorted(names)
        differs: set[str] = set()
        if not names:
            return differs
        k = self.keys
        async with amap_redis_errors(), self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(k.agent(name))
                pipe.hgetall(k.agent_running(name))
                if assignments:
                    pipe.hgetall(k.agent_kernels(name))
            rows = iter(await pipe.execute())
        for name in names:
            record = AgentRecord.from_fields(next(rows), k.agent(name))
            running = next(rows)
            assigned = parse_assignment(next(rows), k.agent_kernels(name)) if assignments else None
            if record is None:  # deregistered (or malformed): gone from the fleet
                if self.records.pop(name, None) is not None:
                    differs.add(name)
                    self._gone(name)
                self._running.pop(name, None)
                self._reassign(name, None)
                continue
            if (
                self.records.get(name) != record
                or self._running.get(name) != frozenset(running)
                or (assigned is not None and self.assignments.get(name) != set(assigned))
            ):
                differs.add(name)
            self.records[name] = record
            self._running[name] = frozenset(running)
            if assigned is not None:
                self._reassign(name, set(assigned))
        return differs

    def _gone(self, name: str) -> None:
        """`name`'s record, read again, is gone: it deregistered (it left on purpose), unless we
        already declared it dead or saw it leave."""
        if name not in self._declared | self._departed:
            self._left.add(name)

    async def _report(
        self,
        alive: set[str],
        suspect: set[str],
        departed: set[str],
        known: set[str],
        assigned: Counter[str],
        now_redis: float,
    ) -> None:
        """Log state changes and count them in the `reliability` hash."""
        left, self._left = sorted(self._left | (departed - self._departed)), set()
        for name in left:
            logger.info("agent %s left: it stopped on purpose (no death)", name)
        if left:
            async with amap_redis_errors():
                await self.redis.hincrby(self.keys.reliability(), stats.AGENTS_DEPARTED, len(left))
        self._departed = (self._departed | departed) & (known - alive)
        for name in suspect - self._suspects:
            logger.warning("agent %s is suspect: a lease renewal is overdue", name)
            async with amap_redis_errors():
                await self.redis.hincrby(self.keys.reliability(), stats.AGENTS_SUSPECTED, 1)
        self._suspects = suspect
        for name in known - alive - departed - self._declared:
            self._declared.add(name)
            last = self._beats.get(name, 0)
            detection = round(now_redis - last) if last else None
            logger.warning(
                "agent %s is dead: lease expired%s; %d kernel(s) to fail over",
                name,
                f" {detection} ms after its last heartbeat" if detection is not None else "",
                assigned[name],
            )
            async with amap_redis_errors(), self.redis.pipeline(transaction=False) as pipe:
                key = self.keys.reliability()
                pipe.hincrby(key, stats.AGENTS_DEAD, 1)
                if detection is not None:
                    pipe.hset(
                        key,
                        mapping={
                            stats.DETECTION_MS_LAST: detection,
                            stats.DETECTION_LAST_AT: round(now_redis),
                        },
                    )
                    pipe.hincrby(key, stats.DETECTION_MS_SUM, detection)
                    pipe.hincrby(key, stats.DETECTION_COUNT, 1)
                await pipe.execute()
        self._declared &= known - alive  # back alive, or forgotten: report a later death again

    def last_seen(self, agent: str) -> float | None:
        """Unix seconds of the agent's last beat we saw (Redis's clock), if any."""
        beat = self._beats.get(agent)
        return beat / 1000 if beat else None

    async def dead_kernels(self, kernels: list[KernelRecord], fleet: Fleet) -> list[KernelRecord]:
        """Running kernels on live agents missing from their agent's running record for longer
        than `lease_ttl` (the process is gone and the agent did not bring it back). A death is
        confirmed by reading that record again first (our copy follows the agent's beats)."""
        now = time.monotonic()
        dead = []
        for k in kernels:
            ref = f"{k.cluster}/{k.name}"
            listed = fleet.running.get(k.agent)
            watched = k.state is KernelState.RUNNING and fleet.hosts(k.agent) and listed is not None
            if not watched or ref in (listed or ()):
                self._missing.pop(ref, None)
                continue
            since = self._missing.setdefault(ref, now)  # missing: looked at again at every pass
            started = k.started_at and time.time() - k.started_at > 2 * self.lease_ttl
            if started and now - since > self.lease_ttl and not self.blind:
                dead.append(k)
        if dead:  # confirm from the agents' records themselves: our copy may trail their beats
            agents = sorted({k.agent for k in dead})
            async with amap_redis_errors(), self.redis.pipeline(transaction=False) as pipe:
                for agent in agents:
                    pipe.hkeys(self.keys.agent_running(agent))
                listed_now = dict(zip(agents, map(frozenset, await pipe.execute()), strict=True))
            self._running.update(listed_now)
            dead = [k for k in dead if f"{k.cluster}/{k.name}" not in listed_now[k.agent]]
        for k in dead:
            self._missing.pop(f"{k.cluster}/{k.name}", None)
            logger.warning(
                "kernel %s/%s on agent %s is dead: its process is gone", k.cluster, k.name, k.agent
            )
        if dead:
            async with amap_redis_errors():
                await self.redis.hincrby(self.keys.reliability(), stats.KERNELS_DEAD, len(dead))
        return dead

    async def forget(self, agent: str) -> None:
        self._declared.discard(agent)
        self._departed.discard(agent)
        self._reassign(agent, None)
        for cache in (self.records, self._running, self._versions, self._beats):
            cache.pop(agent, None)
        self._alive.discard(agent)
