"""kcp's Lua scripts on a Redis Cluster (issue 20): every script's KEYS hash to one slot (unit,
by computing the slots), and the scripts give on a 3-master cluster what they give on one Redis,
for kcp clusters whose names hash to different masters (`pytest --redis-cluster`).

A client's reply lists are per kcp cluster (``kcp:reply:{cluster}:client``), so finish.lua,
rebind.lua and take_replies.lua run in the cluster's slot; the client's bell
(``kcp:reply:{client}:bell``) is rung by a plain ZADD after the push, in the client's slot.
bus_publish.lua and bus_trim.lua run in their stream's slot (a topic's or a kernel's inbox).
No script spans slots.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis as AsyncRedis
from redis.crc import key_slot

from controlplane.ops.redis_server import RedisClusterProcess, RedisServerProcess
from controlplane.protocol.keys import Keys
from controlplane.redis.connect import AsyncRedisCluster, connect
from controlplane.redis.scripts import bus, deferred, jobs, kernels, metrics
from controlplane.redis.scripts.call import Call
from controlplane.redis.scripts.fenced import FencedWrite
from controlplane.redis.scripts.jobs import Routing

KEYS = Keys()
NOW = int(time.time() * 1000)  # the scripts set TTLs from it: near the Redis clock
CLIENT = "client-1"
#: kcp cluster names; `test_the_names_spread_over_the_masters` checks they land on 3 masters
NAMES = ("web", "batch", "train")


def _calls(cluster: str) -> dict[str, Call[Any]]:
    """One call of every script for `cluster` (kernel k1, siblings k2 k3, job j1)."""
    siblings = [("k2", 1), ("k3", 1)]
    routing = Routing(
        mode="p2c", tie=0.5, load_expiry_ms=5_000, slow_start_ms=0, rr_ttl_ms=60_000,
        kernels=[("k1", "a1"), ("k2", "a2")],
    )  # fmt: skip
    return {
        "kernel_start": kernels.kernel_start(
            KEYS, cluster, "k1", agent="a1", pid=1, host="h", now_s=1, syscalls=["PING"], capabilities=[]
        ),
        "enqueue": jobs.enqueue(
            KEYS,
            cluster,
            "k1",
            job_id="j1",
            payload="{}",
            reply_key=KEYS.reply(cluster, CLIENT),
            now_ms=NOW,
            deadline_ms=NOW + 10_000,
            ttl_ms=60_000,
            strategy="adaptive",
        ),
        "enqueue_routed": jobs.enqueue(
            KEYS,
            cluster,
            "k1",
            job_id="j2",
            payload="{}",
            reply_key=KEYS.reply(cluster, CLIENT),
            now_ms=NOW,
            deadline_ms=NOW + 10_000,
            ttl_ms=60_000,
            strategy="adaptive",
            routing=routing,
        ),
        "claim": jobs.claim(KEYS, cluster, "k1", epoch=1, now_ms=NOW, siblings=siblings, version=True),
        "claim_sibling": jobs.claim(
            KEYS, cluster, "k1", epoch=1, now_ms=NOW, siblings=siblings, version=True
        ),
        "finish": jobs.finish(
            KEYS,
            cluster,
            "k1",
            job_id="j1",
            epoch=1,
            reply_key=KEYS.reply(cluster, CLIENT),
            message="r",
            success=True,
            latency_ms=1,
            reply_ttl_ms=1_000,
        ),
        "take_replies": jobs.take_replies(KEYS, cluster, CLIENT, count=10, ttl_ms=1_000),
        "cancel": jobs.cancel(KEYS, cluster, "k2", job_id="j2"),
        "kernel_stop": kernels.kernel_stop(KEYS, cluster, "k1", epoch=1),
        "rebind": kernels.rebind(
            KEYS,
            cluster,
            "k2",
            source=KEYS.inflight(cluster, "k1"),
            job_ids=["j1", "j2"],
            replies=[KEYS.reply(cluster, CLIENT)],
        ),
        "outlier": kernels.outlier(
            KEYS,
            cluster,
            "k1",
            now_ms=NOW,
            event="failure",
            consecutive_failures=5,
            base_ejection_ms=1_000,
            max_ejection_ms=10_000,
            max_ejected=1,
            slow_start_ms=0,
        ),
        "defer": deferred.defer(
            KEYS, cluster, "j3", payload="{}", now_ms=NOW, due_ms=NOW + 1, ttl_extra_ms=60_000
        ),
        "undefer": deferred.undefer(KEYS, cluster, "j3", now_ms=NOW + 2, lease_ms=1_000),
        "abort": deferred.abort(KEYS, cluster, "j3", kernel="k1", message="m", keep_ms=1_000, now_ms=NOW),
        "metric_increment": metrics.metric_increment(
            KEYS, cluster, field="k1/m", kernel="k1", metric="m", amount="1", now_s="1"
        ),
        "stats_read": jobs.read_stats(KEYS, cluster),
        "fold": FencedWrite(KEYS, cluster)
        .hfold(KEYS.kernel_stats(cluster, "k2"), KEYS.cluster_stats(cluster))
        .srem(KEYS.cluster_kernels(cluster), "k2")
        .call(1),
        "stats_read_after_fold": jobs.read_stats(KEYS, cluster),
    }


def _bus(stream: str) -> dict[str, Call[Any]]:
    """The bus's scripts on one stream (named here after a kcp cluster, for its slot)."""
    return {
        "bus_publish": bus.bus_publish(KEYS, KEYS.bus_topic(stream), target="", topic=stream, batch=b"[]"),
        "bus_trim": bus.bus_trim(KEYS, KEYS.bus_inbox(stream), keep=1, cap=2, label="inbox"),
    }


def _fleet() -> dict[str, Call[Any]]:
    return {
        "leader": kernels.leader(KEYS, token="t", ttl_ms=1_000),
    }


@pytest.mark.unit
@pytest.mark.timeout(10)
@pytest.mark.parametrize("cluster", NAMES)
def test_every_script_of_a_cluster_runs_in_the_cluster_slot(cluster: str) -> None:
    slot = key_slot(KEYS.cluster(cluster).encode())
    for name, call in _calls(cluster).items():
        assert {key_slot(k.encode()) for k in call.keys} == {slot}, name
    for name, call in [*_fleet().items(), *_bus(cluster).items()]:
        assert len({key_slot(k.encode()) for k in call.keys}) == 1, name


@pytest.mark.unit
@pytest.mark.timeout(10)
def test_the_prefixes_scripts_build_keys_from_carry_the_cluster_tag() -> None:
    """claim.lua builds job keys from ARGV[4], enqueue.lua kernel keys from ARGV[8]."""
    slot = key_slot(KEYS.cluster("web").encode())
    assert key_slot((KEYS.job("web", "") + "any-id").encode()) == slot
    assert key_slot((KEYS.kernel("web", "") + "k9:queue").encode()) == slot
    assert key_slot((KEYS.kernel("web", "") + "k9:stats").encode()) == slot  # stats_read.lua
    assert key_slot(KEYS.load("a1", "web", "w1").encode()) == slot
    assert key_slot(KEYS.cluster_epoch("web").encode()) == slot


def _master_of(cluster: RedisClusterProcess) -> Callable[[str], str]:
    with SyncRedis.from_url(cluster.masters()[0].url, decode_responses=True) as r:
        slots = r.execute_command("CLUSTER", "SLOTS")

    def master(key: str) -> str:
        s = key_slot(key.encode())
        for start, end, owner, *_ in slots:
            if start <= s <= end:
                return f"{owner[0]}:{owner[1]}"
        raise AssertionError(f"slot {s} not covered")

    return master


async def _run_all(r: Any, clusters: tuple[str, ...]) -> list[Any]:
    """Every single-slot script for each of `clusters`, in an order that exercises their writes;
    the replies and then every key's value (sorted)."""
    out: list[Any] = []
    for cluster in clusters:
        await r.hset(KEYS.kernel(cluster, "k1"), mapping={"agent": "a1", "state": "starting"})
        await r.hset(KEYS.kernel(cluster, "k2"), mapping={"agent": "a2", "state": "running", "epoch": 1})
        await r.hset(KEYS.agent_kernels("a1"), f"{cluster}/k1", "run")
        await r.sadd(KEYS.cluster_kernels(cluster), "k1", "k2")
        await r.hset(
            KEYS.kernel_stats(cluster, "k2"), mapping={"dispatches:adaptive": 2, "latency_ms_sum": 1.5}
        )
        for name, call in _calls(cluster).items():
            out.append((cluster, name, await call.reply(r)))
            if name == "kernel_start":  # what the agent does once the process is up
                await r.hset(KEYS.kernel(cluster, "k1"), "state", "running")
        for name, call in [*_fleet().items(), *_bus(cluster).items()]:
            out.append((cluster, name, await call.reply(r)))
        for key in sorted([KEYS.kernel(cluster, "k1"), KEYS.kernel(cluster, "k2"), KEYS.job(cluster, "j2")]):
            out.append((key, await r.hgetall(key)))
        out.append(await r.get(KEYS.cluster_epoch(cluster)))
    return out


@pytest.mark.redis_cluster
@pytest.mark.integration
@pytest.mark.timeout(60)
async def test_the_scripts_give_on_a_redis_cluster_what_they_give_on_one_redis(
    redis_cluster: RedisClusterProcess, redis_cluster_url: str, redis_server: RedisServerProcess
) -> None:
    master = _master_of(redis_cluster)
    assert len({master(KEYS.cluster(c)) for c in NAMES}) == 3, "the names must spread over the masters"
    with SyncRedis.from_url(redis_server.url) as s:
        s.flushall()
    one = AsyncRedis.from_url(redis_server.url, decode_responses=True)
    many = connect(redis_cluster_url)
    assert isinstance(many, AsyncRedisCluster)
    try:
        expected = await _run_all(one, NAMES)
        assert await _run_all(many, NAMES) == expected
        replies = {e[1]: e[2] for e in expected if isinstance(e, tuple) and len(e) == 3}
        assert replies["claim"][:2] == ["ok", "{}"], "claim built the job key from its prefix"
        read = jobs.read_stats(KEYS, "web")
        assert read.parse(replies["stats_read"]).kernels["k2"]["dispatches:adaptive"] == "2", (
            "built from its prefix"
        )
        after = read.parse(replies["stats_read_after_fold"])
        assert (after.cluster["dispatches:adaptive"], list(after.kernels)) == ("2", ["k1"])
    finally:
        await one.aclose()
        await many.aclose()


@pytest.mark.redis_cluster
@pytest.mark.integration
@pytest.mark.timeout(30)
async def test_the_scan_patterns_match_the_tagged_keys(redis: Any) -> None:
    """`{` and `}` are literal in a Redis glob: kernel_pattern and job_pattern find one cluster's
    keys and not a cluster whose name starts the same."""
    for cluster in ("web", "webx"):
        await redis.hset(KEYS.kernel(cluster, "k1"), "state", "running")
        await redis.zadd(KEYS.queue(cluster, "k1"), {"j1": 1})
        await redis.hset(KEYS.job(cluster, "j1"), "job", "{}")
    kernel_keys = sorted([k async for k in redis.scan_iter(match=KEYS.kernel_pattern("web"))])
    assert kernel_keys == [KEYS.kernel("web", "k1"), KEYS.queue("web", "k1")]
    assert [k async for k in redis.scan_iter(match=KEYS.job_pattern("web"))] == [KEYS.job("web", "j1")]


@pytest.mark.unit
@pytest.mark.timeout(10)
def test_a_reply_list_names_its_bell_in_the_clients_slot() -> None:
    """finish.lua's caller rings the bell `Keys.reply_bell_for` finds from the job's reply list:
    the client's, in the client's slot (a list of another shape has none)."""
    bell = KEYS.reply_bell(CLIENT)
    assert key_slot(bell.encode()) == key_slot(CLIENT.encode())
    for cluster in NAMES:
        assert KEYS.reply_bell_for(KEYS.reply(cluster, CLIENT)) == bell
        assert jobs.ring(KEYS, cluster, KEYS.reply(cluster, CLIENT), 7, ttl_ms=9) == (
            ("ZADD", bell, 7, cluster),
            ("PEXPIRE", bell, 9),
        )
    for other in (
        "kcp:reply:{client-1}",
        "kcp:job:{web}:j1",
        KEYS.reply_taken("web", CLIENT),
        "kcp:reply:{}:x",
    ):
        assert KEYS.reply_bell_for(other) is None, other
        assert jobs.ring(KEYS, "web", other, 7, ttl_ms=9) == ()


@pytest.mark.redis_cluster
@pytest.mark.integration
@pytest.mark.timeout(60)
async def test_a_client_gets_the_results_of_two_clusters_on_different_masters(
    redis_cluster: RedisClusterProcess, redis_cluster_url: str
) -> None:
    """Two kcp clusters whose slots live on different masters finish a job each for one client:
    each result goes to the client's list in its cluster's slot, each ring to the one bell, and
    the listener's steps (a blocking pop of the bell, a take from the cluster it names) get both,
    on one blocking connection."""
    master = _master_of(redis_cluster)
    web, train = "web", "train"
    assert master(KEYS.cluster(web)) != master(KEYS.cluster(train))
    r = connect(redis_cluster_url)
    assert isinstance(r, AsyncRedisCluster)
    try:
        for cluster in (web, train):
            await r.hset(KEYS.kernel(cluster, "k1"), mapping={"agent": "a1", "state": "running", "epoch": 1})
            enqueued = await jobs.enqueue(
                KEYS,
                cluster,
                "k1",
                job_id=f"j-{cluster}",
                payload="{}",
                reply_key=KEYS.reply(cluster, CLIENT),
                now_ms=NOW,
                deadline_ms=NOW + 10_000,
                ttl_ms=60_000,
                strategy="adaptive",
            ).run(r)
            assert isinstance(enqueued, jobs.Enqueued)
            claimed = await jobs.claim(KEYS, cluster, "k1", epoch=1, now_ms=NOW).run(r)
            assert isinstance(claimed, jobs.Claimed) and claimed.reply == KEYS.reply(cluster, CLIENT)
            delivered = await jobs.finish(
                KEYS,
                cluster,
                "k1",
                job_id=claimed.id,
                epoch=1,
                reply_key=claimed.reply,
                message=f"result-{cluster}",
                success=True,
                latency_ms=1,
                reply_ttl_ms=10_000,
            ).run(r)
            assert delivered
            for command in jobs.ring(KEYS, cluster, claimed.reply, NOW, ttl_ms=60_000):
                await r.execute_command(*command)  # the kernel rings, after the push
        got: dict[str, list[str]] = {}
        for _ in range(2):
            popped = await r.bzpopmin([KEYS.reply_bell(CLIENT)], 1)
            assert popped is not None
            cluster = popped[1]
            got[cluster] = await jobs.take_replies(KEYS, cluster, CLIENT, count=10, ttl_ms=10_000).run(r)
        assert got == {web: [f"result-{web}"], train: [f"result-{train}"]}
        assert await r.bzpopmin([KEYS.reply_bell(CLIENT)], 0.1) is None, "each cluster rang once"
        for cluster in (web, train):  # the next take drops what was delivered
            assert await jobs.take_replies(KEYS, cluster, CLIENT, count=10, ttl_ms=10_000).run(r) == []
            assert await r.exists(KEYS.reply_taken(cluster, CLIENT)) == 0
    finally:
        await r.aclose()
