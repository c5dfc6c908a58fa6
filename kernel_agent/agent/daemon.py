"""The agent: one daemon per host that registers, keeps a lease, and supervises kernels.

The control plane writes which kernels this agent should run (`agent:{name}:kernels`);
the agent converges on that set level-triggered on every heartbeat, and at once when
woken through `agent:{name}:wake`. Each kernel is its own OS process
(`python -m kernel_agent.kernel`), forked from the agent's fork server when it runs
(kernel_agent/agent/spawner.py), restarted with back-off when it crashes.
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

from pydantic import BaseModel, Field

from controlplane.errors import PermissionDenied, RedisError, RedisUnavailable
from controlplane.lifecycle import Service
from controlplane.protocol.keys import ASSIGN_DRAIN, ASSIGN_RUN, Keys
from controlplane.protocol.models import Capability, Name
from controlplane.protocol.records import (
    AgentRecord,
    KernelRecord,
    LoadRecord,
    parse_assignment,
    parse_counters,
)
from controlplane.protocol.stats import DISPATCHES, ERRORS, LATENCY_MS_SUM
from controlplane.redis.connect import AsyncRedis
from controlplane.redis.errors import amap_redis_errors
from controlplane.redis.retry import Backoff, best_effort, periodically
from controlplane.settings import Settings
from kernel_agent.agent.heartbeat import Heartbeat
from kernel_agent.agent.load import ProcessSampler, RateTracker
from kernel_agent.agent.spawner import KernelHandle, Spawner
from kernel_agent.contract import EXIT_UNASSIGNED, KERNEL_MODULE, KERNEL_PRELOAD
from kernel_agent.syscalls import arq_settings_in, builtin_registry, load_handlers

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
    rates: RateTracker = field(default_factory=RateTracker)

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
        self.capabilities = sorted(set(config.capabilities) | registry.capabilities())
        self.children: dict[str, _Child] = {}
        self.sampler = ProcessSampler()
        self._stop = asyncio.Event()
        self._registered = False  # in Redis, as far as we know: False again after an outage
        self._live: list[tuple[str, str, int]] = []  # read by the heartbeat thread; replaced, never mutated
        self.heartbeat = Heartbeat(
            redis_url=settings.redis_url,
            keys=self.keys,
            agent=config.name,
            interval=settings.heartbeat_interval,
            ttl=settings.lease_ttl,
            children=lambda: self._live,
            stall_after=max(10.0, 4 * settings.lease_ttl),
        )

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
        """Register (again, after an outage), converge, then wait for a wake-up or a heartbeat."""
        name = self.config.name
        if not self._registered:
            await self._register()
            self._registered = True
            self.heartbeat.start()
            logger.info(
                "agent %s registered: %d slots, capabilities %s",
                name,
                self.config.slots,
                self.capabilities or "-",
            )
        await self._tick()
        self.heartbeat.touch()
        if await self._wait_wake():
            logger.debug("agent %s woken", name)

    def _lost(self, exc: RedisError) -> None:
        if exc.transient:  # waiting for Redis is not a wedged loop: renew as soon as it answers
            self.heartbeat.touch()
        if isinstance(exc, RedisUnavailable):  # our record may be gone when Redis is back
            self._registered = False

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    def _publish_live(self) -> None:
        self._live = [
            (c.cluster, c.kernel, c.proc.pid) for c in self.children.values() if c.running and c.proc
        ]

    async def _wait_wake(self) -> bool:
        wake = asyncio.ensure_future(
            self.redis.blpop(
                [self.keys.agent_wake(self.config.name)],
                timeout=self.settings.heartbeat_interval,  # type: ignore[arg-type]  # fractional: Redis >= 6
            )
        )
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            done, _ = await asyncio.wait({wake, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (wake, stop):
                if not task.done():
                    task.cancel()
            await asyncio.gather(wake, stop, return_exceptions=True)
        return wake in done and not wake.cancelled() and wake.exception() is None and bool(wake.result())

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
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(k.agent(c.name), mapping=record.to_fields())
            pipe.sadd(k.agents(), c.name)
            pipe.hdel(k.lapsed_agents(), c.name)  # back: no longer shown as a lapsed agent
            pipe.set(k.agent_lease(c.name), int(time.time() * 1000), px=int(self.settings.lease_ttl * 1000))
            await pipe.execute()
        await self.redis.lpush(k.service_wake(), f"agent {c.name}")

    async def _tick(self) -> None:
        """Converge on the assignment, report load (the heartbeat thread renews the leases)."""
        name = self.config.name
        registered = await self.redis.exists(self.keys.agent(name))
        if not registered:  # forgotten while unreachable (paused, partitioned): register again
            logger.warning("agent %s was deregistered by the control plane; registering again", name)
            await self._register()
        key = self.keys.agent_kernels(name)
        assigned = parse_assignment(await self.redis.hgetall(key), key)  # malformed fields skipped
        await self._converge(assigned)
        self._publish_live()
        await self._report_load()

    async def _converge(self, assigned: dict[str, str]) -> None:
        """Run what is assigned ("run" or "drain"), drain what is not, restart what crashed."""
        now = time.monotonic()
        for ref in assigned.keys() - self.children.keys():
            cluster, _, kernel = ref.partition("/")
            self.children[ref] = _Child(cluster, kernel)
        for child in list(self.children.values()):
            if child.proc is not None and child.proc.returncode is not None:
                await self._reap(child)
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
        # not for kernels told to stop: their record may already be gone with their cluster
        live = [c for c in self.children.values() if c.running and not c.stopping and c.proc is not None]
        if not live:
            return
        k = self.keys
        async with self.redis.pipeline(transaction=False) as pipe:
            for c in live:
                pipe.zcard(k.queue(c.cluster, c.kernel))
                pipe.zcard(k.inflight(c.cluster, c.kernel))
                pipe.hgetall(k.kernel_stats(c.cluster, c.kernel))
            rows = await pipe.execute(raise_on_error=False)  # a key of the wrong type reads as empty
        ttl_ms = int(self.settings.lease_ttl * 1000)
        now = round(time.time(), 3)
        async with self.redis.pipeline(transaction=False) as pipe:
            for i, c in enumerate(live):
                queued, inflight, raw = (
                    r if not isinstance(r, Exception) else None for r in rows[3 * i : 3 * i + 3]
                )
                stats = parse_counters(raw or {}, k.kernel_stats(c.cluster, c.kernel))
                c.rates.update(
                    float(stats.get(DISPATCHES, 0)),
                    float(stats.get(ERRORS, 0)),
                    float(stats.get(LATENCY_MS_SUM, 0)),
                )
                cpu, memory, rss = self.sampler.sample(c.proc.pid)  # type: ignore[union-attr]
                key = k.load(self.config.name, c.cluster, c.kernel)
                # as measured, unvalidated: a value out of range is the readers' to skip, as always
                load = LoadRecord.model_construct(
                    cpu=round(cpu, 4),
                    memory=round(memory, 6),
                    queue_depth=queued or 0,
                    inflight=inflight or 0,
                    latency_ms=round(c.rates.latency_ms, 3),
                    error_rate=round(c.rates.error_rate, 4),
                    updated_at=now,
                    memory_bytes=rss,
                )
                pipe.hset(key, mapping=load.to_fields())
                pipe.pexpire(key, ttl_ms)
            await pipe.execute()

    async def _shutdown(self) -> None:
        """Drain every kernel (SIGTERM, grace, then SIGKILL) and deregister."""
        name = self.config.name
        self._publish_live()
        self.heartbeat.stall_after = float("inf")  # draining may take a while: stay alive meanwhile
        async with best_effort():
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
        if self._spawner is not None:
            await self._spawner.close()
        await asyncio.to_thread(self.heartbeat.stop)
        k = self.keys
        async with best_effort():
            async with self.redis.pipeline(transaction=True) as pipe:
                # the assignment hash stays: the control plane owns it and clears it
                pipe.delete(k.agent_lease(name), k.agent_wake(name))
                pipe.hdel(k.heartbeats(), name)
                await pipe.execute()
            try:
                async with amap_redis_errors(), self.redis.pipeline(transaction=True) as pipe:
                    pipe.srem(k.agents(), name)
                    pipe.delete(k.agent(name))
                    await pipe.execute()
            except PermissionDenied:
                # The per-agent ACL (docs/security.md) lets an agent join the agent set but not
                # remove names from it (it could evict another agent): the record stays, and the
                # leader forgets us now that the lease is gone.
                logger.debug("agent %s leaves its deregistration to the control plane", name)
            await self.redis.lpush(k.service_wake(), f"agent {name}")
        logger.info("agent %s stopped", name)
