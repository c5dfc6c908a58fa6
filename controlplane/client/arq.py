"""arq's enqueue side on kcp: `KcpClient.enqueue_job` and the `Job` handle it returns.

A job enqueued now is routed like a dispatch (the client's strategy, in one enqueue.lua round
trip) but nobody waits on it: it runs however long it takes, its kernel keeps its result for
the function's `keep_result` (`Keys.job_result`), and a kernel that dies with it hands it on
(rebind). A deferred job (`_defer_by`, `_defer_until`, or a function's `Retry`) waits in its
cluster's deferred set; `DeferredMover`, a task of every client that enqueued or watched arq
jobs of that cluster, routes it when it is due, so the kernel is chosen then, by this client's
strategy. It sleeps until the earliest due job it saw, and looks again at least every
`RESCAN_S`: a job runs within a few ms of its time while the client that deferred it runs,
within `RESCAN_S` otherwise (while any client of the cluster runs). See docs/arq.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from controlplane.client import routing
from controlplane.client.dispatch import JOB_TTL_EXTRA_MS, ClusterViews, Dispatcher
from controlplane.client.engine import OrchestrationEngine
from controlplane.client.routing import KernelBusy, Placed
from controlplane.errors import InvalidRequest, KcpError, KernelError, NoKernelAvailable, RedisError
from controlplane.protocol import arq as arq_protocol
from controlplane.protocol.arq import JobDef, JobResult, JobStatus
from controlplane.protocol.jobs import Outcome, decode_job, encode_job, encode_result
from controlplane.protocol.keys import Keys
from controlplane.protocol.models import RoutingStrategy
from controlplane.protocol.requests import SyscallRequest, parse_request
from controlplane.redis.connect import AsyncRedis
from controlplane.redis.errors import amap_redis_errors
from controlplane.redis.retry import periodically
from controlplane.redis.scripts import deferred
from controlplane.redis.state import now_ms

__all__ = [
    "ArqContext",
    "DeferredMover",
    "Job",
    "JobDef",
    "JobResult",
    "JobStatus",
    "enqueue_job",
    "route",
    "validate_job_id",
]

logger = logging.getLogger(__name__)

#: How often the mover looks at each cluster's deferred set at least, seconds (the timer
#: resolution for jobs deferred by other clients).
RESCAN_S = 0.5
#: How long a mover holds a due job while routing it, ms: a mover that dies mid-move leaves it
#: to another after this long.
LEASE_MS = 5_000
#: Due jobs moved per cluster per look.
MOVE_BATCH = 64
#: A job id a key can carry: no separator, glob or hash-tag character.
_JOB_ID = re.compile(r"[^\s:*?\[\]{}]{1,128}")


class ArqContext:
    """What the arq side of a `KcpClient` shares: its Redis, keys, dispatcher, views, engine."""

    def __init__(
        self,
        redis: AsyncRedis,
        keys: Keys,
        dispatcher: Dispatcher,
        views: ClusterViews,
        engine: OrchestrationEngine,
        wait_s: float,
        max_request_bytes: int,
    ) -> None:
        self.redis, self.keys = redis, keys
        self.dispatcher, self.views, self.engine = dispatcher, views, engine
        self.wait_s = wait_s  # how long an enqueue waits for a running kernel
        self.max_request_bytes = max_request_bytes
        self.mover = DeferredMover(self)


def validate_job_id(job_id: object, what: str = "job id") -> str:
    """`job_id` if a key can carry it, else `InvalidRequest`."""
    if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
        raise InvalidRequest(
            f"{what} must be 1-128 characters, none of them blank or one of :*?[]{{}} (got {job_id!r})"
        )
    return job_id


def _ms(when: datetime | float | timedelta | None, what: str, *, relative: bool) -> int | None:
    """`when` in ms: a datetime as unix ms; seconds or a timedelta as a duration (never negative)."""
    if when is None:
        return None
    if isinstance(when, datetime):
        if relative:
            raise InvalidRequest(f"{what} takes seconds or a timedelta, not a datetime")
        return round(when.timestamp() * 1000)
    seconds = when.total_seconds() if isinstance(when, timedelta) else when
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds != seconds:
        raise InvalidRequest(f"{what} must be a number of seconds (got {when!r})")
    if seconds < 0:
        raise InvalidRequest(f"{what} must not be negative (got {when!r})")
    return round(seconds * 1000)


async def enqueue_job(
    arq: ArqContext,
    cluster: str,
    function: str,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    *,
    job_id: str | None,
    defer_until: datetime | None,
    defer_by: float | timedelta | None,
    expires: float | timedelta | None,
) -> Job | None:
    """See `KcpClient.enqueue_job`."""
    if defer_until is not None and defer_by is not None:
        raise InvalidRequest("use either _defer_until or _defer_by, not both")
    if job_id is not None:
        validate_job_id(job_id, "_job_id")
    now = now_ms()
    if defer_until is not None and not isinstance(defer_until, datetime):
        raise InvalidRequest(f"_defer_until must be a datetime (got {defer_until!r})")
    due = _ms(defer_until, "_defer_until", relative=False)
    by = _ms(defer_by, "_defer_by", relative=True)
    due = now + by if by is not None else due if due is not None else now
    expires_ms = _ms(expires, "_expires", relative=True)
    deadline = now + expires_ms if expires_ms is not None else max(due, now) + arq_protocol.EXPIRES_EXTRA_MS
    request = parse_request(
        arq_protocol.arq_request(function, args, kwargs, score=due), max_bytes=arq.max_request_bytes
    )
    explicit_id, job_id = job_id is not None, job_id or uuid.uuid4().hex
    kernels, _ = await arq.views.get(cluster, wait=arq.wait_s)
    arq.engine.eligible(kernels, request)  # an unknown function fails here, before anything is written
    payload = encode_job(request.model_dump(mode="json", exclude_defaults=True), job_try=1, enqueue_ms=now)
    if explicit_id and await Job(arq, cluster, job_id).exists():
        return None
    pushed = arq.dispatcher.watch(job_id, cluster)  # before it can finish: its pushed result is not missed
    try:
        if due > now:
            call = deferred.defer(
                arq.keys,
                cluster,
                job_id,
                payload=payload,
                now_ms=now,
                due_ms=due,
                ttl_extra_ms=JOB_TTL_EXTRA_MS,
                reply_key=arq.dispatcher.reply_key(cluster),
                deadline_ms=deadline,
                strategy=arq.engine.config.strategy.value,
            )
            async with amap_redis_errors():
                if await call.run(arq.redis) == deferred.DUPLICATE:
                    arq.dispatcher.unwatch(job_id, pushed)
                    return None
            arq.mover.watch(cluster, due)
        else:
            try:
                await route(arq, cluster, request, job_id=job_id, payload=payload, deadline_ms=deadline)
            except NoKernelAvailable:
                if await Job(arq, cluster, job_id).exists():  # enqueue.lua found the id in use
                    arq.dispatcher.unwatch(job_id, pushed)
                    return None
                raise
            arq.mover.watch(cluster)  # its `Retry` may defer it
    except BaseException:
        arq.dispatcher.unwatch(job_id, pushed)
        raise
    return Job(arq, cluster, job_id, pushed)


async def route(
    arq: ArqContext,
    cluster: str,
    request: SyscallRequest,
    *,
    job_id: str,
    payload: str,
    deadline_ms: int,
    reply_key: str = "",
    strategy: str = "",
) -> Placed:
    """Enqueue an arq job on a kernel of `cluster` picked by the engine's strategy, without waiting
    for its outcome: candidates that refuse are left out (NoKernelAvailable when none takes it)."""
    engine = arq.engine
    with_loads = engine.config.strategy in (RoutingStrategy.LEAST_LOADED, RoutingStrategy.CAPABILITY_BASED)
    refused: set[str] = set()
    async with amap_redis_errors():
        while True:
            kernels, loads = await arq.views.get(cluster, wait=arq.wait_s, with_loads=with_loads)
            plan = engine.select(engine.eligible(kernels, request), loads, refused)
            if plan is None:
                raise NoKernelAvailable(f"no running kernel of {cluster} takes {request.type} now")
            now = now_ms()
            try:
                return await routing.enqueue(
                    arq.dispatcher.channel,
                    arq.keys,
                    plan,
                    job_id=job_id,
                    payload=payload,
                    reply_key=reply_key or arq.dispatcher.reply_key(cluster),
                    now_ms=now,
                    deadline_ms=deadline_ms,
                    ttl_ms=max(deadline_ms - now, 0) + JOB_TTL_EXTRA_MS,
                    strategy=strategy or engine.config.strategy.value,
                )
            except KernelBusy:
                refused.update(k.name for k in plan.candidates)
                arq.views.invalidate(cluster)


class Job:
    """arq's job handle for a kcp arq job: `status`, `result`, `info`, `result_info`, `abort`."""

    def __init__(
        self, arq: ArqContext, cluster: str, job_id: str, pushed: asyncio.Future[Outcome] | None = None
    ) -> None:
        """`pushed`: the future of the result pushed to this client (a job it enqueued)."""
        self._arq = arq
        self._pushed = pushed
        self.cluster = cluster
        self.job_id = job_id
        k = arq.keys
        self._job, self._deferred = k.job(cluster, job_id), k.job_deferred(cluster, job_id)
        self._result, self._deferred_set = k.job_result(cluster, job_id), k.cluster_deferred(cluster)

    def __repr__(self) -> str:
        return f"<kcp arq job {self.cluster}/{self.job_id}>"

    async def exists(self) -> bool:
        async with amap_redis_errors():
            return bool(await self._arq.redis.exists(self._job, self._deferred, self._result))

    async def status(self) -> JobStatus:
        """arq's `JobStatus`: deferred (waiting for its time), queued, in_progress, complete, not_found."""
        return self._status(*await self._read())

    async def _read(self) -> tuple[str | None, str | None, float | None]:
        """(kept result, job state, deferred score). Not a transaction: read in the order a job
        moves through them (deferred, queued or running, finished), so a job that moves between
        the reads is still seen in one of them (its later stage, which `_status` prefers)."""
        async with amap_redis_errors(), self._arq.redis.pipeline(transaction=False) as pipe:
            pipe.zscore(self._deferred_set, self.job_id)
            pipe.hget(self._job, "state")
            pipe.get(self._result)
            score, state, result = await pipe.execute()
        return result, state, score

    @staticmethod
    def _status(result: str | None, state: str | None, score: float | None) -> JobStatus:
        if result is not None:
            return JobStatus.complete
        if state == "running":
            return JobStatus.in_progress
        if state is not None:
            return JobStatus.queued
        if score is not None:
            return JobStatus.deferred if score > now_ms() else JobStatus.queued
        return JobStatus.not_found

    async def result_info(self) -> JobResult | None:
        """arq's `JobResult` when the job has finished and its result is kept, else None."""
        async with amap_redis_errors():
            raw = await self._arq.redis.get(self._result)
        return arq_protocol.job_result(raw) if raw else None

    async def info(self) -> JobDef | None:
        """arq's `JobDef` (a `JobResult` once finished), or None when the job is not known."""
        done = await self.result_info()
        if done is not None:
            return done
        # not a transaction: in the order a job moves (deferred, then live), and a job that
        # finished meanwhile is found by its result
        async with amap_redis_errors(), self._arq.redis.pipeline(transaction=False) as pipe:
            pipe.zscore(self._deferred_set, self.job_id)
            pipe.hget(self._deferred, "job")
            pipe.hget(self._job, "job")
            score, waiting, live = await pipe.execute()
        raw = live or waiting
        if raw is None:
            return await self.result_info()
        info = arq_protocol.job_def(raw, self.job_id, None)
        info.score = int(score) if score is not None else decode_job(raw)[0].get("score")
        return info

    async def result(self, timeout: float | None = None, *, poll_delay: float = 0.5) -> Any:  # noqa: ASYNC109 (arq's signature)
        """The function's return value, waiting up to `timeout` seconds (None: for ever).

        Raises `KernelError` (its `error_type` names the exception, e.g. ``TimeoutError``,
        ``JobExecutionFailed``, ``JobAborted``) when the job failed, `TimeoutError` when it did
        not finish in time, arq's `ResultNotFound` when the job is not known (or its result was
        not kept). This client's own jobs wake it when their result is pushed; others are read
        every `poll_delay` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        own = self._pushed is not None and not self._pushed.cancelled()
        fut = (
            self._pushed
            if own and self._pushed is not None
            else self._arq.dispatcher.watch(self.job_id, self.cluster)
        )
        read = not own  # our own job's result is pushed to us: wait for it before reading
        try:
            while True:
                if fut.done() and not fut.cancelled():
                    outcome = fut.result()
                    return _value(outcome.success, _pushed(outcome), outcome.kernel)
                if read:
                    raw, state, score = await self._read()
                    if raw is not None:
                        done = arq_protocol.job_result(raw)
                        return _value(done.success, done.result, done.function)
                    if self._status(raw, state, score) is JobStatus.not_found:
                        raise arq_protocol.ResultNotFound(
                            f"job {self.job_id} is not queued, deferred or running on {self.cluster}, "
                            "and no result is kept for it"
                        )
                read = True
                wait = poll_delay if deadline is None else min(poll_delay, deadline - time.monotonic())
                if wait <= 0:
                    raise TimeoutError(f"job {self.job_id} did not finish within {timeout}s")
                if fut.cancelled():  # the client stopped listening: read until the deadline
                    await asyncio.sleep(wait)
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(fut), wait)
        finally:
            if not own:
                self._arq.dispatcher.unwatch(self.job_id, fut)

    async def abort(self, *, timeout: float | None = None, poll_delay: float = 0.5) -> bool:  # noqa: ASYNC109 (arq's signature)
        """Abort the job if it has not started (deferred, or queued on a kernel): True when it
        was aborted; False when it runs or ran already (kcp does not cancel a running job).
        `timeout` (default: a mover's lease) bounds waiting for a client that routes it now."""
        limit = time.monotonic() + (LEASE_MS / 1000 + 1 if timeout is None else timeout)
        info = await self.info()
        message = encode_result(
            job_id=self.job_id,
            function=info.function if info is not None else "?",
            kernel="",
            queue="",
            attempt=info.job_try if info is not None else 0,
            enqueue_ms=round(info.enqueue_time.timestamp() * 1000) if info is not None else now_ms(),
            start_ms=now_ms(),
            finish_ms=now_ms(),
            value=None,
            error="job aborted before it started",
            error_type=arq_protocol.ABORTED,
        )
        while True:
            async with amap_redis_errors():
                kernel = await self._arq.redis.hget(self._job, "kernel") or ""
                status = await deferred.abort(
                    self._arq.keys,
                    self.cluster,
                    self.job_id,
                    kernel=kernel,
                    message=message,
                    keep_ms=round(arq_protocol.KEEP_RESULT_S * 1000),
                    now_ms=now_ms(),
                ).run(self._arq.redis)
            if status != "moved":
                return status == "aborted"
            if time.monotonic() >= limit:
                return False
            await asyncio.sleep(min(poll_delay, 0.05))


def _pushed(outcome: Outcome) -> Any:
    if outcome.success:
        return (outcome.value or {}).get("result")
    return {"error": outcome.error, "error_type": outcome.error_type}


def _value(success: bool, result: Any, where: str) -> Any:
    if success:
        return result
    error = result if isinstance(result, dict) else {"error": str(result), "error_type": "KernelError"}
    raise KernelError(str(error.get("error", "")), kernel=where, error_type=str(error.get("error_type", "")))


class DeferredMover:
    """Routes the due jobs of the clusters this client enqueued arq jobs to (see the module)."""

    def __init__(self, arq: ArqContext) -> None:
        self._arq = arq
        self._clusters: dict[str, float] = {}  # cluster -> earliest due time seen, unix ms
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def watch(self, cluster: str, due_ms: float = 0.0) -> None:
        """Look after `cluster`'s deferred jobs from now on; `due_ms`: a job due then (the mover
        is woken only for a cluster it did not know or a job earlier than it sleeps for)."""
        seen = self._clusters.get(cluster)
        if seen is None or (due_ms and (not seen or due_ms < seen)):
            self._clusters[cluster] = due_ms
            self._wake.set()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="kcp-arq-deferred")

    def unwatch(self, cluster: str) -> None:
        """Stop looking after `cluster` (destroyed, or another process looks after it)."""
        self._clusters.pop(cluster, None)

    @property
    def watched(self) -> frozenset[str]:
        return frozenset(self._clusters)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        await periodically(self._pass, what="arq deferred mover", log=logger, running=lambda: True)

    async def _pass(self) -> None:
        """Move what is due in every watched cluster, then sleep until the next due job (at most
        `RESCAN_S`, or until `watch` names an earlier one)."""
        self._wake.clear()
        now = now_ms()
        for cluster in list(self._clusters):
            self._clusters[cluster] = await self._move_due(cluster, now)
        upcoming = [t for t in self._clusters.values() if t]
        pause = RESCAN_S if not upcoming else min(RESCAN_S, max(min(upcoming) - now_ms(), 0) / 1000)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), pause)

    async def _move_due(self, cluster: str, now: int) -> float:
        """Route `cluster`'s due jobs; the due time of its next one (0: none)."""
        redis, keys = self._arq.redis, self._arq.keys
        async with amap_redis_errors():
            due = await redis.zrangebyscore(
                keys.cluster_deferred(cluster), "-inf", now, start=0, num=MOVE_BATCH
            )
        for job_id in due:
            try:
                await self._move(cluster, job_id)
            except RedisError:
                raise
            except KcpError as exc:  # no kernel takes it now: it waits for the lease, then again
                logger.info("deferred job %s/%s not routed yet: %s", cluster, job_id, exc)
        async with amap_redis_errors():
            head = await redis.zrange(keys.cluster_deferred(cluster), 0, 0, withscores=True)
        return float(head[0][1]) if head else 0.0

    async def _move(self, cluster: str, job_id: str) -> None:
        arq = self._arq
        async with amap_redis_errors():
            taken = await deferred.undefer(arq.keys, cluster, job_id, now_ms=now_ms(), lease_ms=LEASE_MS).run(
                arq.redis
            )
        if not isinstance(taken, deferred.Due):
            return
        try:
            request = parse_request(decode_job(taken.job)[0], max_bytes=arq.max_request_bytes)
        except ValueError as exc:  # InvalidRequest too: it can never run, so it goes
            logger.warning("dropping deferred job %s/%s: it is not a job (%s)", cluster, job_id, exc)
            async with amap_redis_errors():
                await deferred.undefer(arq.keys, cluster, job_id, now_ms=now_ms(), done=taken.lease).run(
                    arq.redis
                )
            return
        await route(
            arq,
            cluster,
            request,
            job_id=job_id,
            payload=taken.job,
            deadline_ms=taken.deadline_ms,
            reply_key=taken.reply,
            strategy=taken.strategy,
        )
        async with amap_redis_errors():
            await deferred.undefer(arq.keys, cluster, job_id, now_ms=now_ms(), done=taken.lease).run(
                arq.redis
            )
