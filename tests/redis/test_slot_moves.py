"""`controlplane/redis/slots.py`: CLUSTER NODES as kcp reads it, and a slot moved live with its keys
on a real local Redis Cluster (the session's, and one whose only user is an ACL user): batches
of keys, binary keys, a half-done move resumed, a move crossing another one refused."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from controlplane.errors import NotRedisCluster, ReshardError
from controlplane.ops.redis_server import RedisClusterProcess, RedisServerProcess, start_redis_cluster
from controlplane.redis.connect import SyncRedis, connect_sync
from controlplane.redis.slots import (
    SlotTable,
    _check_movable,
    cluster_client,
    move_slot,
    parse_nodes,
    read_table,
    slot_of,
)

pytestmark = pytest.mark.redis_cluster

NODES = """\
aaaa1111 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460 [5461-<-bbbb2222]
bbbb2222 127.0.0.1:7001@17001 master - 0 1700000000000 2 connected 5461-10922 [5461->-aaaa1111]
cccc3333 127.0.0.1:7002@17002,node-c master,fail - 0 1700000000000 3 disconnected 10923-16383
dddd4444 :0@0 slave,noaddr cccc3333 0 0 3 disconnected
"""


@pytest.mark.unit
@pytest.mark.timeout(10)
def test_cluster_nodes_lines_give_ranges_flags_and_open_migrations() -> None:
    a, b, c, d = parse_nodes(NODES)
    assert (a.address, a.ranges, dict(a.importing), a.master, a.down) == (
        "127.0.0.1:7000",
        ((0, 5460),),
        {5461: "bbbb2222"},
        True,
        False,
    )
    assert dict(b.migrating) == {5461: "aaaa1111"} and b.serves(5461) and not b.serves(5460)
    assert c.down and c.port == 7002 and c.ranges == ((10923, 16383),)
    assert not d.master and d.down
    table = SlotTable((a, b, c, d))
    assert table.master_of(16000) is c
    assert table.master("127.0.0.1:7001") is b and table.master("bbbb") is b
    with pytest.raises(ReshardError, match="no master named 'zz'"):
        table.master("zz")
    assert table.open_slots() == {
        5461: [
            "127.0.0.1:7000 importing it from 127.0.0.1:7001",
            "127.0.0.1:7001 migrating it to 127.0.0.1:7000",
        ]
    }


@pytest.mark.unit
@pytest.mark.timeout(10)
def test_a_move_is_refused_while_a_master_is_down_or_the_slot_migrates_elsewhere() -> None:
    a, b, c, _ = parse_nodes(NODES)
    with pytest.raises(ReshardError, match=r"master 127.0.0.1:7002 \(fail\) is down"):
        _check_movable(SlotTable((a, b, c)), 100, a, b)
    healthy = SlotTable((a, b))
    with pytest.raises(ReshardError, match="slot 5461 is already migrating"):
        _check_movable(healthy, 5461, a, b)  # b migrates it to a, not the other way
    _check_movable(healthy, 5461, b, a)  # the very move left half-way: resumed


@pytest.mark.unit
@pytest.mark.timeout(10)
def test_a_single_redis_has_no_slots() -> None:
    with pytest.raises(NotRedisCluster, match="redis\\+cluster://"):
        cluster_client(redis.Redis())


def _elsewhere(cluster: RedisClusterProcess, slot: int) -> tuple[RedisServerProcess, RedisServerProcess]:
    home = cluster.master_of_slot(slot)
    return home, next(m for m in cluster.masters() if m is not home)


def _address(node: RedisServerProcess) -> str:
    return f"{node.host}:{node.port}"


@pytest.fixture
def client(redis_cluster_url: str) -> Iterator[SyncRedis]:
    with connect_sync(redis_cluster_url, decode_responses=False) as c:
        yield c


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_a_slot_moves_with_every_key_in_batches_binary_keys_too(
    redis_cluster: RedisClusterProcess, client: SyncRedis
) -> None:
    keys = [f"kcp:job:{{moving}}:{i}".encode() for i in range(250)] + [b"kcp:job:{moving}:\xff\xfe"]
    slot = slot_of("kcp:job:{moving}:0")
    home, target = _elsewhere(redis_cluster, slot)
    try:
        for key in keys:
            client.set(key, key)
        assert move_slot(client, slot, _address(target), batch=100) is True
        redis_cluster.wait_ok()
        assert redis_cluster.master_of_slot(slot) is target
        with redis.Redis.from_url(target.url) as there, redis.Redis.from_url(home.url) as before:
            assert there.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == len(keys)
            assert before.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 0
            assert there.get(keys[-1]) == keys[-1]
        assert move_slot(client, slot, redis_cluster.node_id(target)) is False  # there already
    finally:
        redis_cluster.move_slot(slot, home)


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_a_move_left_half_way_resumes_and_one_crossing_it_is_refused(
    redis_cluster: RedisClusterProcess, client: SyncRedis
) -> None:
    a, b = b"kcp:job:{half}:a", b"kcp:job:{half}:b"
    slot = slot_of("kcp:job:{half}:a")
    home, target = _elsewhere(redis_cluster, slot)
    third = next(m for m in redis_cluster.masters() if m not in (home, target))
    try:
        client.set(a, b"1")
        client.set(b, b"2")
        with redis.Redis.from_url(home.url) as src, redis.Redis.from_url(target.url) as dst:
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", redis_cluster.node_id(home))
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", redis_cluster.node_id(target))
            src.execute_command("MIGRATE", target.host, target.port, "", 0, 5000, "KEYS", a)
        opened = read_table(client).open_slots()[slot]
        assert len(opened) == 2 and all(_address(n) in " ".join(opened) for n in (home, target))
        with pytest.raises(ReshardError, match=f"slot {slot} is already migrating"):
            move_slot(client, slot, _address(third))
        assert move_slot(client, slot, _address(target)) is True  # the same move: finished
        redis_cluster.wait_ok()
        assert redis_cluster.master_of_slot(slot) is target
        assert (client.get(a), client.get(b)) == (b"1", b"2")
        assert slot not in read_table(client).open_slots()
    finally:
        redis_cluster.move_slot(slot, home)


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_migrate_authenticates_as_the_clients_acl_user(tmp_path: Path) -> None:
    """The only user that may log in is `kcp-admin`: a MIGRATE without AUTH2 is refused by the
    target (NOAUTH), so the keys arriving there show that the move sent the client's user."""
    with start_redis_cluster(data_dir=tmp_path, masters=2) as cluster:
        for node in cluster.nodes:
            with redis.Redis.from_url(node.url) as plain:
                plain.execute_command("ACL", "SETUSER", "kcp-admin", "on", ">s3cret", "~*", "&*", "+@all")
                plain.execute_command("ACL", "SETUSER", "default", "off")
        url = cluster.url.replace("redis+cluster://", "redis+cluster://kcp-admin:s3cret@", 1)
        slot = slot_of("kcp:job:{acl}:x")
        with connect_sync(url) as client:
            client.set("kcp:job:{acl}:x", "v")
            target = next(n for n in read_table(client).masters() if not n.serves(slot))
            assert move_slot(client, slot, target.address) is True
            assert read_table(client).master_of(slot).address == target.address
            assert client.get("kcp:job:{acl}:x") == "v"
