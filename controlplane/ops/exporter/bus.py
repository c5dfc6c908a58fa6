"""Prometheus families of the inter-kernel bus, read from Redis at scrape time.

The bus's own `read_stats` (controlplane/bus/stats.py, also behind `InterKernelBus.get_stats`)
gives subscriptions, pending entries, dead letters and gaps; this module adds what was
published (each stream's sequence counter) and delivered (the consumer groups'
`entries-read`, Redis >= 7) and turns it all into families labelled by topic (`events`,
`metrics`, `control`, `data`, and `inbox` for direct messages, summed over kernels).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from controlplane.bus.stats import read_stats
from controlplane.protocol.keys import Keys
from controlplane.protocol.models import BusTopic
from controlplane.redis.connect import SyncRedis

logger = logging.getLogger(__name__)

INBOX = "inbox"  # the label of direct messages (kernel inboxes), as in bus.get_stats()


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _published_and_delivered(client: SyncRedis, keys: Keys, kernels: list[str]) -> tuple[dict[str, int], ...]:
    topics = [t.value for t in BusTopic]
    streams = [(t, keys.bus_topic(t)) for t in topics] + [(INBOX, keys.bus_inbox(k)) for k in kernels]
    pipe = client.pipeline(transaction=False)
    for _, stream in streams:
        pipe.get(keys.bus_seq(stream))
        pipe.xinfo_groups(stream)
    rows = pipe.execute(raise_on_error=False)
    published = dict.fromkeys([*topics, INBOX], 0)
    delivered = dict.fromkeys([*topics, INBOX], 0)
    for i, (label, _) in enumerate(streams):
        seq, groups = rows[2 * i], rows[2 * i + 1]
        published[label] += 0 if isinstance(seq, Exception) else _int(seq)
        if isinstance(groups, list):  # an error: the stream does not exist (nothing delivered)
            delivered[label] += sum(_int(g.get("entries-read")) for g in groups)
    return published, delivered


def bus_families(client: SyncRedis, keys: Keys) -> Iterable[Metric]:
    """Every bus family; raises redis errors (the caller logs them and leaves the bus out)."""
    stats = read_stats(client, keys)
    published, delivered = _published_and_delivered(client, keys, list(stats.get("kernels", [])))
    t = ("topic",)
    families: list[tuple[Any, str, str, dict[str, int]]] = [
        (
            CounterMetricFamily,
            "kcp_bus_published",
            "messages published (stream sequence counters)",
            published,
        ),
        (
            CounterMetricFamily,
            "kcp_bus_delivered",
            "messages read by subscriber groups (entries-read, Redis >= 7; one per subscriber)",
            delivered,
        ),
        (
            GaugeMetricFamily,
            "kcp_bus_pending_messages",
            "delivered to a subscriber, not acknowledged yet",
            stats.get("pending", {}),
        ),
        (
            CounterMetricFamily,
            "kcp_bus_dead_lettered",
            "messages given up after too many deliveries",
            stats.get("dead_letters", {}),
        ),
        (
            CounterMetricFamily,
            "kcp_bus_gaps",
            "messages trimmed before a subscriber read them",
            stats.get("gaps", {}),
        ),
        (
            GaugeMetricFamily,
            "kcp_bus_subscriptions",
            "kernels subscribed to the topic",
            stats.get("subscriptions", {}),
        ),
        (
            GaugeMetricFamily,
            "kcp_bus_stream_length",
            "entries kept in the topic's stream",
            stats.get("stream_length", {}),
        ),
    ]
    for kind, name, doc, values in families:
        family = kind(name, doc, labels=t)
        for topic, value in sorted(values.items()):
            family.add_metric([topic], float(_int(value)))
        yield family
    kernels = GaugeMetricFamily(
        "kcp_bus_kernels",
        "kernels registered on the bus: live (lease renewed) or stale (lease lapsed); they sum to all",
        labels=("state",),
    )
    registered, live = _int(stats.get("registered_kernels")), _int(stats.get("live_kernels"))
    kernels.add_metric(["live"], float(live))
    kernels.add_metric(["stale"], float(max(registered - live, 0)))
    yield kernels
