"""`kcp bus publish|tail|stats`: put a message on the bus, watch a stream, read the statistics.

    kcp bus publish events '{"event": "ready"}' --from ops
    kcp bus publish data '{"key": "v"}' --to worker-1          direct message (worker-1's inbox)
    kcp bus tail metrics                                       last 10 entries, then follow
    kcp bus tail inbox:worker-1 --last 50 --no-follow
    kcp bus tail dead                                          dead letters, with their reason
    kcp bus stats

`tail` reads with XRANGE/XREAD, not with a consumer group: it never takes, delays or acknowledges
anyone's messages.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
from typing import Any

import pydantic

from controlplane.bus.codec import check_name, check_topic
from controlplane.bus.core import InterKernelBus
from controlplane.client.core import KcpClient
from controlplane.errors import InvalidRequest
from controlplane.ops.cli.output import non_negative_int, positive_int, table
from controlplane.protocol.keys import Keys
from controlplane.protocol.models import BusMessage
from controlplane.protocol.requests import explain
from controlplane.redis.connect import SyncRedis, connect_sync
from controlplane.redis.errors import map_redis_errors, where_from_url


def add_arguments(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    add = functools.partial(sub.add_parser, parents=[common])
    publish = add("publish", help="publish a message to a topic, or --to a kernel's inbox")
    publish.add_argument("topic", help="events, metrics, control or data")
    publish.add_argument("payload", help='a JSON object, e.g. {"event": "ready"}')
    publish.add_argument("--from", dest="sender", default="cli", help="from_kernel (default: cli)")
    publish.add_argument(
        "--to",
        help="a kernel registered on the bus: send to its inbox, not the topic (`kcp bus stats` lists them)",
    )
    publish.add_argument(
        "--count", type=positive_int, default=1, help="publish the message N times (one batch)"
    )
    tail = add("tail", help="print a stream's recent entries, then follow it")
    tail.add_argument("stream", help="a topic, inbox:KERNEL, or dead (the dead-letter stream)")
    tail.add_argument(
        "--last", type=non_negative_int, default=10, help="entries of history to print first (default 10)"
    )
    tail.add_argument("--no-follow", action="store_true", help="exit after the history")
    tail.add_argument(
        "--limit", type=non_negative_int, default=0, help="exit after this many followed entries"
    )
    add("stats", help="registered kernels, subscriptions, pending, dead letters, gaps (from Redis)")


def _stream_key(keys: Keys, name: str) -> str:
    if name == "dead":
        return keys.bus_dead()
    if name.startswith("inbox:"):
        return keys.bus_inbox(check_name(name.removeprefix("inbox:")))
    return keys.bus_topic(check_topic(name).value)


def _line(entry_id: str, fields: dict[str, str], as_json: bool) -> str:
    if as_json:
        return json.dumps({"id": entry_id, **fields})
    target = f"-> {fields['to']}" if "to" in fields else f"[{fields.get('topic', '?')}]"
    head = f"{entry_id}  seq={fields.get('seq', '?')}  {fields.get('from', '?')} {target}"
    if "reason" in fields:
        head += f"  DEAD after {fields.get('deliveries')} deliveries: {fields['reason']}"
    return f"{head}  {fields.get('payload', '')}"


def _tail(args: argparse.Namespace, client: SyncRedis, keys: Keys) -> int:
    stream = _stream_key(keys, args.stream)
    last_id = "$"
    if args.last > 0:
        newest_first: Any = client.xrevrange(stream, count=args.last)
        history = list(reversed(newest_first))
        for entry_id, fields in history:
            print(_line(entry_id, fields, args.json), flush=True)
        if history:
            last_id = history[-1][0]
    if args.no_follow:
        return 0
    if last_id == "$":  # XREAD with "$" repeated would skip entries added between two reads
        newest: Any = client.xrevrange(stream, count=1)
        last_id = newest[0][0] if newest else "0-0"
    shown = 0
    while not args.limit or shown < args.limit:
        batch: Any = client.xread({stream: last_id}, count=100, block=1000)
        for _, entries in batch or []:
            for entry_id, fields in entries:
                print(_line(entry_id, fields, args.json), flush=True)
                last_id = entry_id
                shown += 1
    return 0


async def _publish(args: argparse.Namespace) -> int:
    try:
        payload = json.loads(args.payload)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"payload is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise InvalidRequest("payload must be a JSON object")
    topic = check_topic(args.topic)
    if args.to is not None and "/" in args.to:
        cluster, _, kernel = args.to.partition("/")
        raise InvalidRequest(
            f"{args.to!r} names a kernel of cluster {cluster!r}: cluster kernels run syscalls and do "
            f"not listen on the bus; `kcp dispatch {cluster} --kernel {kernel} JSON` runs one there"
        )
    try:
        message = BusMessage(from_kernel=args.sender, topic=topic, payload=payload, to_kernel=args.to)
    except pydantic.ValidationError as exc:
        raise InvalidRequest(explain("invalid message", exc)) from None
    async with InterKernelBus(args.settings) as bus:
        try:
            published = await bus.publish_many([message] * args.count)
        except InvalidRequest:
            if args.to is None:
                raise
            raise InvalidRequest(await _unknown_target(args, bus, args.to)) from None
    data: dict[str, Any] = {
        "stream": f"inbox:{args.to}" if args.to else topic.value,
        "count": len(published),
        "first": {"id": published[0].id, "seq": published[0].seq},
        "last": {"id": published[-1].id, "seq": published[-1].seq},
    }
    if args.json:
        print(json.dumps(data))
    else:
        print(f"published {data['count']} to {data['stream']}: seq {published[0].seq}..{published[-1].seq}")
    return 0


async def _unknown_target(args: argparse.Namespace, bus: InterKernelBus, target: str) -> str:
    """Why `--to target` found no inbox, with the names that exist: bus kernels, and the
    clusters' kernels a person may have meant."""
    stats = bus.get_stats()
    known = ", ".join(stats["kernels"]) or "none"
    offline = (
        f"; offline (messages wait for them): {', '.join(stats['offline_kernels'])}"
        if stats["offline_kernels"]
        else ""
    )
    text = f"kernel {target!r} is not registered on the bus (bus kernels: {known}{offline})"
    async with KcpClient(args.settings) as kcp:
        holders = [c.name for c in await kcp.list_clusters() if any(k.name == target for k in c.kernels)]
    if holders:
        text += (
            f"; {target!r} is a kernel of cluster {', '.join(holders)}: cluster kernels run syscalls and "
            f"do not listen on the bus; `kcp dispatch {holders[0]} --kernel {target} JSON` runs one there"
        )
    return text


def _stats(args: argparse.Namespace) -> int:
    bus = InterKernelBus(args.settings)
    try:
        stats = bus.get_stats()
    finally:
        asyncio.run(bus.aclose())
    stats.pop("local", None)
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    topics = list(stats["subscriptions"])
    rows = [
        (
            t,
            stats["subscriptions"][t],
            stats["stream_length"][t],
            stats["pending"][t],
            stats["dead_letters"][t],
            stats["gaps"][t],
        )
        for t in topics
    ]
    rows.append(
        ("inbox", "-", "-", stats["pending"]["inbox"], stats["dead_letters"]["inbox"], stats["gaps"]["inbox"])
    )
    offline = stats["offline_kernels"]
    print(
        f"kernels: {stats['registered_kernels']} registered ({', '.join(stats['kernels']) or '-'})"
        + (
            f", {len(offline)} offline: their process is gone, messages wait ({', '.join(offline)})"
            if offline
            else ""
        )
        + "\n"
    )
    print(table(rows, ("TOPIC", "SUBSCRIBERS", "LENGTH", "PENDING", "DEAD", "GAPS")))
    return 0


def run(args: argparse.Namespace) -> int:
    """`kcp bus ...`; its errors reach `kcp`'s one report (`report_error`)."""
    keys = Keys(args.settings.prefix)
    try:
        if args.action == "publish":
            return asyncio.run(_publish(args))
        if args.action == "stats":
            return _stats(args)
        with (
            map_redis_errors(where_from_url(args.settings.redis_url)),
            connect_sync(args.settings.redis_url, timeout=None) as client,
        ):
            return _tail(args, client, keys)
    except KeyboardInterrupt:
        return 0
