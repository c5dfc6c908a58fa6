"""Every kcp metric family, built from one `Snapshot` and the reliability counters.

The names, types and labels docs/observability.md lists; `KcpCollector` (core.py) reads the
snapshot and yields these.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)

from controlplane.protocol import stats
from controlplane.protocol.models import ClusterStatus, KernelState, RoutingStrategy
from controlplane.redis.snapshot import ClusterView, KernelView, Snapshot

#: A reliability-hash field exported as a counter of its own.
_FIELD = re.compile(r"^[a-z][a-z0-9_]{0,62}_total$")

#: The `strategy` label values read from the stats hash: every strategy and `pinned`; whatever
#: else it holds is `unknown` (`_by_strategy`), so the label set stays bounded.
STRATEGY_LABELS = (*(s.value for s in RoutingStrategy), stats.PINNED)


def _by_strategy(s: Mapping[str, float]) -> dict[str, tuple[float, float]]:
    """(dispatches, errors) per strategy label; what the per-strategy fields of STRATEGY_LABELS
    do not explain (job hashes without a strategy, or with a name that is none) is `unknown`, so
    the labels sum to the totals."""
    out = {
        label: (
            s[stats.by_strategy(stats.DISPATCHES, label)],
            s.get(stats.by_strategy(stats.ERRORS, label), 0.0),
        )
        for label in STRATEGY_LABELS
        if stats.by_strategy(stats.DISPATCHES, label) in s
    }
    rest = s.get(stats.DISPATCHES, 0.0) - sum(d for d, _ in out.values())
    rest_errors = s.get(stats.ERRORS, 0.0) - sum(e for _, e in out.values())
    if rest > 0 or rest_errors > 0:
        out["unknown"] = (max(rest, 0.0), max(rest_errors, 0.0))
    return out


def _histogram(name: str, doc: str, labels: tuple[str, ...]) -> HistogramMetricFamily:
    """A histogram in seconds; its buckets come from the stats hash fields (`stats.BUCKETS`)."""
    return HistogramMetricFamily(name, doc, labels=labels)


def _add_histogram(
    family: HistogramMetricFamily,
    values: list[str],
    counters: Mapping[str, float],
    which: str,
    sum_field: str,
) -> None:
    buckets = stats.histogram(counters, which)
    family.add_metric(
        values,
        [(_le(upper), count) for upper, count in buckets],
        sum_value=counters.get(sum_field, 0.0) / 1000,
    )


def _le(upper: float) -> str:
    return "+Inf" if upper == float("inf") else repr(upper)


class Families:
    """Every kcp family, built from one snapshot and the reliability counters."""

    def __init__(self, lease_ttl: float) -> None:
        self.lease_ttl = lease_ttl

    def collect(
        self, snap: Snapshot, reliability: Mapping[str, float], rejections: Mapping[str, float]
    ) -> Iterable[Metric]:
        yield from self._clusters(snap.clusters)
        yield from self._kernels(snap)
        yield from self._agents(snap)
        yield from self._reliability(reliability)
        yield _rejections(rejections)

    def _clusters(self, clusters: list[ClusterView]) -> Iterable[Metric]:
        c = ("cluster",)
        desired = GaugeMetricFamily("kcp_cluster_desired_kernels", "kernels the cluster should run", labels=c)
        running = GaugeMetricFamily("kcp_cluster_running_kernels", "kernels in state running", labels=c)
        status = GaugeMetricFamily(
            "kcp_cluster_status", "1 for the cluster's current status", labels=(*c, "status")
        )
        orphans = GaugeMetricFamily(
            "kcp_cluster_orphaned_jobs", "jobs of lost kernels waiting for a running kernel", labels=c
        )
        dispatches = CounterMetricFamily(
            "kcp_cluster_dispatches",
            "jobs finished by the cluster's kernels, by the strategy that routed them",
            labels=(*c, "strategy", "outcome"),
        )
        latency = _histogram(
            "kcp_cluster_dispatch_latency_seconds", "enqueue to finish (queue wait + execution)", c
        )
        queue = _histogram("kcp_cluster_queue_wait_seconds", "enqueue to claim by a kernel", c)
        events = {
            stats.RETRIES: CounterMetricFamily(
                "kcp_dispatch_retries", "client attempts after the first one", labels=c
            ),
            stats.FAILOVERS: CounterMetricFamily(
                "kcp_dispatch_failovers", "retries that went to another kernel", labels=c
            ),
            stats.JOBS_REQUEUED: CounterMetricFamily(
                "kcp_jobs_requeued", "jobs of lost kernels handed to a running kernel", labels=c
            ),
            stats.KERNELS_LOST: CounterMetricFamily(
                "kcp_kernels_lost", "kernels removed because their agent's lease expired", labels=c
            ),
            stats.EJECTIONS: CounterMetricFamily(
                "kcp_kernel_ejections", "kernels taken out of routing for failing", labels=c
            ),
            stats.STEALS: CounterMetricFamily(
                "kcp_jobs_stolen", "queued jobs an idle kernel took over from a busy sibling", labels=c
            ),
        }
        scaling = CounterMetricFamily(
            "kcp_scaling_events", "changes of the desired kernel count", labels=(*c, "direction")
        )
        for view in clusters:
            name, s = view.record.name, view.stats
            desired.add_metric([name], view.record.desired)
            running.add_metric([name], view.running)
            for st in ClusterStatus:
                status.add_metric([name, st.value], float(view.record.status is st))
            orphans.add_metric([name], view.orphans)
            for strategy, (total, errors) in _by_strategy(s).items():
                dispatches.add_metric([name, strategy, "ok"], max(total - errors, 0.0))
                dispatches.add_metric([name, strategy, "error"], errors)
            _add_histogram(latency, [name], s, stats.LATENCY, stats.LATENCY_MS_SUM)
            _add_histogram(queue, [name], s, stats.QUEUE, stats.QUEUE_MS_SUM)
            for field, family in events.items():
                family.add_metric([name], s.get(field, 0.0))
            scaling.add_metric([name, "up"], s.get(stats.SCALE_UP, 0.0))
            scaling.add_metric([name, "down"], s.get(stats.SCALE_DOWN, 0.0))
        yield from (desired, running, status, orphans, dispatches, latency, queue, *events.values(), scaling)

    def _kernels(self, snap: Snapshot) -> Iterable[Metric]:
        k = ("cluster", "kernel")
        up = GaugeMetricFamily(
            "kcp_kernel_up", "1 if running or draining with its process and agent leases alive", labels=k
        )
        info = GaugeMetricFamily("kcp_kernel_info", "where the kernel runs", labels=(*k, "agent", "host"))
        state = GaugeMetricFamily(
            "kcp_kernel_state", "1 for the kernel's current state", labels=(*k, "state")
        )
        cpu = GaugeMetricFamily(
            "kcp_kernel_cpu_ratio", "cpu of the kernel process, fraction of one core", labels=k
        )
        mem = GaugeMetricFamily(
            "kcp_kernel_memory_ratio", "rss of the kernel process, fraction of host RAM", labels=k
        )
        rss = GaugeMetricFamily(
            "kcp_kernel_memory_bytes", "rss of the kernel process", labels=k, unit="bytes"
        )
        restarts = CounterMetricFamily(
            "kcp_kernel_restarts",
            "times the kernel's agent restarted its process since it was placed (crash loops)",
            labels=k,
        )
        queued = GaugeMetricFamily("kcp_kernel_queue_depth", "jobs waiting in the kernel's queue", labels=k)
        inflight = GaugeMetricFamily(
            "kcp_kernel_inflight_jobs", "jobs routed to the kernel, not finished", labels=k
        )
        age = GaugeMetricFamily(
            "kcp_kernel_load_age_seconds",
            "age of the kernel's load record (rewritten at least every load_refresh)",
            labels=k,
        )
        dispatches = CounterMetricFamily(
            "kcp_kernel_dispatches", "jobs the kernel finished", labels=(*k, "outcome")
        )
        latency = _histogram("kcp_kernel_dispatch_latency_seconds", "enqueue to finish, per kernel", k)
        queue = _histogram("kcp_kernel_queue_wait_seconds", "enqueue to claim, per kernel", k)
        for cluster, view in snap.kernels():
            r, labels = view.record, [cluster.record.name, view.record.name]
            up.add_metric(labels, float(view.up))
            restarts.add_metric(labels, float(r.restarts))
            info.add_metric([*labels, r.agent, r.host], 1.0)
            for st in KernelState:
                state.add_metric([*labels, st.value], float(r.state is st))
            queued.add_metric(labels, view.queued)
            inflight.add_metric(labels, view.inflight)
            if view.load is not None:
                cpu.add_metric(labels, view.load.cpu)
                mem.add_metric(labels, view.load.memory)
                age.add_metric(labels, max(snap.taken_at - view.load.updated_at, 0.0))
            if view.memory_bytes is not None:
                rss.add_metric(labels, float(view.memory_bytes))
            _add_dispatches(dispatches, labels, view)
            _add_histogram(latency, labels, view.stats, stats.LATENCY, stats.LATENCY_MS_SUM)
            _add_histogram(queue, labels, view.stats, stats.QUEUE, stats.QUEUE_MS_SUM)
        for cluster in snap.clusters:  # lost to a lapsed lease: down, its report ageing, until retention
            for gone in cluster.lapsed:
                labels = [cluster.record.name, gone.name]
                up.add_metric(labels, 0.0)
                info.add_metric([*labels, gone.record.agent, gone.record.host], 1.0)
                age.add_metric(labels, max(snap.taken_at - gone.record.last_seen, 0.0))
        families = (
            up,
            info,
            state,
            cpu,
            mem,
            rss,
            queued,
            inflight,
            age,
            restarts,
            dispatches,
            latency,
            queue,
        )
        yield from families

    def _agents(self, snap: Snapshot) -> Iterable[Metric]:
        a = ("agent",)
        up = GaugeMetricFamily("kcp_agent_up", "1 while the agent's lease is alive", labels=a)
        slots = GaugeMetricFamily("kcp_agent_slots", "kernels the agent may host", labels=a)
        kernels = GaugeMetricFamily("kcp_agent_kernels", "kernels placed on the agent", labels=a)
        lag = GaugeMetricFamily(
            "kcp_agent_heartbeat_lag_seconds", "time since the agent last renewed its lease", labels=a
        )
        placed: dict[str, int] = {}
        for _, view in snap.kernels():
            placed[view.record.agent] = placed.get(view.record.agent, 0) + 1
        for agent in snap.agents:
            name = agent.record.name
            up.add_metric([name], float(agent.alive))
            slots.add_metric([name], agent.record.slots)
            kernels.add_metric([name], placed.get(name, 0))
            if agent.alive:
                lag.add_metric([name], max(self.lease_ttl - agent.lease_ms / 1000, 0.0))
            elif agent.last_beat is not None:
                lag.add_metric([name], max(snap.taken_at - agent.last_beat, 0.0))
        for gone in snap.lapsed_agents:  # forgotten by the leader: still down until the retention
            up.add_metric([gone.name], 0.0)
            slots.add_metric([gone.name], gone.record.slots)
            kernels.add_metric([gone.name], 0)
            lag.add_metric([gone.name], max(snap.taken_at - gone.record.last_seen, 0.0))
        yield from (up, slots, kernels, lag)

    def _reliability(self, fields: Mapping[str, float]) -> Iterable[Metric]:
        """The failure detector's global counters (`keys.reliability`): `*_total` fields as-is, the
        known ones (`stats.RELIABILITY_COUNTERS`) at 0 before their first event."""
        for field in sorted({*stats.RELIABILITY_COUNTERS, *fields}):
            if _FIELD.fullmatch(field):
                name = f"kcp_{field[: -len('_total')]}"
                family = CounterMetricFamily(name, f"failure handling: {field} (reliability hash)")
                family.add_metric([], fields.get(field, 0.0))
                yield family
        detection = SummaryMetricFamily(
            "kcp_failure_detection_seconds", "agent death to detection by the control plane"
        )
        detection.add_metric(
            [], int(fields.get(stats.DETECTION_COUNT, 0)), fields.get(stats.DETECTION_MS_SUM, 0.0) / 1000
        )
        yield detection


def _rejections(fields: Mapping[str, float]) -> Metric:
    """Dispatches clients refused before enqueueing, by reason (`stats.REJECTIONS`; others are
    left out so the label stays bounded)."""
    family = CounterMetricFamily(
        "kcp_dispatch_rejected",
        "dispatches a client refused before enqueueing, by reason",
        labels=("reason",),
    )
    for reason in stats.REJECTIONS:
        family.add_metric([reason], fields.get(reason, 0.0))
    return family


def _add_dispatches(family: CounterMetricFamily, labels: list[str], view: KernelView) -> None:
    total, errors = view.stats.get(stats.DISPATCHES, 0.0), view.stats.get(stats.ERRORS, 0.0)
    family.add_metric([*labels, "ok"], max(total - errors, 0.0))
    family.add_metric([*labels, "error"], errors)
