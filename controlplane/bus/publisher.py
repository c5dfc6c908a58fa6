"""Appending to bus streams: batched `bus_publish.lua` calls, and trimming with `bus_trim.lua`.

`publish()` callers that overlap share round trips: a call that finds another append in flight
queues its encoded message and awaits a future; one flush task sends everything queued for a
stream in batches of up to `publish_batch` messages per script call and resolves each caller's
future with its own id and sequence number (or the error). A call with nothing else in flight
appends at once (no task hop: latency). A caller is answered only after Redis appended its message.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from controlplane.bus.codec import BusConfig, Published
from controlplane.errors import InvalidRequest, KcpError
from controlplane.protocol.keys import Keys
from controlplane.redis.connect import AsyncRedis
from controlplane.redis.errors import amap_redis_errors
from controlplane.redis.scripts.bus import Appended, bus_publish, bus_trim

logger = logging.getLogger(__name__)

Argv = bytes  # one encoded message (`codec.encode`)


class StreamWriter:
    """Appends encoded messages (`codec.encode`) to bus streams and trims them as they grow."""

    def __init__(self, redis: AsyncRedis, keys: Keys, config: BusConfig) -> None:
        self.redis = redis
        self.keys = keys
        self.config = config
        self._queued: dict[tuple[str, str, str], list[tuple[Argv, asyncio.Future[Published]]]] = {}
        self._flusher: asyncio.Task[None] | None = None
        self._since_trim: dict[str, int] = {}
        self._inline: asyncio.Future[None] | None = None  # the lone publish in flight, if any

    async def append(
        self, stream: str, topic: str, messages: Sequence[Argv], *, target: str = ""
    ) -> list[Published]:
        """Append `messages` to `stream` now, in order; with `target`, only if that kernel is registered."""
        out: list[Published] = []
        step = self.config.publish_batch
        for start in range(0, len(messages), step):
            chunk = messages[start : start + step]
            batch = b"[" + b",".join(chunk) + b"]"
            appended = await self._publish(stream, topic, batch, target)
            if appended is None:
                raise InvalidRequest(f"kernel {target!r} is not registered on the bus")
            out += [Published(entry_id, appended.first_seq + i) for i, entry_id in enumerate(appended.ids)]
        await self._count(stream, "inbox" if target else topic, len(messages))
        return out

    async def _publish(self, stream: str, topic: str, batch: bytes, target: str) -> Appended | None:
        """One bus_publish.lua call (a seam for tests that slow it down)."""
        async with amap_redis_errors():
            call = bus_publish(self.keys, stream, target=target, topic=topic, batch=batch)
            return await call.run(self.redis)

    async def publish(self, stream: str, topic: str, argv: Argv, *, target: str = "") -> Published:
        """Append one message. Alone, it goes at once; while another append is in flight it joins
        the shared batch (`submit`), so overlapping callers share round trips. Either way the
        messages reach Redis in the order of the calls."""
        if (
            self._inline is not None
            or self._queued
            or (self._flusher is not None and not self._flusher.done())
        ):
            return await self.submit(stream, topic, argv, target=target)
        self._inline = done = asyncio.get_running_loop().create_future()
        try:
            return (await self.append(stream, topic, [argv], target=target))[0]
        finally:
            self._inline = None
            done.set_result(None)

    def submit(self, stream: str, topic: str, argv: Argv, *, target: str = "") -> asyncio.Future[Published]:
        """Queue one message for the shared flush; the future resolves once Redis appended it."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Published] = loop.create_future()
        self._queued.setdefault((stream, topic, target), []).append((argv, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush(), name="bus-publish-flush")
        return future

    async def _flush(self) -> None:
        if self._inline is not None:  # the lone call before this batch goes first (call order)
            await asyncio.shield(self._inline)
        while self._queued:
            queued, self._queued = self._queued, {}
            for (stream, topic, target), items in queued.items():
                try:
                    published = await self.append(stream, topic, [argv for argv, _ in items], target=target)
                except (KcpError, OSError) as exc:
                    for _, future in items:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                except BaseException as exc:  # cancelled while flushing: nobody may wait forever
                    for _, future in items:
                        if not future.done():
                            future.set_exception(
                                exc if isinstance(exc, Exception) else KcpError("bus closed")
                            )
                    raise
                for (_, future), result in zip(items, published, strict=True):
                    if not future.done():
                        future.set_result(result)

    async def close(self) -> None:
        """Wait for queued messages to be written (or fail)."""
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)

    async def _count(self, stream: str, label: str, n: int) -> None:
        since = self._since_trim.get(stream, 0) + n
        if since < self.config.trim_every:
            self._since_trim[stream] = since
            return
        self._since_trim[stream] = 0
        try:
            await self.trim(stream, label)
        except KcpError as exc:  # the messages are in; trimming is retried after the next batch
            logger.warning("bus: trimming %s failed: %s", stream, exc)
            self._since_trim[stream] = self.config.trim_every

    async def trim(self, stream: str, label: str) -> tuple[int, int]:
        """Trim below the slowest group, then to the hard cap. Returns (removed safely, removed by cap)."""
        async with amap_redis_errors():
            trimmed = await bus_trim(
                self.keys, stream, keep=self.config.keep, cap=self.config.max_len, label=label
            ).run(self.redis)
        if trimmed.by_cap:
            logger.warning("bus: %s reached its hard cap; %d unread entries dropped", stream, trimmed.by_cap)
        return trimmed.safely, trimmed.by_cap
