"""Bus statistics read from Redis (so they cover every process), in two pipelined round trips.

Fleet-wide: the registered kernels and the dead-letter counters. Per stream (in the stream's
slot on a Redis Cluster): subscribers, lengths, groups and the hard cap's gaps, summed here."""

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
    """The spec's ``registered_kernels`` and ``subscriptions``, counting the kernels whose
    process holds their lease, plus the names of those and of the offline ones, pending entries,
    dead letters, gaps (entries the hard cap removed before a subscriber read them) and stream lengths."""
    topics = [t.value for t in BusTopic]
    pipe = client.pipeline(transaction=False)
    pipe.hkeys(keys.bus_kernels())
    pipe.hgetall(keys.bus_stats())
    pipe.xlen(keys.bus_dead())
    for topic in topics:
        pipe.smembers(keys.bus_subscribers(topic))
        pipe.xlen(keys.bus_topic(topic))
        pipe.xinfo_groups(keys.bus_topic(topic))
        pipe.hgetall(keys.bus_gaps(keys.bus_topic(topic)))
    first = pipe.execute(raise_on_error=False)
    for result in first[:3]:
        if isinstance(result, Exception):
            raise result
    registered: list[str] = sorted(first[0])
    counters: dict[str, str] = first[1]
    members, lengths, pending = {}, {}, {}
    capped: list[Any] = []  # each stream's cap counters (`bus_gaps`)
    for i, topic in enumerate(topics):
        subscribers, xlen, groups, gaps_of_topic = first[3 + 4 * i : 7 + 4 * i]
        capped.append(gaps_of_topic)
        members[topic] = set(subscribers) if isinstance(subscribers, set) else set()
        lengths[topic] = _int(xlen)
        pending[topic] = sum(_int(g.get("pending")) for g in groups) if isinstance(groups, list) else 0

    names = sorted(set(registered).union(*members.values()))
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.exists(keys.bus_lease(name))
    for kernel in registered:
        pipe.xpending(keys.bus_inbox(kernel), kernel)
    for kernel in registered:
        pipe.hgetall(keys.bus_gaps(keys.bus_inbox(kernel)))
    second = pipe.execute(raise_on_error=False) if names else []
    live = {name for name, held in zip(names, second[: len(names)], strict=True) if held == 1}
    inboxes = second[len(names) : len(names) + len(registered)]
    capped += second[len(names) + len(registered) :]
    pending[INBOX] = sum(_int(r.get("pending")) for r in inboxes if isinstance(r, dict))

    dead = {label: _int(counters.get(f"dead:{label}")) for label in [*topics, INBOX]}
    gaps = dict.fromkeys([*topics, INBOX], 0)
    for stream_counters in capped:
        for field, value in stream_counters.items() if isinstance(stream_counters, dict) else ():
            kind, _, rest = field.partition(":")
            label = rest.partition(":")[0]
            if kind == "gaps" and label in gaps and not field.endswith(":seen"):
                gaps[label] += _int(value)
    return {
        "registered_kernels": sum(k in live for k in registered),
        "subscriptions": {topic: len(members[topic] & live) for topic in topics},
        "kernels": [k for k in registered if k in live],
        "offline_kernels": [k for k in registered if k not in live],
        "pending": pending,
        "dead_letters": dead,
        "dead_letter_stream_length": _int(first[2]),
        "gaps": gaps,
        "stream_length": lengths,
    }
