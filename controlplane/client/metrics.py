"""ClusterMetricsCollector: the spec's per-kernel metrics store, kept in Redis.

    collector = ClusterMetricsCollector(cluster_name="compute")
    collector.record("kernel-1", "cpu", 0.5)
    collector.increment("kernel-1", "dispatches")
    collector.aggregate("dispatches")  # summed over every kernel, from every process

The API is synchronous, as the spec shows, and talks to Redis with a synchronous redis-py
client (one round trip per call; about 0.1 ms on loopback). Every process that builds a
collector with the same cluster name, Redis and prefix shares the same metrics, so
recordings from several hosts aggregate. Called from async code, each call blocks the event
loop for that round trip; use it for application-level metrics, not per-request hot paths.

Values are stored as JSON in one hash per cluster (`keys.collector_values`), so `reset()`
is one atomic DEL. A metric that is only ever incremented is a Prometheus counter; one
that was `record`ed is a gauge. These metrics are separate from kcp's own (`/metrics`).
"""

from __future__ import annotations

import json
import math
import re
import time
from typing import Any, Self, cast

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from controlplane.client.core import validate_name
from controlplane.errors import InvalidRequest, RedisError
from controlplane.protocol.keys import Keys
from controlplane.protocol.models import ClusterMetrics, KernelMetricsSnapshot
from controlplane.redis.connect import SyncRedis, connect_sync
from controlplane.redis.errors import map_redis_errors, redis_said
from controlplane.redis.scripts.metrics import metric_increment
from controlplane.settings import Settings

_METRIC_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
#: Suffixes Prometheus gives a meaning to; a metric name may not end with them.
_RESERVED_SUFFIXES = ("_total", "_count", "_sum", "_bucket", "_created", "_info")
#: Largest JSON encoding of a recorded value, bytes.
MAX_VALUE_BYTES = 4096
COUNTER, GAUGE = "counter", "gauge"


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class ClusterMetricsCollector:
    """Per-kernel metrics of one cluster: record, increment, aggregate, export."""

    def __init__(
        self,
        cluster_name: str = "default",
        *,
        redis_client: SyncRedis | None = None,
        settings: Settings | None = None,
    ) -> None:
        """`redis_client` (decode_responses=True) overrides the one built from `settings`
        (default: `Settings()`, i.e. KCP_REDIS_URL and KCP_PREFIX)."""
        self.cluster_name = validate_name(cluster_name)
        settings = settings or Settings()
        self._own = redis_client is None
        self.redis: SyncRedis = redis_client or connect_sync(settings.redis_url)
        self._keys = keys = Keys(settings.prefix)
        self._values = keys.collector_values(self.cluster_name)
        self._kernels = keys.collector_kernels(self.cluster_name)
        self._types = keys.collector_types(self.cluster_name)

    # ------------------------------------------------------------ writing
    def record(self, kernel_name: str, metric_name: str, value: Any) -> None:
        """Set a metric of a kernel to `value` (any JSON value; numbers are aggregated)."""
        field = self._field(kernel_name, metric_name)
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidRequest(f"metric {metric_name!r}: {value} is not a finite number")
        try:
            encoded = json.dumps(value, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidRequest(f"metric {metric_name!r}: value is not JSON-serializable: {exc}") from None
        if len(encoded) > MAX_VALUE_BYTES:
            raise InvalidRequest(f"metric {metric_name!r}: value exceeds {MAX_VALUE_BYTES} bytes as JSON")
        # not a transaction: the type first, so an export (which reads the values, then the
        # types) never sees a value without its type
        with map_redis_errors(), self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(self._types, metric_name, GAUGE)
            pipe.hset(self._values, field, encoded)
            pipe.zadd(self._kernels, {kernel_name: time.time()})
            pipe.execute()

    def increment(self, kernel_name: str, metric_name: str, amount: int = 1) -> None:
        """Add `amount` to a numeric metric (missing counts as 0), atomically across processes."""
        field = self._field(kernel_name, metric_name)
        if not _is_number(amount):
            raise InvalidRequest(f"increment amount must be a finite number, got {amount!r}")
        try:
            with map_redis_errors():
                metric_increment(
                    self._keys,
                    self.cluster_name,
                    field=field,
                    kernel=kernel_name,
                    metric=metric_name,
                    amount=repr(amount),
                    now_s=f"{time.time():.6f}",
                ).run_sync(self.redis)
        except RedisError as exc:
            if not redis_said(exc, "NOTNUM"):
                raise
            raise InvalidRequest(
                f"metric {metric_name!r} of {kernel_name!r} holds a non-numeric value"
            ) from None

    def reset(self) -> None:
        """Forget every metric of this cluster (for every process sharing it)."""
        with map_redis_errors():
            self.redis.delete(self._values, self._kernels, self._types)

    # ------------------------------------------------------------ reading
    def get(self, kernel_name: str, metric_name: str) -> Any | None:
        """The metric's value, or None when it was never recorded."""
        with map_redis_errors():
            raw = cast(str | None, self.redis.hget(self._values, self._field(kernel_name, metric_name)))
        return None if raw is None else json.loads(raw)

    def aggregate(self, metric_name: str) -> Any:
        """Sum of the metric's numeric values over every kernel (0 when none)."""
        values = self._numbers(metric_name)
        return sum(values) if values else 0

    def average(self, metric_name: str) -> float:
        """Mean of the metric's numeric values over the kernels that have it (0.0 when none)."""
        values = self._numbers(metric_name)
        return sum(values) / len(values) if values else 0.0

    def get_snapshot(self, kernel_name: str) -> KernelMetricsSnapshot:
        """Every metric of one kernel, now."""
        self._field(kernel_name, "x")
        prefix = f"{kernel_name}/"
        metrics = {f[len(prefix) :]: v for f, v in self._all().items() if f.startswith(prefix)}
        return KernelMetricsSnapshot(kernel_name=kernel_name, timestamp=time.time(), metrics=metrics)

    def get_cluster_summary(self) -> ClusterMetrics:
        """Kernel count, total dispatches and errors, average latency, cpu and memory."""
        values = self._all()
        with map_redis_errors():
            kernel_count = cast(int, self.redis.zcard(self._kernels))

        def numbers(metric: str) -> list[float]:
            suffix = f"/{metric}"
            return [v for f, v in values.items() if f.endswith(suffix) and _is_number(v)]

        def mean(metric: str) -> float:
            xs = numbers(metric)
            return round(sum(xs) / len(xs), 6) if xs else 0.0

        return ClusterMetrics(
            cluster_name=self.cluster_name,
            kernel_count=kernel_count,
            total_dispatches=int(sum(numbers("dispatches"))),
            total_errors=int(sum(numbers("errors"))),
            avg_latency_ms=mean("latency_ms"),
            avg_cpu=mean("cpu"),
            avg_memory=mean("memory"),
        )

    def export_prometheus(self) -> str:
        """Prometheus text exposition: `kernel_{metric}{cluster,kernel}` per numeric metric.

        Counters get `_total`; a metric named `*_ms` is exported in seconds (`*_seconds`);
        non-numeric values are left out. `promtool check metrics` accepts the output."""
        # not a transaction: the values, then the types (written first), so each value's type
        # is there
        with map_redis_errors(), self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self._values)
            pipe.hgetall(self._types)
            raw, types = pipe.execute()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Export(self.cluster_name, raw, types))
        return generate_latest(registry).decode()

    # ------------------------------------------------------------ lifecycle
    def close(self) -> None:
        if self._own:
            self.redis.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------ helpers
    def _field(self, kernel_name: str, metric_name: str) -> str:
        validate_name(kernel_name, "kernel name")
        if not isinstance(metric_name, str) or not _METRIC_NAME.fullmatch(metric_name):
            raise InvalidRequest(
                f"invalid metric name {metric_name!r}: use 1-64 lowercase letters, digits and '_', "
                "starting with a letter"
            )
        if metric_name.endswith(_RESERVED_SUFFIXES):
            raise InvalidRequest(f"invalid metric name {metric_name!r}: Prometheus reserves its suffix")
        return f"{kernel_name}/{metric_name}"

    def _all(self) -> dict[str, Any]:
        with map_redis_errors():
            raw = cast(dict[str, str], self.redis.hgetall(self._values))
        return {f: json.loads(v) for f, v in raw.items()}

    def _numbers(self, metric_name: str) -> list[float]:
        self._field("k", metric_name)
        suffix = f"/{metric_name}"
        return [v for f, v in self._all().items() if f.endswith(suffix) and _is_number(v)]


class _Export(Collector):
    """One-shot collector over a read of the collector's hashes."""

    def __init__(self, cluster: str, raw: dict[str, str], types: dict[str, str]) -> None:
        self.cluster, self.raw, self.types = cluster, raw, types

    def collect(self) -> list[Metric]:
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
        for field in sorted(self.raw, key=lambda f: (f.partition("/")[2], f)):
            kernel, _, metric = field.partition("/")
            value = json.loads(self.raw[field])
            if not _is_number(value):
                continue
            name, scale = f"kernel_{metric}", 1.0
            if metric.endswith("_ms"):
                name, scale = f"kernel_{metric[:-3]}_seconds", 0.001
            counter = self.types.get(metric) == COUNTER
            family = families.get(name)
            if family is None:
                doc = f"kernel metric {metric!r} recorded with ClusterMetricsCollector"
                family = (CounterMetricFamily if counter else GaugeMetricFamily)(
                    name, doc, labels=("cluster", "kernel")
                )
                families[name] = family
            family.add_metric((self.cluster, kernel), float(value) * scale)
        return list(families.values())
