"""Spread kcp clusters over the masters of a Redis Cluster (`kcp slots`, issue 20).

Every key of a kcp cluster carries its name as hash tag (`protocol/keys.py`), so a kcp cluster is
one slot, and the master serving that slot carries all of its traffic. As the names hash, 30 kcp
clusters land 13/9/8 on 3 masters; `redis-cli --cluster reshard` moves N slots of its choosing,
not the one a busy kcp cluster is in. So kcp weighs its clusters and moves their slots itself:

- `read_layout`: each kcp cluster (the fleet's cluster set, as `kcp cluster list` reads it) in
  its slot, on the master serving it, weighed over a short window (`weigh`) by the commands/s its
  dispatches (its stats counters, its kernels' summed: `StatsRead.totals`) cost its master, or
  each counted as one when nothing was dispatched. A master also carries a base, the fleet-wide
  keys' commands/s (agents, the leader, clients' bells), which no move changes. Names that hash
  to one slot share it, weigh together, move together.
- `plan`: a pure function, the moves that bring the busiest master's weight (base included)
  within `ratio` of the idlest's: greedily the slot of the heaviest master whose move to the
  lightest leaves the best spread, while a move improves it; so few moves, not a proven minimum.
- `balance`: the plan carried out live, one slot at a time (`controlplane.redis.slots.move_slot`;
  clients follow the keys by ASK and MOVED, dispatching goes on).

Only kcp clusters' slots move; fleet-wide keys (agents, the leader, the bus) stay where they hash.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from controlplane.errors import ClusterNotFound, NotRedisCluster
from controlplane.protocol import stats
from controlplane.protocol.keys import Keys
from controlplane.redis.connect import SyncRedis, connect_sync, is_cluster_url
from controlplane.redis.errors import map_redis_errors, where_from_url
from controlplane.redis.scripts import jobs
from controlplane.redis.slots import commands_served, move_slot, read_table, slot_of
from controlplane.settings import Settings
from controlplane.tls import redact_url

#: What a weight counts: commands per second (estimated from the dispatches in the window), or
#: kcp clusters (none dispatched).
COMMANDS, COUNT = "commands/s", "kcp clusters"
#: The defaults of `kcp slots`: the sampling window, seconds, and the busiest / idlest target.
WINDOW_S, RATIO = 5.0, 1.25


@dataclass(frozen=True, slots=True)
class SlotLoad:
    """One slot holding kcp clusters, and what they weigh together."""

    slot: int
    clusters: tuple[str, ...]
    weight: float


@dataclass(frozen=True, slots=True)
class MasterLoad:
    """One master and the kcp clusters' slots it serves."""

    node_id: str
    address: str
    slots: tuple[SlotLoad, ...] = ()
    #: what it carries that no slot move changes (the fleet-wide keys' commands/s), in the same unit
    base: float = 0.0

    @property
    def weight(self) -> float:
        return self.base + sum(s.weight for s in self.slots)

    @property
    def clusters(self) -> list[str]:
        return [name for s in self.slots for name in s.clusters]


@dataclass(frozen=True, slots=True)
class Move:
    """One slot, with the kcp clusters in it, from one master to another (their addresses)."""

    slot: int
    clusters: tuple[str, ...]
    weight: float
    source: str
    target: str


def spread(weights: Iterable[float]) -> float:
    """The heaviest weight over the lightest: 1.0 for none or all zero, inf when only the lightest is."""
    values = list(weights)
    heaviest, lightest = max(values, default=0.0), min(values, default=0.0)
    if heaviest <= 0:
        return 1.0
    return heaviest / lightest if lightest > 0 else math.inf


@dataclass(frozen=True, slots=True)
class Layout:
    """The kcp clusters per master of a Redis Cluster, weighed in `unit` (COMMANDS or COUNT)."""

    masters: tuple[MasterLoad, ...]
    unit: str = COUNT
    #: slot -> what its masters say of its migration, for slots of kcp clusters left migrating
    migrating: dict[int, list[str]] = field(default_factory=dict)

    @property
    def spread(self) -> float:
        """The busiest master's weight over the idlest's."""
        return spread(m.weight for m in self.masters)

    @property
    def shared(self) -> list[SlotLoad]:
        """The slots that hold several kcp clusters (they move together)."""
        return [s for m in self.masters for s in m.slots if len(s.clusters) > 1]

    def moved(self, moves: Iterable[Move]) -> Layout:
        """This layout once `moves` are made."""
        slots = {m.address: list(m.slots) for m in self.masters}
        for move in moves:
            held = next(s for s in slots[move.source] if s.slot == move.slot)
            slots[move.source].remove(held)
            slots[move.target].append(held)
        masters = (
            replace(m, slots=tuple(sorted(slots[m.address], key=lambda s: s.slot))) for m in self.masters
        )
        return replace(self, masters=tuple(masters))

    def to_json(self) -> dict[str, Any]:
        return {
            "unit": self.unit,
            "spread": _finite(self.spread),
            "masters": [
                {
                    "node_id": m.node_id,
                    "address": m.address,
                    "weight": round(m.weight, 3),
                    "base": round(m.base, 3),
                    "kcp_clusters": m.clusters,
                    "slots": [
                        {"slot": s.slot, "clusters": list(s.clusters), "weight": s.weight} for s in m.slots
                    ],
                }
                for m in self.masters
            ],
            "shared_slots": [{"slot": s.slot, "clusters": list(s.clusters)} for s in self.shared],
            "migrating": {str(slot): said for slot, said in self.migrating.items()},
        }


def _finite(value: float) -> float | None:
    """`value` for JSON, which has no infinity (None then)."""
    return round(value, 3) if math.isfinite(value) else None


def plan(layout: Layout, ratio: float) -> list[Move]:
    """The slot moves that bring `layout.spread` to `ratio` or below, or as close as moving whole
    slots gets: while the spread is above `ratio`, move the slot of the heaviest master that,
    moved to the lightest, leaves the best spread (then the lowest heaviest weight), if that
    improves on the current one. Pure: no I/O."""
    weights = {m.address: m.weight for m in layout.masters}
    held = {m.address: list(m.slots) for m in layout.masters}
    moves: list[Move] = []

    def score(loads: dict[str, float]) -> tuple[float, float, float]:
        values = loads.values()
        return spread(values), max(values), -min(values)

    while weights and spread(weights.values()) > ratio:
        heavy = max(weights, key=lambda n: weights[n])
        light = min(weights, key=lambda n: weights[n])
        best: tuple[tuple[float, float, float], SlotLoad] | None = None
        for candidate in held[heavy]:
            trial = weights | {
                heavy: weights[heavy] - candidate.weight,
                light: weights[light] + candidate.weight,
            }
            if best is None or score(trial) < best[0]:
                best = (score(trial), candidate)
        if best is None or best[0] >= score(weights):
            break
        chosen = best[1]
        held[heavy].remove(chosen)
        held[light].append(chosen)
        weights[heavy] -= chosen.weight
        weights[light] += chosen.weight
        moves.append(Move(chosen.slot, chosen.clusters, chosen.weight, heavy, light))
    return moves


# ------------------------------------------------------------------ reading Redis
@contextlib.contextmanager
def cluster_client(settings: Settings) -> Iterator[SyncRedis]:
    """A blocking client of the Redis Cluster at `settings.redis_url` (its errors mapped);
    NotRedisCluster for any other URL: one server, or Sentinel's master, has no slots to spread."""
    url = settings.redis_url
    if not is_cluster_url(url):
        raise NotRedisCluster(
            f"{redact_url(url)} is a single Redis (or Sentinel's master): every kcp cluster is on that one "
            "server, there are no slots to spread; `kcp slots` works on a redis+cluster:// URL"
        )
    with map_redis_errors(where_from_url(url)), connect_sync(url, timeout=30.0) as client:
        yield client


def _cluster_names(client: SyncRedis, keys: Keys) -> list[str]:
    """The fleet's kcp clusters (the set `kcp cluster list` reads), sorted."""
    with map_redis_errors():
        members: Any = client.smembers(keys.clusters())
    return sorted(members)


def _dispatches(client: SyncRedis, keys: Keys, names: Sequence[str]) -> dict[str, float]:
    """Each kcp cluster's dispatches so far: its stats counters, its kernels' summed."""
    out = {}
    with map_redis_errors():
        for name in names:
            out[name] = (
                jobs.read_stats(keys, name).run_sync(client).totals(keys, name).get(stats.DISPATCHES, 0.0)
            )
    return out


@dataclass(frozen=True, slots=True)
class Weights:
    """What `weigh` found: each kcp cluster's weight, each master's base (its load that no slot
    move changes), in `unit`."""

    clusters: dict[str, float]
    unit: str = COUNT
    base: dict[str, float] = field(default_factory=dict)


def weigh(
    client: SyncRedis,
    keys: Keys,
    homes: Mapping[str, Sequence[str]],
    window: float,
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> Weights:
    """Weigh the kcp clusters (`homes`: master address -> the kcp clusters on it) over `window`
    seconds: each kcp cluster's dispatches/s (its stats counters), each master's commands/s
    (`commands_served`). A dispatch costs its kcp cluster's master about as many commands on
    every master; taken as the lowest ratio of a master's commands to its kcp clusters'
    dispatches (so that master's own traffic counts as none), a kcp cluster weighs its
    dispatches/s times that (COMMANDS), and what a master serves beyond its kcp clusters' share
    is its base: the fleet-wide keys' traffic (agents, the leader, clients' bells), which no move
    changes. 1 each and no base (COUNT) without a window or a dispatch in it."""
    names = [n for held in homes.values() for n in held]
    if window > 0 and names:
        before, served = _dispatches(client, keys, names), commands_served(client)
        began = time.monotonic()
        sleep(window)
        took = max(time.monotonic() - began, 1e-3)
        served = {m: (c - served.get(m, c)) / took for m, c in commands_served(client).items()}
        after = _dispatches(client, keys, names)
        rates = {n: max(after[n] - before[n], 0.0) / took for n in names}
        dispatched = {m: sum(rates[n] for n in held) for m, held in homes.items()}
        ratios = [served.get(m, 0.0) / d for m, d in dispatched.items() if d > 0]
        if ratios:
            cost = min(ratios)
            base = {m: max(served.get(m, 0.0) - cost * d, 0.0) for m, d in dispatched.items()}
            return Weights({n: r * cost for n, r in rates.items()}, COMMANDS, base)
    return Weights(dict.fromkeys(names, 1.0))


def read_layout(client: SyncRedis, keys: Keys, *, window: float) -> Layout:
    """Every kcp cluster of the fleet's set in its slot, on its master, weighed over `window` s
    (`weigh`). A master that is down and serves no slot (one whose replica took over) is left out."""
    table = read_table(client)
    by_slot: dict[int, list[str]] = {}
    for name in _cluster_names(client, keys):
        by_slot.setdefault(slot_of(keys.cluster(name)), []).append(name)
    masters = [m for m in sorted(table.masters(), key=lambda n: (n.host, n.port)) if m.ranges or not m.down]
    held = {m.address: [(s, names) for s, names in sorted(by_slot.items()) if m.serves(s)] for m in masters}
    weights = weigh(client, keys, {m: [n for _, names in h for n in names] for m, h in held.items()}, window)
    loads = tuple(
        MasterLoad(
            m.node_id,
            m.address,
            tuple(
                SlotLoad(s, tuple(names), sum(weights.clusters[n] for n in names))
                for s, names in held[m.address]
            ),
            weights.base.get(m.address, 0.0),
        )
        for m in masters
    )
    opened = {slot: said for slot, said in table.open_slots().items() if slot in by_slot}
    return Layout(loads, weights.unit, opened)


@dataclass(frozen=True, slots=True)
class Balance:
    """What `balance` found, planned and (unless a dry run) did."""

    before: Layout
    moves: tuple[Move, ...]
    ratio: float
    dry_run: bool
    seconds: float  # the moves' wall time

    @property
    def after(self) -> Layout:
        return self.before.moved(self.moves)

    @property
    def reached(self) -> bool:
        return self.after.spread <= self.ratio


def balance(
    client: SyncRedis,
    keys: Keys,
    *,
    ratio: float,
    window: float,
    dry_run: bool = False,
    on_move: Callable[[Move, str], None] = lambda move, unit: None,
) -> Balance:
    """Weigh, plan (`plan`) and, unless `dry_run`, make the moves live one after the other
    (`on_move` is told of each once made, with the unit of its weight). A ReshardError stops it:
    the moves made so far stay."""
    layout = read_layout(client, keys, window=window)
    moves = plan(layout, ratio)
    began = time.monotonic()
    if not dry_run:
        for move in moves:
            move_slot(client, move.slot, move.target)
            on_move(move, layout.unit)
    return Balance(layout, tuple(moves), ratio, dry_run, time.monotonic() - began)


def move_cluster(client: SyncRedis, keys: Keys, name: str, to: str) -> Move | None:
    """Move the slot of kcp cluster `name` (and of any that share it) to the master `to` (an
    address or a node id); None when it is there already. ClusterNotFound for an unknown name."""
    if name not in _cluster_names(client, keys):
        raise ClusterNotFound(name)
    table = read_table(client)
    slot = slot_of(keys.cluster(name))
    source, target = table.master_of(slot), table.master(to)
    if not move_slot(client, slot, target.address):
        return None
    together = tuple(n for n in _cluster_names(client, keys) if slot_of(keys.cluster(n)) == slot)
    return Move(slot, together, 0.0, source.address, target.address)
