"""The fast path: enqueue a job on a kernel in one round trip and await its pushed result.

Each client process owns one reply list per kcp cluster it dispatches to
(`reply:{cluster}:client_id`, in the cluster's slot, so finish.lua pushes there in one slot with
the job), one doorbell (`reply:{client_id}:bell`, a ZSET in the client's slot) and one listener
task that blocks on the bell and resolves the future of each job id: no polling, and one
blocking connection per client whatever the number of clusters and wherever their slots live.
A kernel that delivered a result adds the reply itself to the bell (finish.lua does on one
Redis), so the listener wakes with it in hand; the list keeps the reply's copy until the listener
takes from it, once every `DRAIN_AFTER` replies of that cluster or at the next sweep. On a Redis
Cluster the bell is usually on another node than the job: there the client subscribes to each
reply list's shard channel (`SSUBSCRIBE`, one connection per master, `ShardedSubscriber`) before
its first job there, finish.lua publishes the reply on it, and only when no subscriber got it
does the kernel add the reply to the bell, once finish.lua replied. Whoever else pushes to a list (the
reconciler failing the jobs of a removed kernel, a rebind) rings the bell with the cluster's
name instead: the listener then takes from that list. The bell is a hint: the listener also
sweeps (takes from) every cluster it waits on at each idle timeout and every `SWEEP_SECONDS`,
so a lost ring only delays a reply. A cached view of each cluster's kernels, invalidated by
`notify` pub/sub messages, keeps routing from reading Redis on every dispatch.

No reply is lost to a Redis crash: a take (`take_replies.lua`) moves replies to the cluster's
`reply:{cluster}:client_id:taken` and drops them from there only at the next take there (or a
`DEL` once they are delivered), after it delivered them. After an outage it reads each taken
list again, then asks Redis for the fate of every job it was waiting for (`_recover`): a result
is delivered, a job still queued or running is waited for, and a job that is gone without a
result (its enqueue was lost, e.g. by a Sentinel failover) ends its attempt at once, so the
engine submits it again without waiting out its deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from controlplane.client import routing
from controlplane.errors import ClusterNotFound, DispatchTimeout, RedisError, RedisUnavailable
from controlplane.lifecycle import finish
from controlplane.protocol.jobs import REPLY_TTL_MS, Outcome, decode_result, encode_job
from controlplane.protocol.keys import Keys
from controlplane.protocol.models import NAME_PATTERN, KernelLoad, KernelState
from controlplane.protocol.records import KernelRecord
from controlplane.protocol.requests import SyscallRequest
from controlplane.redis import portable
from controlplane.redis.connect import BLOCK_GRACE_SECONDS, MAX_BLOCK_SECONDS, AsyncRedis, AsyncRedisCluster
from controlplane.redis.errors import amap_redis_errors
from controlplane.redis.retry import Backoff, best_effort, periodically
from controlplane.redis.scripts import jobs
from controlplane.redis.scripts.call import Call, preloading
from controlplane.redis.sharded import ShardedSubscriber
from controlplane.redis.state import State, now_ms

logger = logging.getLogger(__name__)

#: Replies the listener takes per take (one cluster's list), and pops off its bell per pop, at most.
REPLY_BATCH = 512
#: How many replies of one cluster the listener has off its bell (or its shard channel) before
#: it takes their copies off that cluster's list (else at the next sweep).
DRAIN_AFTER = 256
#: How often the listener takes from every cluster it waits on, whatever its bell says, seconds
#: (and at each idle timeout of its bell pop): a reply whose ring was lost waits no longer.
SWEEP_SECONDS = float(MAX_BLOCK_SECONDS)
_NAME = re.compile(NAME_PATTERN)
#: How long an unfinished job key lives at most, beyond its deadline, ms (a safety net).
JOB_TTL_EXTRA_MS = 3_600_000
#: How long a cached kernel list is trusted without a change notification, seconds; then the
#: cluster's version (one GET) says whether the records must be read again.
VIEW_TTL = 2.0
#: How long cached load records are trusted, seconds (a busy kernel's change at most once per
#: heartbeat; an idle one's every `load_refresh`).
LOAD_TTL = 0.5


class Dispatcher:
    """Submits jobs and awaits their results; `stop()` after use."""

    def __init__(self, redis: AsyncRedis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self.client_id = uuid.uuid4().hex
        self.bell_key = keys.reply_bell(self.client_id)
        # enqueue and cancel, pipelined across concurrent dispatches
        self.channel = preloading(redis, jobs.ENQUEUE, jobs.CANCEL)
        self._replies = preloading(redis, jobs.TAKE_REPLIES)  # the reply listener's takes and waits
        self._waiting: dict[str, asyncio.Future[Outcome]] = {}
        #: job id -> cluster, of the jobs enqueued and not answered yet
        self._queued: dict[str, str] = {}
        #: job id -> cluster, of the jobs `watch`ed (their result comes to the cluster's list)
        self._watched: dict[str, str] = {}
        #: every cluster whose reply list this client handed out (`stop` deletes them)
        self._clusters: set[str] = set()
        #: the jobs queued when the listener lost Redis: their fate is read back when it returns
        self._unsure: dict[str, str] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._due: set[str] = set()  # clusters the next step takes from, without blocking
        #: clusters whose taken list holds replies delivered already (dropped by the next step)
        self._acked: set[str] = set()
        #: cluster -> replies delivered off the bell whose copies its list holds (till a take
        #: there, which then does not decode them again)
        self._copies: dict[str, set[str]] = {}
        self._swept = time.monotonic()
        self._rings: set[asyncio.Task[Any]] = set()  # rings of our own bell, in flight
        #: on a Redis Cluster, the reply lists' shard channels, where finish.lua publishes
        self._shards = (
            ShardedSubscriber(redis, lambda _, reply: self._published(reply))
            if isinstance(redis, AsyncRedisCluster)
            else None
        )

    def reply_key(self, cluster: str) -> str:
        """This client's reply list of `cluster`, for a job enqueued or deferred there (its
        result is pushed to it)."""
        self._clusters.add(cluster)
        return self.keys.reply(cluster, self.client_id)

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
        if self._shards is not None:
            await self._shards.aclose()
        # one DEL per cluster: its lists share its slot, the bell is in ours
        lists = [
            ("DEL", self.keys.reply(c, self.client_id), self.keys.reply_taken(c, self.client_id))
            for c in sorted(self._clusters)
        ]
        async with best_effort():
            await self.channel.execute_many([("DEL", self.bell_key), *lists])
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
        job_id = os.urandom(16).hex()  # as unique as a uuid4's hex (128 random bits), at a fifth of the cost
        now = now_ms()
        payload = encode_job(
            request.model_dump(mode="json", exclude_defaults=True) | {"type": request.type},
            job_try=1,
            enqueue_ms=now,
        )
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Outcome] = loop.create_future()
        self._waiting[job_id] = fut
        reply_key = self.reply_key(plan.cluster)
        if self._shards is not None:  # one round trip before a cluster's first job, else none
            await self._shards.subscribe(reply_key)  # not subscribed: the bell brings the result
        try:
            placed = await routing.enqueue(
                self.channel,
                self.keys,
                plan,
                job_id=job_id,
                payload=payload,
                reply_key=reply_key,
                now_ms=now,
                deadline_ms=now + int(wait_s * 1000),
                ttl_ms=int(wait_s * 1000) + JOB_TTL_EXTRA_MS,
                strategy=strategy,
            )
            cluster, name = plan.cluster, placed.kernel
            self._queued[job_id] = cluster
            # a timer, not asyncio.timeout + shield: the result wakes us one loop step sooner
            overdue = loop.call_later(wait_s, self._overdue, job_id, fut)
            try:
                outcome = await fut
                ok = outcome.success or outcome.error_type in routing.BAD_REQUEST_ERRORS
                placed = await routing.report(
                    self.redis, self.keys, plan, placed, ok=ok, now_ms=now_ms(), ran_on=outcome.kernel
                )
                return routing.Attempt(placed, outcome)
            except _Vanished:  # not the kernel's doing: nothing to report against it
                gone = DispatchTimeout(
                    f"job {job_id} on {cluster}/{name} is gone from Redis without a result (its enqueue "
                    "was lost with Redis); it never ran"
                )
                return routing.Attempt(placed, None, gone)
            except _Overdue:
                cancelled = await jobs.cancel(self.keys, cluster, name, job_id=job_id).run(self.channel)
                if not cancelled:  # finished just now: the result is on its way, take it
                    with contextlib.suppress(TimeoutError, _Vanished):
                        return routing.Attempt(placed, await asyncio.wait_for(self._waiting[job_id], 1.0))
                placed = await routing.report(self.redis, self.keys, plan, placed, ok=False, now_ms=now_ms())
                timeout = DispatchTimeout(f"no result from {cluster}/{name} within {wait_s:.3g}s")
                return routing.Attempt(placed, None, timeout)
            finally:
                overdue.cancel()
        finally:
            self._waiting.pop(job_id, None)
            self._queued.pop(job_id, None)

    def watch(self, job_id: str, cluster: str) -> asyncio.Future[Outcome]:
        """A future for the result of `job_id` of `cluster` pushed to this client's reply list
        there (a job queued without `submit`, e.g. an arq job). It is forgotten once resolved;
        `unwatch` it to stop waiting before."""
        self._listen_for_replies()
        self._clusters.add(cluster)
        self._watched[job_id] = cluster
        fut = self._waiting.get(job_id)
        if fut is None or fut.done():
            fut = self._waiting[job_id] = asyncio.get_running_loop().create_future()
            fut.add_done_callback(lambda done: self.unwatch(job_id, done))
        return fut

    def unwatch(self, job_id: str, fut: asyncio.Future[Outcome]) -> None:
        if self._waiting.get(job_id) is fut:
            del self._waiting[job_id]
            self._watched.pop(job_id, None)

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
        """One step of the reply listener: a take from each cluster due (`take_replies.lua`,
        which first drops what the last take there delivered), or else one blocking pop of the
        bell (`_wait_for_bell`). A take that filled a batch is followed by another there at once.
        At each idle timeout, and every `SWEEP_SECONDS`, it takes from every cluster it waits on
        and from every list that holds copies of replies delivered off the bell."""
        try:
            async with asyncio.timeout(MAX_BLOCK_SECONDS + BLOCK_GRACE_SECONDS), amap_redis_errors():
                if self._unsure is not None:
                    await self._recover(self._unsure)
                    self._unsure = None
                    self._due |= self._clusters  # takes next: they drop the taken lists `_recover` delivered
                if time.monotonic() - self._swept >= SWEEP_SECONDS:
                    self._sweep()
                if self._due:
                    await self._take(sorted(self._due))
                else:
                    await self._wait_for_bell()
        except TimeoutError:
            raise RedisUnavailable("reply pop overdue") from None

    def _waited_on(self) -> set[str]:
        """The clusters of the jobs this client waits for."""
        return {*self._queued.values(), *self._watched.values()}

    def _sweep(self) -> None:
        self._due |= self._waited_on() | self._copies.keys()
        self._swept = time.monotonic()

    def _take_call(self, cluster: str) -> Call[list[str]]:
        return jobs.take_replies(self.keys, cluster, self.client_id, count=REPLY_BATCH, ttl_ms=REPLY_TTL_MS)

    async def _take(self, clusters: list[str]) -> None:
        """One take from each of `clusters`, in one write."""
        calls = [self._take_call(c) for c in clusters]
        self._due.difference_update(clusters)
        futures = await self._replies.send([call.command for call in calls])
        try:
            for cluster, call, fut in zip(clusters, calls, futures, strict=True):
                await self._taken(cluster, await call.settle(await fut, self._replies))
        finally:
            _drop(futures)

    async def _taken(self, cluster: str, batch: list[str]) -> None:
        """Deliver what a take from `cluster` returned."""
        copies = self._copies.pop(cluster, set())  # taken, or in the taken list (dropped by the next step)
        if batch:
            self._acked.add(cluster)  # delivered below: dropped by the next step
        else:
            self._acked.discard(cluster)  # the take dropped the taken list
        if len(batch) >= REPLY_BATCH:
            self._due.add(cluster)  # more may wait behind
        await self._deliver_all([raw for raw in batch if raw not in copies])

    async def _wait_for_bell(self) -> None:
        """One blocking pop of the bell (`BZPOPMIN`, behind the `DEL` of the taken lists whose
        replies are delivered; with more than one job waited for, a `ZPOPMIN` of the rest
        behind it, in the same round trip). A member is a reply, delivered at once (its copy is
        taken off its cluster's list later), or a cluster's name, taken from next: an idle reply
        costs one round trip and one command."""
        acks = [("DEL", self.keys.reply_taken(c, self.client_id)) for c in sorted(self._acked)]
        self._acked.clear()  # a failed step ends in `_recover`, which takes from every cluster
        step: list[tuple[str | int, ...]] = [*acks, ("BZPOPMIN", self.bell_key, MAX_BLOCK_SECONDS)]
        if len(self._waiting) > 1:
            step.append(("ZPOPMIN", self.bell_key, REPLY_BATCH - 1))
        futures = await self._replies.send(step)
        try:
            replies = [await fut for fut in futures]
        finally:
            _drop(futures)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        popped = replies[len(acks)]
        if popped is None:  # idle for a whole pop: take from every cluster waited on
            self._sweep()
            return
        members = [popped[1], *(replies[-1][::2] if len(replies) > len(acks) + 1 else [])]
        for member in members:
            text = member.decode() if isinstance(member, bytes) else str(member)
            if _NAME.match(text):
                self._due.add(text)
            else:
                self._expressed(text)
        await asyncio.sleep(0)  # let the callers woken run before we go on

    async def _deliver_all(self, replies: list[str]) -> int:
        for raw in replies:
            self._deliver(raw)
        if replies:  # let the callers woken run before we go on
            await asyncio.sleep(0)
        return len(replies)

    async def _recover(self, unsure: dict[str, str]) -> None:
        """After an outage: deliver what the last takes moved (their answers may have been
        lost) and what waits in each cluster's list, then settle the jobs queued before it.
        Existence is read first, the replies after, so a job that finished in between has its
        reply read."""
        ids = [j for j in unsure if j in self._waiting]
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.exists(self.keys.job(unsure[job_id], job_id))
            exists = await pipe.execute()
        reads: list[tuple[str | int, ...]] = []
        for cluster in sorted(self._clusters):
            reads.append(("LRANGE", self.keys.reply_taken(cluster, self.client_id), 0, -1))
            reads.append(("LRANGE", self.keys.reply(cluster, self.client_id), 0, -1))
        for replies in await self._replies.execute_many(reads) if reads else []:
            if isinstance(replies, Exception):
                raise replies
            for raw in replies:
                self._deliver(raw)  # a listed one is delivered again by the next take: a future resolves once
        vanished = 0
        for job_id, found in zip(ids, exists, strict=True):
            fut = self._waiting.get(job_id)
            if not found and fut is not None and not fut.done():
                fut.set_exception(_Vanished())
                vanished += 1
        logger.info(
            "reply listener back: %d job(s) were waiting, %d gone without a result", len(ids), vanished
        )

    async def _lost(self, exc: RedisError) -> None:
        if self._unsure is None:
            self._unsure = dict(self._queued)
        else:  # lost again while recovering: jobs queued since count as well
            self._unsure.update(self._queued)
        await self._replies.reset("reply listener reconnects")

    def _expressed(self, raw: str) -> str | None:
        """Deliver a reply popped off the bell or published, and count its copy against its
        cluster's list: that cluster once `DRAIN_AFTER` copies wait there (the listener's next
        step takes them), else None."""
        job_id = self._deliver(raw)
        cluster = self._queued.get(job_id) or self._watched.get(job_id) if job_id else None
        if cluster is None:
            return None
        copies = self._copies.setdefault(cluster, set())
        copies.add(raw)
        if len(copies) < DRAIN_AFTER or cluster in self._due:
            return None
        self._due.add(cluster)
        return cluster

    def _published(self, raw: str) -> None:
        """A reply that came by shard channel. The listener may be blocked on the bell meanwhile:
        when copies are due to be taken, ring the bell with their cluster's name to wake it."""
        cluster = self._expressed(raw)
        if cluster is not None:
            commands = jobs.ring(self.keys, cluster, self.reply_key(cluster), now_ms(), ttl_ms=REPLY_TTL_MS)
            ring = asyncio.create_task(self.channel.execute_many(commands))
            self._rings.add(ring)
            ring.add_done_callback(self._rung)

    def _rung(self, ring: asyncio.Task[Any]) -> None:
        self._rings.discard(ring)
        if not ring.cancelled() and ring.exception() is not None:  # a lost ring only delays the take
            logger.debug("ringing our own bell failed: %s", ring.exception())

    def _deliver(self, raw: str) -> str | None:
        """Resolve the future of the job `raw` answers (once: a reply delivered off the bell
        comes again with a take of its list); its job id, None when `raw` is not a reply."""
        try:
            outcome = decode_result(raw)
        except Exception:
            logger.warning("dropping a malformed reply to %s", self.client_id)
            return None
        fut = self._waiting.get(outcome.job_id)
        if fut is not None and not fut.done():
            fut.set_result(outcome)
        return outcome.job_id


def _drop(futures: list[asyncio.Future[Any]]) -> None:
    """A step's replies nobody reads now (it failed part way): drop them, quietly."""
    for fut in futures:
        if not fut.done():
            fut.cancel()
        elif not fut.cancelled():
            fut.exception()


class _Overdue(Exception):
    """Internal: no result came within a job's wait."""


class _Vanished(Exception):
    """Internal: after an outage, the job is gone from Redis and no result came: it never ran."""


@dataclass(slots=True)
class _View:
    #: a tuple, replaced (never changed) when read again: the engine keeps what it derived
    #: from one (`OrchestrationEngine.eligible`) while the same one comes back
    kernels: tuple[KernelRecord, ...] = ()
    loads: dict[str, KernelLoad] = field(default_factory=dict)
    kernels_at: float = 0.0
    loads_at: float = 0.0
    #: the cluster's version (`Keys.cluster_version`) read before `kernels`; None: read them again
    version: str | None = None


class ClusterViews:
    """Per-cluster cache of kernel records and load records. A `notify` message naming the
    cluster, or a failed attempt, drops the records; otherwise they are checked every
    `VIEW_TTL` by the cluster's version, and read again only when it moved."""

    def __init__(self, state: State) -> None:
        self.state = state
        self._views: dict[str, _View] = {}
        self._changed = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None
        self._stopping = False
        self._attempt = 0  # subscriptions so far (on a cluster, which node the next one is on)

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
            view.kernels_at, view.version = 0.0, None

    async def get(
        self, cluster: str, *, wait: float = 0.0, with_loads: bool = False
    ) -> tuple[tuple[KernelRecord, ...], dict[str, KernelLoad]]:
        """The cluster's kernels (and loads); waits up to `wait` seconds for a running one."""
        self._watch_notifications()
        deadline = time.monotonic() + wait
        while True:
            view = self._views.setdefault(cluster, _View())
            now = time.monotonic()
            if now - view.kernels_at > VIEW_TTL:
                await self._refresh(cluster, view, now)
            if with_loads and now - view.loads_at > LOAD_TTL:
                view.loads = await self.state.loads(view.kernels)
                view.loads_at = now
            if any(k.state is KernelState.RUNNING for k in view.kernels) or now >= deadline:
                return view.kernels, view.loads
            if not view.kernels and await self.state.get_cluster(cluster) is None:
                raise ClusterNotFound(cluster)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(deadline - now, 0.25))
            view.kernels_at, view.version = 0.0, None

    async def _refresh(self, cluster: str, view: _View, now: float) -> None:
        """Read the cluster's records again unless its version is the one they were read at."""
        async with amap_redis_errors():
            version = await self.state.redis.get(self.state.keys.cluster_version(cluster))
        version = str(version or "")
        if view.version is None or version != view.version:
            self._changed.clear()
            view.kernels = tuple(await self.state.kernels(cluster))
            view.version = version
        view.kernels_at = now

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
        """One subscription to `notify`, until it fails or the watcher stops (on a Redis
        Cluster: on one node, the next one after a failure)."""
        self._attempt += 1
        notify, attempt = self.state.keys.notify(), self._attempt
        async with portable.subscribed(self.state.redis, notify, attempt=attempt) as pubsub:
            backoff.reset()  # subscribed: the next outage starts from the shortest pause again
            while not self._stopping:
                # a bounded wait, so an idle subscription never hits the socket timeout
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=MAX_BLOCK_SECONDS)
                cluster = message.get("data") if message else None
                if isinstance(cluster, str):
                    self.invalidate(cluster)
                    self._changed.set()


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

    async def candidates(self, wait: float) -> tuple[tuple[KernelRecord, ...], dict[str, KernelLoad]]:
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
