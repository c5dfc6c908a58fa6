"""The agent: one daemon per host that registers, keeps a lease, and supervises kernels.

The control plane writes which kernels this agent should run (`agent:{name}:kernels`) and
pushes to `agent:{name}:wake`; the agent re-reads the assignment when woken, and at least
every `agent_poll` seconds (the level-triggered safety net), with one blocking pop that stays
pending across loop turns. Each kernel is its own OS process (`python -m kernel_agent.kernel`),
forked from the agent's fork server when it runs (kernel_agent/agent/spawner.py), restarted
with back-off when it crashes: its exit is seen through the process handle at once, without
asking Redis. Every heartbeat interval the loop also converges locally (restarts due),
rewrites `agent:{name}:running` when the set of live kernel processes changed, and writes the
cpu and memory of kernels whose load changed (or is `load_refresh` old).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, Field

from controlplane.errors import PermissionDenied, RedisError, RedisUnavailable
from controlplane.lifecycle import Service
from controlplane.protocol.keys import ASSIGN_DRAIN, ASSIGN_RUN, Keys
from controlplane.protocol.models import Capability, Name
from controlplane.protocol.records import AgentLease, AgentRecord, KernelRecord, LoadRecord, parse_assignment
from controlplane.redis import portable
from controlplane.redis.connect import AsyncPipeline, AsyncRedis
from controlplane.redis.errors import amap_redis_errors
from controlplane.redis.retry import Backoff, best_effort, periodically
from controlplane.settings import Settings
from kernel_agent.agent.heartbeat import Heartbeat
from kernel_agent.agent.load import LoadGate, ProcessSampler
from kernel_agent.agent.spawner import KernelHandle, Spawner
from kernel_agent.contract import EXIT_UNASSIGNED, KERNEL_MODULE, KERNEL_PRELOAD
from kernel_agent.syscalls import arq_settings_in, builtin_registry, declared_capabilities, load_handlers

logger = logging.getLogger(__name__)


class AgentConfig(BaseModel):
    """What `kcp agent` is started with."""

    name: Name = Field(default_factory=lambda: socket.gethostname().split(".")[0] or "agent")
    slots: int = Field(4, ge=0, le=4096, description="how many kernels this agent may host")
    capabilities: list[Capability] = Field(default_factory=list)
    labels: dict[str, str] = Field(default_factory=dict)
    handlers: list[str] = Field(default_factory=list, description="modules with register(registry)")
    arq_settings: list[str] = Field(default_factory=list, description="arq WorkerSettings paths")
    concurrency: int = Field(1, ge=1, le=1024, description="jobs each kernel runs at once")
    drain_timeout: float = Field(30.0, gt=0, description="SIGTERM grace for kernels, seconds")
    fork_server: bool = Field(True, description="fork kernels from a pre-imported process, not exec")


@dataclass(slots=True)
class _Child:
    cluster: str
    kernel: str
    proc: KernelHandle | None = None
    restarts: int = 0
    next_start: float = 0.0
    stopping: bool = False  # SIGTERM sent: draining
    done: bool = False  # exited for good (drained, or the control plane moved it)
    placement: str = ""  # `placed_at` of the kernel record this child was started for
    load: LoadGate = field(default_factory=LoadGate)
    watched: object = None  # the process handle whose exit wakes the main loop

    @property
    def ref(self) -> str:
        return f"{self.cluster}/{self.kernel}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


class Agent(Service):
    """The daemon's main loop. `run()` until `request_stop()`, which drains and deregisters."""

    _spawner: Spawner | None = None  # made at the first kernel start (`_exec`)

    def __init__(self, redis: AsyncRedis, settings: Settings, config: AgentConfig) -> None:
        super().__init__()
        self.what = f"agent {config.name}"
        self.stop_grace = config.drain_timeout + 5  # its kernels' drain, then the deregistration
        self.redis = redis
        self.settings = settings
        self.keys = Keys(settings.prefix)
        self.config = config
        registry = builtin_registry()
        load_handlers(registry, config.handlers)
        arq_paths = [*config.arq_settings, *arq_settings_in(config.handlers)]
        if arq_paths:  # loaded here too, so a bad path stops the agent, not each kernel
            from kernel_agent.syscalls.arq_bridge import load_arq_settings

            load_arq_settings(registry, arq_paths)
        self.capabilities = sorted(declared_capabilities(registry, config.capabilities))
        self.children: dict[str, _Child] = {}
        self.sampler = ProcessSampler()
        self._stop = asyncio.Event()
        self._registered = False  # in Redis, as far as we know: False again after an outage
        self._assigned: dict[str, str] = {}  # the assignment as last read
        self._woken = False  # the pending BLPOP popped a push: clear the list with the next read
        self._poll = True  # re-read the assignment on the next turn (woken, or `agent_poll` passed)
        self._wake: asyncio.Future[Any] | None = None  # the pending BLPOP on our wake list
        self._exited = asyncio.Event()  # a kernel process exited
        self._waiters: set[asyncio.Future[Any]] = set()  # one per watched process handle
        self._running: dict[str, int] | None = None  # `agent:{name}:running` as last written
        # our state version, in the lease: a new incarnation never repeats one of the last
        self._incarnation = f"{int(time.time() * 1000)}"
        self._version = 0
        self.heartbeat = Heartbeat(
            redis_url=settings.redis_url,
            keys=self.keys,
            agent=config.name,
            interval=settings.heartbeat_interval,
            ttl=settings.lease_ttl,
            version=self.version,
            stall_after=max(10.0, 4 * settings.lease_ttl, 2 * settings.agent_poll),
        )

    def version(self) -> str:
        """The state version the heartbeat puts in the lease (read by its thread)."""
        return f"{self._incarnation}.{self._version}"

    def _on_stop(self) -> None:
        """Begin a clean shutdown: drain every kernel, then deregister."""
        self._stop.set()

    # ------------------------------------------------------------ lifecycle
    async def _loop(self) -> None:
        await periodically(
            self._step,
            what=self.what,
            log=logger,
            running=lambda: not self._stop.is_set(),
            pause=self._pause,
            on_error=self._lost,
            # back within a heartbeat of Redis answering, as the heartbeat thread is: kernels to
            # (re)start and wake-ups wait on this loop
            backoff=Backoff.within(self.settings.heartbeat_interval),
        )
        await self._shutdown()

    async def _step(self) -> None:
        """Register (again, after an outage), converge, report, then wait: for a wake-up, a
        kernel's exit, or one heartbeat interval (local work only, unless something is due)."""
        name = self.config.name
        if not self._registered:
            await self._register()
            self._registered = True
            self._poll = True
            self.heartbeat.start()
            logger.info(
                "agent %s registered: %d slots, capabilities %s",
                name,
                self.config.slots,
                self.capabilities or "-",
            )
        if self._poll:
            await self._tick()
            self._poll = False
        else:
            await self._converge(self._assigned, renew=False)
        await self._publish_running()
        await self._report_load()
        self.heartbeat.touch()
        await self._wait()

    def _lost(self, exc: RedisError) -> None:
        if exc.transient:  # waiting for Redis is not a wedged loop: renew as soon as it answers
            self.heartbeat.touch()
        if isinstance(exc, RedisUnavailable):  # our record may be gone when Redis is back
            self._registered = False
            self._running = None  # and so may our running record

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    def _watch(self, child: _Child) -> None:
        """Wake the main loop when `child`'s process exits (no polling)."""
        proc = child.proc
        if proc is None or child.watched is proc:
            return
        child.watched = proc
        waiter = asyncio.ensure_future(proc.wait())
        self._waiters.add(waiter)
        waiter.add_done_callback(self._waiters.discard)
        waiter.add_done_callback(lambda _: self._exited.set())

    async def _wait(self) -> None:
        """Up to one heartbeat interval. The BLPOP on our wake list (timeout `agent_poll`) stays
        pending across turns: when it returns (a push, or its timeout), the next turn re-reads
        the assignment."""
        if self._wake is None:
            self._wake = asyncio.ensure_future(
                self.redis.blpop(
                    [self.keys.agent_wake(self.config.name)],
                    timeout=self.settings.agent_poll,  # type: ignore[arg-type]  # fractional: Redis >= 6
                )
            )
            # read by the next turn; if the loop ends first (cancelled, as in a kill), not lost
            self._wake.add_done_callback(lambda f: f.cancelled() or f.exception())
        stop = asyncio.ensure_future(self._stop.wait())
        exited = asyncio.ensure_future(self._exited.wait())
        try:
            await asyncio.wait(
                {self._wake, stop, exited},
                timeout=self.settings.heartbeat_interval,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            for task in (stop, exited):
                task.cancel()
            await asyncio.gather(stop, exited, return_exceptions=True)
        self._exited.clear()
        if self._wake.done():
            woken, self._wake = self._wake, None
            self._poll = True
            if not woken.cancelled() and woken.exception() is None and woken.result():
                logger.debug("agent %s woken", self.config.name)
                self._woken = True

    async def _cancel_wake(self) -> None:
        if self._wake is not None:
            self._wake.cancel()
            await asyncio.gather(self._wake, return_exceptions=True)
            self._wake = None

    async def _register(self) -> None:
        k, c = self.keys, self.config
        record = AgentRecord(
            name=c.name,
            host=socket.gethostname(),
            pid=os.getpid(),
            slots=c.slots,
            capabilities=" ".join(self.capabilities),
            labels=json.dumps(c.labels),
            draining=False,
            started_at=round(time.time(), 3),
        )

        # Not a transaction (the keys are in several slots): ordered instead, the lease last, so
        # the leader sees the agent alive only once its record is written and the previous
        # incarnation's running kernels are gone. Cut short, there is no lease: nothing to undo.
        def listed(pipe: AsyncPipeline) -> None:
            pipe.hset(k.agent(c.name), mapping=record.to_fields())
            pipe.delete(k.agent_running(c.name))  # a new incarnation runs nothing yet
            pipe.sadd(k.agents(), c.name)
            pipe.hdel(k.lapsed_agents(), c.name)  # back: no longer shown as a lapsed agent

        def alive(pipe: AsyncPipeline) -> None:
            # alive from now on; the heartbeat's first beat writes the Redis-clock time
            pipe.set(
                k.agent_lease(c.name),
                AgentLease(0, self._next_version()).encode(),
                px=int(self.settings.lease_ttl * 1000),
            )

        await portable.in_order(self.redis, listed, alive)
        self._running = {}
        await self.redis.lpush(k.service_wake(), f"agent {c.name}")

    def _next_version(self) -> str:
        self._version += 1
        return self.version()

    async def _tick(self) -> None:
        """Re-read the assignment (one round trip: after a wake-up, or `agent_poll` without one)
        and converge on it."""
        name, k = self.config.name, self.keys
        key = k.agent_kernels(name)
        woken = self._woken

        def answered(pipe: AsyncPipeline) -> None:
            if woken:  # the pushes so far are all answered by the read below (so: before it)
                pipe.delete(k.agent_wake(name))

        def read(pipe: AsyncPipeline) -> None:
            pipe.exists(k.agent(name))
            pipe.hgetall(key)

        *_, registered, raw = await portable.in_order(self.redis, answered, read)
        self._woken = False
        if not registered:  # forgotten while unreachable (paused, partitioned): register again
            logger.warning("agent %s was deregistered by the control plane; registering again", name)
            await self._register()
        self._assigned = parse_assignment(raw, key)  # malformed fields skipped
        await self._converge(self._assigned)

    async def _publish_running(self) -> None:
        """Rewrite `agent:{name}:running` when the set of live kernel processes changed, then
        move our state version on (the next beat tells the leader to re-read it)."""
        running = {c.ref: c.proc.pid for c in self.children.values() if c.running and c.proc is not None}
        if running == self._running:
            return
        key = self.keys.agent_running(self.config.name)
        # one key, so no transaction: the new entries first, then the gone ones out, so a
        # reader never sees a running kernel missing (at most one that just exited, still listed);
        # when what the record holds is not known (Redis was away), it is rewritten whole
        async with self.redis.pipeline(transaction=False) as pipe:
            if self._running is None:
                pipe.delete(key)
            if running:
                pipe.hset(key, mapping={ref: str(pid) for ref, pid in running.items()})
            if gone := [ref for ref in self._running or () if ref not in running]:
                pipe.hdel(key, *gone)
            await pipe.execute()
        self._running = running
        self._next_version()

    async def _converge(self, assigned: dict[str, str], *, renew: bool = True) -> None:
        """Run what is assigned ("run" or "drain"), drain what is not, restart what crashed."""
        now = time.monotonic()
        for ref in assigned.keys() - self.children.keys():
            cluster, _, kernel = ref.partition("/")
            self.children[ref] = _Child(cluster, kernel)
        for child in list(self.children.values()):
            if child.proc is not None and child.proc.returncode is not None:
                await self._reap(child)
        if renew:  # only with a fresh read of the assignment: it asks Redis
            await self._renew_replaced(assigned, now)
        for ref, child in list(self.children.items()):
            wanted = assigned.get(ref)
            if wanted is None or wanted == ASSIGN_DRAIN:
                if child.running and not child.stopping:
                    logger.info("draining kernel %s", ref)
                    child.stopping = True
                    child.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
                elif wanted is None and not child.running:
                    del self.children[ref]
                    continue
            if wanted is not None and not child.running and not child.done and now >= child.next_start:
                await self._spawn(child)  # a crashed draining kernel comes back to finish its queue
            self._watch(child)

    async def _renew_replaced(self, assigned: dict[str, str], now: float) -> None:
        """A kernel the control plane removed and placed again under the same name, between two
        of our ticks, looks like the old one (finished, or waiting out a restart back-off); its
        record's `placed_at` tells them apart. A new placement starts afresh, at once."""
        waiting = [
            c
            for ref, c in self.children.items()
            if assigned.get(ref) == ASSIGN_RUN and not c.running and (c.done or now < c.next_start)
        ]
        if not waiting:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for c in waiting:
                pipe.hget(self.keys.kernel(c.cluster, c.kernel), KernelRecord.PLACED_AT)
            placements = await pipe.execute()
        for c, placed in zip(waiting, placements, strict=True):
            if placed and placed != c.placement:
                logger.info("kernel %s was placed here again; starting it afresh", c.ref)
                self.children[c.ref] = _Child(c.cluster, c.kernel)

    async def _reap(self, child: _Child) -> None:
        assert child.proc is not None
        code = child.proc.returncode
        self.sampler.forget(child.proc.pid)
        child.proc = None
        if code in (0, EXIT_UNASSIGNED):  # drained and stopped, or no longer ours
            child.done = True
            return
        child.restarts += 1
        delay = min(0.2 * 2 ** min(child.restarts - 1, 6), 10.0)
        child.next_start = time.monotonic() + delay
        logger.warning(
            "kernel %s exited with %s; restart %d in %.1fs", child.ref, code, child.restarts, delay
        )

    async def _spawn(self, child: _Child) -> None:
        child.placement = (
            await self.redis.hget(self.keys.kernel(child.cluster, child.kernel), KernelRecord.PLACED_AT) or ""
        )
        cmd = [
            sys.executable,
            "-m",
            KERNEL_MODULE,
            "--cluster",
            child.cluster,
            "--name",
            child.kernel,
            "--agent",
            self.config.name,
            "--concurrency",
            str(self.config.concurrency),
            "--log-level",
            logging.getLevelName(logging.getLogger().level),
        ]
        if self.config.capabilities:  # the kernel declares them too, beside its handlers' own
            cmd += ["--capabilities", ",".join(self.config.capabilities)]
        for module in self.config.handlers:
            cmd += ["--handlers", module]
        for path in self.config.arq_settings:
            cmd += ["--arq-settings", path]
        env = {**os.environ, "KCP_REDIS_URL": self.settings.redis_url, "KCP_PREFIX": self.settings.prefix}
        child.proc = await self._exec(cmd, env)
        child.stopping = False
        logger.info("started kernel %s (pid %d)", child.ref, child.proc.pid)

    async def _exec(self, cmd: list[str], env: dict[str, str]) -> KernelHandle:
        """Start one kernel process, forked from the fork server, else exec'd (the seam
        `bench/fleet.py` replaces with in-process kernels)."""
        if self._spawner is None:  # the server preloads the kernel and the user's modules
            c = self.config
            user = [
                *c.handlers,
                *(p.partition(":")[0] if ":" in p else p.rpartition(".")[0] for p in c.arq_settings),
            ]
            optional = [*user, "kernel_agent.syscalls.arq_bridge"] if user else []
            self._spawner = Spawner(KERNEL_PRELOAD, optional, enabled=c.fork_server)
        return await self._spawner.start(cmd, env)

    async def _report_load(self) -> None:
        """Write the cpu and memory of each kernel whose figures moved past `LoadGate`'s
        thresholds, or whose last write is `load_refresh` old (every other refresh also renews the
        record's TTL, 3 x `load_refresh`). The rest
        of the record is the kernel's own (`kernel_agent/kernel/load_report.py`)."""
        # not for kernels told to stop: their record may already be gone with their cluster
        live = [c for c in self.children.values() if c.running and not c.stopping and c.proc is not None]
        if not live:
            return
        now, refresh = time.monotonic(), self.settings.load_refresh
        due = []
        for c in live:
            cpu, memory, rss = self.sampler.sample(c.proc.pid)  # type: ignore[union-attr]
            if c.load.due(cpu, memory, now, refresh):
                due.append((c, cpu, memory, rss, c.load.renew_ttl(now, refresh)))
        if not due:
            return
        ttl_ms = int(3 * refresh * 1000)
        stamp = round(time.time(), 3)
        async with self.redis.pipeline(transaction=False) as pipe:
            for c, cpu, memory, rss, ttl in due:
                key = self.keys.load(self.config.name, c.cluster, c.kernel)
                pipe.hset(
                    key,
                    mapping=LoadRecord.fields(
                        cpu=round(cpu, 4), memory=round(memory, 6), memory_bytes=rss, updated_at=stamp
                    ),
                )
                if ttl:
                    pipe.pexpire(key, ttl_ms)
            await pipe.execute()
        for c, cpu, memory, _, ttl in due:
            c.load.written(cpu, memory, now, ttl=ttl)

    async def _shutdown(self) -> None:
        """Drain every kernel (SIGTERM, grace, then SIGKILL) and deregister."""
        name = self.config.name
        await self._cancel_wake()
        self.heartbeat.stall_after = float("inf")  # draining may take a while: stay alive meanwhile
        async with best_effort():
            # first of all, before the lease can go: the leader takes a lease gone under a
            # `draining` record (or no record) for a departure, never for a death
            await self.redis.hset(self.keys.agent(name), mapping=AgentRecord.fields(draining=True))
            await self.redis.lpush(self.keys.service_wake(), f"agent {name}")
        procs = [c.proc for c in self.children.values() if c.running and c.proc is not None]
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        if procs:
            logger.info("agent %s draining %d kernels", name, len(procs))
            _, pending = await asyncio.wait(
                [asyncio.ensure_future(p.wait()) for p in procs], timeout=self.config.drain_timeout
            )
            for proc in procs:
                if proc.returncode is None:
                    logger.warning("kernel pid %d did not drain in time; killing it", proc.pid)
                    proc.kill()
            for task in pending:
                await task
        for waiter in list(self._waiters):  # handles that will not exit now (stubs, a kill's leftovers)
            waiter.cancel()
        if self._spawner is not None:
            await self._spawner.close()
        await asyncio.to_thread(self.heartbeat.stop)
        k = self.keys
        async with best_effort():
            # not transactions (several slots, one DEL each): the lease first, so the leader
            # sees us gone at once (a departure: the record says draining, or is gone); what a
            # cut-short stop leaves, the leader's forget clears
            async with self.redis.pipeline(transaction=False) as pipe:
                # the assignment hash stays: the control plane owns it and clears it
                for key in (k.agent_lease(name), k.agent_wake(name), k.agent_running(name)):
                    pipe.delete(key)
                await pipe.execute()
            try:
                # one after the other (two slots, no MULTI): the record goes only once we left
                # the set, so a refused SREM leaves the record the leader forgets us by
                async with amap_redis_errors():
                    await self.redis.srem(k.agents(), name)
                    await self.redis.delete(k.agent(name))
            except PermissionDenied:
                # The per-agent ACL (docs/security.md) lets an agent join the agent set but not
                # remove names from it (it could evict another agent): the record stays, and the
                # leader forgets us now that the lease is gone.
                logger.debug("agent %s leaves its deregistration to the control plane", name)
            await self.redis.lpush(k.service_wake(), f"agent {name}")
        logger.info("agent %s stopped", name)
