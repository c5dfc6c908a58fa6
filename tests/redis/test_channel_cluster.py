"""`ClusterChannel`: the hot path's pipelined transport on a real local Redis Cluster (3 masters,
one replica each): routing by slot, redirections after a resharding, a master's failover."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
import redis
import redis.exceptions as rex

from controlplane.errors import RedisUnavailable
from controlplane.ops.redis_server import RedisClusterProcess, RedisServerProcess
from controlplane.protocol.keys import Keys
from controlplane.redis.channel import Channel
from controlplane.redis.cluster_channel import ClusterChannel, first_key
from controlplane.redis.connect import AsyncRedisCluster, connect
from controlplane.redis.errors import amap_redis_errors
from controlplane.redis.lua import Script
from controlplane.redis.scripts import jobs
from controlplane.redis.scripts.call import Call, preloading
from controlplane.redis.sharded import ShardedSubscriber

pytestmark = [pytest.mark.redis_cluster, pytest.mark.timeout(60)]

INCR = Script.of("channel-cluster-incr", "return redis.call('INCR', KEYS[1])")


def _client(url: str) -> AsyncRedisCluster:
    client = connect(url)
    assert isinstance(client, AsyncRedisCluster)
    return client


def _plain(node: RedisServerProcess) -> redis.Redis:
    return redis.Redis.from_url(node.url, decode_responses=True)


def _node(channel: ClusterChannel, node: RedisServerProcess) -> Channel | None:
    return channel._nodes.get(f"{node.host}:{node.port}")


@pytest.mark.unit
@pytest.mark.parametrize(
    ("command", "key"),
    [
        (("GET", "k"), "k"),
        (("EVALSHA", "abc", 2, "k1", "k2", "a"), "k1"),
        (("EVAL", "return 1", 0, "a"), None),
        (("XREADGROUP", "GROUP", "g", "c", "COUNT", 1, "STREAMS", "s", ">"), "s"),
        (("PUBLISH", "kcp:notify", "c"), None),
        (("SCRIPT", "LOAD", "return 1"), None),
        (("PING",), None),
        ((b"bzpopmin", b"w", 1), b"w"),
    ],
)
def test_a_command_is_routed_by_its_first_key(command: tuple[Any, ...], key: object) -> None:
    assert first_key(command) == key


@pytest.mark.integration
async def test_a_batch_over_many_slots_lands_on_the_owning_masters_and_returns_in_order(
    redis_cluster: RedisClusterProcess, redis_cluster_url: str
) -> None:
    r = _client(redis_cluster_url)
    channel = preloading(r)
    assert isinstance(channel, ClusterChannel)
    keys = [f"kcp:job:{{c{i}}}:x" for i in range(60)]
    try:
        sets = await channel.execute_many([("SET", k, f"v{i}") for i, k in enumerate(keys)])
        assert sets == [True] * len(keys) or sets == ["OK"] * len(keys)
        mixed = [c for i, k in enumerate(keys) for c in (("GET", k), ("STRLEN", k), ("ECHO", f"e{i}"))]
        replies = await channel.execute_many(mixed)
        expected = [x for i in range(len(keys)) for x in (f"v{i}", len(f"v{i}"), f"e{i}")]
        assert replies == expected
        # concurrent single calls too, each its own reply
        got = await asyncio.gather(*(channel.execute("GET", k) for k in keys))
        assert got == [f"v{i}" for i in range(len(keys))]
        owners = {redis_cluster.master_of_key(k).port for k in keys}
        assert len(owners) == 3, "the keys span every master"
        for i, k in enumerate(keys):  # each key is on the master of its slot
            with _plain(redis_cluster.master_of_key(k)) as node:
                assert node.get(k) == f"v{i}"
        assert sorted(channel._nodes) == sorted(f"{m.host}:{m.port}" for m in redis_cluster.masters())
        for master in redis_cluster.masters():  # one connection per master carried it all
            with _plain(master) as node:
                mine = [c for c in node.client_list() if c["cmd"] in ("get", "strlen", "echo", "set")]
                assert len(mine) == 1, mine
        # the futures interface: one future per command, in the caller's order, over every node
        futures = await channel.send([("GET", k) for k in keys])
        assert [await f for f in futures] == [f"v{i}" for i in range(len(keys))]
        # an error reply is the command's, raised by execute, handed back by execute_many
        wrong = await channel.execute_many([("GET", keys[0]), ("HGET", keys[1], "f"), ("GET", keys[2])])
        assert wrong[0] == "v0" and isinstance(wrong[1], rex.ResponseError) and wrong[2] == "v2"
        with pytest.raises(rex.ResponseError, match="WRONGTYPE"):
            await channel.execute("HGET", keys[1], "f")
    finally:
        await channel.aclose()
        await r.aclose()


@pytest.mark.integration
async def test_preloaded_scripts_run_on_the_right_node_and_noscript_is_loaded_there(
    redis_cluster: RedisClusterProcess, redis_cluster_url: str
) -> None:
    r = _client(redis_cluster_url)
    channel = preloading(r, INCR, jobs.ENQUEUE)
    keys = [f"kcp:kernel:{{s{i}}}:n" for i in range(12)]
    other = Script.of("channel-cluster-not-preloaded", "return redis.call('INCRBY', KEYS[1], 10)")
    try:
        # EVALSHA as such (no NOSCRIPT fallback): the scripts were loaded when each node connected
        replies = await channel.execute_many([("EVALSHA", INCR.sha, 1, k) for k in keys])
        assert replies == [1] * len(keys)
        for k in keys:
            with _plain(redis_cluster.master_of_key(k)) as node:
                assert node.get(k) == "1"
                assert node.script_exists(INCR.sha, jobs.ENQUEUE.sha) == [True, True]
        # a script no connect loaded: NOSCRIPT, then SCRIPT LOAD on the key's node, then it runs
        assert [await Call(other, [k], [], int).run(channel) for k in keys] == [11] * len(keys)
        with _plain(redis_cluster.master_of_key(keys[0])) as node:
            assert node.script_exists(other.sha) == [True]
    finally:
        await channel.aclose()
        await r.aclose()


@pytest.mark.integration
async def test_enqueues_for_many_kcp_clusters_pipeline_each_to_its_clusters_master(
    redis_cluster: RedisClusterProcess, redis_cluster_url: str
) -> None:
    """What the dispatcher's channel does: enqueue.lua for jobs of many kcp clusters at once."""
    keys = Keys()
    r = _client(redis_cluster_url)
    channel = preloading(r, jobs.ENQUEUE, jobs.CANCEL)
    clusters = [f"c{i}" for i in range(24)]
    try:
        await channel.execute_many(
            [("HSET", keys.kernel(c, "k0"), "state", "running", "epoch", 1) for c in clusters]
        )
        calls = [
            jobs.enqueue(
                keys, c, "k0", job_id=f"j-{c}", payload="{}", reply_key=keys.reply(c, "client"),
                now_ms=1, deadline_ms=10**13, ttl_ms=60_000, strategy="pinned",
            )
            for c in clusters
        ]  # fmt: skip
        results = await asyncio.gather(*(call.run(channel) for call in calls))
        assert all(isinstance(res, jobs.Enqueued) and res.inflight == 1 for res in results), results
        for c in clusters:
            with _plain(redis_cluster.master_of_key(keys.queue(c, "k0"))) as node:
                assert node.zrange(keys.queue(c, "k0"), 0, -1) == [f"j-{c}"]
        assert len({redis_cluster.master_of_key(keys.queue(c, "k0")).port for c in clusters}) == 3
    finally:
        await channel.aclose()
        await r.aclose()


@pytest.mark.integration
async def test_a_blocking_pop_holds_up_only_its_nodes_channel(
    redis_cluster: RedisClusterProcess, redis_cluster_url: str
) -> None:
    r = _client(redis_cluster_url)
    channel = preloading(r)
    assert isinstance(channel, ClusterChannel)
    pop_key = "kcp:kernel:{blocked}:wake"
    home = redis_cluster.master_of_key(pop_key)
    elsewhere = next(i for i in range(1000) if redis_cluster.master_of_key(f"{{o{i}}}") is not home)
    other = f"{{o{elsewhere}}}"
    try:
        pop, after = await channel.send([("BZPOPMIN", pop_key, 2), ("ZCARD", pop_key)])
        start = time.monotonic()
        assert await channel.execute("SET", other, "x") in (True, "OK")
        assert time.monotonic() - start < 0.5, "another node's channel is not blocked"
        assert not pop.done()
        await channel.execute_many([])  # nothing to send is nothing
        with _plain(home) as node:
            node.zadd(pop_key, {"w": 1})
        assert await asyncio.wait_for(pop, 3) == [pop_key, "w", "1"]
        assert await after == 0  # written behind the pop, on the same connection, run after it
        # a drain resets the channel: a blocked pop fails with ConnectionError, the next call reconnects
        (pop,) = await channel.send([("BZPOPMIN", pop_key, 5)])
        await asyncio.sleep(0.05)
        await channel.reset("kernel draining")
        with pytest.raises(rex.ConnectionError, match="kernel draining"):
            await asyncio.wait_for(pop, 1)
        assert await channel.execute("ZCARD", pop_key) == 0
    finally:
        await channel.aclose()
        await r.aclose()


@pytest.mark.integration
async def test_after_a_resharding_moved_and_ask_are_followed(
    redis_cluster: RedisClusterProcess, redis_cluster_url: str
) -> None:
    key = "kcp:cluster:{resharded}:version"
    slot = redis_cluster.keyslot(key)
    home = redis_cluster.master_of_slot(slot)
    target = next(m for m in redis_cluster.masters() if m is not home)
    r = _client(redis_cluster_url)
    channel = preloading(r, INCR)
    assert isinstance(channel, ClusterChannel)
    try:
        assert await channel.execute("SET", key, "1") in (True, "OK")
        assert _node(channel, home) is not None and _node(channel, target) is None

        # ASK: the slot is migrating and the key already moved; the old owner answers ASK
        source_id, target_id = redis_cluster.node_id(home), redis_cluster.node_id(target)
        with _plain(home) as src, _plain(target) as dst:
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
            src.execute_command("MIGRATE", target.host, target.port, "", 0, 5000, "KEYS", key)
        assert await channel.execute("GET", key) == "1"  # ASKING + GET on the importing node
        assert r.get_node_from_key(key).port == home.port, "ASK leaves the slot table as it was"

        # MOVED: the migration finished; commands in the slot are sent where it is now
        for node in [target, home, *(m for m in redis_cluster.masters() if m not in (home, target))]:
            with _plain(node) as plain:
                plain.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        redis_cluster.wait_ok()
        replies = await channel.execute_many([("EVALSHA", INCR.sha, 1, key), ("GET", key), ("PING",)])
        assert replies == [2, "2", True] or replies == [2, "2", "PONG"]
        assert r.get_node_from_key(key).port == target.port, "the slot table was re-read"
        # the futures interface follows too (moved back: MOVED from the target now)
        redis_cluster.move_slot(slot, home)
        first, second = await channel.send([("INCR", key), ("GET", key)])
        assert (await first, await second) == (3, "3")
        assert r.get_node_from_key(key).port == home.port
    finally:
        await channel.aclose()
        await r.aclose()
        redis_cluster.move_slot(slot, home)


@pytest.mark.integration
@pytest.mark.timeout(90)
async def test_after_a_master_is_killed_the_channel_reaches_the_promoted_replica(
    redis_cluster: RedisClusterProcess, redis_cluster_url: str
) -> None:
    key = "kcp:kernel:{failover}:queue"
    wake = "kcp:kernel:{failover}:wake"
    master = redis_cluster.master_of_key(key)
    r = _client(redis_cluster_url)
    channel = preloading(r, INCR)
    assert isinstance(channel, ClusterChannel)
    try:
        assert await channel.execute("EVALSHA", INCR.sha, 1, key) == 1
        # acknowledged by the replica (AOF, appendfsync always) before the master dies
        assert await channel.execute("WAIT", 1, 2000) == 1
        (pop,) = await channel.send([("BZPOPMIN", wake, 30)])
        await asyncio.sleep(0.1)
        redis_cluster.kill(master)
        killed = time.monotonic()
        with pytest.raises(rex.ConnectionError):  # the waiting call fails, as on one Redis
            await asyncio.wait_for(pop, 5)
        value: Any = None
        while time.monotonic() - killed < 20:
            try:
                async with amap_redis_errors():
                    # EVALSHA as such: the new master's channel loaded the script on connect
                    value = await channel.execute("EVALSHA", INCR.sha, 1, key)
                break
            except RedisUnavailable:
                await asyncio.sleep(0.1)
        answered_after = time.monotonic() - killed
        print(f"failover: channel answered {answered_after:.2f}s after the kill")
        assert value == 2, "the data survived on the promoted replica and the script ran there"
        new_master = redis_cluster.master_of_key(key)
        assert new_master is not master
        assert _node(channel, new_master) is not None
        assert _node(channel, master) is None, "the dead master's channel was dropped"
    finally:
        await channel.aclose()
        await r.aclose()
        redis_cluster.restart(master)  # it rejoins as the new master's replica
    assert master in redis_cluster.replicas()


@pytest.mark.integration
async def test_tryagain_is_retried_briefly_then_a_transient_typed_error(
    redis_cluster: RedisClusterProcess, redis_cluster_url: str
) -> None:
    a, b = "kcp:job:{migrating}:a", "kcp:job:{migrating}:b"
    slot = redis_cluster.keyslot(a)
    home = redis_cluster.master_of_slot(slot)
    target = next(m for m in redis_cluster.masters() if m is not home)
    r = _client(redis_cluster_url)
    channel = preloading(r)
    try:
        await channel.execute_many([("SET", a, "1"), ("SET", b, "2")])
        with _plain(home) as src, _plain(target) as dst:
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", redis_cluster.node_id(home))
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", redis_cluster.node_id(target))
            src.execute_command("MIGRATE", target.host, target.port, "", 0, 5000, "KEYS", a)
        start = time.monotonic()
        with pytest.raises(RedisUnavailable):  # half the keys moved: TRYAGAIN, every time
            async with amap_redis_errors():
                await channel.execute("MGET", a, b)
        assert 0.2 < time.monotonic() - start < 3, "retried a few times, briefly"
        assert await channel.execute("GET", b) == "2"  # one key still here: served as usual
        assert await channel.execute("GET", a) == "1"  # moved: ASK followed
    finally:
        await channel.aclose()
        await r.aclose()
        redis_cluster.move_slot(slot, target)  # finish the migration, then move it back
        redis_cluster.move_slot(slot, home)


@pytest.mark.integration
@pytest.mark.parametrize("subscribed", [True, False], ids=["subscribed", "bell"])
async def test_a_kernel_serves_jobs_over_its_cluster_channel(
    redis_cluster: RedisClusterProcess, redis_cluster_url: str, subscribed: bool
) -> None:
    """A real `KernelProcess` on the cluster client: start, claims behind blocking pops, results,
    drain; its channel reaches that master only. Each result is published on the reply list's
    shard channel: a client subscribed there gets it and the bell (in the client's slot) is left
    alone; with nobody subscribed the kernel adds the result to the bell."""
    from controlplane.protocol.jobs import encode_job
    from controlplane.protocol.models import ClusterConfig
    from controlplane.protocol.records import ClusterRecord, KernelRecord
    from kernel_agent.kernel.worker import KernelProcess
    from kernel_agent.syscalls import builtin_registry

    keys, cluster = Keys(), "kc"
    home = redis_cluster.master_of_key(keys.cluster(cluster))
    reply = keys.reply(cluster, "client-1")  # in the cluster's slot; the client's bell is in its own
    r = _client(redis_cluster_url)
    own = _client(redis_cluster_url)
    channel = preloading(r, jobs.ENQUEUE)
    record = ClusterRecord(name=cluster, config=ClusterConfig(), desired=1)
    await r.hset(keys.cluster(cluster), mapping=record.to_fields())
    fields = KernelRecord(cluster=cluster, name="k0", agent="a", state="pending", epoch=100).to_fields()
    await r.hset(keys.kernel(cluster, "k0"), mapping={**fields, "syscalls": "PING", "capabilities": ""})
    await r.sadd(keys.cluster_kernels(cluster), "k0")
    process = KernelProcess(own, keys, cluster=cluster, name="k0", agent="a", registry=builtin_registry())
    heard: list[str] = []
    shards = ShardedSubscriber(r, lambda _, message: heard.append(json.loads(message)["id"]))
    task = asyncio.create_task(process.run())
    try:
        if subscribed:
            assert await shards.subscribe(reply), "subscribed on the master of the reply list's slot"
        assert isinstance(process.channel, ClusterChannel)
        deadline = time.monotonic() + 10
        while await r.hget(keys.kernel(cluster, "k0"), "state") != "running":
            assert time.monotonic() < deadline, "the kernel did not start"
            await asyncio.sleep(0.05)
        for n in range(5):
            now = int(time.time() * 1000)
            call = jobs.enqueue(
                keys, cluster, "k0", job_id=f"j{n}",
                payload=encode_job({"type": "PING"}, job_try=1, enqueue_ms=now), reply_key=reply,
                now_ms=now, deadline_ms=now + 10_000, ttl_ms=60_000, strategy="random",
            )  # fmt: skip
            assert isinstance(await call.run(channel), jobs.Enqueued)
            popped = await channel.execute("BLPOP", reply, 10)
            assert popped is not None and f'"j{n}"' in popped[1]
        # the kernel's channel holds its cluster's master only (it adds each reply to the bell, in
        # another slot, on a channel of its own after finish.lua replied)
        assert set(process.channel._nodes) == {f"{home.host}:{home.port}"}
        on_bell = sorted(json.loads(m)["id"] for m in await r.zrange(keys.reply_bell("client-1"), 0, -1))
        done = [f"j{n}" for n in range(5)]
        assert (heard, on_bell) == ((done, []) if subscribed else ([], done))
    finally:
        await shards.aclose()
        process.drain()
        await asyncio.wait_for(task, 20)
        await channel.aclose()
        await own.aclose()
        await r.aclose()
