"""The Prometheus exporter, `kcp top`, the compose stack and the Grafana dashboard."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ProcessStack, RedisServerFactory
from promtool import promtool_check
from redis.asyncio import Redis as AsyncRedis

from controlplane import (
    ClusterNotFound,
    DispatchTimeout,
    InvalidRequest,
    KcpClient,
    KernelError,
    OrchestrationConfig,
)
from controlplane.ops.cli.top import TopView
from controlplane.ops.exporter.core import exposition, serve_metrics
from controlplane.ops.redis_server import free_port
from controlplane.protocol import stats
from controlplane.protocol.jobs import REPLY_TTL_MS
from controlplane.protocol.keys import Keys
from controlplane.protocol.models import ClusterConfig
from controlplane.protocol.records import LapsedRecord
from controlplane.redis.connect import connect, connect_sync
from controlplane.redis.scripts import jobs
from controlplane.redis.snapshot import read_snapshot
from controlplane.redis.state import State
from controlplane.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose"
DASHBOARD = COMPOSE / "grafana" / "dashboards" / "kcp.json"
RULES = COMPOSE / "prometheus" / "rules" / "kcp.yml"
KEYS = Keys()
SETTINGS = Settings(redis_url="redis://unused", prefix=KEYS.prefix)


def samples(text: str) -> dict[str, float]:
    """`name{labels}` -> value of every sample line of an exposition."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def names(text: str) -> set[str]:
    return {re.split(r"[{ ]", line, maxsplit=1)[0] for line in text.splitlines() if line and line[0] != "#"}


# ---------------------------------------------------------------- a fleet written straight into Redis
async def put_kernel(
    redis: AsyncRedis, cluster: str, kernel: str, agent: str, state: str = "running"
) -> None:
    await redis.hset(
        KEYS.kernel(cluster, kernel),
        mapping={
            "cluster": cluster,
            "name": kernel,
            "agent": agent,
            "state": state,
            "epoch": "1",
            "host": "h1",
        },
    )
    await redis.sadd(KEYS.cluster_kernels(cluster), kernel)
    await redis.hset(KEYS.agent_running(agent), f"{cluster}/{kernel}", "1")  # its process runs


async def finish(
    redis: AsyncRedis,
    cluster: str,
    kernel: str,
    job: str,
    latency_ms: float,
    ok: bool,
    strategy: str = "adaptive",
) -> None:
    """A job routed by `strategy` finished through finish.lua, exactly as a kernel does it (the
    job in its kernel's in-flight set, as enqueue.lua leaves it)."""
    await redis.hset(KEYS.job(cluster, job), mapping={"kernel": kernel, "epoch": "1", "strategy": strategy})
    await redis.zadd(KEYS.inflight(cluster, kernel), {job: 0})
    queue_ms = int(latency_ms / 2)
    delivered = await jobs.finish(
        KEYS,
        cluster,
        kernel,
        job_id=job,
        epoch="1",
        reply_key=KEYS.reply(cluster, "client-1"),
        message="{}",
        success=ok,
        latency_ms=latency_ms,
        reply_ttl_ms=REPLY_TTL_MS,
        queue_ms=queue_ms,
        buckets=(
            stats.bucket_field(stats.LATENCY, latency_ms / 1000),
            stats.bucket_field(stats.QUEUE, queue_ms / 1000),
        ),
    ).run(redis)
    assert delivered == 1


async def seed(redis: AsyncRedis) -> None:
    state = State(redis, KEYS)
    await state.create_cluster("compute", ClusterConfig(), 2)
    await state.update_cluster("compute", status="running")
    for agent, alive in (("a1", True), ("a2", False)):
        await redis.hset(KEYS.agent(agent), mapping={"name": agent, "host": "h1", "slots": "4"})
        await redis.sadd(KEYS.agents(), agent)
        if alive:
            await redis.set(KEYS.agent_lease(agent), "1", px=3000)
    await put_kernel(redis, "compute", "worker-0", "a1")
    await put_kernel(redis, "compute", "worker-1", "a2")  # its agent's lease is gone
    await redis.hset(
        KEYS.load("a1", "compute", "worker-0"),
        mapping={"cpu": "0.25", "memory": "0.125", "queue_depth": "0", "updated_at": "1e9"},
    )
    await redis.zadd(KEYS.queue("compute", "worker-0"), {"q1": 1, "q2": 2})
    await redis.zadd(KEYS.inflight("compute", "worker-0"), {"q1": 1, "q2": 2, "r1": 0})
    for i, latency in enumerate((0.3, 2, 3, 40)):
        await finish(redis, "compute", "worker-0", f"j{i}", latency, ok=i != 3)
    await finish(redis, "compute", "worker-1", "j9", 700, ok=True, strategy=stats.PINNED)
    await redis.hincrby(KEYS.cluster_stats("compute"), stats.JOBS_REQUEUED, 3)
    await redis.hincrby(KEYS.cluster_stats("compute"), stats.SCALE_DOWN, 1)


@pytest.mark.integration
@pytest.mark.timeout(30)
@pytest.mark.redis_cluster
async def test_exporter_reads_the_fleet_from_redis(redis: AsyncRedis) -> None:
    await seed(redis)
    # a second cluster whose kernel has the same name: nothing may be attributed to the wrong one
    await State(redis, KEYS).create_cluster("batch", ClusterConfig(), 1)
    await put_kernel(redis, "batch", "worker-0", "a1")
    await redis.hset(KEYS.load("a1", "batch", "worker-0"), mapping={"cpu": "0.75", "updated_at": "1e9"})
    await finish(redis, "batch", "worker-0", "b1", 1, ok=False, strategy="no such strategy")
    # the failure detector's global counters
    reliability = {
        "agents_dead_total": 2,
        "detection_ms_sum": 3000,
        "detection_count": 2,
        "Bad Field_total": 1,
    }
    await redis.hset(KEYS.reliability(), mapping=reliability)
    # a restarted kernel, its memory in bytes; an agent and a kernel the leader removed after
    # their leases lapsed (still shown down), and one whose retention has passed (not shown)
    await redis.hset(KEYS.kernel("compute", "worker-0"), "restarts", 4)
    await redis.hset(KEYS.load("a1", "compute", "worker-0"), "memory_bytes", 123456789)
    now = time.time()
    lapsed = LapsedRecord(last_seen=now - 30, until=now + 60, host="h9", slots=3)
    await redis.hset(KEYS.lapsed_agents(), "gone", lapsed.encode())
    expired = LapsedRecord(last_seen=now - 99, until=now - 1)
    await redis.hset(KEYS.lapsed_agents(), "long-gone", expired.encode())
    await redis.hset(KEYS.lapsed_agents(), "a1", lapsed.encode())  # registered again: the live one wins
    await redis.hset(KEYS.lapsed_agents(), "garbage", "{not json")
    lost = LapsedRecord(last_seen=now - 20, until=now + 60, agent="gone", host="h9")
    await redis.hset(KEYS.lapsed_kernels(), "compute/worker-7", lost.encode())
    await redis.hset(KEYS.lapsed_kernels(), "nosuch/worker-0", lost.encode())  # its cluster is gone
    await redis.hincrby(KEYS.rejections(), stats.REJECT_INVALID, 2)
    await redis.hincrby(KEYS.rejections(), "made-up reason", 5)
    text = await exposition(redis, SETTINGS)
    print(text)
    s = samples(text)
    c, k0, k1 = (
        'cluster="compute"',
        'cluster="compute",kernel="worker-0"',
        'cluster="compute",kernel="worker-1"',
    )
    by_strategy = {
        (strategy, outcome): s[
            f'kcp_cluster_dispatches_total{{{c},outcome="{outcome}",strategy="{strategy}"}}'
        ]
        for strategy in ("adaptive", "pinned")
        for outcome in ("ok", "error")
    }
    assert by_strategy == {
        ("adaptive", "ok"): 3,
        ("adaptive", "error"): 1,
        ("pinned", "ok"): 1,
        ("pinned", "error"): 0,
    }
    assert sum(v for key, v in s.items() if key.startswith(f"kcp_cluster_dispatches_total{{{c},")) == 4 + 1
    assert s[f'kcp_kernel_dispatches_total{{{k0},outcome="error"}}'] == 1
    assert s[f'kcp_kernel_dispatches_total{{{k1},outcome="ok"}}'] == 1
    # histogram: cumulative buckets in seconds, count == finished jobs, sum in seconds
    assert s[f'kcp_cluster_dispatch_latency_seconds_bucket{{{c},le="0.0005"}}'] == 1
    assert s[f'kcp_cluster_dispatch_latency_seconds_bucket{{{c},le="0.005"}}'] == 3
    assert s[f'kcp_cluster_dispatch_latency_seconds_bucket{{{c},le="0.05"}}'] == 4
    assert s[f'kcp_cluster_dispatch_latency_seconds_bucket{{{c},le="+Inf"}}'] == 5
    assert s[f"kcp_cluster_dispatch_latency_seconds_count{{{c}}}"] == 5
    assert s[f"kcp_cluster_dispatch_latency_seconds_sum{{{c}}}"] == pytest.approx(0.7453)
    assert s[f"kcp_cluster_queue_wait_seconds_sum{{{c}}}"] == pytest.approx(0.372)  # whole ms: 0+1+1+20+350
    assert s[f'kcp_kernel_dispatch_latency_seconds_bucket{{{k1},le="1.0"}}'] == 1
    assert s[f"kcp_jobs_requeued_total{{{c}}}"] == 3
    assert s[f"kcp_kernels_lost_total{{{c}}}"] == 0
    assert s[f'kcp_scaling_events_total{{{c},direction="down"}}'] == 1
    # liveness from leases: worker-1's agent has no lease
    assert s[f"kcp_kernel_up{{{k0}}}"] == 1 and s[f"kcp_kernel_up{{{k1}}}"] == 0
    assert s['kcp_agent_up{agent="a1"}'] == 1 and s['kcp_agent_up{agent="a2"}'] == 0
    assert 'kcp_agent_heartbeat_lag_seconds{agent="a2"}' not in s  # never beat: no age to show
    assert s['kcp_agent_kernels{agent="a1"}'] == 2  # compute/worker-0 and batch/worker-0
    assert 0 <= s['kcp_agent_heartbeat_lag_seconds{agent="a1"}'] <= 3
    assert s[f"kcp_kernel_cpu_ratio{{{k0}}}"] == 0.25 and s[f"kcp_kernel_memory_ratio{{{k0}}}"] == 0.125
    assert f"kcp_kernel_cpu_ratio{{{k1}}}" not in s  # no load record: no value rather than a stale one
    assert s[f"kcp_kernel_queue_depth{{{k0}}}"] == 2 and s[f"kcp_kernel_inflight_jobs{{{k0}}}"] == 3
    assert s[f'kcp_cluster_status{{{c},status="running"}}'] == 1
    assert s["kcp_agents_dead_total"] == 2
    # counters exist at 0 before their first event, so increase() sees the first one
    for counter in ("agents_suspected", "kernels_dead", "jobs_failed_over", "leader_fenced_writes"):
        assert s[f"kcp_{counter}_total"] == 0
    assert s['kcp_dispatch_rejected_total{reason="invalid_request"}'] == 2
    assert s['kcp_dispatch_rejected_total{reason="unknown_cluster"}'] == 0
    assert "made-up" not in text
    assert s[f"kcp_kernel_restarts_total{{{k0}}}"] == 4 and s[f"kcp_kernel_restarts_total{{{k1}}}"] == 0
    assert s[f"kcp_kernel_memory_bytes{{{k0}}}"] == 123456789
    # down means 0, not gone: the lapsed agent and kernel, with their growing age
    assert s['kcp_agent_up{agent="gone"}'] == 0 and s['kcp_agent_slots{agent="gone"}'] == 3
    assert 29 <= s['kcp_agent_heartbeat_lag_seconds{agent="gone"}'] <= 40
    assert 'agent="long-gone"' not in text and 'agent="garbage"' not in text
    k7 = 'cluster="compute",kernel="worker-7"'
    assert s[f"kcp_kernel_up{{{k7}}}"] == 0 and 19 <= s[f"kcp_kernel_load_age_seconds{{{k7}}}"] <= 30
    assert s['kcp_kernel_info{agent="gone",cluster="compute",host="h9",kernel="worker-7"}'] == 1
    assert 'cluster="nosuch"' not in text
    assert s["kcp_failure_detection_seconds_sum"] == 3 and s["kcp_failure_detection_seconds_count"] == 2
    assert "Bad" not in text
    b0 = 'cluster="batch",kernel="worker-0"'
    # a strategy name that is not one (a rogue job hash) is counted, under a bounded label
    assert s['kcp_cluster_dispatches_total{cluster="batch",outcome="error",strategy="unknown"}'] == 1
    assert s['kcp_cluster_dispatches_total{cluster="batch",outcome="ok",strategy="unknown"}'] == 0
    assert "no such strategy" not in text
    assert s[f'kcp_kernel_dispatches_total{{{b0},outcome="error"}}'] == 1
    assert s[f"kcp_kernel_cpu_ratio{{{b0}}}"] == 0.75 and s[f"kcp_kernel_queue_depth{{{b0}}}"] == 0
    assert s['kcp_cluster_status{cluster="batch",status="initializing"}'] == 1
    assert s["kcp_redis_up"] == 1
    assert any(key.startswith("kcp_build_info{") for key in s)
    assert not re.search(r'\b(job|id|request)="', text)  # bounded labels only
    assert promtool_check(text) == ""

    # the kernel process exits (its agent lists it no more, the agent lives): down at once
    await redis.hdel(KEYS.agent_running("a1"), "compute/worker-0")
    assert samples(await exposition(redis, SETTINGS))[f"kcp_kernel_up{{{k0}}}"] == 0

    # a removed kernel and a destroyed cluster leave no series behind
    await redis.srem(KEYS.cluster_kernels("compute"), "worker-1")
    await redis.delete(KEYS.kernel("compute", "worker-1"), KEYS.kernel_stats("compute", "worker-1"))
    text = await exposition(redis, SETTINGS)
    assert 'kernel="worker-1"' not in text and 'kernel="worker-0"' in text
    await redis.hset(KEYS.cluster("compute"), "status", "stopped")
    text = await exposition(redis, SETTINGS)
    assert "compute" not in text and 'cluster="batch"' in text
    assert samples(text)['kcp_agent_up{agent="a1"}'] == 1
    assert promtool_check(text) == ""


@pytest.mark.integration
@pytest.mark.timeout(30)
@pytest.mark.redis_cluster
async def test_clients_count_retries_failovers_and_scale_requests(redis: AsyncRedis, redis_url: str) -> None:
    """Two kernels recorded as running but with no process: the attempt times out, the retry goes
    to the other kernel and times out too. Both show up as counters, as does a scale request."""
    await State(redis, KEYS).create_cluster("stuck", ClusterConfig(), 2)
    for kernel in ("worker-0", "worker-1"):
        await put_kernel(redis, "stuck", kernel, "a1")
        await redis.hset(KEYS.kernel("stuck", kernel), "syscalls", "PING")
    config = OrchestrationConfig(timeout_ms=300, retry_count=1)
    async with KcpClient(Settings(redis_url=redis_url), orchestration=config) as kcp:
        with pytest.raises(DispatchTimeout):
            await kcp.dispatch("stuck", {"type": "PING"})
        await kcp.scale_cluster("stuck", 3, wait=0)
        await kcp.scale_cluster("stuck", 3, wait=0)  # no change: not an event
        # refused in the client before anything is enqueued: counted by reason
        for bad in ({"type": "READ", "address": -1, "size": 4}, {"type": 7}, ["not", "a", "dict"]):
            with pytest.raises(InvalidRequest):
                await kcp.dispatch("stuck", bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidRequest):
            await kcp.dispatch("no/such", {"type": "PING"})
        with pytest.raises(ClusterNotFound):
            await kcp.dispatch("nosuch", {"type": "PING"})
    assert await redis.hgetall(KEYS.rejections()) == {"invalid_request": "4", "unknown_cluster": "1"}
    counters = await redis.hgetall(KEYS.cluster_stats("stuck"))
    assert counters == {stats.RETRIES: "1", stats.FAILOVERS: "1", stats.SCALE_UP: "1"}
    s = samples(await exposition(redis, SETTINGS))
    assert s['kcp_dispatch_retries_total{cluster="stuck"}'] == 1
    assert s['kcp_dispatch_failovers_total{cluster="stuck"}'] == 1
    assert s['kcp_scaling_events_total{cluster="stuck",direction="up"}'] == 1
    assert s['kcp_dispatch_rejected_total{reason="invalid_request"}'] == 4
    assert s['kcp_dispatch_rejected_total{reason="no_kernel"}'] == 0


@pytest.mark.integration
@pytest.mark.timeout(30)
@pytest.mark.redis_cluster
async def test_exporter_reads_bus_counters(redis: AsyncRedis, redis_url: str) -> None:
    events = KEYS.bus_topic("events")
    for i in range(3):
        await redis.xadd(events, {"seq": i + 1, "m": "{}"})
    await redis.set(KEYS.bus_seq(events), 3)
    await redis.sadd(KEYS.bus_subscribers("events"), "k1")
    await redis.set(KEYS.bus_lease("k1"), "host:1", px=30_000)  # a live process serves k1
    await redis.xgroup_create(events, "k1", id="0")
    await redis.xreadgroup("k1", "c", {events: ">"}, count=2)  # delivered 2, not acknowledged
    await redis.hincrby(KEYS.bus_stats(), "dead:events", 1)
    with connect_sync(redis_url) as bus_client:
        text = await exposition(redis, SETTINGS, bus_client=bus_client)
    s = samples(text)
    assert s['kcp_bus_published_total{topic="events"}'] == 3
    assert s['kcp_bus_delivered_total{topic="events"}'] == 2
    assert s['kcp_bus_pending_messages{topic="events"}'] == 2
    assert s['kcp_bus_dead_lettered_total{topic="events"}'] == 1
    assert s['kcp_bus_stream_length{topic="events"}'] == 3
    assert s['kcp_bus_subscriptions{topic="events"}'] == 1
    assert s['kcp_bus_published_total{topic="data"}'] == 0
    assert s['kcp_bus_kernels{state="live"}'] == 0 and s['kcp_bus_kernels{state="offline"}'] == 0
    assert promtool_check(text) == ""


@pytest.mark.integration
@pytest.mark.timeout(30)
async def test_exporter_reports_redis_down_instead_of_failing() -> None:
    down = connect("redis://127.0.0.1:1/0")
    try:
        text = await exposition(down, SETTINGS)
    except Exception as exc:  # the one-off helper may raise; the scrape path must not
        pytest.fail(f"exposition raised {exc!r}")
    finally:
        await down.aclose()
    assert samples(text)["kcp_redis_up"] == 0


@pytest.mark.integration
@pytest.mark.timeout(30)
# not on the cluster run: it SIGSTOPs its own single server (one hung node is no cluster outage)
async def test_a_hung_redis_reads_as_redis_up_0_within_the_scrape_timeout(
    redis_server_factory: RedisServerFactory,
) -> None:
    """SIGSTOP Redis: the scrape answers `kcp_redis_up 0` after `scrape_timeout` instead of
    hanging past Prometheus's deadline; it answers 1 again once Redis resumes. A follower (not
    leading) only pings Redis and exports no fleet series."""
    server = redis_server_factory()
    settings = Settings(redis_url=server.url, scrape_timeout=0.5)
    client = connect(server.url)
    leading = True
    try:
        async with serve_metrics(client, settings, port=0, host="127.0.0.1", leader=lambda: leading) as port:
            assert port is not None
            up = samples(await asyncio.to_thread(_scrape, port))
            assert up["kcp_redis_up"] == 1 and up["kcp_control_plane_leader"] == 1
            assert up["kcp_agents_dead_total"] == 0 and "process_resident_memory_bytes" in up
            os.kill(server.pid, signal.SIGSTOP)
            try:
                t0 = time.monotonic()
                hung = samples(await asyncio.to_thread(_scrape, port))
                took = time.monotonic() - t0
            finally:
                os.kill(server.pid, signal.SIGCONT)
            print(f"scrape of a hung Redis answered in {took:.2f}s")
            assert hung["kcp_redis_up"] == 0 and "kcp_agents_dead_total" not in hung
            assert took < 5
            leading = False
            follower = await _until(
                lambda: samples(_scrape(port)).get("kcp_redis_up") == 1 and _scrape(port), 10, "Redis back"
            )
            assert "kcp_control_plane_leader 0.0" in follower and "kcp_agents_dead_total" not in follower
    finally:
        await client.aclose()


@pytest.mark.integration
@pytest.mark.timeout(30)
@pytest.mark.redis_cluster
async def test_top_frames_show_rates_p99_and_events(redis: AsyncRedis) -> None:
    await seed(redis)
    state = State(redis, KEYS)
    view = TopView()
    first = view.frame(await read_snapshot(state))
    print(first)
    assert "compute/worker-0" in first and "compute/worker-1" in first
    assert "running?" in first  # worker-1 is recorded running but its agent's lease is gone
    assert re.search(r"compute\s+running\s+1/2\s+5\s+1", first)  # 1 of 2 kernels up; 5 finished, 1 error
    for i in range(10):
        await finish(redis, "compute", "worker-0", f"k{i}", 7, ok=True)
    await redis.hincrby(KEYS.cluster_stats("compute"), stats.KERNELS_LOST, 1)
    await put_kernel(redis, "compute", "worker-2", "a1", state="pending")
    second = view.frame(await read_snapshot(state))
    print(second)
    # p99 of the jobs since the previous frame only: all ten took 7 ms (bucket 5..10 ms)
    row = next(line for line in second.splitlines() if line.startswith("compute/worker-0"))
    assert row.endswith(" ms") and 5.0 <= float(row.split()[-2]) <= 10.0
    assert "1 kernel(s) lost with their agent" in second
    assert "kernel compute/worker-2 placed on a1" in second

    # a1 dies and the leader forgets it (listed as lapsed); then work stealing goes on for many
    # frames: the steals collapse into one line with a count, so the death stays on screen
    now = time.time()
    await redis.srem(KEYS.agents(), "a1")
    gone = LapsedRecord(last_seen=now - 5, until=now + 60, host="h1", slots=4)
    await redis.hset(KEYS.lapsed_agents(), "a1", gone.encode())
    frame = view.frame(await read_snapshot(state))
    assert re.search(r"a1\s+h1\s+LAPSED \d+s ago\s+0/4", frame), frame
    for _ in range(12):
        await redis.hincrby(KEYS.cluster_stats("compute"), stats.STEALS, 2)
        frame = view.frame(await read_snapshot(state))
    print(frame)
    events = frame.split("EVENTS\n", 1)[1].splitlines()
    assert len(events) <= 8
    assert any("agent a1 lease EXPIRED" in line for line in events), events
    steals = [line for line in events if "taken over by an idle kernel" in line]
    assert len(steals) == 1 and "24 job(s)" in steals[0] and "(x12 since " in steals[0], steals


# ---------------------------------------------------------------- compose and dashboard
@pytest.mark.unit
@pytest.mark.timeout(60)
def test_compose_file_validates() -> None:
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.skip("docker-compose not installed (Debian package `docker-compose`; .ci/run installs it)")
    cmd = [compose, "-f", str(COMPOSE / "docker-compose.yml")]
    res = subprocess.run([*cmd, "config", "-q"], capture_output=True, text=True, timeout=50)
    assert res.returncode == 0, res.stderr
    services = subprocess.run([*cmd, "config", "--services"], capture_output=True, text=True, timeout=50)
    assert set(services.stdout.split()) == {
        "redis",
        "serve",
        "agent-1",
        "agent-2",
        "agent-3",
        "prometheus",
        "grafana",
    }
    full = subprocess.run([*cmd, "config"], capture_output=True, text=True, timeout=50).stdout
    assert "--appendonly" in full and "--metrics-port" in full
    assert (ROOT / "Dockerfile").is_file() and (ROOT / ".dockerignore").is_file()
    assert f"{COMPOSE / 'prometheus'}:/etc/prometheus:ro" in full  # the config and the rules it loads


_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool"}
_PROMQL_WORDS |= {"and", "or", "unless", "le", "inf", "nan"}


def dashboard_queries() -> list[str]:
    """The PromQL of every panel target, as written (with `$cluster`, `$__rate_interval`)."""
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


#: Series Prometheus makes itself (from the rules), not the exporter.
PROMETHEUS_SERIES = {"ALERTS"}


def dashboard_metric_names() -> set[str]:
    """Metric names in every PromQL expression of the dashboard (panels and template queries)."""
    dash = json.loads(DASHBOARD.read_text())
    exprs = dashboard_queries()
    for var in dash["templating"]["list"]:
        if var["type"] == "datasource":
            continue
        match = re.fullmatch(r"label_values\((\w+),\s*\w+\)", var["definition"])
        assert match, var["definition"]
        exprs.append(match.group(1))
    found = set()
    for expr in exprs:
        stripped = re.sub(r'\{[^}]*\}|"[^"]*"|\[[^\]]*\]', " ", expr)  # matchers, strings, ranges
        stripped = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", " ", stripped)  # grouping labels
        for m in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", stripped):
            word, rest = m.group(0), stripped[m.end() :].lstrip()
            if rest.startswith("(") or word.lower() in _PROMQL_WORDS:
                continue  # a function or a keyword
            found.add(word)
    return found - PROMETHEUS_SERIES


@pytest.mark.unit
@pytest.mark.timeout(30)
def test_dashboard_and_provisioning_are_consistent() -> None:
    dash = json.loads(DASHBOARD.read_text())
    datasource = (COMPOSE / "grafana/provisioning/datasources/prometheus.yml").read_text()
    assert re.search(r"type:\s*prometheus", datasource)
    provider = (COMPOSE / "grafana/provisioning/dashboards/kcp.yml").read_text()
    assert "/var/lib/grafana/dashboards" in provider
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    assert variables["cluster"]["datasource"]["uid"] == "${datasource}"  # no hard-coded datasource uid
    titles, rows = set(), set()
    for panel in dash["panels"]:
        if panel["type"] == "row":
            rows.add(panel["title"])
            continue
        titles.add(panel["title"])
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"] and panel["description"]
        assert panel["gridPos"]["w"] > 0
        defaults = panel["fieldConfig"]["defaults"]
        assert defaults.get("unit"), f"{panel['title']}: no unit"
        exprs = " ".join(t["expr"] for t in panel["targets"])
        if re.search(r"\brate\(", exprs) and "histogram_quantile" not in exprs and " / " not in exprs:
            units = {defaults["unit"]} | {
                p["value"]
                for o in panel["fieldConfig"].get("overrides", [])
                for p in o["properties"]
                if p["id"] == "unit"
            }
            assert "ops" in units, f"{panel['title']}: a rate is shown as ops/s"
        if "histogram_quantile" in exprs or "/" in exprs:  # latency and ratio panels have thresholds
            thresholds = [defaults.get("thresholds")] + [
                p["value"]
                for o in panel["fieldConfig"].get("overrides", [])
                for p in o["properties"]
                if p["id"] == "thresholds"
            ]
            assert any(t and len(t["steps"]) > 1 for t in thresholds), f"{panel['title']}: no thresholds"
    for expr in dashboard_queries():  # windows follow the scrape interval and the zoom
        assert not re.search(r"\[\d+[smh]\]", expr), f"fixed window in {expr}"
    assert any("$__rate_interval" in e for e in dashboard_queries())
    for needed in ("Dispatch rate", "Dispatch latency percentiles", "Errors", "Kernel CPU", "Failovers"):
        assert needed in titles
    assert {"Kernel restarts", "Alerts pending and firing", "Rejected requests", "Kernel memory"} <= titles
    assert "Alerts" in rows
    assert any(a.get("expr", "").startswith("ALERTS{") for a in dash["annotations"]["list"])
    found = dashboard_metric_names()
    assert len(found) >= 15
    assert {
        "kcp_cluster_dispatch_latency_seconds_bucket",
        "kcp_kernel_cpu_ratio",
        "kcp_agent_up",
        "kcp_kernel_restarts_total",
        "kcp_kernel_memory_bytes",
    } <= found
    assert not {"rate", "sum", "le", "cluster", "histogram_quantile"} & found


# ---------------------------------------------------------------- against a live stack
def _cli(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "controlplane.ops.cli", "--redis-url", redis_url, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return str(resp.read().decode())


def _query(port: int, promql: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.load(resp)
    assert body["status"] == "success", body
    return list(body["data"]["result"])


async def _until(check: Callable[[], Any], limit: float, what: str) -> Any:
    """Poll `check` (run in a thread) until it returns something truthy."""
    deadline = time.monotonic() + limit
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = await asyncio.to_thread(check)
        except OSError as exc:  # not listening yet
            last = exc
        if last and not isinstance(last, Exception):
            return last
        await asyncio.sleep(0.25)
    raise AssertionError(f"timed out after {limit}s waiting for {what} (last: {last!r})")


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[..., int]]:
    """`start(*metrics_ports)` runs a real Prometheus (loopback, 1 s scrapes and rule evaluations,
    the shipped rules loaded) against those ports and returns its HTTP port; stopped at teardown."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus not installed (Debian package `prometheus`; .ci/run installs it)")
    procs: list[subprocess.Popen[bytes]] = []
    log = (tmp_path / "prometheus.log").open("wb")

    def start(*metrics_ports: int) -> int:
        port = free_port()
        config = tmp_path / "prometheus.yml"
        targets = ", ".join(f"'127.0.0.1:{p}'" for p in metrics_ports)
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"rule_files: ['{RULES}']\n"
            "scrape_configs:\n  - job_name: kcp\n    static_configs:\n"
            f"      - targets: [{targets}]\n"
        )
        args = [f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}"]
        args += [f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]
        procs.append(subprocess.Popen([binary, *args], stdout=log, stderr=log))
        return port

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    log.close()


def _value(rows: list[dict[str, Any]]) -> float | None:
    return float(rows[0]["value"][1]) if len(rows) == 1 else None


def _leading(ports: tuple[int, int]) -> int | None:
    """The metrics port of the `kcp serve` that leads (exports the fleet), once one does."""
    for port in ports:
        if re.search(r"^kcp_control_plane_leader 1\.0$", _scrape(port), re.M):
            return port
    return None


async def _kernel(redis: AsyncRedis, cluster: str, kernel: str) -> dict[str, str]:
    return dict(await redis.hgetall(KEYS.kernel(cluster, kernel)))


@pytest.mark.system
@pytest.mark.timeout(180)
# single Redis only, for `make test`'s budget (16 s): on the cluster run, the exporter's reads of
# the fleet, the client counters and the bus are the integration tests above
async def test_prometheus_scrapes_a_live_stack(
    stack: ProcessStack, redis_url: str, redis: AsyncRedis, prometheus: Callable[..., int]
) -> None:
    """A real Prometheus scrapes two `kcp serve --metrics-port` at once, with the shipped rules.

    Fleet sums over both instances equal what was done (only the leader exports the fleet); every
    dashboard query returns series; a kernel SIGKILLed three times is counted in
    `kcp_kernel_restarts_total` and makes KcpKernelCrashLooping pending; a SIGKILLed agent stays
    at `kcp_agent_up 0` with a growing lag and makes KcpAgentDown pending; a destroyed cluster's
    series go away."""
    ports = (free_port(), free_port())
    for port in ports:
        stack.serve("--metrics-port", str(port), "--metrics-host", "127.0.0.1")
    stack.agent("obs-a", slots=4)
    doomed = stack.agent("obs-b", slots=4)
    prom_port = prometheus(*ports)
    ok, failed = 12, 2
    async with KcpClient(Settings(redis_url=redis_url)) as kcp:

        async def both_agents() -> bool:
            return bool(await redis.scard(KEYS.agents()) == 2)

        await _until_async(both_agents, 20, "both agents to register")  # a kernel on each
        await kcp.create_cluster("obs", 2)
        for i in range(ok):
            await kcp.dispatch("obs", {"type": "PING", "payload": i})
        for _ in range(failed):  # on a kernel named by the request: strategy "pinned"
            with pytest.raises(KernelError):
                await kcp.dispatch("obs", {"type": "READ", "address": 0x10, "size": 4}, kernel="worker-0")
        with pytest.raises(InvalidRequest):  # refused in the client, counted by reason
            await kcp.dispatch("obs", {"type": "READ", "address": -1, "size": 4})

        def counted() -> dict[tuple[str, str], float] | None:
            query = 'sum by (strategy, outcome) (kcp_cluster_dispatches_total{cluster="obs"})'
            rows = _query(prom_port, query)
            got = {(r["metric"]["strategy"], r["metric"]["outcome"]): float(r["value"][1]) for r in rows}
            got = {key: n for key, n in got.items() if n}
            return got if got == {("adaptive", "ok"): ok, ("pinned", "error"): failed} else None

        t0 = time.monotonic()
        print("prometheus:", await _until(counted, 60, "Prometheus to see the dispatches"))
        print(f"prometheus had the counts {time.monotonic() - t0:.1f}s after the last dispatch")

        # both instances are scraped (a target's first scrape may lag the other's by an
        # interval); summed over them, every fleet number is the truth
        def both_up() -> bool | None:
            return _value(_query(prom_port, 'count(up{job="kcp"} == 1)')) == 2 or None

        await _until(both_up, 20, "both kcp serve targets to be up")
        assert _value(_query(prom_port, "sum(kcp_control_plane_leader)")) == 1
        assert _value(_query(prom_port, "count(kcp_redis_up == 1)")) == 2
        assert _value(_query(prom_port, 'sum(kcp_kernel_up{cluster="obs"})')) == 2
        assert _value(_query(prom_port, "sum(kcp_agent_up)")) == 2
        assert _value(
            _query(prom_port, 'sum(kcp_cluster_dispatch_latency_seconds_count{cluster="obs"})')
        ) == (ok + failed)
        assert _value(_query(prom_port, 'sum(kcp_kernel_dispatches_total{cluster="obs"})')) == ok + failed
        assert _value(_query(prom_port, 'sum(kcp_dispatch_rejected_total{reason="invalid_request"})')) == 1
        assert _value(_query(prom_port, "count(process_resident_memory_bytes)")) == 2

        leader = await _until(lambda: _leading(ports), 10, "a leader")
        follower = next(p for p in ports if p != leader)
        text = await asyncio.to_thread(_scrape, leader)
        missing = dashboard_metric_names() - names(text)
        assert not missing, f"dashboard queries metrics the exporter does not emit: {sorted(missing)}"
        assert promtool_check(text) == ""
        quiet = await asyncio.to_thread(_scrape, follower)
        assert "kcp_cluster_" not in quiet and "kcp_agent_up" not in quiet and "kcp_redis_up 1.0" in quiet
        assert promtool_check(quiet) == ""

        top = await asyncio.to_thread(_cli, redis_url, "top", "--once")
        print(top.stdout)
        assert top.returncode == 0, top.stderr
        assert "obs/worker-0" in top.stdout and "obs/worker-1" in top.stdout and "\x1b[" not in top.stdout
        human = await asyncio.to_thread(_cli, redis_url, "status")
        assert human.returncode == 0, human.stderr
        assert re.search(r"obs-b\s+\S+\s+up\s+1/4", human.stdout) and "obs      worker-1" in human.stdout
        status = await asyncio.to_thread(_cli, redis_url, "--json", "status")
        assert status.returncode == 0, status.stderr
        assert {k["name"] for k in json.loads(status.stdout)["clusters"][0]["kernels"]} == {
            "worker-0",
            "worker-1",
        }

        # a kernel of obs-a crashes three times; its agent restarts it each time
        placed = {k: (await _kernel(redis, "obs", k))["agent"] for k in ("worker-0", "worker-1")}
        crashing = next(k for k, agent in placed.items() if agent == "obs-a")
        for n in range(1, 4):
            pid = int((await _kernel(redis, "obs", crashing))["pid"])
            os.kill(pid, signal.SIGKILL)

            async def restarted(pid: int = pid) -> dict[str, str] | None:
                record = await _kernel(redis, "obs", crashing)
                return record if record.get("pid") not in (None, "0", str(pid)) else None

            record = await _until_async(restarted, 20, f"restart {n} of obs/{crashing}")
            assert record["restarts"] == str(n) and record["agent"] == "obs-a"
        ref = f'cluster="obs",kernel="{crashing}"'
        await _until(
            lambda: _value(_query(prom_port, f"sum(kcp_kernel_restarts_total{{{ref}}})")) == 3,
            20,
            "Prometheus to count the restarts",
        )

        # agent obs-b dies with its kernel: the leader removes both, they stay exported as down
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(10)
        killed_at = time.monotonic()
        await _until(
            lambda: (
                _value(_query(prom_port, 'sum(kcp_kernel_up{cluster="obs"})')) == 2
                and _value(_query(prom_port, 'count(kcp_kernel_info{agent="obs-a",cluster="obs"})')) == 2
            ),
            30,
            "the lost kernel to be placed again on obs-a",
        )
        assert not await redis.sismember(KEYS.agents(), "obs-b")  # forgotten by the leader
        lag = 'kcp_agent_heartbeat_lag_seconds{agent="obs-b"}'
        first = await _until(lambda: _value(_query(prom_port, lag)), 10, "the dead agent's lag")
        # its heartbeat lag keeps growing, scrape after scrape; and down means 0, not gone
        await _until(
            lambda: (_value(_query(prom_port, lag)) or 0) > first, 10, "the dead agent's lag to grow"
        )
        assert _value(_query(prom_port, 'kcp_agent_up{agent="obs-b"}')) == 0

        def alerting() -> set[tuple[str, str]] | None:
            rows = _query(prom_port, 'ALERTS{alertname=~"KcpAgentDown|KcpKernelCrashLooping"}')
            got = {
                (r["metric"]["alertname"], r["metric"].get("agent") or r["metric"]["kernel"]) for r in rows
            }
            want = {("KcpAgentDown", "obs-b"), ("KcpKernelCrashLooping", crashing)}
            return got if got == want else None

        print("alerts:", await _until(alerting, 20, "the agent-down and crash-loop alerts to be pending"))
        print(f"agent obs-b down and alerting {time.monotonic() - killed_at:.1f}s after its SIGKILL")

        # every dashboard query returns series for this scenario (its windows: 5 scrapes)
        for expr in dashboard_queries():
            promql = expr.replace("$__rate_interval", "5s").replace("$cluster", ".*")
            assert _query(prom_port, promql), f"dashboard query returns no series: {expr}"

        lapsed = await asyncio.to_thread(_cli, redis_url, "top", "--once")
        assert re.search(r"obs-b\s+\S+\s+LAPSED \d+s ago", lapsed.stdout), lapsed.stdout

        await kcp.destroy_cluster("obs")
    await _until(lambda: 'cluster="obs"' not in _scrape(leader), 30, "the cluster's series to go")
    await _until(
        lambda: not _query(prom_port, 'kcp_cluster_desired_kernels{cluster="obs"}'),
        30,
        "Prometheus to mark the destroyed cluster's series stale",
    )


async def _until_async(check: Callable[[], Awaitable[Any]], limit: float, what: str) -> Any:
    """Poll the coroutine function `check` until it returns something truthy."""
    deadline = time.monotonic() + limit
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {limit}s waiting for {what} (last: {last!r})")


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_serve_refuses_a_metrics_port_it_cannot_bind() -> None:
    """A clear error and exit code 2 before the service starts (nothing touches Redis)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = _cli(
            "redis://127.0.0.1:1/0", "serve", "--metrics-port", str(port), "--metrics-host", "127.0.0.1"
        )
    assert res.returncode == 2, res.stderr
    assert f"cannot serve metrics on 127.0.0.1:{port}" in res.stderr and "Traceback" not in res.stderr
