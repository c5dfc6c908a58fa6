"""Failure detection: agent and kernel leases, read by the leader at every pass.

An agent's heartbeat thread renews its lease (`agent:{name}:lease`, TTL `lease_ttl`) every
`heartbeat_interval`, and one lease per live kernel process (`kernel:{cluster}:{kernel}:lease`).
The detector classifies each agent at every pass:

- **alive**: the lease exists and was renewed recently;
- **suspect**: the lease exists but at least one renewal is overdue (nothing is moved yet);
- **dead**: the lease is gone. The reconciler then removes its kernels and fails their work over.

A kernel is dead when its agent is alive but its own lease has been missing for longer than
`lease_ttl` (its process is gone and the agent has not brought it back).

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
from dataclasses import dataclass, field

from controlplane.protocol import stats
from controlplane.protocol.keys import Keys
from controlplane.protocol.models import KernelState
from controlplane.protocol.records import AgentRecord, KernelRecord
from controlplane.redis.connect import AsyncRedis
from controlplane.redis.state import State, now_ms
from controlplane.settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Fleet:
    """The agents as seen at the start of a pass."""

    agents: dict[str, AgentRecord]
    alive: frozenset[str]
    assigned: Counter[str]  # agent -> kernels assigned (all clusters)
    suspect: frozenset[str] = field(default_factory=frozenset)

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
        self._next_expiry = time.monotonic() + settings.lease_ttl
        self.window = settings.lease_ttl + settings.heartbeat_interval
        self._unseen = True  # no read has succeeded yet: the blind window opens with the first
        self._blind_until = 0.0

    def grace(self) -> None:
        """We could not see Redis (it was down, restarting, loading, failing over): the leases may
        have lapsed because nobody could renew them, not because the agents died. The blind window
        opens again at the next read that succeeds (`fleet`), not now: however long Redis stays
        away, every agent gets a full window to renew once it answers."""
        self._unseen = True

    @property
    def blind(self) -> bool:
        """Whether deaths are withheld: Redis not seen yet, or seen again less than `window` ago."""
        return self._unseen or time.monotonic() < self._blind_until

    def next_check_in(self) -> float:
        """Seconds until the earliest live lease would expire (if not renewed), at least 10 ms."""
        return max(self._next_expiry - time.monotonic(), 0.01)

    async def fleet(self) -> Fleet:
        agents = await self.state.agents()
        k = self.keys
        async with self.redis.pipeline(transaction=False) as pipe:
            for record, _ in agents:
                pipe.pttl(k.agent_lease(record.name))
                pipe.hlen(k.agent_kernels(record.name))
            pipe.hgetall(k.heartbeats())
            rows = await pipe.execute()
        heartbeats: dict[str, str] = rows[-1]
        now = time.monotonic()
        if self._unseen:  # the first read since an outage (or since we started): the window opens
            self._unseen = False
            self._blind_until = now + self.window
            logger.info("Redis answers: no death declared for %.1fs, so every agent can renew", self.window)
        alive: set[str] = set()
        suspect: set[str] = set()
        assigned: Counter[str] = Counter()
        soonest = self.lease_ttl
        # a renewal is overdue once the lease has lost more than 1.5 heartbeat periods
        overdue_below = self.ttl_ms - 1.5 * self.interval_ms
        blind = self.blind
        for i, (record, _) in enumerate(agents):
            name, pttl = record.name, int(rows[2 * i])
            assigned[name] = int(rows[2 * i + 1])
            if pttl == -2 and not blind:  # no lease: dead
                continue
            alive.add(name)
            if pttl >= 0:
                soonest = min(soonest, pttl / 1000)
                if pttl < overdue_below:
                    suspect.add(name)
        self._next_expiry = now + soonest + 0.005
        await self._report(alive, suspect, {r.name for r, _ in agents}, assigned, heartbeats)
        return Fleet(
            agents={r.name: r for r, _ in agents},
            alive=frozenset(alive),
            assigned=assigned,
            suspect=frozenset(suspect),
        )

    async def _report(
        self,
        alive: set[str],
        suspect: set[str],
        known: set[str],
        assigned: Counter[str],
        heartbeats: dict[str, str],
    ) -> None:
        """Log state changes and count them in the `reliability` hash."""
        for name in suspect - self._suspects:
            logger.warning("agent %s is suspect: a lease renewal is overdue", name)
            await self.redis.hincrby(self.keys.reliability(), stats.AGENTS_SUSPECTED, 1)
        self._suspects = suspect
        for name in known - alive - self._declared:
            self._declared.add(name)
            last = int(heartbeats.get(name) or 0)
            detection = now_ms() - last if last else None
            logger.warning(
                "agent %s is dead: lease expired%s; %d kernel(s) to fail over",
                name,
                f" {detection} ms after its last heartbeat" if detection is not None else "",
                assigned[name],
            )
            async with self.redis.pipeline(transaction=False) as pipe:
                key = self.keys.reliability()
                pipe.hincrby(key, stats.AGENTS_DEAD, 1)
                if detection is not None:
                    pipe.hset(
                        key, mapping={stats.DETECTION_MS_LAST: detection, stats.DETECTION_LAST_AT: now_ms()}
                    )
                    pipe.hincrby(key, stats.DETECTION_MS_SUM, detection)
                    pipe.hincrby(key, stats.DETECTION_COUNT, 1)
                await pipe.execute()
        self._declared &= known - alive  # back alive, or forgotten: report a later death again

    async def dead_kernels(self, kernels: list[KernelRecord], fleet: Fleet) -> list[KernelRecord]:
        """Running kernels on live agents whose own lease has lapsed (the process is gone)."""
        watched = [
            k
            for k in kernels
            if k.state is KernelState.RUNNING
            and fleet.hosts(k.agent)
            and k.started_at
            and time.time() - k.started_at > 2 * self.lease_ttl  # its agent has had time to renew it
        ]
        if not watched or self.blind:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for k in watched:
                pipe.exists(self.keys.kernel_lease(k.cluster, k.name))
            found = await pipe.execute()
        dead = [k for k, ok in zip(watched, found, strict=True) if not ok]
        for k in dead:
            logger.warning("kernel %s/%s on agent %s is dead: its lease expired", k.cluster, k.name, k.agent)
        if dead:
            await self.redis.hincrby(self.keys.reliability(), stats.KERNELS_DEAD, len(dead))
        return dead

    async def forget(self, agent: str) -> None:
        self._declared.discard(agent)
        await self.redis.hdel(self.keys.heartbeats(), agent)
