"""Redis Cluster hash slots: which master serves which, and moving one live, keys and all.

The mechanics of `kcp slots` (`controlplane/ops/slots.py` decides what moves) and of the test
helper `RedisClusterProcess.move_slot`: the one implementation of the live resharding protocol
(the cluster specification's, as `redis-cli --cluster reshard` runs it, but for a chosen slot):

1. `CLUSTER SETSLOT <slot> IMPORTING <source>` on the target, `MIGRATING <target>` on the source:
   from then on the source answers a command on a key it no longer has with ASK, so clients
   follow the keys as they move, and a new key goes to the target;
2. `CLUSTER GETKEYSINSLOT` and `MIGRATE ... KEYS` on the source until the slot is empty there
   (each MIGRATE is atomic per batch; a client sees a key on one side or the other);
3. `CLUSTER SETSLOT <slot> NODE <target>` on the target, the source, then every other master.

MIGRATE is a connection from the source to the target, so it authenticates with the client's
own credentials (AUTH2 with an ACL user, AUTH with a password alone); with `tls-cluster yes`
the source reaches the target over TLS by itself. A node's `CLUSTER NODES` line lists the slots
it is migrating or importing; only the node's own line says so, so `read_table` asks every master.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, cast

import redis
from redis.crc import key_slot

from controlplane.errors import NotRedisCluster, RedisError, ReshardError
from controlplane.redis.connect import SyncRedis, SyncRedisCluster, cluster_settings, node_sync
from controlplane.redis.errors import Where, map_redis_errors, where_of

#: The number of hash slots of every Redis Cluster.
CLUSTER_SLOTS = 16384
#: CLUSTER NODES flags of a node that is not (yet, or any more) a healthy member.
DOWN_FLAGS = frozenset({"fail", "fail?", "handshake", "noaddr"})
#: Keys moved per MIGRATE, and how long the source waits for the target to take a batch, ms.
MIGRATE_BATCH, MIGRATE_TIMEOUT_MS = 100, 10_000


def slot_of(key: str) -> int:
    """The hash slot of `key` (its first `{...}` tag when it has one), as Redis computes it."""
    return key_slot(key.encode())


@dataclass(frozen=True, slots=True)
class Node:
    """One node as a line of `CLUSTER NODES` describes it."""

    node_id: str
    host: str
    port: int
    flags: frozenset[str]
    connected: bool
    #: the slot ranges it serves, inclusive (a master's; a replica serves none)
    ranges: tuple[tuple[int, int], ...] = ()
    #: slot -> node id: what the node migrates to another, or imports from one (its own line only)
    migrating: Mapping[int, str] = field(default_factory=dict)
    importing: Mapping[int, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def master(self) -> bool:
        return "master" in self.flags

    @property
    def down(self) -> bool:
        """Flagged failing (by the node that listed it), or its link from that node is down."""
        return bool(DOWN_FLAGS & self.flags) or not self.connected

    def serves(self, slot: int) -> bool:
        return any(start <= slot <= end for start, end in self.ranges)


def parse_nodes(text: str) -> list[Node]:
    """The nodes of a `CLUSTER NODES` reply: `<id> <ip:port@cport[,hostname]> <flags> <master>
    <ping> <pong> <epoch> <link> <slot>...`, a slot being `0-5460`, `5461`, `[5461->-<id>]`
    (migrating) or `[5461-<-<id>]` (importing)."""
    nodes = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 8:
            continue
        host, _, port = parts[1].partition("@")[0].rpartition(":")
        ranges: list[tuple[int, int]] = []
        migrating: dict[int, str] = {}
        importing: dict[int, str] = {}
        for item in parts[8:]:
            if item.startswith("["):
                slot, arrow, peer = item.strip("[]").partition("->-")
                if arrow:
                    migrating[int(slot)] = peer
                else:
                    slot, _, peer = item.strip("[]").partition("-<-")
                    importing[int(slot)] = peer
            else:
                start, _, end = item.partition("-")
                ranges.append((int(start), int(end or start)))
        nodes.append(
            Node(
                node_id=parts[0],
                host=host,
                port=int(port or 0),
                flags=frozenset(parts[2].split(",")),
                connected=parts[7] == "connected",
                ranges=tuple(ranges),
                migrating=migrating,
                importing=importing,
            )
        )
    return nodes


@dataclass(frozen=True, slots=True)
class SlotTable:
    """The cluster's nodes as one master sees them, each master's open migrations as its own
    line reports them."""

    nodes: tuple[Node, ...]

    def masters(self) -> list[Node]:
        return [n for n in self.nodes if n.master]

    def master(self, ref: str) -> Node:
        """The master `ref` names: its `host:port`, its node id or a unique prefix of that id;
        ReshardError if none does (or several)."""
        found = [n for n in self.masters() if ref and (n.address == ref or n.node_id.startswith(ref))]
        if len(found) != 1:
            known = ", ".join(f"{n.address} ({n.node_id[:8]})" for n in self.masters())
            what = "no master" if not found else "several masters"
            raise ReshardError(f"{what} named {ref!r} in this Redis Cluster (masters: {known})")
        return found[0]

    def master_of(self, slot: int) -> Node:
        """The master serving `slot`; ReshardError if none does (a slot left uncovered)."""
        for node in self.masters():
            if node.serves(slot):
                return node
        raise ReshardError(f"slot {slot} is served by no master (`redis-cli --cluster fix` covers it)")

    def open_slots(self) -> dict[int, list[str]]:
        """Slot -> what its masters say of its migration, for every slot migrating or importing."""
        out: dict[int, list[str]] = {}
        names = {n.node_id: n.address for n in self.nodes}
        for node in self.masters():
            for slot, peer in node.migrating.items():
                out.setdefault(slot, []).append(f"{node.address} migrating it to {names.get(peer, peer)}")
            for slot, peer in node.importing.items():
                out.setdefault(slot, []).append(f"{node.address} importing it from {names.get(peer, peer)}")
        return out


def cluster_client(client: SyncRedis | SyncRedisCluster) -> SyncRedisCluster:
    """`client` as the cluster client it is (`connect_sync` types both as `SyncRedis`);
    NotRedisCluster if it is one server's."""
    if not isinstance(client, SyncRedisCluster):
        raise NotRedisCluster(
            "this is a single Redis, not a Redis Cluster: every key is on one server, there are no slots "
            "to spread (a Redis Cluster needs a redis+cluster:// or rediss+cluster:// URL)"
        )
    return cast(SyncRedisCluster, client)  # redis-py's cluster client derives from untyped bases


@contextlib.contextmanager
def _node(cluster: SyncRedisCluster, node: Node) -> Iterator[tuple[redis.Redis, Where]]:
    """A plain client for `node` (replies as bytes: keys need not be UTF-8), and where it points."""
    where = where_of(cluster)
    client = node_sync(cluster, node.host, node.port, decode_responses=False)
    try:
        yield client, Where(url=f"{where.url} (node {node.address})", user=where.user)
    finally:
        client.close()


def _ask(client: redis.Redis, where: Where, *args: Any) -> Any:
    with map_redis_errors(where):
        return client.execute_command(*args)  # type: ignore[no-untyped-call]


def read_table(client: SyncRedis | SyncRedisCluster) -> SlotTable:
    """Every node as the cluster client's default node lists it, with each reachable master's
    open migrations from its own line (NotRedisCluster for a single Redis's client)."""
    cluster = cluster_client(client)
    default = cluster_settings(cluster)
    view = Node("", str(default["host"]), int(default["port"]), frozenset(), True)
    with _node(cluster, view) as (conn, where):
        nodes = parse_nodes(_ask(conn, where, "CLUSTER", "NODES").decode())
    merged = []
    for node in nodes:
        if node.master and not node.down:
            with _node(cluster, node) as (conn, where):
                own = parse_nodes(_ask(conn, where, "CLUSTER", "NODES").decode())
            mine = next((n for n in own if "myself" in n.flags), node)
            node = replace(node, migrating=mine.migrating, importing=mine.importing)
        merged.append(node)
    return SlotTable(tuple(merged))


def commands_served(client: SyncRedis | SyncRedisCluster) -> dict[str, int]:
    """The commands each running master has served since it started (`INFO commandstats` calls,
    the commands Lua scripts run included), by address."""
    cluster = cluster_client(client)
    out = {}
    for node in read_table(cluster).masters():
        if not node.down:
            with _node(cluster, node) as (conn, where), map_redis_errors(where):
                info: Any = conn.info("commandstats")
            out[node.address] = sum(int(v["calls"]) for v in info.values())
    return out


def _auth(cluster: SyncRedisCluster) -> tuple[str, ...]:
    """MIGRATE's AUTH/AUTH2 arguments: the client's own credentials, which the target checks."""
    settings = cluster_settings(cluster)
    username, password = settings.get("username"), settings.get("password")
    if password is None:
        return ()
    return ("AUTH2", username, password) if username else ("AUTH", password)


def _check_movable(table: SlotTable, slot: int, source: Node, target: Node) -> None:
    """Refuse a move that cannot complete (a master down) or would cross another migration of
    the slot. A migration of this very move (source to target) left half-way is resumed."""
    down = [n for n in table.masters() if n.down]
    if down:
        which = ", ".join(
            f"{n.address} ({','.join(sorted(DOWN_FLAGS & n.flags)) or 'no link'})" for n in down
        )
        raise ReshardError(
            f"cannot move slot {slot}: master {which} is down; every master takes the slot's new owner, "
            "so slots move only while all of them answer"
        )
    ours = (
        source.migrating.get(slot) in (None, target.node_id)
        and target.importing.get(slot) in (None, source.node_id)
        and slot not in source.importing
        and slot not in target.migrating
    )
    others = [
        n
        for n in table.masters()
        if n.node_id not in (source.node_id, target.node_id) and (slot in n.migrating or slot in n.importing)
    ]
    if not ours or others:
        said = "; ".join(table.open_slots().get(slot, []))
        raise ReshardError(
            f"slot {slot} is already migrating ({said}): settle it first, e.g. "
            f"`redis-cli --cluster fix {source.address}`"
        )


def move_slot(
    client: SyncRedis | SyncRedisCluster, slot: int, to: str, *, batch: int = MIGRATE_BATCH
) -> bool:
    """Move `slot`, keys and all, to the master `to` (its address or node id: `SlotTable.master`)
    while clients keep using it; False when it is there already. ReshardError when the move will
    not start (a master down, the slot migrating elsewhere) or stops part-way (the message says
    how the slot was left: the same move again resumes it); NotRedisCluster for a single Redis's
    client."""
    if not 0 <= slot < CLUSTER_SLOTS:
        raise ReshardError(f"slot {slot} is not a Redis Cluster slot (0-{CLUSTER_SLOTS - 1})")
    cluster = cluster_client(client)
    table = read_table(cluster)
    source, target = table.master_of(slot), table.master(to)
    if source.node_id == target.node_id:
        return False
    _check_movable(table, slot, source, target)
    auth = _auth(cluster)
    others = [n for n in table.masters() if n.node_id not in (source.node_id, target.node_id)]
    with _node(cluster, source) as (src, src_at), _node(cluster, target) as (dst, dst_at):
        # refused here (an ACL user without the right, say), nothing has changed: that error as such
        _ask(dst, dst_at, "CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id)
        try:
            _ask(src, src_at, "CLUSTER", "SETSLOT", slot, "MIGRATING", target.node_id)
            migrate = ("MIGRATE", target.host, target.port, "", 0, MIGRATE_TIMEOUT_MS, *auth, "KEYS")
            while keys := _ask(src, src_at, "CLUSTER", "GETKEYSINSLOT", slot, batch):
                _ask(src, src_at, *migrate, *keys)
            _ask(dst, dst_at, "CLUSTER", "SETSLOT", slot, "NODE", target.node_id)
            _ask(src, src_at, "CLUSTER", "SETSLOT", slot, "NODE", target.node_id)
        except RedisError as exc:
            raise ReshardError(
                f"moving slot {slot} from {source.address} to {target.address} stopped part-way: "
                f"{str(exc).rstrip('.')}; "
                f"the same move again resumes it, or `redis-cli --cluster fix {source.address}` settles it"
            ) from exc
    # the move is done: the other masters are told only so they redirect sooner (gossip tells them
    # anyway), so one that cannot be (down, or a replica now though the view still says master,
    # as just after a failover) is no reason to fail it
    for node in others:
        with contextlib.suppress(RedisError), _node(cluster, node) as (conn, at):
            _ask(conn, at, "CLUSTER", "SETSLOT", slot, "NODE", target.node_id)
    return True
