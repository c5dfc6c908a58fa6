"""ClusterMetricsCollector (the spec's example, shared through Redis) and the histogram helpers."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import fakeredis
import pytest
import redis
from promtool import promtool_check

from controlplane import (
    ClusterMetrics,
    ClusterMetricsCollector,
    InvalidRequest,
    KernelMetricsSnapshot,
    RedisUnavailable,
)
from controlplane.protocol import stats
from controlplane.redis.connect import connect_sync
from controlplane.settings import Settings

pytestmark = pytest.mark.timeout(30)

Connect = Callable[[], redis.Redis]


@pytest.fixture(
    params=[
        pytest.param("fake", marks=pytest.mark.unit),
        pytest.param("real", marks=[pytest.mark.integration, pytest.mark.redis_cluster]),
    ]
)
def server(request: pytest.FixtureRequest) -> Iterator[Connect]:
    """`connect()` gives a new client of one store, as separate processes would have: fakeredis, or
    the private redis-server (with `--redis-cluster`: the Redis Cluster; the same contract on all)."""
    clients: list[redis.Redis] = []
    if request.param == "fake":
        fake = fakeredis.FakeServer(version=(7,))

        def connect() -> redis.Redis:
            clients.append(fakeredis.FakeRedis(server=fake, decode_responses=True))
            return clients[-1]

    else:
        url = request.getfixturevalue("redis_url")

        def connect() -> redis.Redis:
            clients.append(connect_sync(url))
            return clients[-1]

    yield connect
    for client in clients:
        client.close()


def _collector(connect: Connect, cluster: str = "compute") -> ClusterMetricsCollector:
    return ClusterMetricsCollector(cluster_name=cluster, redis_client=connect())


@pytest.fixture
def collector(server: Connect) -> Iterator[ClusterMetricsCollector]:
    with _collector(server) as c:
        yield c


def spec_example(collector: ClusterMetricsCollector) -> None:
    collector.record("kernel-1", "cpu", 0.5)
    collector.record("kernel-1", "memory", 0.3)
    collector.increment("kernel-1", "dispatches")
    collector.increment("kernel-1", "dispatches")
    collector.record("kernel-2", "cpu", 0.4)
    collector.record("kernel-2", "memory", 0.2)
    collector.increment("kernel-2", "dispatches")


# ---------------------------------------------------------------- the spec's example
def test_spec_example(collector: ClusterMetricsCollector) -> None:
    spec_example(collector)
    assert collector.get("kernel-1", "cpu") == 0.5
    assert collector.aggregate("dispatches") == 3
    summary = collector.get_cluster_summary()
    assert isinstance(summary, ClusterMetrics)
    assert summary == ClusterMetrics(
        cluster_name="compute",
        kernel_count=2,
        total_dispatches=3,
        total_errors=0,
        avg_latency_ms=0.0,
        avg_cpu=0.45,
        avg_memory=0.25,
    )
    assert summary.to_dict() == {
        "cluster_name": "compute",
        "kernel_count": 2,
        "total_dispatches": 3,
        "total_errors": 0,
        "avg_latency_ms": 0.0,
        "avg_cpu": 0.45,
        "avg_memory": 0.25,
    }
    snapshot = collector.get_snapshot("kernel-1")
    assert isinstance(snapshot, KernelMetricsSnapshot)
    assert snapshot.kernel_name == "kernel-1"
    assert snapshot.metrics == {"cpu": 0.5, "memory": 0.3, "dispatches": 2}
    assert isinstance(snapshot.metrics["dispatches"], int)
    assert snapshot.timestamp > 1e9
    assert collector.average("cpu") == pytest.approx(0.45)
    assert collector.average("memory") == pytest.approx(0.25)


def test_the_spec_example_exports_text_promtool_accepts(collector: ClusterMetricsCollector) -> None:
    spec_example(collector)
    collector.record("kernel-1", "latency_ms", 12.5)
    collector.record("kernel-2", "status", "ok")  # not a number: not exported
    text = collector.export_prometheus()
    print(text)
    lines = {line for line in text.splitlines() if not line.startswith("#")}
    assert 'kernel_cpu{cluster="compute",kernel="kernel-1"} 0.5' in lines
    assert 'kernel_memory{cluster="compute",kernel="kernel-1"} 0.3' in lines
    assert 'kernel_cpu{cluster="compute",kernel="kernel-2"} 0.4' in lines
    assert 'kernel_memory{cluster="compute",kernel="kernel-2"} 0.2' in lines
    # only ever incremented: a counter, with the conventional suffix
    assert 'kernel_dispatches_total{cluster="compute",kernel="kernel-1"} 2.0' in lines
    assert 'kernel_dispatches_total{cluster="compute",kernel="kernel-2"} 1.0' in lines
    assert "# TYPE kernel_dispatches_total counter" in text
    assert "# TYPE kernel_cpu gauge" in text
    # milliseconds are exported in the base unit
    assert 'kernel_latency_seconds{cluster="compute",kernel="kernel-1"} 0.0125' in lines
    assert "status" not in text
    assert promtool_check(text) == ""


# ---------------------------------------------------------------- shared through Redis
def test_collectors_of_different_processes_aggregate(server: Connect) -> None:
    """Two collectors on one Redis (as two processes would be) see one set of metrics."""
    a, b = _collector(server), _collector(server)
    a.increment("kernel-1", "dispatches", 5)
    b.increment("kernel-1", "dispatches", 2)
    b.increment("kernel-2", "dispatches")
    a.record("kernel-2", "cpu", 0.25)
    assert a.aggregate("dispatches") == b.aggregate("dispatches") == 8
    assert b.get("kernel-2", "cpu") == 0.25
    assert a.get_cluster_summary() == b.get_cluster_summary()
    assert a.get_cluster_summary().kernel_count == 2
    other = _collector(server, "other")  # another cluster name: its own metrics
    assert other.aggregate("dispatches") == 0
    assert other.get_cluster_summary().kernel_count == 0
    a.reset()
    assert b.aggregate("dispatches") == 0 and b.get("kernel-2", "cpu") is None
    assert b.get_cluster_summary() == ClusterMetrics(cluster_name="compute")
    assert b.export_prometheus() == ""


def test_defaults_come_from_settings(server: Connect) -> None:
    prefixed = ClusterMetricsCollector(
        "compute",
        redis_client=server(),
        settings=Settings(prefix="other:"),
    )
    prefixed.record("kernel-1", "cpu", 0.5)
    plain = server()
    assert plain.hgetall("other:metrics:{compute}:values") == {"kernel-1/cpu": "0.5"}
    assert ClusterMetricsCollector().cluster_name == "default"  # the spec's default; no I/O until used


def test_counters_gauges_and_values(collector: ClusterMetricsCollector) -> None:
    assert collector.get("kernel-1", "cpu") is None
    assert collector.aggregate("cpu") == 0 and collector.average("cpu") == 0.0
    collector.increment("kernel-1", "bytes_read", 1024)
    collector.increment("kernel-1", "bytes_read", 0.5)
    assert collector.get("kernel-1", "bytes_read") == 1024.5
    collector.increment("kernel-1", "queue_depth", 3)
    collector.increment("kernel-1", "queue_depth", -1)  # went down: a gauge now
    collector.record("kernel-1", "labels", {"zone": "a"})
    assert collector.get("kernel-1", "labels") == {"zone": "a"}
    assert collector.get_snapshot("kernel-1").metrics == {
        "bytes_read": 1024.5,
        "queue_depth": 2,
        "labels": {"zone": "a"},
    }
    text = collector.export_prometheus()
    assert "# TYPE kernel_bytes_read_total counter" in text
    assert "# TYPE kernel_queue_depth gauge" in text
    assert "labels" not in text
    assert collector.get_snapshot("nobody").metrics == {}


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda c: c.record("kernel 1", "cpu", 1), "kernel name"),
        (lambda c: c.record("kernel-1", "CPU", 1), "metric name"),
        (lambda c: c.record("kernel-1", "cpu:x", 1), "metric name"),
        (lambda c: c.record("kernel-1", "dispatches_total", 1), "reserves its suffix"),
        (lambda c: c.record("kernel-1", "cpu", math.nan), "finite"),
        (lambda c: c.record("kernel-1", "cpu", object()), "JSON"),
        (lambda c: c.record("kernel-1", "cpu", "x" * 5000), "bytes"),
        (lambda c: c.increment("kernel-1", "cpu", "1"), "finite number"),  # type: ignore[arg-type]
        (lambda c: c.increment("kernel-1", "cpu", True), "finite number"),
        (lambda c: c.increment("kernel-1", "status"), "non-numeric"),
        (lambda c: c.aggregate("Bad Name"), "metric name"),
        (lambda c: c.get_snapshot("../x"), "kernel name"),
    ],
)
def test_bad_input_is_a_typed_error_and_changes_nothing(
    collector: ClusterMetricsCollector, call: object, message: str
) -> None:
    collector.record("kernel-1", "status", "ok")
    collector.record("kernel-1", "cpu", 0.5)
    before = collector.get_snapshot("kernel-1").metrics
    with pytest.raises(InvalidRequest, match=message):
        call(collector)  # type: ignore[operator]
    assert collector.get_snapshot("kernel-1").metrics == before


@pytest.mark.unit
def test_bad_cluster_name_is_rejected() -> None:
    with pytest.raises(InvalidRequest, match="cluster name"):
        ClusterMetricsCollector("no/such name")


# ---------------------------------------------------------------- histogram helpers
@pytest.mark.unit
def test_bucket_fields_histograms_and_quantiles() -> None:
    assert stats.bucket_field(stats.LATENCY, 0.0) == "latency_le_0.0005"
    assert stats.bucket_field(stats.LATENCY, 0.003) == "latency_le_0.005"
    assert stats.bucket_field(stats.QUEUE, 0.005) == "queue_le_0.005"  # bounds are inclusive
    assert stats.bucket_field(stats.LATENCY, 11) == "latency_le_inf"
    counts = {"latency_le_0.001": 90.0, "latency_le_0.01": 9.0, "latency_le_inf": 1.0}
    buckets = stats.histogram(counts, stats.LATENCY)
    assert buckets[-1] == (math.inf, 100.0)
    assert dict(buckets)[0.005] == 90.0 and dict(buckets)[0.01] == 99.0
    assert stats.quantile(0.5, buckets) == pytest.approx(0.0005 + 0.0005 * 50 / 90)
    assert stats.quantile(0.99, buckets) == pytest.approx(0.01)
    assert stats.quantile(1.0, buckets) == 10.0  # the infinite bucket reports the largest bound
    assert stats.quantile(0.99, stats.histogram({}, stats.LATENCY)) is None
    later = stats.histogram({**counts, "latency_le_0.01": 19.0}, stats.LATENCY)
    window = stats.diff(later, buckets)
    assert window[-1][1] == 10.0 and stats.quantile(0.5, window) == pytest.approx(0.0075)
    assert stats.diff(buckets, later) == buckets  # counters went down: a reset, count from zero


@pytest.mark.unit
def test_redis_down_is_a_typed_error() -> None:
    with ClusterMetricsCollector("compute", settings=Settings(redis_url="redis://127.0.0.1:1/0")) as c:
        for call in (lambda: c.record("kernel-1", "cpu", 0.5), lambda: c.increment("kernel-1", "n"), c.reset):
            with pytest.raises(RedisUnavailable):
                call()
