"""Bus statistics read from Redis (so they cover every process), in two pipelined round trips."""

from __future__ import annotations

from typing import Any

from controlplane.bus.consumer import INBOX
from controlplane.protocol.keys import Keys
from controlplane.protocol.models import BusTopic
from controlplane.redis.connect import SyncRedis


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def read_stats(client: SyncRedis, keys: Keys) -> dict[str, Any]:
    """The spec's ``registered_kernels`` and ``subscriptions``, plus live kernels, pending entries,
    dead letters, gaps (entries the hard cap removed before a subscriber read them) and stream lengths."""
    topics = [t.value for t in BusTopic]
    pipe = client.pipeline(transaction=False)
    pipe.hkeys(keys.bus_kernels())
    pipe.hgetall(keys.bus_stats())
    pipe.xlen(keys.bus_dead())
    for topic in topics:
        pipe.scard(keys.bus_subscribers(topic))
        pipe.xlen(keys.bus_topic(topic))
        pipe.xinfo_groups(keys.bus_topic(topic))
    first = pipe.execute(raise_on_error=False)
    for result in first[:3]:
        if isinstance(result, Exception):
            raise result
    kernels: list[str] = sorted(first[0])
    counters: dict[str, str] = first[1]
    subscriptions, lengths, pending = {}, {}, {}
    for i, topic in enumerate(topics):
        scard, xlen, groups = first[3 + 3 * i : 6 + 3 * i]
        subscriptions[topic] = _int(scard)
        lengths[topic] = _int(xlen)
        pending[topic] = sum(_int(g.get("pending")) for g in groups) if isinstance(groups, list) else 0

    pipe = client.pipeline(transaction=False)
    for kernel in kernels:
        pipe.exists(keys.bus_lease(kernel))
        pipe.xpending(keys.bus_inbox(kernel), kernel)
    second = pipe.execute(raise_on_error=False) if kernels else []
    live = sum(1 for r in second[0::2] if r == 1)
    pending[INBOX] = sum(_int(r.get("pending")) for r in second[1::2] if isinstance(r, dict))

    dead = {label: _int(counters.get(f"dead:{label}")) for label in [*topics, INBOX]}
    gaps = dict.fromkeys([*topics, INBOX], 0)
    for field, value in counters.items():
        kind, _, rest = field.partition(":")
        label = rest.partition(":")[0]
        if kind == "gaps" and label in gaps and not field.endswith(":seen"):
            gaps[label] += _int(value)
    return {
        "registered_kernels": len(kernels),
        "subscriptions": subscriptions,
        "live_kernels": live,
        "kernels": kernels,
        "pending": pending,
        "dead_letters": dead,
        "dead_letter_stream_length": _int(first[2]),
        "gaps": gaps,
        "stream_length": lengths,
    }
