"""One consistent-enough read of the whole fleet: clusters, kernels, agents and their counters.

`kcp status`, `kcp top` and the Prometheus exporter all render this, so what they show comes
from one place. It is read fresh each time (nothing cached), which is what makes the series of
a destroyed cluster or a removed kernel disappear from `/metrics` instead of freezing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from controlplane.protocol import stats
from controlplane.protocol.models import ClusterStatus, KernelLoad, KernelState
from controlplane.protocol.records import AgentLease, AgentRecord, ClusterRecord, KernelRecord, LapsedRecord
from controlplane.redis.errors import amap_redis_errors
from controlplane.redis.scripts import jobs
from controlplane.redis.state import State

#: Kernel states in which a kernel process is expected to be alive.
LIVE_STATES = frozenset({KernelState.RUNNING, KernelState.DRAINING})


@dataclass(frozen=True, slots=True)
class KernelView:
    record: KernelRecord
    stats: dict[str, float]
    load: KernelLoad | None
    queued: int
    inflight: int
    agent_alive: bool
    lease: bool  # its process is listed in its agent's running record (`agent:{a}:running`)
    memory_bytes: int | None = None  # resident memory of the process (its load record)

    @property
    def up(self) -> bool:
        """Running or draining, its process alive (in its agent's running record) on an agent
        whose lease is alive."""
        return self.record.state in LIVE_STATES and self.agent_alive and self.lease


@dataclass(frozen=True, slots=True)
class Lapsed:
    """An agent or kernel the leader removed because its lease lapsed, still shown as down."""

    name: str
    record: LapsedRecord


@dataclass(frozen=True, slots=True)
class ClusterView:
    record: ClusterRecord
    stats: dict[str, float]
    orphans: int
    kernels: list[KernelView] = field(default_factory=list)
    #: kernels removed because their lease lapsed and not placed again under that name yet
    lapsed: list[Lapsed] = field(default_factory=list)

    @property
    def running(self) -> int:
        return sum(k.record.state is KernelState.RUNNING for k in self.kernels)


@dataclass(frozen=True, slots=True)
class AgentView:
    record: AgentRecord
    alive: bool
    lease_ms: int  # remaining lease, ms; <= 0 when expired
    last_beat: float | None = None  # unix seconds of its last heartbeat (in its lease, Redis clock)


@dataclass(frozen=True, slots=True)
class Snapshot:
    taken_at: float
    clusters: list[ClusterView]
    agents: list[AgentView]
    #: agents forgotten because their lease lapsed and not registered again yet
    lapsed_agents: list[Lapsed] = field(default_factory=list)

    def kernels(self) -> list[tuple[ClusterView, KernelView]]:
        return [(c, k) for c in self.clusters for k in c.kernels]


def _floats(raw: dict[str, str]) -> dict[str, float]:
    out = {}
    for k, v in raw.items():
        try:
            out[k] = float(v)
        except ValueError:
            continue
    return out


def _lapsed(raw: dict[str, str], key: str, present: set[str], now: float) -> dict[str, LapsedRecord]:
    """The entries of a lapsed hash still within their retention, for names not present again."""
    out = {}
    for name, value in raw.items():
        if name not in present and (record := LapsedRecord.decode(value, key)) and record.until > now:
            out[name] = record
    return out


async def read_snapshot(state: State) -> Snapshot:
    """Every cluster that is not being destroyed, its kernels, and every registered agent; and
    the agents and kernels lost to a lapsed lease within the retention (`Settings.down_retention`)."""
    keys, redis = state.keys, state.redis
    agents = await state.agents()
    alive = {a.name for a, ok in agents if ok}
    clusters = [c for c in await state.list_clusters() if c.status is not ClusterStatus.STOPPED]
    kernels = {c.name: await state.kernels(c.name) for c in clusters}
    loads = {c.name: await state.load_records(kernels[c.name]) for c in clusters}
    async with amap_redis_errors(), redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.lapsed_agents())
        pipe.hgetall(keys.lapsed_kernels())
        for a, _ in agents:
            pipe.pttl(keys.agent_lease(a.name))
            pipe.get(keys.agent_lease(a.name))
            pipe.hkeys(keys.agent_running(a.name))
        for c in clusters:  # in the order the loop below reads them back
            pipe.zcard(keys.cluster_orphans(c.name))
            for k in kernels[c.name]:
                pipe.zcard(keys.queue(k.cluster, k.name))
                pipe.zcard(keys.inflight(k.cluster, k.name))
        rows = iter(await pipe.execute())
    # a cluster's hash and its kernels' at one instant (a removed kernel's is folded into the
    # cluster's: read apart, the totals could step back); one more round trip for all clusters
    calls = [jobs.read_stats(keys, c.name) for c in clusters]
    async with amap_redis_errors():
        async with redis.pipeline(transaction=False) as pipe:
            for call in calls:
                pipe.execute_command(*call.command)
            replies = await pipe.execute(raise_on_error=False)
        reads = [await call.settle(reply, redis) for call, reply in zip(calls, replies, strict=True)]
    now = time.time()
    lapsed_agents = _lapsed(next(rows), keys.lapsed_agents(), {a.name for a, _ in agents}, now)
    present = {f"{c.name}/{k.name}" for c in clusters for k in kernels[c.name]}
    lapsed_kernels = _lapsed(next(rows), keys.lapsed_kernels(), present, now)
    agent_views = []
    running: set[str] = set()
    for a, ok in agents:
        pttl, beat_of = max(int(next(rows)), 0), AgentLease.decode(next(rows))
        running |= set(next(rows))
        beat = beat_of.beat_ms / 1000 if beat_of is not None and beat_of.beat_ms else None
        agent_views.append(AgentView(a, ok, pttl, beat))
    cluster_views = []
    for c, read in zip(clusters, reads, strict=True):
        theirs = {name: _floats(dict(h)) for name, h in read.kernels.items()}
        orphans = int(next(rows))
        views = []
        for k in kernels[c.name]:
            queued, inflight = int(next(rows)), int(next(rows))
            kstats = stats.derive(theirs.get(k.name, {}))
            lease = f"{c.name}/{k.name}" in running
            r = loads[c.name].get(k.name)
            load, rss = (r.to_load(k.name), r.memory_bytes) if r is not None else (None, None)
            views.append(KernelView(k, kstats, load, queued, inflight, k.agent in alive, lease, rss))
        lost = [
            Lapsed(ref.partition("/")[2], entry)
            for ref, entry in sorted(lapsed_kernels.items())
            if ref.partition("/")[0] == c.name
        ]
        cluster_views.append(
            ClusterView(c, stats.totals(_floats(dict(read.cluster)), theirs.values()), orphans, views, lost)
        )
    gone = [Lapsed(name, entry) for name, entry in sorted(lapsed_agents.items())]
    return Snapshot(now, cluster_views, agent_views, gone)
