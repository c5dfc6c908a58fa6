# (redis-py 5 types every asyncio command as `Awaitable[T] | T`; see pyproject's mypy overrides)
"""One kernel's consumer loop: read its topic streams and inbox, run handlers, ack, retry, dead-letter.

A kernel reads every stream it listens to with one `XREADGROUP` (its group is named after it
on every topic stream and on its inbox, and so is its consumer; on a Redis Cluster, where the
streams are in several slots, one per stream: `portable.xreadgroup`). The loop:

1. drains its own pending entries first (`XREADGROUP ... 0`): what a previous incarnation read
   and never acknowledged, e.g. because it was SIGKILLed in the middle of a handler;
2. every `claim_idle / 2` seconds reclaims entries pending longer than `claim_idle` with
   `XAUTOCLAIM` (a failed handler, or a crashed consumer of another name) and retries them;
3. otherwise blocks in `XREADGROUP ... >` for new entries, `read_count` at a time.

An entry is acknowledged only after its handler returned: a batch's `XACK`s go in the same
pipeline as the next `XREADGROUP` (one round trip), and within a long batch every 50 ms.
An entry delivered more than `max_deliveries` times goes to the dead-letter stream with the last
error as its reason, and is acknowledged after it (`recovery.dead_letter`).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from types import CoroutineType
from typing import Any, Protocol

from controlplane.bus.codec import BusConfig, Fields, ReceivedMessage, decode
from controlplane.bus.recovery import StreamBatch, dead_letter, delivery_counts, unseen_gaps
from controlplane.errors import KcpError, RedisError
from controlplane.lifecycle import finish
from controlplane.protocol.keys import Keys
from controlplane.protocol.models import BusMessage, BusTopic
from controlplane.redis import portable
from controlplane.redis.connect import AsyncRedis
from controlplane.redis.errors import amap_redis_errors, redis_said
from controlplane.redis.retry import Backoff, best_effort

logger = logging.getLogger(__name__)

#: A handler gets each message; it may be a plain function or a coroutine function.
MessageHandler = Callable[[BusMessage], Awaitable[Any] | Any]
#: `kind` of an inbox stream (a topic stream's kind is its BusTopic)
INBOX = "inbox"
_MAX_REMEMBERED_ERRORS = 10_000
#: within a long batch, acknowledge what is done at least this often (seconds), so a crash
#: redelivers little
_ACK_EVERY = 0.05


class ConsumerHost(Protocol):
    """What a consumer needs from its bus."""

    config: BusConfig
    keys: Keys

    def resolve_reply(self, message: ReceivedMessage) -> None: ...

    async def reply(self, message: BusMessage, payload: dict[str, Any]) -> object: ...


class KernelConsumer:
    """Delivers one kernel's messages in this process. Created and driven by `InterKernelBus`."""

    def __init__(self, host: ConsumerHost, kernel: str) -> None:
        self.host = host
        self.kernel = kernel
        self.direct: MessageHandler | None = None
        self.topics: dict[BusTopic, MessageHandler] = {}
        self.counters: Counter[str] = Counter()
        self.task: asyncio.Task[None] | None = None
        self._redis: AsyncRedis | None = None
        self._read: asyncio.Future[Any] | None = None
        self._errors: dict[str, str] = {}
        self._last_seq: dict[str, int] = {}
        self._stopping = False
        self._changed = asyncio.Event()

    # ------------------------------------------------------------ lifecycle
    def start(self, redis: AsyncRedis) -> None:
        self._redis = redis
        self._stopping = False
        self._changed = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._run(), name=f"bus-consumer-{self.kernel}")

    def changed(self) -> None:
        """Subscriptions changed: interrupt a blocked read so the next one covers the new streams."""
        self._changed.set()
        if self._read is not None and not self._read.done():
            self._read.cancel()

    def retire(self) -> None:
        """Stop after the batch in hand (the kernel was unregistered); does not wait."""
        self.direct, self.topics, self._stopping = None, {}, True
        self.changed()

    async def stop(self, grace: float) -> None:
        """Let the batch in hand finish (its acks included) for up to `grace` seconds, then cancel."""
        self._stopping = True
        task, self.task = self.task, None
        if task is None or task.done():
            return
        self.changed()
        await finish(task, grace)

    # ------------------------------------------------------------ the loop
    def _streams(self) -> dict[str, str | BusTopic]:
        keys = self.host.keys
        out: dict[str, str | BusTopic] = {keys.bus_topic(t.value): t for t in self.topics}
        if self.direct is not None:
            out[keys.bus_inbox(self.kernel)] = INBOX
        return out

    async def _run(self) -> None:
        current = asyncio.current_task()
        assert current is not None
        drain, next_claim, backoff = True, 0.0, Backoff(0.05, 1.0)
        claim_every = self.host.config.claim_idle / 2
        acks: dict[str, list[str]] = {}  # handled, acknowledged together with the next read
        while not self._stopping:
            if current.cancelling():  # a handler swallowed our cancellation: honour it anyway
                raise asyncio.CancelledError
            streams = self._streams()
            sent, acks = acks, {}
            try:
                async with amap_redis_errors():  # Redis errors as kcp's, for the handler below
                    if not streams:
                        await self._ack(sent)
                        self._changed.clear()
                        await self._changed.wait()
                        continue
                    if drain:
                        await self._ack(sent)
                        sent = {}
                        await self._drain(streams)
                        drain = False
                    now = time.monotonic()
                    if now >= next_claim:
                        await self._ack(sent)
                        sent = {}
                        await self._claim(streams)
                        next_claim = now + claim_every
                    block = max(0.001, min(self.host.config.block, next_claim - time.monotonic()))
                    self._changed.clear()
                    self._read = asyncio.ensure_future(self._ack_and_read(streams, sent, block))
                    try:
                        response = await self._read
                    finally:
                        self._read = None
                    if response:
                        acks = await self._handle(streams, response, None, defer=True)
                    backoff.reset()
            except asyncio.CancelledError:
                if current.cancelling():
                    raise
                # the read was interrupted (subscription change, stop): whether its XACK ran is unknown
                # (acking again is harmless), and what it read is pending: drain it
                await self._ack(sent)
                drain = True
            except Exception as exc:  # Redis down, lost groups (NOGROUP), or a bug: never end the loop
                delay = backoff.next()
                if isinstance(exc, RedisError) and redis_said(exc, "NOGROUP"):
                    logger.warning(
                        "bus: %s lost a consumer group (Redis lost data?); re-creating", self.kernel
                    )
                    with contextlib.suppress(OSError):
                        async with best_effort():
                            await self._recreate_groups(streams)
                elif isinstance(exc, KcpError | OSError):
                    logger.warning("bus: %s: Redis error (%s); retrying in %.2fs", self.kernel, exc, delay)
                else:
                    logger.exception("bus: %s: unexpected error in the consumer loop", self.kernel)
                self.counters["reconnects"] += 1
                await asyncio.sleep(delay)
                drain = True
        with contextlib.suppress(OSError):
            async with best_effort():
                await self._ack(acks)

    async def _ack_and_read(
        self, streams: dict[str, str | BusTopic], acks: dict[str, list[str]], block: float
    ) -> Any:
        """XACK what was handled and XREADGROUP new entries in one round trip (one pipeline)."""
        assert self._redis is not None
        todo = {stream: ids for stream, ids in acks.items() if ids}
        response = await portable.xreadgroup(
            self._redis,
            self.kernel,
            self.kernel,
            dict.fromkeys(streams, ">"),
            count=self.host.config.read_count,
            block_ms=int(block * 1000),
            acks=todo,
        )
        self._forget(todo)
        return response

    async def _recreate_groups(self, streams: dict[str, str | BusTopic]) -> None:
        assert self._redis is not None
        for stream, kind in streams.items():
            try:  # an inbox group starts at 0 (direct messages wait for their kernel), a topic group at $
                async with amap_redis_errors():
                    await self._redis.xgroup_create(
                        stream, self.kernel, "0" if kind == INBOX else "$", mkstream=True
                    )
            except RedisError as exc:
                if not redis_said(exc, "BUSYGROUP"):
                    raise

    async def _drain(self, streams: dict[str, str | BusTopic]) -> None:
        """Re-handle this consumer's own pending entries, oldest first."""
        assert self._redis is not None
        cursors: dict[Any, Any] = dict.fromkeys(streams, "0")
        while cursors:
            response = await portable.xreadgroup(
                self._redis, self.kernel, self.kernel, cursors, count=self.host.config.read_count
            )
            cursors = {stream: entries[-1][0] for stream, entries in response or [] if entries}
            if cursors:
                await self._handle(
                    streams, response, await delivery_counts(self._redis, self.kernel, response)
                )

    async def _claim(self, streams: dict[str, str | BusTopic]) -> None:
        """Take over entries pending for longer than `claim_idle` (XAUTOCLAIM) and retry them."""
        assert self._redis is not None
        labels = {s: kind.value if isinstance(kind, BusTopic) else INBOX for s, kind in streams.items()}
        self.counters["gaps"] += await unseen_gaps(self._redis, self.host.keys, self.kernel, labels)
        idle_ms = int(self.host.config.claim_idle * 1000)
        for stream in streams:
            reply = await self._redis.xautoclaim(
                stream, self.kernel, self.kernel, idle_ms, "0-0", count=self.host.config.read_count
            )
            entries, deleted = reply[1], reply[2] if len(reply) > 2 else []
            if deleted:  # trimmed away while pending (Redis drops them from the PEL itself)
                self.counters["lost"] += len(deleted)
                logger.warning(
                    "bus: %s: %d pending entries of %s were trimmed", self.kernel, len(deleted), stream
                )
            if entries:
                self.counters["reclaimed"] += len(entries)
                response: StreamBatch = [(stream, entries)]
                await self._handle(
                    streams, response, await delivery_counts(self._redis, self.kernel, response)
                )

    # ------------------------------------------------------------ handling
    async def _handle(
        self,
        streams: dict[str, str | BusTopic],
        response: StreamBatch,
        deliveries: dict[str, int] | None,
        *,
        defer: bool = False,
    ) -> dict[str, list[str]]:
        """Run the handlers; acknowledge what they handled (or, with `defer`, return it to ack later)."""
        max_deliveries = self.host.config.max_deliveries
        acks: dict[str, list[str]] = {}
        flushed, seen = time.monotonic(), 0
        for stream, entries in response:
            kind = streams.get(stream)
            if kind is None:
                continue
            handler = self.direct if kind == INBOX else self.topics.get(kind)  # type: ignore[call-overload]
            done = acks.setdefault(stream, [])
            for entry_id, fields in entries:
                seen += 1
                if seen % 64 == 0 and time.monotonic() - flushed > _ACK_EVERY:  # slow handlers: ack as we go
                    await self._ack(acks)
                    acks, flushed = {}, time.monotonic()
                    done = acks.setdefault(stream, [])
                count = deliveries.get(entry_id, 1) if deliveries is not None else 1
                if not fields:  # deleted (trimmed) while pending
                    self.counters["lost"] += 1
                    done.append(entry_id)
                    continue
                if count > max_deliveries:
                    reason = self._errors.pop(
                        entry_id, "not acknowledged (handler failed or its process died)"
                    )
                    await self._dead_letter(stream, kind, entry_id, fields, count, reason)
                    continue
                try:
                    message = decode(entry_id, fields, count)
                except ValueError as exc:
                    await self._dead_letter(stream, kind, entry_id, fields, count, str(exc))
                    continue
                if deliveries is None:
                    self._check_seq(stream, message.seq)
                if await self._deliver(kind, handler, message):
                    done.append(entry_id)
        if defer:
            return acks
        await self._ack(acks)
        return {}

    async def _deliver(
        self, kind: str | BusTopic, handler: MessageHandler | None, message: ReceivedMessage
    ) -> bool:
        """Run the handler; True when the entry may be acknowledged."""
        if kind == INBOX:
            if message.kind == "reply":
                self.host.resolve_reply(message)
                return True
            if message.deadline is not None and message.deadline < time.time():
                self.counters["expired"] += 1
                return True
        elif message.from_kernel == self.kernel:
            return True  # a publisher does not receive its own topic messages
        if handler is None:
            return False
        try:
            result = handler(message)
            if type(result) is CoroutineType or inspect.isawaitable(result):
                result = await result
        except Exception as exc:
            self.counters["failed"] += 1
            if len(self._errors) >= _MAX_REMEMBERED_ERRORS:
                self._errors.clear()
            self._errors[message.id] = f"{type(exc).__name__}: {exc}"[:1000]
            logger.warning(
                "bus: %s: handler failed on %s (delivery %d): %r",
                self.kernel,
                message.id,
                message.deliveries,
                exc,
            )
            return False
        self.counters["handled"] += 1
        if message.is_request and isinstance(result, dict):
            await self.host.reply(message, result)
        return True

    def _check_seq(self, stream: str, seq: int) -> None:
        last = self._last_seq.get(stream)
        if last is not None and seq > last + 1:  # counted from Redis by `recovery.unseen_gaps`
            logger.warning(
                "bus: %s: sequence of %s jumps from %d to %d: %d entries were removed before it read them",
                self.kernel,
                stream,
                last,
                seq,
                seq - last - 1,
            )
        self._last_seq[stream] = seq

    async def _ack(self, acks: dict[str, list[str]]) -> None:
        assert self._redis is not None
        todo = {stream: ids for stream, ids in acks.items() if ids}
        if not todo:
            return
        pipe = self._redis.pipeline(transaction=False)
        for stream, ids in todo.items():
            pipe.xack(stream, self.kernel, *ids)
        await pipe.execute()
        self._forget(todo)

    def _forget(self, acked: dict[str, list[str]]) -> None:
        if self._errors:
            for ids in acked.values():
                for entry_id in ids:
                    self._errors.pop(entry_id, None)

    async def _dead_letter(
        self, stream: str, kind: str | BusTopic, entry_id: str, fields: Fields, count: int, reason: str
    ) -> None:
        assert self._redis is not None
        label = kind.value if isinstance(kind, BusTopic) else INBOX
        await dead_letter(
            self._redis,
            self.host.keys,
            self.host.config,
            group=self.kernel,
            stream=stream,
            label=label,
            entry_id=entry_id,
            fields=fields,
            deliveries=count,
            reason=reason,
        )
        self.counters["dead"] += 1
