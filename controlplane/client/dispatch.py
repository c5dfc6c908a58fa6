"""The fast path: enqueue a job on a kernel in one round trip and await its pushed result.

Each client process owns one reply list (`reply:{client_id}`) and one listener task that
blocks on it (BLPOP) and resolves the future of each job id: no polling anywhere. A cached
view of each cluster's kernels, invalidated by `notify` pub/sub messages, keeps routing
from reading Redis on every dispatch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field

from controlplane.client import routing
from controlplane.errors import ClusterNotFound, DispatchTimeout, RedisError, RedisUnavailable
from controlplane.lifecycle import finish
from controlplane.protocol.jobs import Outcome, decode_result, encode_job
from controlplane.protocol.keys import Keys
from controlplane.protocol.models import KernelLoad, KernelState
from controlplane.protocol.records import KernelRecord
from controlplane.protocol.requests import SyscallRequest
from controlplane.redis.channel import Channel
from controlplane.redis.connect import BLOCK_GRACE_SECONDS, MAX_BLOCK_SECONDS, AsyncRedis
from controlplane.redis.errors import amap_redis_errors, redis_said
from controlplane.redis.retry import Backoff, best_effort, periodically
from controlplane.redis.scripts import jobs
from controlplane.redis.scripts.call import preloading
from controlplane.redis.state import State, now_ms

logger = logging.getLogger(__name__)

#: Replies the listener takes per blocking pop, at most.
REPLY_BATCH = 512
#: How long an unfinished job key lives at most, beyond its deadline, ms (a safety net).
JOB_TTL_EXTRA_MS = 3_600_000
#: How long a cached kernel list is trusted without a change notification, seconds.
VIEW_TTL = 2.0
#: How long cached load records are trusted (they are refreshed once per heartbeat), seconds.
LOAD_TTL = 0.5


class Dispatcher:
    """Submits jobs and awaits their results; `stop()` after use."""

    def __init__(self, redis: AsyncRedis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self.client_id = uuid.uuid4().hex
        self.reply_key = keys.reply(self.client_id)
        # enqueue and cancel, pipelined across concurrent dispatches
        self.channel = preloading(redis, jobs.ENQUEUE, jobs.CANCEL)
        self._replies = Channel(redis)  # the reply listener's blocking pops
        self._waiting: dict[str, asyncio.Future[Outcome]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._batched = True  # BLMPOP (Redis 7) takes every waiting reply in one trip; BLPOP before 7

    def _listen_for_replies(self) -> None:
        """Start the reply listener with the first job: a client that never dispatches (`kcp
        cluster list`, ...) needs none, nor a warning from it when Redis is down."""
        if self._listener is None:
            self._listener = asyncio.create_task(self._listen(), name=f"kcp-replies-{self.client_id[:8]}")

    async def stop(self) -> None:
        if self._listener is not None:
            # at once: safe, as its blocking pop runs on a connection of its own
            await finish(self._listener, grace=0.0)
            self._listener = None
        for fut in self._waiting.values():
            if not fut.done():
                fut.cancel()
        await self._replies.aclose()
        async with best_effort():
            await self.channel.execute("DEL", self.reply_key)
        await self.channel.aclose()

    async def submit(
        self, plan: routing.Plan, request: SyscallRequest, wait_s: float, *, strategy: str
    ) -> routing.Attempt:
        """Enqueue `request` by `plan` and wait up to `wait_s` seconds for its result.

        `strategy` is the routing strategy that made `plan` (the cluster counts dispatches
        by it), or `stats.PINNED` for a request that named its kernel: that job runs there, no
        idle sibling takes it over (claim.lua).

        Raises `KernelBusy` when no candidate takes work (nothing was enqueued). When no result
        came in time the attempt carries a `DispatchTimeout` (the job is then cancelled, so a
        late result is dropped by the kernel instead of delivered twice).
        """
        self._listen_for_replies()
        job_id = uuid.uuid4().hex
        now = now_ms()
        payload = encode_job(
            request.model_dump(mode="json", exclude_defaults=True) | {"type": request.type},
            job_try=1,
            enqueue_ms=now,
        )
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Outcome] = loop.create_future()
        self._waiting[job_id] = fut
        try:
            placed = await routing.enqueue(
                self.channel,
                self.keys,
                plan,
                job_id=job_id,
                payload=payload,
                reply_key=self.reply_key,
                now_ms=now,
                deadline_ms=now + int(wait_s * 1000),
                ttl_ms=int(wait_s * 1000) + JOB_TTL_EXTRA_MS,
                strategy=strategy,
            )
            cluster, name = plan.cluster, placed.kernel
            # a timer, not asyncio.timeout + shield: the result wakes us one loop step sooner
            overdue = loop.call_later(wait_s, self._overdue, job_id, fut)
            try:
                outcome = await fut
                ok = outcome.success or outcome.error_type in routing.BAD_REQUEST_ERRORS
                placed = await routing.report(
                    self.redis, self.keys, plan, placed, ok=ok, now_ms=now_ms(), ran_on=outcome.kernel
                )
                return routing.Attempt(placed, outcome)
            except _Overdue:
                cancelled = await jobs.cancel(self.keys, cluster, name, job_id=job_id).run(self.channel)
                if not cancelled:  # finished just now: the result is on its way, take it
                    with contextlib.suppress(TimeoutError):
                        return routing.Attempt(placed, await asyncio.wait_for(self._waiting[job_id], 1.0))
                placed = await routing.report(self.redis, self.keys, plan, placed, ok=False, now_ms=now_ms())
                timeout = DispatchTimeout(f"no result from {cluster}/{name} within {wait_s:.3g}s")
                return routing.Attempt(placed, None, timeout)
            finally:
                overdue.cancel()
        finally:
            self._waiting.pop(job_id, None)

    def watch(self, job_id: str) -> asyncio.Future[Outcome]:
        """A future for the result of `job_id` pushed to this client's reply list (a job queued
        without `submit`, e.g. an arq job). It is forgotten once resolved; `unwatch` it to stop
        waiting before."""
        self._listen_for_replies()
        fut = self._waiting.get(job_id)
        if fut is None or fut.done():
            fut = self._waiting[job_id] = asyncio.get_running_loop().create_future()
            fut.add_done_callback(lambda done: self.unwatch(job_id, done))
        return fut

    def unwatch(self, job_id: str, fut: asyncio.Future[Outcome]) -> None:
        if self._waiting.get(job_id) is fut:
            del self._waiting[job_id]

    def _overdue(self, job_id: str, fut: asyncio.Future[Outcome]) -> None:
        """`submit`'s wait for `job_id` is over: fail `fut`, and leave a fresh future in its
        place, in the same step, so a result that comes while the job is being cancelled is
        still taken."""
        if not fut.done():
            self._waiting[job_id] = asyncio.get_running_loop().create_future()
            fut.set_exception(_Overdue())

    async def _listen(self) -> None:
        await periodically(
            self._take_replies,
            what="reply listener",
            log=logger,
            running=lambda: True,  # until `stop` cancels it
            on_error=self._lost,
        )

    async def _take_replies(self) -> None:
        """One blocking pop of the reply list; resolve the future of each reply it took."""
        try:
            async with asyncio.timeout(MAX_BLOCK_SECONDS + BLOCK_GRACE_SECONDS), amap_redis_errors():
                if self._batched:
                    item = await self._replies.execute(
                        "BLMPOP", MAX_BLOCK_SECONDS, 1, self.reply_key, "LEFT", "COUNT", REPLY_BATCH
                    )
                    replies = item[1] if item else []
                else:
                    item = await self._replies.execute("BLPOP", self.reply_key, MAX_BLOCK_SECONDS)
                    replies = [item[1]] if item else []
        except TimeoutError:
            raise RedisUnavailable("reply pop overdue") from None
        except RedisError as exc:
            if self._batched and redis_said(exc, "unknown command"):
                self._batched = False  # BLMPOP is Redis 7's; BLPOP takes one reply at a time
                return
            raise
        for raw in replies:
            self._deliver(raw)
        if replies:  # let the callers woken run before the next pop is written
            await asyncio.sleep(0)

    async def _lost(self, exc: RedisError) -> None:
        await self._replies.reset("reply listener reconnects")

    def _deliver(self, raw: str) -> None:
        try:
            outcome = decode_result(raw)
        except Exception:
            logger.warning("dropping a malformed reply on %s", self.reply_key)
            return
        fut = self._waiting.get(outcome.job_id)
        if fut is not None and not fut.done():
            fut.set_result(outcome)


class _Overdue(Exception):
    """Internal: no result came within a job's wait."""


@dataclass(slots=True)
class _View:
    kernels: list[KernelRecord] = field(default_factory=list)
    loads: dict[str, KernelLoad] = field(default_factory=dict)
    kernels_at: float = 0.0
    loads_at: float = 0.0


class ClusterViews:
    """Per-cluster cache of kernel records and load records, refreshed on `notify` messages."""

    def __init__(self, state: State) -> None:
        self.state = state
        self._views: dict[str, _View] = {}
        self._changed = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None
        self._stopping = False

    def _watch_notifications(self) -> None:
        """Subscribe to `notify` with the first read of a view or wait for a change."""
        if self._watcher is None:
            self._stopping = False
            self._watcher = asyncio.create_task(self._watch(), name="kcp-notify")

    async def stop(self) -> None:
        if self._watcher is not None:
            self._stopping = True
            # redis-py can swallow a cancellation that lands while its pub/sub connection is
            # being set up; the watcher checks `_stopping`, and `finish` cancels until it is done
            await finish(self._watcher, grace=0.0)
            self._watcher = None

    async def wait_change(self, seconds: float) -> None:
        """Return after the next change notification (any cluster), or after `seconds`."""
        self._watch_notifications()
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), max(seconds, 0.0))

    def invalidate(self, cluster: str) -> None:
        view = self._views.get(cluster)
        if view is not None:
            view.kernels_at = 0.0

    async def get(
        self, cluster: str, *, wait: float = 0.0, with_loads: bool = False
    ) -> tuple[list[KernelRecord], dict[str, KernelLoad]]:
        """The cluster's kernels (and loads); waits up to `wait` seconds for a running one."""
        self._watch_notifications()
        deadline = time.monotonic() + wait
        while True:
            view = self._views.setdefault(cluster, _View())
            now = time.monotonic()
            if now - view.kernels_at > VIEW_TTL:
                self._changed.clear()
                view.kernels = await self.state.kernels(cluster)
                view.kernels_at = now
            if with_loads and now - view.loads_at > LOAD_TTL:
                view.loads = await self.state.loads(view.kernels)
                view.loads_at = now
            if any(k.state is KernelState.RUNNING for k in view.kernels) or now >= deadline:
                return view.kernels, view.loads
            if not view.kernels and await self.state.get_cluster(cluster) is None:
                raise ClusterNotFound(cluster)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(deadline - now, 0.25))
            view.kernels_at = 0.0

    async def _watch(self) -> None:
        backoff = Backoff()
        await periodically(
            lambda: self._subscribed(backoff),
            what="notify watcher",
            log=logger,
            running=lambda: not self._stopping,
            backoff=backoff,
            on_error=lambda exc: self._views.clear(),
        )

    async def _subscribed(self, backoff: Backoff) -> None:
        """One subscription to `notify`, until it fails or the watcher stops."""
        pubsub = self.state.redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self.state.keys.notify())
            backoff.reset()  # subscribed: the next outage starts from the shortest pause again
            while not self._stopping:
                # a bounded wait, so an idle subscription never hits the socket timeout
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=MAX_BLOCK_SECONDS)
                cluster = message.get("data") if message else None
                if isinstance(cluster, str):
                    self.invalidate(cluster)
                    self._changed.set()
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]


class DispatchTarget:
    """The engine's `ClusterTarget` for one `KcpClient.dispatch` call: the cluster's kernels
    from the cached views, attempts through the dispatcher, counted under `strategy`."""

    __slots__ = ("cluster", "dispatcher", "request", "strategy", "views", "with_loads")

    def __init__(
        self,
        cluster: str,
        request: SyscallRequest,
        *,
        views: ClusterViews,
        dispatcher: Dispatcher,
        strategy: str,
        with_loads: bool,
    ) -> None:
        self.cluster, self.request = cluster, request
        self.views, self.dispatcher = views, dispatcher
        self.strategy, self.with_loads = strategy, with_loads

    async def candidates(self, wait: float) -> tuple[list[KernelRecord], dict[str, KernelLoad]]:
        return await self.views.get(self.cluster, wait=wait, with_loads=self.with_loads)

    async def submit(self, plan: routing.Plan, wait_s: float) -> routing.Attempt:
        """An attempt through the dispatcher; one that failed leaves the kernel list to be
        re-read (a kernel may have stopped)."""
        try:
            attempt = await self.dispatcher.submit(plan, self.request, wait_s, strategy=self.strategy)
        except Exception:
            self.views.invalidate(self.cluster)
            raise
        if attempt.error is not None:
            self.views.invalidate(self.cluster)
        return attempt
