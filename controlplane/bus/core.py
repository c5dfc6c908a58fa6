"""InterKernelBus: the spec's message bus, on Redis Streams, across processes and hosts.

The spec's methods keep its shapes: `register`, `unregister`, `subscribe`, `unsubscribe` and
`get_stats` are plain (synchronous) methods, `publish` and `send_direct` are coroutines. The
synchronous ones talk to Redis at once with a small blocking client, so that what they
change is in Redis when they return (a message published right after `subscribe()` is kept
for the new subscriber, and `get_stats()` in any process sees it). Delivery runs in this
process's event loop: one consumer task per kernel registered or subscribed here, started as
soon as a loop runs (`async with bus`, `await bus.start()`, or the first publish).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from typing import Any

import pydantic

from controlplane.bus.codec import BusConfig, Published, ReceivedMessage, check_name, check_topic, encode
from controlplane.bus.consumer import KernelConsumer, MessageHandler
from controlplane.bus.publisher import StreamWriter
from controlplane.bus.stats import read_stats
from controlplane.errors import DispatchTimeout, InvalidRequest, RedisUnavailable
from controlplane.protocol.keys import Keys
from controlplane.protocol.models import BusMessage, BusTopic
from controlplane.protocol.requests import explain
from controlplane.redis.connect import AsyncRedis, SyncRedis, connect, connect_sync
from controlplane.redis.errors import error_reply, map_redis_errors
from controlplane.redis.retry import Backoff, best_effort, periodically
from controlplane.settings import Settings

logger = logging.getLogger(__name__)

#: XGROUP CREATE of a group that exists; XGROUP DESTROY on a stream that does not
_TOLERATED = ("BUSYGROUP", "requires the key to exist")


def _raw_reply(response: Any, **options: Any) -> Any:
    return response


def _message(sender: str, target: str, topic: BusTopic, payload: dict[str, Any]) -> BusMessage:
    try:
        return BusMessage(from_kernel=sender, to_kernel=target, topic=topic, payload=payload)
    except pydantic.ValidationError as exc:
        raise InvalidRequest(explain("invalid message", exc)) from None


class InterKernelBus:
    """Kernel-to-kernel messages: topics fanned out to every subscriber, and direct messages.

    Settings come from `KCP_*` environment variables (`KCP_REDIS_URL`, `KCP_PREFIX`) unless
    given; `redis_url` overrides just the URL. Delivery is at-least-once: see docs/bus.md.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        config: BusConfig | None = None,
        redis_url: str | None = None,
    ) -> None:
        settings = settings or Settings()
        if redis_url is not None:
            settings = settings.model_copy(update={"redis_url": redis_url})
        self.settings = settings
        self.config = config or BusConfig()
        self.keys = Keys(settings.prefix)
        self._consumers: dict[str, KernelConsumer] = {}
        self._waiters: dict[str, asyncio.Future[ReceivedMessage]] = {}
        self._sync: SyncRedis | None = None
        self._redis: AsyncRedis | None = None
        self._writer: StreamWriter | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lease_task: asyncio.Task[None] | None = None
        self._late_replies = 0

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> InterKernelBus:
        """Connect and start delivering to the kernels registered or subscribed in this process."""
        self._ensure_started()
        return self

    async def __aenter__(self) -> InterKernelBus:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop delivering (handlers in progress get `stop_grace` seconds), flush publishes, disconnect.

        This process's kernels leave `get_stats()` at once (their leases are dropped); their
        consumer groups and inboxes stay in Redis, so a restarted process that registers the same
        kernels gets what was published meanwhile. `unregister` is how a kernel leaves for good."""
        if self._loop is asyncio.get_running_loop():
            await asyncio.gather(*(c.stop(self.config.stop_grace) for c in self._consumers.values()))
            if self._lease_task is not None:
                self._lease_task.cancel()
                await asyncio.gather(self._lease_task, return_exceptions=True)
            if self._writer is not None:
                await self._writer.close()
            if self._redis is not None:
                leases = [self.keys.bus_lease(k) for k in self._consumers]
                with contextlib.suppress(OSError):
                    async with best_effort():
                        if leases:
                            await self._redis.delete(*leases)
                await self._redis.aclose()
        self._redis, self._writer, self._loop, self._lease_task = None, None, None, None
        if self._sync is not None:
            self._sync.close()
            self._sync = None

    def _ensure_started(self) -> AsyncRedis:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._redis is None:
            self._redis = connect(self.settings.redis_url, max_connections=1024)
            # consumers take XREADGROUP replies raw (flat field lists): redis-py's dict building
            # was a quarter of a consumer's per-message cost
            self._redis.set_response_callback("XREADGROUP", _raw_reply)
            self._writer = StreamWriter(self._redis, self.keys, self.config)
            self._loop = loop
            self._lease_task = loop.create_task(self._keep_leases(), name="bus-leases")
            for consumer in self._consumers.values():
                consumer.start(self._redis)
        return self._redis

    def _maybe_start(self, consumer: KernelConsumer) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop yet: starts with the bus
        redis_ = self._ensure_started()
        if consumer.task is None or consumer.task.done():
            consumer.start(redis_)
        else:
            consumer.changed()

    async def _keep_leases(self) -> None:
        every = self.config.lease_ttl / 3
        await periodically(
            self._renew_leases,
            what="bus kernel-lease keeper",
            log=logger,
            running=lambda: True,  # until `aclose` cancels it
            every=every,
            backoff=Backoff(every, every),  # a failed renewal waits one period too
        )

    async def _renew_leases(self) -> None:
        kernels = list(self._consumers)  # registered or subscribed here
        if kernels and self._redis is not None:
            try:
                pipe = self._redis.pipeline(transaction=False)
                for kernel in kernels:
                    pipe.set(
                        self.keys.bus_lease(kernel),
                        f"{socket.gethostname()}:{os.getpid()}",
                        px=int(self.config.lease_ttl * 1000),
                    )
                await pipe.execute()
            except OSError as exc:
                raise RedisUnavailable(f"renewing kernel leases failed: {exc}") from exc

    def _client(self) -> SyncRedis:
        if self._sync is None:
            self._sync = connect_sync(self.settings.redis_url, timeout=10.0)
        return self._sync

    def _lease(self, pipe: Any, kernel: str) -> None:
        """Take `kernel`'s lease in `pipe`: it counts in `get_stats()` while this process renews it
        (with its event loop: `_keep_leases`), and for `lease_ttl` seconds after."""
        pipe.set(
            self.keys.bus_lease(kernel),
            f"{socket.gethostname()}:{os.getpid()}",
            px=int(self.config.lease_ttl * 1000),
        )

    @staticmethod
    def _check_results(results: Iterable[Any]) -> None:
        """Pipelines run with raise_on_error=False: an existing group, or a stream not there, is fine."""
        for result in results:
            if isinstance(result, Exception):
                if error_reply(result) and any(s in str(result) for s in _TOLERATED):
                    continue
                raise result

    # ------------------------------------------------------------ the spec's methods
    def register(self, kernel_name: str, handler: MessageHandler) -> None:
        """Register a kernel and the handler of its direct messages (its inbox).

        Direct messages sent while it is down wait in its inbox; registering again resumes them."""
        kernel = check_name(kernel_name)
        if not callable(handler):
            raise InvalidRequest("handler must be callable")
        record = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "registered_at": time.time()})
        with map_redis_errors():
            pipe = self._client().pipeline(transaction=False)
            pipe.xgroup_create(self.keys.bus_inbox(kernel), kernel, "0", mkstream=True)
            pipe.hset(self.keys.bus_kernels(), kernel, record)
            self._lease(pipe, kernel)
            self._check_results(pipe.execute(raise_on_error=False))
        consumer = self._consumers.setdefault(kernel, KernelConsumer(self, kernel))
        consumer.direct = handler
        self._maybe_start(consumer)

    def unregister(self, kernel_name: str) -> None:
        """Remove a kernel for good: its subscriptions, its inbox (unread direct messages too), its record."""
        kernel = check_name(kernel_name)
        consumer = self._consumers.pop(kernel, None)
        if consumer is not None:
            consumer.retire()
        with map_redis_errors():
            pipe = self._client().pipeline(transaction=False)
            for topic in BusTopic:
                pipe.srem(self.keys.bus_subscribers(topic.value), kernel)
                pipe.xgroup_destroy(self.keys.bus_topic(topic.value), kernel)
            inbox = self.keys.bus_inbox(kernel)
            # the inbox first: from its deletion on, bus_publish.lua refuses direct messages
            k = self.keys
            for key in (inbox, k.bus_seq(inbox), k.bus_gaps(inbox), k.bus_lease(kernel)):
                pipe.delete(key)  # one DEL each: a cluster pipeline takes no other kind
            pipe.hdel(self.keys.bus_kernels(), kernel)
            self._check_results(pipe.execute(raise_on_error=False))

    def subscribe(self, kernel_name: str, topic: BusTopic, handler: MessageHandler) -> None:
        """Deliver every message published to `topic` from now on to `handler` (a durable subscription).

        Subscribing again after a restart resumes where the kernel's group left off."""
        kernel, topic = check_name(kernel_name), check_topic(topic)
        if not callable(handler):
            raise InvalidRequest("handler must be callable")
        with map_redis_errors():
            pipe = self._client().pipeline(transaction=False)
            pipe.xgroup_create(self.keys.bus_topic(topic.value), kernel, "$", mkstream=True)
            pipe.sadd(self.keys.bus_subscribers(topic.value), kernel)
            self._lease(pipe, kernel)
            self._check_results(pipe.execute(raise_on_error=False))
        consumer = self._consumers.setdefault(kernel, KernelConsumer(self, kernel))
        consumer.topics[topic] = handler
        self._maybe_start(consumer)

    def unsubscribe(self, kernel_name: str, topic: BusTopic) -> None:
        """Stop delivering `topic` to the kernel; its group (and what it had not read) is removed."""
        kernel, topic = check_name(kernel_name), check_topic(topic)
        consumer = self._consumers.get(kernel)
        if consumer is not None and consumer.topics.pop(topic, None) is not None:
            consumer.changed()
        with map_redis_errors():
            pipe = self._client().pipeline(transaction=False)
            pipe.srem(self.keys.bus_subscribers(topic.value), kernel)
            pipe.xgroup_destroy(self.keys.bus_topic(topic.value), kernel)
            self._check_results(pipe.execute(raise_on_error=False))

    def _route(self, message: BusMessage) -> tuple[str, str, str]:
        """(stream, topic, target kernel or "") of a message."""
        topic = check_topic(message.topic).value
        if message.to_kernel is not None:
            target = check_name(message.to_kernel)
            return self.keys.bus_inbox(target), topic, target
        return self.keys.bus_topic(topic), topic, ""

    async def publish(self, message: BusMessage) -> Published:
        """Append a message to its topic's stream (or, with `to_kernel`, to that kernel's inbox).

        Returns once Redis has it; overlapping calls share round trips."""
        self._ensure_started()
        argv = encode(message, self.config.max_message_bytes)
        stream, topic, target = self._route(message)
        return await self._writer_().publish(stream, topic, argv, target=target)

    async def publish_many(self, messages: Iterable[BusMessage]) -> list[Published]:
        """Publish a batch in as few round trips as possible; results in the order given.

        Every message is checked before anything is written; the batch is atomic per stream
        and per `publish_batch` chunk, not as a whole."""
        self._ensure_started()
        encoded = [(m, encode(m, self.config.max_message_bytes)) for m in messages]
        groups: dict[tuple[str, str, str], list[int]] = {}
        for i, (m, _) in enumerate(encoded):
            groups.setdefault(self._route(m), []).append(i)
        out: list[Published | None] = [None] * len(encoded)
        for (stream, topic, target), indexes in groups.items():
            results = await self._writer_().append(
                stream, topic, [encoded[i][1] for i in indexes], target=target
            )
            for i, result in zip(indexes, results, strict=True):
                out[i] = result
        return [r for r in out if r is not None]

    async def send_direct(
        self, from_kernel: str, to_kernel: str, payload: dict[str, Any], *, topic: BusTopic = BusTopic.DATA
    ) -> Published:
        """Send a message to one registered kernel's inbox (InvalidRequest if it is not registered)."""
        return await self.publish(_message(from_kernel, check_name(to_kernel), topic, payload))

    async def request(
        self,
        from_kernel: str,
        to_kernel: str,
        payload: dict[str, Any],
        *,
        timeout: float = 5.0,  # noqa: ASYNC109
    ) -> ReceivedMessage:
        """Send a direct message and wait for the reply (the handler returns a dict, or calls `reply`).

        `from_kernel` must be registered in this bus (the reply comes to its inbox). The request
        carries a deadline; the target drops it unhandled once that has passed. Raises
        DispatchTimeout when no reply comes within `timeout` seconds."""
        sender, target = check_name(from_kernel), check_name(to_kernel)
        consumer = self._consumers.get(sender)
        if consumer is None or consumer.direct is None:
            raise InvalidRequest(f"{sender!r} must be registered on this bus to receive the reply")
        self._ensure_started()
        corr = uuid.uuid4().hex
        future: asyncio.Future[ReceivedMessage] = asyncio.get_running_loop().create_future()
        self._waiters[corr] = future
        extra = {"corr": corr, "reply_to": sender, "deadline": repr(time.time() + timeout), "kind": "request"}
        message = _message(sender, target, BusTopic.DATA, payload)
        try:
            argv = encode(message, self.config.max_message_bytes, extra=extra)
            await self._writer_().publish(
                self.keys.bus_inbox(target), BusTopic.DATA.value, argv, target=target
            )
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            raise DispatchTimeout(f"no reply from {target!r} within {timeout}s") from None
        finally:
            self._waiters.pop(corr, None)

    async def reply(self, message: BusMessage, payload: dict[str, Any]) -> Published | None:
        """Answer a request received by a handler. Returns None if `message` is not a request."""
        if not isinstance(message, ReceivedMessage) or not message.is_request or message.reply_to is None:
            return None
        sender = message.to_kernel or "?"
        answer = BusMessage(
            from_kernel=sender, to_kernel=message.reply_to, topic=message.topic, payload=payload
        )
        argv = encode(
            answer,
            self.config.max_message_bytes,
            extra={"corr": message.correlation_id or "", "kind": "reply"},
        )
        self._ensure_started()
        try:
            return await self._writer_().publish(
                self.keys.bus_inbox(message.reply_to), answer.topic.value, argv, target=message.reply_to
            )
        except InvalidRequest:  # the requester left the bus meanwhile
            return None

    def resolve_reply(self, message: ReceivedMessage) -> None:
        future = self._waiters.get(message.correlation_id or "")
        if future is None or future.done():
            self._late_replies += 1
            logger.info("bus: reply %s to %s came after its request ended", message.id, message.to_kernel)
            return
        future.set_result(message)

    def get_stats(self) -> dict[str, Any]:
        """Bus statistics read from Redis, so they cover every process:

        ``registered_kernels`` and ``subscriptions`` per topic (as in the spec) count the kernels
        a live process serves (its lease: gone within `lease_ttl` of the process's end), with
        ``kernels`` their names and ``offline_kernels`` those registered before whose process is
        gone (their messages wait for them), plus ``pending`` and ``dead_letters`` per topic
        and for inboxes, ``gaps`` per topic (entries dropped by the hard cap before a subscriber
        read them), ``stream_length`` per topic, and this process's delivery counters (``local``)."""
        with map_redis_errors():
            stats = read_stats(self._client(), self.keys)
        local: Counter[str] = Counter()
        for consumer in self._consumers.values():
            local.update(consumer.counters)
        stats["local"] = {**dict(sorted(local.items())), "late_replies": self._late_replies}
        return stats

    def _writer_(self) -> StreamWriter:
        assert self._writer is not None
        return self._writer
