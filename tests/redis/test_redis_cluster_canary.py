"""What redis-py's Redis Cluster client gives kcp, pinned against a local 3-master cluster with a
replica each (the session's `redis_cluster` fixture), so that the sharding design (issue 20) rests
on facts and an upgrade of redis-py that changes one fails here.

docs/architecture.md ("Redis Cluster: what the client gives") lists these facts; each names the
test that backs it. Every kcp process accepts a cluster URL (the last tests).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis.exceptions as rex
from redis import Redis as SyncRedis
from redis.asyncio.connection import SSLConnection

from controlplane.client.core import KcpClient
from controlplane.errors import (
    EXIT_BAD_INPUT,
    AuthenticationFailed,
    InvalidRequest,
    RedisError,
    RedisUnavailable,
    exit_code,
)
from controlplane.ops.cli.main import main as kcp_main
from controlplane.ops.redis_server import RedisClusterProcess, start_redis_cluster
from controlplane.protocol.keys import Keys
from controlplane.redis.connect import (
    RESP,
    AsyncRedisCluster,
    SyncRedisCluster,
    connect,
    connect_sync,
    parse_cluster_url,
    wait_for_redis,
)
from controlplane.redis.errors import amap_redis_errors, map_redis_errors, translate
from controlplane.redis.lua import Script
from controlplane.redis.scripts import kernels
from controlplane.redis.scripts.call import Call
from controlplane.redis.scripts.fenced import FENCE, Fence, FencedWrite
from controlplane.redis.scripts.kernels import LEADER
from controlplane.settings import Settings

pytestmark = [pytest.mark.redis_cluster, pytest.mark.timeout(60)]

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[2]
#: Nothing listens on port 1: a URL that must be refused before any connection is tried.
NOWHERE = "redis+cluster://127.0.0.1:1,127.0.0.1:2"


async def _cluster_client(url: str) -> AsyncRedisCluster:
    client = connect(url)
    assert isinstance(client, AsyncRedisCluster)
    return client


async def _until(fn: Callable[[], Awaitable[T]], limit: float) -> tuple[T, float]:
    """Retry `fn` on RedisUnavailable (what kcp's callers do) until it succeeds; its result and
    how long that took."""
    start = time.monotonic()
    while True:
        try:
            async with amap_redis_errors():
                return await fn(), time.monotonic() - start
        except RedisUnavailable:
            if time.monotonic() - start > limit:
                raise
            await asyncio.sleep(0.1)


# ------------------------------------------------------------------ URLs (no server)
@pytest.mark.unit
@pytest.mark.parametrize(
    ("url", "nodes", "node_url"),
    [
        ("redis+cluster://h1:7000", (("h1", 7000),), "redis://h1:7000/0"),
        (
            "redis+cluster://u:p%40ss@h1:7000,h2:7001/0",
            (("h1", 7000), ("h2", 7001)),
            "redis://u:p%40ss@h1:7000/0",
        ),
        ("redis+cluster://[::1]:7000,h2:7001/", (("::1", 7000), ("h2", 7001)), "redis://[::1]:7000/0"),
        (
            "rediss+cluster://h1:7000?ssl_ca_certs=/ca.crt&ssl_check_hostname=true",
            (("h1", 7000),),
            "rediss://h1:7000/0?ssl_ca_certs=/ca.crt&ssl_check_hostname=true",
        ),
    ],
)
def test_a_cluster_url_names_its_startup_nodes(url: str, nodes: tuple[Any, ...], node_url: str) -> None:
    spec = parse_cluster_url(url)
    assert spec.nodes == nodes
    assert spec.node_url == node_url


@pytest.mark.unit
@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+cluster://", "is not host:port"),
        ("redis+cluster://h1:7000,h2", "'h2' is not host:port"),
        ("redis+cluster://h1:99999", "port 1-65535"),
        ("redis+cluster://h1:7000/3", "only database 0"),
        ("redis+cluster://u:hunter2@h1:7000/mymaster", "only database 0"),
        ("redis+cluster://h1:7000?db=2", "only database 0"),
    ],
)
def test_a_bad_cluster_url_is_bad_input_that_says_what_to_fix(url: str, message: str) -> None:
    for make in (connect, connect_sync):
        with pytest.raises(InvalidRequest, match=message) as caught:
            make(url)
        assert "hunter2" not in str(caught.value)
        assert exit_code(caught.value) == EXIT_BAD_INPUT


@pytest.mark.unit
def test_the_cluster_client_asks_for_resp2_and_carries_the_tls_settings(tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text("not read until a connection is made")
    settings = Settings(redis_url="rediss+cluster://u:pw@h1:7000,h2:7001", redis_tls_ca_file=ca)
    assert settings.redis_url.startswith("rediss+cluster://u:pw@h1:7000,h2:7001")
    assert "ssl_check_hostname=true" in settings.redis_url
    client = connect(settings.redis_url)
    assert isinstance(client, AsyncRedisCluster)
    kwargs = client.connection_kwargs
    assert (kwargs["protocol"], kwargs["decode_responses"]) == (RESP, True)
    assert (kwargs["username"], kwargs["password"]) == ("u", "pw")
    assert kwargs["connection_class"] is SSLConnection
    assert (kwargs["ssl_ca_certs"], kwargs["ssl_check_hostname"]) == (str(ca), True)
    assert sorted(client.nodes_manager.startup_nodes) == ["h1:7000", "h2:7001"]
    # the blocking cluster client reads the slot table in its constructor (the asyncio one on first use)
    with pytest.raises(RedisUnavailable, match="Connection refused"):
        connect_sync(NOWHERE)
    with pytest.raises(ValueError, match="need a rediss:// URL"):
        Settings(redis_url="redis+cluster://h1:7000", redis_tls_ca_file=ca)


@pytest.mark.unit
def test_kcp_accepts_a_cluster_url_and_connects_lazily() -> None:
    client = connect(NOWHERE)  # nothing listens: the asyncio client connects on first use
    assert isinstance(client, AsyncRedisCluster)
    kcp = KcpClient(Settings(redis_url=NOWHERE))
    assert isinstance(kcp.redis, AsyncRedisCluster)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("exc", "kind", "says"),
    [
        (rex.ClusterDownError("The cluster is down"), RedisUnavailable, "cluster is down"),
        (rex.MasterDownError("Link with MASTER is down"), RedisUnavailable, "MASTER"),
        (rex.TryAgainError(), RedisUnavailable, "unavailable"),
        (rex.ClusterError("TTL exhausted."), RedisUnavailable, "TTL"),
        (rex.MovedError("3999 127.0.0.1:7002"), RedisUnavailable, "3999"),
        (rex.SlotNotCoveredError('Slot "5" is not covered'), RedisUnavailable, "not covered"),
        (rex.RedisClusterException("All slots are not covered after query"), RedisUnavailable, "covered"),
        (rex.ResponseError("CLUSTERDOWN The cluster is down"), RedisUnavailable, "CLUSTERDOWN"),
        (rex.ClusterCrossSlotError("Keys in request don't hash to the same slot"), RedisError, "kcp bug"),
        (rex.ResponseError("CROSSSLOT Keys in request don't hash to the same slot"), RedisError, "slots"),
        (rex.RedisClusterException("EVALSHA - all keys must map to the same key slot"), RedisError, "slots"),
        (rex.ResponseError("MOVED 3999 127.0.0.1:7002"), RedisError, "is a Redis Cluster node"),
        (  # what the agent's registration pipeline reports
            rex.ResponseError(
                "Command # 2 (SADD kcp:agents a1) of pipeline caused error: ('MOVED 13337 127.0.0.1:7001',)"
            ),
            RedisError,
            "is a Redis Cluster node",
        ),
        (rex.RedisClusterException("transaction is deprecated in cluster mode"), RedisError, "MULTI/EXEC"),
        (rex.RedisClusterException("No way to dispatch this command to Redis Cluster."), RedisError, "route"),
    ],
)
def test_the_cluster_clients_errors_map_to_kcp_types(
    exc: Exception, kind: type[RedisError], says: str
) -> None:
    mapped = translate(exc)
    assert type(mapped) is kind
    assert says in str(mapped)
    if kind is RedisError:
        assert not mapped.transient and ("kcp bug" in str(mapped) or "redis+cluster://" in str(mapped))


# ------------------------------------------------------------------ against the cluster
@pytest.mark.integration
async def test_a_cluster_url_reaches_every_master_and_every_connection_speaks_resp2(
    redis_cluster: RedisClusterProcess, redis_cluster_url: str
) -> None:
    r = await _cluster_client(redis_cluster_url)
    try:
        assert await wait_for_redis(r, log=logging.getLogger("test"), what="canary")
        keys = [f"k{i}" for i in range(30)]
        for key in keys:
            await r.set(key, key)
        assert [await r.get(key) for key in keys] == keys
        masters = {redis_cluster.master_of_key(key).port for key in keys}
        assert len(masters) == 3  # the keys did spread over the masters
        infos = await r.execute_command("CLIENT", "INFO", target_nodes=AsyncRedisCluster.PRIMARIES)
        assert len(infos) == 3 and all("resp=2" in info for info in infos.values())
    finally:
        await r.aclose()
    with connect_sync(redis_cluster_url) as sync:
        assert isinstance(sync, SyncRedisCluster)
        infos = sync.execute_command("CLIENT", "INFO", target_nodes=SyncRedisCluster.PRIMARIES)
        assert len(infos) == 3 and all("resp=2" in info for info in infos.values())


@pytest.mark.integration
async def test_a_script_whose_keys_share_a_hash_tag_runs_once_loaded_as_one_word(
    redis_cluster_url: str,
) -> None:
    r = await _cluster_client(redis_cluster_url)
    script = Script.of("canary", "redis.call('SET', KEYS[1], ARGV[1]); return redis.call('INCR', KEYS[2])")
    call = Call(script, ["{cluster:a}:record", "{cluster:a}:version"], ["x"], int)
    try:
        # kcp's NOSCRIPT fallback loads the script on the node that owns the first key's slot
        # (`SCRIPT LOAD` as two words would go through the cluster client's key parser and fail)
        assert await call.run(r) == 1
        exists = await r.execute_command(
            "SCRIPT", "EXISTS", script.sha, target_nodes=AsyncRedisCluster.PRIMARIES
        )
        assert sorted(exists.values()) == [[0], [0], [1]]
        assert await call.run(r) == 2
        assert await r.get("{cluster:a}:record") == "x"
    finally:
        await r.aclose()


@pytest.mark.integration
async def test_keys_in_different_slots_are_refused_with_a_typed_error(
    redis_cluster: RedisClusterProcess, redis_cluster_url: str
) -> None:
    r = await _cluster_client(redis_cluster_url)
    try:
        # the cluster client checks the declared keys itself and sends nothing
        with pytest.raises(RedisError, match="keys in different Redis Cluster hash slots") as caught:
            async with amap_redis_errors():
                await r.eval("return 1", 2, "{a}:x", "{b}:x")
        assert not caught.value.transient and "kcp bug" in str(caught.value)
        assert isinstance(caught.value.__cause__, rex.RedisClusterException)
        # a script that touches a key it did not declare (claim.lua, rebind.lua do): refused when
        # that key's slot is on another node; allowed, on this Redis, when it is on the same node
        home = redis_cluster.master_of_key("{a}:x")
        slot = redis_cluster.keyslot("{a}:x")
        keys = [f"k{i}" for i in range(200)]
        there = next(k for k in keys if redis_cluster.master_of_key(k) is not home)
        here = next(
            k for k in keys if redis_cluster.master_of_key(k) is home and redis_cluster.keyslot(k) != slot
        )
        touch = "return redis.call('GET', ARGV[1])"
        with pytest.raises(RedisError, match="non local key") as caught:
            async with amap_redis_errors():
                await r.eval(touch, 1, "{a}:x", there)
        assert "keys in different Redis Cluster hash slots" in str(caught.value)
        assert await r.eval(touch, 1, "{a}:x", here) is None
    finally:
        await r.aclose()
    # the server's own CROSSSLOT, through a plain connection to one node
    node = redis_cluster.masters()[0]
    plain = connect(node.url)
    try:
        with pytest.raises(RedisError, match="CROSSSLOT") as caught:
            async with amap_redis_errors():
                await plain.eval("return 1", 2, "{a}:x", "{b}:x")
        assert "keys in different Redis Cluster hash slots" in str(caught.value)
    finally:
        await plain.aclose()


@pytest.mark.integration
async def test_no_multi_exec_no_pubsub_but_plain_pipelines_across_nodes(redis_cluster_url: str) -> None:
    r = await _cluster_client(redis_cluster_url)
    try:
        with pytest.raises(RedisError, match="MULTI/EXEC"), map_redis_errors():
            r.pipeline(transaction=True)
        with pytest.raises(RedisError, match="no key to route by"):
            async with amap_redis_errors():
                await r.execute_command("MULTI")
        # a non-transactional pipeline is split per node and its replies come back in order
        pipe = r.pipeline(transaction=False)
        for i in range(6):
            pipe.set(f"p{i}", i)
        pipe.get("p0").get("p5")
        assert await pipe.execute() == [True] * 6 + ["0", "5"]
        # asyncio: no pub/sub, no PUBLISH method, no connection_pool (what kcp's Channel takes over);
        # sharded pub/sub's SPUBLISH routes by its channel
        assert not hasattr(r, "pubsub") and not hasattr(r, "publish")
        assert not hasattr(r, "connection_pool")
        assert await r.execute_command("SPUBLISH", "canary", "x") == 0
    finally:
        await r.aclose()
    with connect_sync(redis_cluster_url) as sync:
        assert isinstance(sync, SyncRedisCluster)
        pubsub = sync.pubsub()  # the blocking client has one
        pubsub.close()


@pytest.mark.integration
async def test_acl_credentials_reach_every_node_and_a_wrong_password_is_not_waited_for(
    redis_cluster: RedisClusterProcess, redis_cluster_url: str
) -> None:
    for node in redis_cluster.nodes:  # ACL users are per node: a cluster needs them on each
        with SyncRedis.from_url(node.url) as admin:
            admin.acl_setuser("canary", enabled=True, passwords=["+s3cret"], commands=["+@all"], keys=["*"])
    user_url = redis_cluster_url.replace("redis+cluster://", "redis+cluster://canary:s3cret@")
    try:
        r = await _cluster_client(user_url)
        try:
            whoami = await r.execute_command("ACL", "WHOAMI", target_nodes=AsyncRedisCluster.PRIMARIES)
            assert set(whoami.values()) == {"canary"}
        finally:
            await r.aclose()
        wrong = await _cluster_client(user_url.replace("s3cret", "wrong"))
        try:
            with pytest.raises(AuthenticationFailed, match="user canary") as caught:
                await asyncio.wait_for(wait_for_redis(wrong, log=logging.getLogger("test"), what="x"), 10)
            assert "wrong" not in str(caught.value)
        finally:
            await wrong.aclose()
    finally:
        for node in redis_cluster.nodes:
            with SyncRedis.from_url(node.url) as admin:
                admin.acl_deluser("canary")


@pytest.mark.integration
async def test_an_unreachable_cluster_is_waited_for() -> None:
    r = await _cluster_client(NOWHERE)
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.5, stop.set)
    try:
        assert await wait_for_redis(r, log=logging.getLogger("test"), what="canary", stop=stop) is False
    finally:
        await r.aclose()


@pytest.mark.integration
async def test_after_a_resharding_the_client_follows_moved(
    redis_cluster: RedisClusterProcess, redis_cluster_url: str
) -> None:
    key = "{resharded}:k"
    slot = redis_cluster.keyslot(key)
    home = redis_cluster.master_of_slot(slot)
    elsewhere = next(m for m in redis_cluster.masters() if m is not home)
    r = await _cluster_client(redis_cluster_url)
    plain = connect(home.url)
    try:
        await r.set(key, "v")
        assert r.get_node_from_key(key).port == home.port
        redis_cluster.move_slot(slot, elsewhere)
        assert await r.get(key) == "v"  # MOVED from the old master, followed
        assert r.get_node_from_key(key).port == elsewhere.port  # and the slot table patched
        # a plain client on the old master: a typed error saying it is a cluster node
        with pytest.raises(RedisError, match="the server is a Redis Cluster node") as caught:
            async with amap_redis_errors():
                await plain.get(key)
        assert f"MOVED {slot} " in str(caught.value) and "redis+cluster://" in str(caught.value)
    finally:
        await plain.aclose()
        await r.aclose()
        redis_cluster.move_slot(slot, home)


@pytest.mark.integration
async def test_after_a_master_failover_the_client_recovers_with_the_data_and_scripts(
    redis_cluster: RedisClusterProcess, redis_cluster_url: str
) -> None:
    key = "{failover}:k"
    master = redis_cluster.master_of_key(key)
    r = await _cluster_client(redis_cluster_url)
    call = Call(Script.of("canary-failover", "return redis.call('INCR', KEYS[1])"), [key], [], int)
    try:
        await r.execute_command("SCRIPT LOAD", call.script.source)
        assert await call.run(r) == 1  # type: ignore[arg-type]
        # acknowledged by the replica (AOF, appendfsync always) before the master dies
        node = r.get_node_from_key(key)
        assert await r.execute_command("WAIT", 1, 2000, target_nodes=node) == 1
        redis_cluster.kill(master)
        killed = time.monotonic()
        with pytest.raises(RedisUnavailable):  # before the promotion: a transient kcp error
            async with amap_redis_errors():
                await r.get(key)
        failed_after = time.monotonic() - killed
        value, _ = await _until(lambda: r.get(key), limit=15)
        answered_after = time.monotonic() - killed
        print(
            f"failover: first GET failed {failed_after:.2f}s, answered {answered_after:.2f}s after the kill"
        )
        assert value == "1" and answered_after < 10
        new_master = redis_cluster.master_of_key(key)
        assert new_master is not master and new_master.alive()
        # the promoted replica never saw SCRIPT LOAD: NOSCRIPT until it is loaded again
        with pytest.raises(rex.NoScriptError):
            await r.evalsha(call.script.sha, 1, key)
        await r.execute_command("SCRIPT LOAD", call.script.source)
        assert await call.run(r) == 2  # type: ignore[arg-type]
    finally:
        await r.aclose()
        redis_cluster.restart(master)  # it rejoins as the new master's replica
    assert master in redis_cluster.replicas()


# ------------------------------------------------------------------ kcp processes on a cluster URL
@pytest.mark.integration  # runs `kcp` in subprocesses against nothing: they wait for the cluster
@pytest.mark.parametrize("command", [["serve"], ["agent", "--name", "a1"]])
def test_kcp_serve_and_agent_accept_a_cluster_url_and_wait_for_it(command: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KCP_REDIS_URL": NOWHERE}
    proc = subprocess.Popen(
        [sys.executable, "-m", "controlplane.ops.cli", "--log-level", "INFO", *command],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 20
        seen = ""
        while "waiting for Redis" not in seen:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, f"exited {proc.returncode}: {seen}"
            seen += line
            assert time.monotonic() < deadline, seen
        assert "Traceback" not in seen and "not supported" not in seen
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(15)
        if proc.stderr is not None:
            proc.stderr.close()


@pytest.mark.integration
def test_kcp_commands_reach_the_cluster(redis_cluster_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert kcp_main(["--redis-url", redis_cluster_url, "--json", "cluster", "list"]) == 0
    assert json.loads(capsys.readouterr().out) == []


@pytest.mark.integration
async def test_the_redis_url_fixture_follows_the_redis_cluster_option(
    request: pytest.FixtureRequest, redis_url: str, redis: Any
) -> None:
    on_cluster = bool(request.config.getoption("--redis-cluster"))
    assert redis_url.startswith("redis+cluster://") is on_cluster
    assert isinstance(redis, AsyncRedisCluster) is on_cluster
    await redis.set("{fixture}:k", "v")
    assert await redis.get("{fixture}:k") == "v"


@pytest.mark.unit
def test_the_cluster_fixture_refuses_a_cluster_without_masters(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one master"):
        start_redis_cluster(data_dir=tmp_path, masters=0)
    assert not any(tmp_path.iterdir())  # nothing was started


@pytest.mark.integration
def test_the_cluster_fixture_names_every_node_in_its_url(redis_cluster: RedisClusterProcess) -> None:
    spec = parse_cluster_url(redis_cluster.url)
    assert [port for _, port in spec.nodes] == [node.port for node in redis_cluster.nodes]
    assert len(redis_cluster.masters()) == 3 and len(redis_cluster.replicas()) == 3
    assert 6379 not in {node.port for node in redis_cluster.nodes}


@pytest.mark.integration
@pytest.mark.timeout(60)
async def test_the_leader_term_and_a_fenced_write_each_stay_in_one_slot(redis_cluster_url: str) -> None:
    keys = Keys()
    r = await _cluster_client(redis_cluster_url)
    try:
        for script in (LEADER, FENCE):
            assert await r.execute_command("SCRIPT LOAD", script.source) == script.sha
        assert await kernels.leader(keys, token="a", ttl_ms=5_000).run(r) == 1  # type: ignore[arg-type]
        record = "kcp:kernel:{web}:w1"  # a cluster key in the tagged form (issue 20's convention)
        write = FencedWrite(keys, "web").hset(record, {"state": "running"}).incr("kcp:cluster:{web}:version")
        assert await write.call(2).run(r) is Fence.OK  # type: ignore[arg-type]
        assert await write.call(1).run(r) is Fence.FENCED  # type: ignore[arg-type]
        assert await r.get(keys.cluster_term("web")) == "2"
        assert await r.get("kcp:cluster:{web}:version") == "1", "the refused write wrote nothing"
    finally:
        await r.aclose()
