"""One kernel: an OS process that executes the jobs routed to its queue.

It wakes on a blocking pop of its wake token, set whenever a job is queued for it (no
polling: an idle kernel issues one BZPOPMIN and one claim every `IDLE_BLOCK` seconds), claims
each job under its fencing epoch in the same round trip, runs the syscall and pushes the
result straight to the waiting client (see `controlplane/redis/lua/`). When its own queue runs dry
it takes over the oldest job still queued on a sibling that it can run (work stealing, in the
same claim.lua call), so work waits for the first free kernel rather than for the one it was
routed to; an idle kernel also looks at its siblings' queues once every `IDLE_BLOCK`.
SIGTERM drains: no new work is accepted (none is taken from siblings either), queued work
finishes, then the process exits.

A kernel of one worker (the default) holds one Redis connection: its start, the sibling reads,
its stop and every job go over the worker's channel, in the gaps between its blocking pops
(only the rare re-run of a script Redis forgot takes a connection of the pool; on a Redis Cluster
it holds one more, to add its results to clients' bells on other nodes).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from controlplane.errors import RedisError, RedisUnavailable
from controlplane.lifecycle import Service
from controlplane.protocol import stats
from controlplane.protocol.jobs import REPLY_TTL_MS, decode_job, encode_job, encode_result
from controlplane.protocol.keys import Keys
from controlplane.redis.channel import Channel, Command
from controlplane.redis.connect import BLOCK_GRACE_SECONDS, AsyncRedis, AsyncRedisCluster
from controlplane.redis.errors import amap_redis_errors, error_reply
from controlplane.redis.retry import best_effort, retry
from controlplane.redis.scripts import deferred, jobs
from controlplane.redis.scripts.call import Call, preloading
from controlplane.redis.scripts.kernels import (
    KERNEL_START,
    KERNEL_STOP,
    REBIND,
    NotStarted,
    Stop,
    kernel_start,
    kernel_stop,
    rebind,
    reply_fields,
)
from kernel_agent.kernel.load_report import LoadReporter
from kernel_agent.kernel.siblings import Siblings
from kernel_agent.syscalls import (
    Deferral,
    JobInfo,
    KernelMemory,
    SyscallContext,
    SyscallError,
    SyscallRegistry,
    declared_capabilities,
)

logger = logging.getLogger(__name__)

#: Blocking-pop timeout while idle, seconds: that pop and the claim behind it are the only
#: Redis traffic of an idle kernel (0.25 commands/s). It bounds how long a job queued without a
#: wake token (written by hand) or behind a busy sibling waits for an idle kernel's look.
IDLE_BLOCK = 8.0
#: Blocking-pop timeout while draining, seconds.
DRAIN_BLOCK = 0.2
#: The shortest blocking pop a due load report shortens an idle block to, seconds.
MIN_BLOCK = 0.05
#: claim.lua calls a kernel keeps for reuse at most (more only when siblings are sampled).
MAX_CLAIM_CALLS = 64
#: How long a deferred job's keys outlive its deadline, ms (a safety net, as for queued jobs).
DEFERRED_TTL_EXTRA_MS = 3_600_000


class Finish(NamedTuple):
    """A finished job: its id, its finish.lua call (defer.lua for a job an arq `Retry` defers),
    and what tells its client: `express`, the commands that add the reply to the client's bell
    once the call delivered it and no subscriber got it from the call (on a Redis Cluster; on one
    Redis finish.lua adds it itself), and
    `ring`, those that ring the bell with the cluster's name when a call sent again after an
    outage was rejected (it may have been delivered before the outage, its bell write lost).
    Both are empty without a bell."""

    job_id: str
    call: Call[bool] | Call[int]
    express: tuple[Command, ...] = ()
    ring: tuple[Command, ...] = ()


class KernelProcess(Service):
    """The run loop of one kernel incarnation. `run()`; `drain()` (SIGTERM) ends it cleanly."""

    def __init__(
        self,
        redis: AsyncRedis,
        keys: Keys,
        *,
        cluster: str,
        name: str,
        agent: str,
        registry: SyscallRegistry,
        concurrency: int = 1,
        capabilities: Iterable[str] = (),
        arq_keep_ms: Mapping[str, int] | None = None,
    ) -> None:
        """`capabilities`: the agent's (`kcp agent --capabilities`), declared with those of the
        registry's syscalls. `arq_keep_ms`: the syscalls that are arq functions, and how long
        each keeps its result, ms (they also get the job in their context, and may defer it)."""
        super().__init__()
        self.what = f"kernel {cluster}/{name}"
        self.redis = redis
        self.keys = keys
        self.cluster = cluster
        self.name = name
        self.agent = agent
        self.registry = registry
        #: what the kernel record declares and work stealing compares siblings against
        self.capabilities = declared_capabilities(registry, capabilities)
        self.ctx = SyscallContext(memory=KernelMemory(), kernel=name, cluster=cluster)
        self.epoch = ""
        self.concurrency = concurrency
        self.arq_keep_ms = dict(arq_keep_ms or {})
        self._busy = 0  # jobs between claim and delivered result, over all workers
        self._popping: set[Channel] = set()  # workers blocked on their pop (a drain wakes them)
        self._undelivered: list[Finish] = []  # results an outage kept from finish.lua
        self._draining = asyncio.Event()
        self._superseded = False  # a newer incarnation owns our name: stop without touching its work
        #: on one Redis the client's bell is on the node of the job: finish.lua adds the reply to
        #: it. On a Redis Cluster it may live on another node: finish.lua publishes the reply on
        #: the reply list's shard channel, where the client subscribes, and when no subscriber got
        #: it the reply goes to the bell once finish.lua delivered it (not beside it: a result
        #: finish.lua rejects must not reach the client), on a channel of its own (the worker's
        #: channel to that node may be blocked in its pop)
        self._bell_inside = not isinstance(redis, AsyncRedisCluster)
        self._ringer: Channel | None = None  # made at the first reply it adds
        self.queue_key = keys.queue(cluster, name)
        self.inflight_key = keys.inflight(cluster, name)
        self.wake_key = keys.kernel_wake(cluster, name)
        self.siblings = Siblings(
            keys,
            cluster=cluster,
            name=name,
            registry=registry,
            capabilities=self.capabilities,
            wake_key=self.wake_key,
        )
        self.load = LoadReporter(keys, cluster=cluster, name=name, agent=agent, busy=lambda: self._busy)
        #: claim.lua calls made so far, by what they depend on (`_claim_call`): a worker claims
        #: once per job, and the call's keys and arguments rarely change
        self._claims: dict[tuple[object, ...], Call[jobs.Claimed | jobs.NotClaimed]] = {}
        scripts = (jobs.CLAIM, jobs.FINISH, KERNEL_START, KERNEL_STOP, REBIND)
        #: the first worker's channel, which also carries the start, the stop and the sibling
        #: reads (so a kernel of one worker holds one connection)
        self.channel = preloading(redis, *scripts, *((deferred.DEFER,) if self.arq_keep_ms else ()))

    def drain(self) -> None:
        """Stop taking new work; `run` returns once everything in flight is finished."""
        self.request_stop()

    def _on_stop(self) -> None:
        self._draining.set()
        for channel in self._popping:  # end their long blocking pops now (see `_work`)
            asyncio.get_running_loop().create_task(channel.reset("kernel draining"))

    async def start(self) -> bool:
        """Take a fresh fencing epoch and take back jobs a previous incarnation left in flight."""
        started = await kernel_start(
            self.keys,
            self.cluster,
            self.name,
            agent=self.agent,
            pid=os.getpid(),
            host=socket.gethostname(),
            now_s=f"{time.time():.3f}",
            syscalls=self.registry.names(),
            capabilities=sorted(self.capabilities),
        ).run(self.channel)
        if isinstance(started, NotStarted):
            logger.warning("kernel %s/%s not started: %s", self.cluster, self.name, started.reason)
            return False
        epoch, state = started.epoch, started.state
        self.epoch = str(epoch)
        if state == "draining":  # restarted after a crash while draining: finish the queue, then stop
            self.drain()
        recovered = await self.requeue_own(self.channel)
        await self.channel.execute("PUBLISH", self.keys.notify(), self.cluster)
        logger.info(
            "kernel %s/%s up: epoch %s, state %s, %d jobs recovered",
            self.cluster,
            self.name,
            epoch,
            state,
            recovered,
        )
        return True

    async def requeue_own(self, channel: Channel) -> int:
        """Put every job still in our in-flight set back on our queue under our epoch."""
        ids = await channel.execute("ZRANGE", self.inflight_key, 0, -1)
        moved = 0
        for i in range(0, len(ids), 256):
            chunk = ids[i : i + 256]
            replies = await channel.execute_many(reply_fields(self.keys, self.cluster, chunk))
            call = rebind(
                self.keys, self.cluster, self.name, source=self.inflight_key, job_ids=chunk, replies=replies
            )
            rebound = await call.run(channel)
            moved += max(rebound.moved, 0)
            now = _now_ms()
            rings = [
                c
                for key in rebound.answered
                for c in jobs.ring(self.keys, self.cluster, key, now, ttl_ms=REPLY_TTL_MS)
            ]
            if rings:  # rebind.lua replied: its pushes are done (best effort: a lost ring only delays)
                await channel.execute_many(rings)
        return moved

    async def _loop(self) -> None:
        """Serve until drained (SIGTERM) or unassigned. Reconnects after Redis outages."""
        outage = False

        def lost(exc: RedisError) -> None:
            nonlocal outage
            outage = True

        async def serve() -> None:
            if not self.epoch and not await self.start():
                return
            if outage:
                await self._recover()
            await self._serve()

        # an error that needs a person ends the process: its agent restarts it with a back-off
        await retry(serve, what=self.what, log=logger, on_error=lost, transient_only=True)

    async def _recover(self) -> None:
        """After an outage, with no worker running: deliver the results the outage held up
        (finish.lua is fenced, so one that did arrive is not delivered twice), then put back
        the jobs whose claim was lost with the connection."""
        while self._undelivered:
            finish = self._undelivered[-1]
            delivered = await finish.call.run(self.channel)
            tell = finish.ring if not delivered else _unheard(finish, delivered)
            if tell:  # best effort: an error reply is returned
                await self.channel.execute_many(tell)
            self._undelivered.pop()
        self._busy = 0
        await self.requeue_own(self.channel)

    async def _serve(self) -> None:
        scripts = (jobs.CLAIM, jobs.FINISH, REBIND, *((deferred.DEFER,) if self.arq_keep_ms else ()))
        channels = [self.channel, *(preloading(self.redis, *scripts) for _ in range(self.concurrency - 1))]
        try:
            async with asyncio.TaskGroup() as workers:  # one worker failing stops them all
                for channel in channels:
                    workers.create_task(self._work(channel))
        except BaseExceptionGroup as group:  # the outage that stopped them, for `run`
            raise group.exceptions[0] from None
        finally:
            for channel in [*channels, *([self._ringer] if self._ringer else [])]:
                await channel.aclose()  # each reconnects if used again (after an outage)

    async def _work(self, channel: Channel) -> None:
        """One worker: claim, execute, deliver, on a connection of its own.

        Each step is one write: the result of the job just run (if any), then the claim of the
        next job (claim.lua, which takes a sibling's job when our queue is empty). While
        claim.lua reports jobs waiting here or on a sibling, that is all; otherwise the claim
        goes behind a blocking pop of our wake token (set by enqueue.lua). Redis runs a command
        written behind a blocking one as soon as the block ends, so the job that wakes an idle
        worker is claimed in the same round trip: one round trip per job, busy or idle. An idle
        kernel sends one BZPOPMIN and one claim every `IDLE_BLOCK` seconds."""
        finish: Finish | None = None
        busy = True  # jobs may be waiting: claim the next at once rather than block
        replies: list[asyncio.Future[Any]] = []
        try:
            while not self._superseded:  # a newer incarnation owns our name: stop, touch nothing of it
                draining = self._draining.is_set()
                block = DRAIN_BLOCK if draining else IDLE_BLOCK
                steps = [] if finish is None else [finish.call.command]
                first = len(steps)
                steps += self.load.commands()  # our load record, when a report is due
                reporting = len(steps) - first
                report_in = self.load.pending_in()
                if report_in is not None:  # block no longer than the next report is due
                    block = min(block, max(report_in, MIN_BLOCK))
                if not busy:
                    steps.append(("BZPOPMIN", self.wake_key, block))
                if self.siblings.stale and not draining:  # the cluster's version moved
                    await self.siblings.refresh(channel)
                claim = self._claim_call(after_job=finish is not None, after_pop=not busy)
                steps.append(claim.command)
                replies = await channel.send(steps)
                reported = replies[first : first + reporting]
                if finish is not None:
                    await self._delivered(finish, replies[:first])
                    finish = None
                claimed: jobs.Claimed | jobs.NotClaimed | None = None
                if busy or await self._woken(channel, replies[-2], replies[-1], block):
                    claimed = await claim.settle(await replies[-1], channel)  # NOSCRIPT: again here
                    self.siblings.seen(claimed.version)
                for reply in reported:  # best effort: a lost report is written at the next change
                    _forget(reply)
                if claimed is None or _empty(claimed):
                    busy = False
                    if draining and not self._busy and await self._try_stop(channel):
                        return
                    continue
                # work waiting here or on a sibling: claim the next at once, else block first
                busy = not isinstance(claimed, jobs.Claimed) or claimed.queued > 0
                finish = await self._run(claimed)
            if finish is not None:  # still deliver it: finish.lua decides whether it may
                await self._delivered(finish, await channel.send([finish.call.command]))
        except BaseException:
            if finish is not None:  # `_recover` delivers it once Redis is back
                self._undelivered.append(finish)
            for reply in replies:  # the step's other replies: nobody waits for them now
                _forget(reply)
            raise

    async def _woken(
        self, channel: Channel, pop: asyncio.Future[Any], claim: asyncio.Future[Any], block: float
    ) -> bool:
        """Wait for the blocking pop of our wake token to end. True when it did (with the token,
        or at its timeout): the claim written behind it has run, `claim` holds its reply. False
        when a drain began: it resets the connection of a worker blocked here, and the claim
        goes with it; a job that claim may have taken is still in our in-flight set, and
        `_try_stop` puts it back."""
        self._popping.add(channel)
        try:
            async with asyncio.timeout(block + BLOCK_GRACE_SECONDS), amap_redis_errors():
                popped = await pop
        except RedisUnavailable:  # the connection dropped (a drain resets it, see `drain`)
            _forget(claim)
            if not self._draining.is_set():
                raise
            return False
        except TimeoutError:  # the server never answered a bounded pop: the link is dead
            _forget(claim)
            await channel.reset("blocking pop overdue")
            raise RedisUnavailable("BZPOPMIN overdue") from None
        finally:
            self._popping.discard(channel)
        if error_reply(popped):
            # the wake key holds something else (claim.lua replaces it): no tight loop meanwhile
            logger.warning("kernel %s/%s: blocking pop failed: %s", self.cluster, self.name, popped)
            await asyncio.sleep(DRAIN_BLOCK)
        elif isinstance(popped, Exception):
            _forget(claim)
            raise popped
        return True

    def _claim_call(self, *, after_job: bool, after_pop: bool) -> Call[jobs.Claimed | jobs.NotClaimed]:
        """claim.lua; unless draining, with the siblings whose queues it counts and may take
        from, asking for the cluster's version `after_job` when the check is due. `now` is left
        to the Redis clock: a claim written behind a blocking pop runs when the pop returns."""
        if self._draining.is_set():
            siblings, version = None, False
        else:
            siblings = tuple(self.siblings.for_claim())
            version = self.siblings.ask_version(after_job=after_job)
        key = (self.epoch, siblings, version, after_pop)
        call = self._claims.get(key)
        if call is None:
            if len(self._claims) >= MAX_CLAIM_CALLS:  # siblings sampled from a large cluster
                self._claims.clear()
            call = self._claims[key] = jobs.claim(
                self.keys,
                self.cluster,
                self.name,
                epoch=self.epoch,
                siblings=siblings,
                version=version,
                after_pop=after_pop,
            )
        return call

    async def _try_stop(self, channel: Channel) -> bool:
        """Mark ourselves draining, and stopped once nothing is in flight (on the worker's own
        `channel`, between its steps)."""
        done = await kernel_stop(self.keys, self.cluster, self.name, epoch=self.epoch).run(channel)
        if done is Stop.STOPPED:
            await channel.execute("PUBLISH", self.keys.notify(), self.cluster)
            logger.info("kernel %s/%s drained and stopped", self.cluster, self.name)
            return True
        if done is Stop.NOT_OURS:
            return True
        if not await channel.execute("ZCARD", self.queue_key):
            # in flight but not queued: a job claimed for a pop the drain cut off; take it back
            await self.requeue_own(channel)
        return False

    async def _run(self, claimed: jobs.Claimed | jobs.NotClaimed) -> Finish | None:
        """Execute a job claim.lua handed us; its finish.lua call, or None when it is not ours
        to run."""
        if isinstance(claimed, jobs.NotClaimed) and claimed.status is jobs.Skip.ZOMBIE:
            logger.warning(
                "kernel %s/%s epoch %s was replaced by a newer incarnation; exiting",
                self.cluster,
                self.name,
                self.epoch,
            )
            self._superseded = True
            self.drain()
            return None
        if isinstance(claimed, jobs.NotClaimed):
            logger.debug("job %s not run: %s", claimed.id, claimed.status)
            return None
        job_id, raw_job, attempt = claimed.id, claimed.job, claimed.attempt
        start_ms = _now_ms()
        function, value, error, error_type = "?", None, "", ""
        enqueue_ms, keep_ms = start_ms, 0
        try:
            request, enqueue_ms, base_try = decode_job(raw_job)
            function = str(request.get("type", "?"))
            ctx = self.ctx
            if function in self.arq_keep_ms:
                keep_ms = self.arq_keep_ms[function]
                # arq counts a try per start: the envelope's, plus the claims a dead kernel cut off
                job = JobInfo(job_id, base_try + max(int(attempt), 1) - 1, enqueue_ms)
                ctx = dataclasses.replace(self.ctx, job=job)
            value = await self.registry.execute(ctx, request)
        except Deferral as exc:
            return Finish(job_id, self._defer(job_id, request, enqueue_ms, exc))
        except SyscallError as exc:
            error, error_type = str(exc), exc.error_type
        except Exception as exc:  # a corrupt job must not kill the kernel
            logger.warning("job %s could not be decoded: %s", job_id, exc)
            error, error_type = f"malformed job: {exc}", "MalformedJob"
        finish_ms = _now_ms()
        latency_ms = max(time.time() * 1000 - enqueue_ms, 0.0)  # queue wait + execution
        queue_ms = max(int(start_ms - enqueue_ms), 0)  # enqueue to claim, whole ms (HINCRBY)
        reply = encode_result(
            job_id=job_id,
            function=function,
            kernel=self.name,
            queue=self.queue_key,
            attempt=int(attempt),
            enqueue_ms=enqueue_ms,
            start_ms=start_ms,
            finish_ms=finish_ms,
            value=value,
            error=error,
            error_type=error_type,
            epoch=int(self.epoch),
        )
        call = jobs.finish(
            self.keys,
            self.cluster,
            self.name,
            job_id=job_id,
            epoch=self.epoch,
            reply_key=claimed.reply,
            message=reply,
            success=not error_type,
            latency_ms=f"{latency_ms:.3f}",
            reply_ttl_ms=REPLY_TTL_MS,
            queue_ms=queue_ms,
            buckets=(
                stats.bucket_field(stats.LATENCY, latency_ms / 1000),
                stats.bucket_field(stats.QUEUE, queue_ms / 1000),
            ),
            keep_ms=keep_ms,
            bell=self.keys.reply_bell_for(claimed.reply) if self._bell_inside else None,
            publish=not self._bell_inside,
        )
        self.load.finished(latency_ms, failed=bool(error_type), queued=getattr(claimed, "queued", 0))
        self._busy += 1  # until `_delivered` has finish.lua's reply
        return Finish(
            job_id,
            call,
            () if self._bell_inside else jobs.express(self.keys, claimed.reply, reply, ttl_ms=REPLY_TTL_MS),
            jobs.ring(self.keys, self.cluster, claimed.reply, finish_ms, ttl_ms=REPLY_TTL_MS),
        )

    def _defer(self, job_id: str, request: dict[str, Any], enqueue_ms: int, exc: Deferral) -> Call[int]:
        """defer.lua for a job whose arq function raised `Retry`: back to the cluster's deferred
        set as its next try, due `exc.defer_ms` from now (a client routes it then)."""
        now = _now_ms()
        due = now + exc.defer_ms
        logger.info(
            "job %s (%s) retries in %.2fs as try %d",
            job_id,
            request["type"],
            exc.defer_ms / 1000,
            exc.job_try,
        )
        self._busy += 1  # until `_delivered` has defer.lua's reply
        return deferred.defer(
            self.keys,
            self.cluster,
            job_id,
            payload=encode_job(request | {"score": due}, job_try=exc.job_try, enqueue_ms=enqueue_ms),
            now_ms=now,
            due_ms=due,
            ttl_extra_ms=DEFERRED_TTL_EXTRA_MS,
            retry_of=(self.name, self.epoch),
        )

    async def _delivered(self, finish: Finish, replies: Sequence[asyncio.Future[Any]]) -> None:
        """Account for the reply of `finish`'s call, sent together with the next pop."""
        try:
            # NOSCRIPT (SCRIPT FLUSH): again, not on the worker's channel: the blocking pop sent
            # after it holds that connection
            delivered = await finish.call.settle(await replies[0], self.redis)
        finally:
            self._busy -= 1
        if not delivered:
            logger.info("result of job %s rejected (fenced: the job moved or was cancelled)", finish.job_id)
        elif express := _unheard(finish, delivered):
            if self._ringer is None:
                self._ringer = preloading(self.redis)
            # not waited for (the next job need not wait a round trip to another node), best
            # effort: a lost one only delays the reply (the client takes the list's copy)
            async with best_effort():
                for sent in await self._ringer.send(express):
                    sent.add_done_callback(_forget)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _empty(claimed: jobs.Claimed | jobs.NotClaimed) -> bool:
    """Whether claim.lua found nothing to take (with or without the cluster's version)."""
    return isinstance(claimed, jobs.NotClaimed) and claimed.status is jobs.Skip.EMPTY


def _unheard(finish: Finish, delivered: int) -> tuple[Command, ...]:
    """What adds `finish`'s delivered reply to its client's bell: nothing when a subscriber got it."""
    return () if delivered == jobs.PUBLISHED else finish.express


def _forget(reply: asyncio.Future[Any]) -> None:
    """Mark a reply nobody will wait for as seen (asyncio would log its error at exit)."""
    if reply.done() and not reply.cancelled():
        reply.exception()
    else:
        reply.cancel()
