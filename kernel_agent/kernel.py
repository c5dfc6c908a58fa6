"""One kernel: an OS process that executes the jobs routed to its queue.

It wakes on a blocking pop of its own queue (no polling: an idle kernel issues one
BZPOPMIN every `IDLE_BLOCK` seconds), claims each job under its fencing epoch, runs the
syscall and pushes the result straight to the waiting client (see `controlplane/lua/`).
SIGTERM drains: no new work is accepted, queued work finishes, then the process exits.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import time

import redis.asyncio as aioredis
import redis.exceptions

from controlplane.connection import connect
from controlplane.jobs import REPLY_TTL_MS, decode_job, encode_result
from controlplane.keys import Keys
from controlplane.scripts import Scripts
from controlplane.settings import Settings

from .syscalls import (
    KernelMemory,
    SyscallContext,
    SyscallError,
    SyscallRegistry,
    builtin_registry,
    load_handlers,
)

logger = logging.getLogger(__name__)

#: Blocking-pop timeout while idle, seconds: the only Redis traffic of an idle kernel.
IDLE_BLOCK = 5.0
#: Blocking-pop timeout while draining, seconds.
DRAIN_BLOCK = 0.2
#: Exit code when the control plane no longer assigns this kernel to our agent.
EXIT_UNASSIGNED = 3


class KernelProcess:
    """The run loop of one kernel incarnation."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        *,
        cluster: str,
        name: str,
        agent: str,
        registry: SyscallRegistry,
        concurrency: int = 1,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.scripts = Scripts(redis)
        self.cluster = cluster
        self.name = name
        self.agent = agent
        self.registry = registry
        self.ctx = SyscallContext(memory=KernelMemory(), kernel=name, cluster=cluster)
        self.epoch = ""
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._draining = asyncio.Event()
        self._superseded = False  # a newer incarnation owns our name: stop without touching its work
        self.queue_key = keys.queue(cluster, name)
        self.inflight_key = keys.inflight(cluster, name)

    def drain(self) -> None:
        """Stop taking new work; `run` returns once everything in flight is finished."""
        self._draining.set()

    async def start(self) -> bool:
        """Take a fresh fencing epoch and take back jobs a previous incarnation left in flight."""
        epoch, state = await self.scripts.kernel_start(
            keys=[self.keys.kernel(self.cluster, self.name), self.keys.epoch()],
            args=[
                self.agent,
                os.getpid(),
                socket.gethostname(),
                f"{time.time():.3f}",
                " ".join(self.registry.names()),
                " ".join(sorted(self.registry.capabilities())),
            ],
        )
        if int(epoch) == 0:
            logger.warning("kernel %s/%s not started: %s", self.cluster, self.name, state)
            return False
        self.epoch = str(epoch)
        if state == "draining":  # restarted after a crash while draining: finish the queue, then stop
            self.drain()
        recovered = await self.requeue_own()
        await self.redis.publish(self.keys.notify(), self.cluster)
        logger.info(
            "kernel %s/%s up: epoch %s, state %s, %d jobs recovered",
            self.cluster,
            self.name,
            epoch,
            state,
            recovered,
        )
        return True

    async def requeue_own(self) -> int:
        """Put every job still in our in-flight set back on our queue under our epoch."""
        ids = await self.redis.zrange(self.inflight_key, 0, -1)
        moved = 0
        for i in range(0, len(ids), 256):
            chunk = ids[i : i + 256]
            res = await self.scripts.rebind(
                keys=[
                    self.inflight_key,
                    self.keys.kernel(self.cluster, self.name),
                    self.queue_key,
                    self.inflight_key,
                    *(self.keys.job(self.cluster, j) for j in chunk),
                ],
                args=[self.name, *chunk],
            )
            moved += max(int(res), 0)
        return moved

    async def run(self) -> None:
        """Serve until drained (SIGTERM) or unassigned. Reconnects after Redis outages."""
        backoff = 0.1
        while True:
            try:
                if not self.epoch and not await self.start():
                    return
                await self._serve()
                return
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                logger.warning(
                    "kernel %s/%s lost Redis (%s); retrying in %.1fs", self.cluster, self.name, exc, backoff
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def _serve(self) -> None:
        while True:
            if self._draining.is_set() and not self._tasks and (self._superseded or await self._try_stop()):
                return
            await self._slots.acquire()
            try:
                popped = await self._pop()
            except BaseException:
                self._slots.release()
                raise
            if popped is None:
                self._slots.release()
                continue
            task = asyncio.create_task(self._handle(str(popped[1])))
            self._tasks.add(task)
            task.add_done_callback(self._job_done)

    async def _pop(self) -> tuple[str, str, float] | None:
        """Block on our queue until a job arrives, the timeout passes, or a drain begins.

        A pop interrupted by a drain may already have taken a job off the queue; the job is
        still in our in-flight set, and `_try_stop` puts it back."""
        if self._draining.is_set():
            return await self.redis.bzpopmin(self.queue_key, timeout=DRAIN_BLOCK)  # type: ignore[no-any-return]
        pop = asyncio.ensure_future(self.redis.bzpopmin(self.queue_key, timeout=IDLE_BLOCK))
        drain = asyncio.ensure_future(self._draining.wait())
        try:
            await asyncio.wait({pop, drain}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for fut in (pop, drain):
                fut.cancel()
            await asyncio.gather(pop, drain, return_exceptions=True)
        if pop.cancelled():
            return None
        return pop.result()  # type: ignore[no-any-return]

    def _job_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            logger.error("kernel %s/%s job task failed", self.cluster, self.name, exc_info=task.exception())

    async def _try_stop(self) -> bool:
        """Mark ourselves draining, and stopped once nothing is in flight."""
        done = int(
            await self.scripts.kernel_stop(
                keys=[self.keys.kernel(self.cluster, self.name), self.inflight_key], args=[self.epoch]
            )
        )
        if done == 1:
            await self.redis.publish(self.keys.notify(), self.cluster)
            logger.info("kernel %s/%s drained and stopped", self.cluster, self.name)
            return True
        if done < 0:  # another incarnation owns the record now
            return True
        if not await self.redis.zcard(self.queue_key):
            # in flight but not queued: a job popped by an attempt that never ran; take it back
            await self.requeue_own()
        return False

    async def _handle(self, job_id: str) -> None:
        job_key = self.keys.job(self.cluster, job_id)
        claimed = await self.scripts.claim(
            keys=[job_key, self.inflight_key, self.queue_key], args=[job_id, self.name, self.epoch, _now_ms()]
        )
        if claimed[0] == "zombie":
            logger.warning(
                "kernel %s/%s epoch %s was replaced by a newer incarnation; exiting",
                self.cluster,
                self.name,
                self.epoch,
            )
            self._superseded = True
            self.drain()
            return
        if claimed[0] != "ok":
            logger.debug("job %s not run: %s", job_id, claimed[0])
            return
        _, raw_job, reply_key, attempt = claimed
        start_ms = _now_ms()
        function, value, error, error_type = "?", None, "", ""
        enqueue_ms = start_ms
        try:
            request, enqueue_ms = decode_job(raw_job)
            function = str(request.get("type", "?"))
            value = await self.registry.execute(self.ctx, request)
        except SyscallError as exc:
            error, error_type = str(exc), exc.error_type
        except Exception as exc:  # a corrupt job must not kill the kernel
            logger.exception("job %s could not be decoded", job_id)
            error, error_type = f"malformed job: {exc}", "MalformedJob"
        finish_ms = _now_ms()
        latency_ms = max(time.time() * 1000 - enqueue_ms, 0.0)  # queue wait + execution
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
        )
        delivered = await self.scripts.finish(
            keys=[
                job_key,
                self.inflight_key,
                reply_key,
                self.keys.cluster_stats(self.cluster),
                self.keys.kernel_stats(self.cluster, self.name),
            ],
            args=[
                job_id,
                self.name,
                self.epoch,
                reply,
                0 if error_type else 1,
                f"{latency_ms:.3f}",
                REPLY_TTL_MS,
            ],
        )
        if not delivered:
            logger.info("result of job %s rejected (fenced: the job moved or was cancelled)", job_id)


def _now_ms() -> int:
    return int(time.time() * 1000)


async def _amain(args: argparse.Namespace) -> int:
    settings = Settings()
    registry = builtin_registry(max_request_bytes=settings.max_request_bytes)
    load_handlers(registry, args.handlers)
    redis = connect(settings.redis_url)
    kernel = KernelProcess(
        redis,
        Keys(settings.prefix),
        cluster=args.cluster,
        name=args.name,
        agent=args.agent,
        registry=registry,
        concurrency=args.concurrency,
    )
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, kernel.drain)
    loop.add_signal_handler(signal.SIGINT, kernel.drain)
    try:
        await kernel.run()
    finally:
        await redis.aclose()
    return 0 if kernel.epoch else EXIT_UNASSIGNED


def main(argv: list[str] | None = None) -> int:
    """Entry point of a kernel process; the agent starts it (settings come from KCP_* variables)."""
    parser = argparse.ArgumentParser(prog="kcp-kernel", description=__doc__)
    parser.add_argument("--cluster", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--agent", required=True)
    parser.add_argument("--handlers", action="append", default=[], help="module with register(registry)")
    parser.add_argument("--concurrency", type=int, default=1, help="jobs run at once")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format=f"%(asctime)s kernel[{args.cluster}/{args.name}] %(levelname)s %(message)s",
    )
    return asyncio.run(_amain(args))


if __name__ == "__main__":
    raise SystemExit(main())
