"""The Prometheus exporter, `kcp top`, the compose stack and the Grafana dashboard."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ProcessStack
from promtool import promtool_check
from redis import Redis as SyncRedis
from redis.asyncio import Redis as AsyncRedis

from controlplane import DispatchTimeout, KcpClient, KernelError, OrchestrationConfig
from controlplane.ops.cli.top import TopView
from controlplane.ops.exporter.core import exposition
from controlplane.ops.redis_server import free_port
from controlplane.protocol import stats
from controlplane.protocol.jobs import REPLY_TTL_MS
from controlplane.protocol.keys import Keys
from controlplane.protocol.models import ClusterConfig
from controlplane.redis.scripts import jobs
from controlplane.redis.snapshot import read_snapshot
from controlplane.redis.state import State
from controlplane.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose"
DASHBOARD = COMPOSE / "grafana" / "dashboards" / "kcp.json"
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
    await redis.set(KEYS.kernel_lease(cluster, kernel), "1", px=3000)


async def finish(
    redis: AsyncRedis,
    cluster: str,
    kernel: str,
    job: str,
    latency_ms: float,
    ok: bool,
    strategy: str = "adaptive",
) -> None:
    """A job routed by `strategy` finished through finish.lua, exactly as a kernel does it."""
    await redis.hset(KEYS.job(cluster, job), mapping={"kernel": kernel, "epoch": "1", "strategy": strategy})
    queue_ms = int(latency_ms / 2)
    delivered = await jobs.finish(
        KEYS,
        cluster,
        kernel,
        job_id=job,
        epoch="1",
        reply_key=KEYS.reply("c"),
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
    assert s['kcp_agent_kernels{agent="a1"}'] == 2  # compute/worker-0 and batch/worker-0
    assert 0 <= s['kcp_agent_heartbeat_lag_seconds{agent="a1"}'] <= 3
    assert s[f"kcp_kernel_cpu_ratio{{{k0}}}"] == 0.25 and s[f"kcp_kernel_memory_ratio{{{k0}}}"] == 0.125
    assert f"kcp_kernel_cpu_ratio{{{k1}}}" not in s  # no load record: no value rather than a stale one
    assert s[f"kcp_kernel_queue_depth{{{k0}}}"] == 2 and s[f"kcp_kernel_inflight_jobs{{{k0}}}"] == 3
    assert s[f'kcp_cluster_status{{{c},status="running"}}'] == 1
    assert s["kcp_agents_dead_total"] == 2
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

    # the kernel process's own lease lapses (process gone, agent alive): down at once
    await redis.delete(KEYS.kernel_lease("compute", "worker-0"))
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
    counters = await redis.hgetall(KEYS.cluster_stats("stuck"))
    assert counters == {stats.RETRIES: "1", stats.FAILOVERS: "1", stats.SCALE_UP: "1"}
    s = samples(await exposition(redis, SETTINGS))
    assert s['kcp_dispatch_retries_total{cluster="stuck"}'] == 1
    assert s['kcp_dispatch_failovers_total{cluster="stuck"}'] == 1
    assert s['kcp_scaling_events_total{cluster="stuck",direction="up"}'] == 1


@pytest.mark.integration
@pytest.mark.timeout(30)
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
    with SyncRedis.from_url(redis_url, decode_responses=True) as bus_client:
        text = await exposition(redis, SETTINGS, bus_client=bus_client)
    s = samples(text)
    assert s['kcp_bus_published_total{topic="events"}'] == 3
    assert s['kcp_bus_delivered_total{topic="events"}'] == 2
    assert s['kcp_bus_pending_messages{topic="events"}'] == 2
    assert s['kcp_bus_dead_lettered_total{topic="events"}'] == 1
    assert s['kcp_bus_stream_length{topic="events"}'] == 3
    assert s['kcp_bus_subscriptions{topic="events"}'] == 1
    assert s['kcp_bus_published_total{topic="data"}'] == 0
    assert s['kcp_bus_kernels{state="registered"}'] == 0
    assert promtool_check(text) == ""


@pytest.mark.integration
@pytest.mark.timeout(30)
async def test_exporter_reports_redis_down_instead_of_failing() -> None:
    down = AsyncRedis.from_url("redis://127.0.0.1:1/0", decode_responses=True)
    try:
        text = await exposition(down, SETTINGS)
    except Exception as exc:  # the one-off helper may raise; the scrape path must not
        pytest.fail(f"exposition raised {exc!r}")
    finally:
        await down.aclose()
    assert samples(text)["kcp_redis_up"] == 0


@pytest.mark.integration
@pytest.mark.timeout(30)
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
    promtool = shutil.which("promtool")
    if promtool:
        check = subprocess.run(
            [promtool, "check", "config", str(COMPOSE / "prometheus.yml")], capture_output=True, text=True
        )
        assert check.returncode == 0, check.stdout + check.stderr


_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool"}
_PROMQL_WORDS |= {"and", "or", "unless", "le", "inf", "nan"}


def dashboard_metric_names() -> set[str]:
    """Metric names in every PromQL expression of the dashboard (panels and template queries)."""
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
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
    return found


@pytest.mark.unit
@pytest.mark.timeout(30)
def test_dashboard_and_provisioning_are_consistent() -> None:
    dash = json.loads(DASHBOARD.read_text())
    datasource = (COMPOSE / "grafana/provisioning/datasources/prometheus.yml").read_text()
    uid = re.search(r"uid:\s*(\S+)", datasource)
    assert uid is not None
    provider = (COMPOSE / "grafana/provisioning/dashboards/kcp.yml").read_text()
    assert "/var/lib/grafana/dashboards" in provider
    titles = set()
    for panel in dash["panels"]:
        if panel["type"] == "row":
            continue
        titles.add(panel["title"])
        assert panel["datasource"]["uid"] == uid.group(1)
        assert panel["targets"] and panel["description"]
        assert panel["gridPos"]["w"] > 0
    for needed in ("Dispatch rate", "Dispatch latency percentiles", "Errors", "Kernel CPU", "Failovers"):
        assert needed in titles
    found = dashboard_metric_names()
    assert len(found) >= 15
    assert {"kcp_cluster_dispatch_latency_seconds_bucket", "kcp_kernel_cpu_ratio", "kcp_agent_up"} <= found
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
def prometheus(tmp_path: Path) -> Iterator[Callable[[int], int]]:
    """`start(metrics_port)` runs a real Prometheus (loopback, 1 s scrapes) against that port and
    returns its HTTP port; stopped at teardown."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus not installed (Debian package `prometheus`; .ci/run installs it)")
    procs: list[subprocess.Popen[bytes]] = []
    log = (tmp_path / "prometheus.log").open("wb")

    def start(metrics_port: int) -> int:
        port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: kcp\n    static_configs:\n"
            f"      - targets: ['127.0.0.1:{metrics_port}']\n"
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


@pytest.mark.system
@pytest.mark.timeout(150)
async def test_prometheus_scrapes_a_live_stack(
    stack: ProcessStack, redis_url: str, prometheus: Callable[[int], int]
) -> None:
    """A real Prometheus scrapes `kcp serve --metrics-port`; its counts match what was sent. The
    dashboard's queries use names the live exporter emits; `kcp top --once` shows the kernels;
    a destroyed cluster's series go away (and go stale in Prometheus)."""
    metrics_port = free_port()
    stack.serve("--metrics-port", str(metrics_port), "--metrics-host", "127.0.0.1")
    stack.agent("obs-a", slots=4)
    prom_port = prometheus(metrics_port)
    ok, failed = 12, 2
    async with KcpClient(Settings(redis_url=redis_url)) as kcp:
        await kcp.create_cluster("obs", 2)
        for i in range(ok):
            await kcp.dispatch("obs", {"type": "PING", "payload": i})
        for _ in range(failed):  # on a kernel named by the request: strategy "pinned"
            with pytest.raises(KernelError):
                await kcp.dispatch("obs", {"type": "READ", "address": 0x10, "size": 4}, kernel="worker-0")

        def counted() -> dict[tuple[str, str], float] | None:
            query = 'sum by (strategy, outcome) (kcp_cluster_dispatches_total{cluster="obs"})'
            rows = _query(prom_port, query)
            got = {(r["metric"]["strategy"], r["metric"]["outcome"]): float(r["value"][1]) for r in rows}
            got = {key: n for key, n in got.items() if n}
            return got if got == {("adaptive", "ok"): ok, ("pinned", "error"): failed} else None

        t0 = time.monotonic()
        print("prometheus:", await _until(counted, 60, "Prometheus to see the dispatches"))
        print(f"prometheus had the counts {time.monotonic() - t0:.1f}s after the last dispatch")
        assert _query(prom_port, 'sum(kcp_kernel_up{cluster="obs"})')[0]["value"][1] == "2"
        latency = _query(prom_port, 'kcp_cluster_dispatch_latency_seconds_count{cluster="obs"}')
        assert float(latency[0]["value"][1]) == ok + failed
        assert _query(prom_port, 'kcp_agent_up{agent="obs-a"}')[0]["value"][1] == "1"

        text = await asyncio.to_thread(_scrape, metrics_port)
        missing = dashboard_metric_names() - names(text)
        assert not missing, f"dashboard queries metrics the exporter does not emit: {sorted(missing)}"
        assert promtool_check(text) == ""

        top = await asyncio.to_thread(_cli, redis_url, "top", "--once")
        print(top.stdout)
        assert top.returncode == 0, top.stderr
        assert "obs/worker-0" in top.stdout and "obs/worker-1" in top.stdout and "\x1b[" not in top.stdout
        human = await asyncio.to_thread(_cli, redis_url, "status")
        assert human.returncode == 0, human.stderr
        assert re.search(r"obs-a\s+\S+\s+up\s+2/4", human.stdout) and "obs      worker-1" in human.stdout
        status = await asyncio.to_thread(_cli, redis_url, "--json", "status")
        assert status.returncode == 0, status.stderr
        assert {k["name"] for k in json.loads(status.stdout)["clusters"][0]["kernels"]} == {
            "worker-0",
            "worker-1",
        }

        await kcp.destroy_cluster("obs")
    await _until(lambda: 'cluster="obs"' not in _scrape(metrics_port), 30, "the cluster's series to go")
    await _until(
        lambda: not _query(prom_port, 'kcp_cluster_desired_kernels{cluster="obs"}'),
        30,
        "Prometheus to mark the destroyed cluster's series stale",
    )


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
