"""The consumer's slow paths: delivery counts, dead letters, and gaps left by the hard cap.

Plain functions over a Redis client, so the delivery loop (`consumer.py`) stays about the hot path.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from controlplane.bus.codec import BusConfig, Fields, as_dict
from controlplane.protocol.keys import Keys
from controlplane.redis.connect import AsyncRedis

logger = logging.getLogger(__name__)

#: [(stream, [[entry id, fields or None], ...]), ...] as XREADGROUP/XAUTOCLAIM return them
StreamBatch = list[tuple[str, list[Any]]]


async def delivery_counts(redis: AsyncRedis, group: str, response: StreamBatch) -> dict[str, int]:
    """How often each entry in `response` was delivered (XPENDING), by entry id."""
    pipe = redis.pipeline(transaction=False)
    for stream, entries in response:
        if entries:
            pipe.xpending_range(stream, group, entries[0][0], entries[-1][0], len(entries))
    counts: dict[str, int] = {}
    for rows in await pipe.execute():
        for row in rows:
            counts[row["message_id"]] = row["times_delivered"]
    return counts


async def dead_letter(
    redis: AsyncRedis,
    keys: Keys,
    config: BusConfig,
    *,
    group: str,
    stream: str,
    label: str,
    entry_id: str,
    fields: Fields,
    deliveries: int,
    reason: str,
) -> None:
    """Move an entry to the dead-letter stream, with why, and acknowledge it."""
    record = {
        **as_dict(fields),
        "stream": stream,
        "group": group,
        "entry_id": entry_id,
        "deliveries": str(deliveries),
        "reason": reason,
        "dead_at": repr(time.time()),
    }
    # not a transaction (the streams are in several slots): dead-lettered first, then acked, so
    # a cut-short call dead-letters the entry again at worst, never loses it
    pipe = redis.pipeline(transaction=False)
    pipe.xadd(keys.bus_dead(), record, maxlen=config.dead_max_len, approximate=True)  # type: ignore[arg-type]
    pipe.xack(stream, group, entry_id)
    pipe.hincrby(keys.bus_stats(), f"dead:{label}", 1)
    await pipe.execute()
    logger.warning(
        "bus: %s: %s of %s dead-lettered after %d deliveries: %s", group, entry_id, stream, deliveries, reason
    )


async def unseen_gaps(redis: AsyncRedis, keys: Keys, group: str, streams: dict[str, str]) -> int:
    """Entries the hard cap removed before `group` read them and that it was not told about yet;
    `streams`: each stream the group reads, with its label (topic name, or "inbox").

    `bus_trim.lua` counts them in `gaps:{label}:{group}` of the stream's `bus_gaps` hash (also
    while the kernel is down); this logs the news and marks it seen in `gaps:{label}:{group}:seen`.
    Returns how many were new."""
    pipe = redis.pipeline(transaction=False)
    for stream, label in streams.items():
        field = f"gaps:{label}:{group}"
        pipe.hmget(keys.bus_gaps(stream), [field, f"{field}:seen"])
    new = 0
    for (stream, label), (total, seen) in zip(streams.items(), await pipe.execute(), strict=True):
        lost = int(total or 0) - int(seen or 0)
        if lost > 0:
            new += lost
            logger.warning("bus: %s lost %d unread %s entries to the hard cap (max_len)", group, lost, label)
            await redis.hset(keys.bus_gaps(stream), f"gaps:{label}:{group}:seen", str(total))
    return new
