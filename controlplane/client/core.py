"""The typed async client: manage clusters and dispatch requests. Raises `KcpError`s.

async with KcpClient() as kcp:
    await kcp.create_cluster("compute", kernel_count=3)
    result = await kcp.dispatch("compute", {"type": "PING"})
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Self

import pydantic

from controlplane.client.dispatch import ClusterViews, Dispatcher, DispatchTarget
from controlplane.client.engine import OrchestrationEngine, Trace
from controlplane.errors import ClusterNotFound, InvalidRequest, NoKernelAvailable
from controlplane.lifecycle import LifecycleError, Phase
from controlplane.protocol.keys import Keys
from controlplane.protocol.models import (
    ACTIVE_KERNEL_STATES,
    NAME_PATTERN,
    ClusterConfig,
    ClusterMetrics,
    ClusterStatus,
    KernelState,
    OrchestrationConfig,
    RoutingStrategy,
)
from controlplane.protocol.records import ClusterRecord, KernelRecord
from controlplane.protocol.requests import parse_args, parse_request
from controlplane.protocol.stats import (
    FAILOVERS,
    PINNED,
    REJECT_INVALID,
    REJECT_NO_CLUSTER,
    REJECT_NO_KERNEL,
    RETRIES,
    SCALE_DOWN,
    SCALE_UP,
)
from controlplane.redis.connect import AsyncRedis, connect
from controlplane.redis.errors import amap_redis_errors
from controlplane.redis.retry import best_effort
from controlplane.redis.state import State
from controlplane.settings import Settings

if TYPE_CHECKING:
    from controlplane.client.arq import ArqContext, Job

logger = logging.getLogger(__name__)

#: Longest a refused dispatch waits to be counted before its error is raised anyway, seconds.
REJECT_COUNT_TIMEOUT = 0.5

_NAME = pydantic.TypeAdapter(pydantic.constr(pattern=NAME_PATTERN))


def validate_name(name: object, what: str = "cluster name") -> str:
    """`name` if it is a safe name (letters, digits, `_.-`, at most 64), else `InvalidRequest`."""
    try:
        return _NAME.validate_python(name)
    except pydantic.ValidationError:
        raise InvalidRequest(
            f"invalid {what} {name!r}: use 1-64 letters, digits, '_', '.', '-' "
            "(starting with a letter or digit)"
        ) from None


def parse_kernel(kernel: object) -> tuple[str, int | None]:
    """`"worker-3"` -> ("worker-3", None); `"worker-3@17"` -> ("worker-3", 17): a kernel by name
    (whichever incarnation runs it when the job is queued), or one incarnation of it."""
    name, at, epoch = str(kernel).partition("@") if isinstance(kernel, str) else (kernel, "", "")
    name = validate_name(name, "kernel name")
    if not at:
        return name, None
    if not epoch.isdigit() or int(epoch) < 1:
        raise InvalidRequest(
            f"invalid kernel {kernel!r}: after '@' comes the incarnation (epoch), a positive whole "
            "number, as in 'worker-3@17' (DispatchResult.epoch)"
        )
    return name, int(epoch)


def _error_text(exc: pydantic.ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in exc.errors())


class ClusterInfo(pydantic.BaseModel):
    """A cluster as a client sees it."""

    name: str
    status: ClusterStatus
    desired: int
    running: int
    config: ClusterConfig
    reason: str = ""
    kernels: list[KernelRecord] = pydantic.Field(default_factory=list)

    @classmethod
    def of(cls, record: ClusterRecord, kernels: list[KernelRecord]) -> ClusterInfo:
        return cls(
            name=record.name,
            status=record.status,
            desired=record.desired,
            config=record.config,
            reason=record.reason,
            kernels=kernels,
            running=sum(k.state is KernelState.RUNNING for k in kernels),
        )


class DispatchResult(pydantic.BaseModel):
    kernel: str
    result: dict[str, Any]
    #: what the caller waited, routing and retries included, milliseconds (fractions too)
    latency_ms: float
    #: every attempt the engine made, retries and failovers included
    attempts: int
    job_id: str
    #: the incarnation of `kernel` that ran the request (its fencing epoch): a restart keeps the
    #: name and starts with empty memory under a new epoch; pin `f"{kernel}@{epoch}"` to fail
    #: (`KernelGone`) rather than run on a newer one
    epoch: int = 0

    @property
    def incarnation(self) -> str:
        """`kernel@epoch`, what `dispatch(kernel=...)` takes to pin this very incarnation."""
        return f"{self.kernel}@{self.epoch}"

    #: LEAST_LOADED / CAPABILITY_BASED: every candidate was above the load balancer's
    #: `health_threshold`, so the least loaded of them ran it anyway
    all_unhealthy: bool = False


class KcpClient:
    """One connection pool, one reply listener, one engine. Use as an async context manager."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        redis: AsyncRedis | None = None,
        orchestration: OrchestrationConfig | None = None,
    ) -> None:
        self.settings = settings or Settings()
        self.keys = Keys(self.settings.prefix)
        self._own_redis = redis is None
        self.redis = redis if redis is not None else connect(self.settings.redis_url)
        self.state = State(self.redis, self.keys)
        self._dispatcher: Dispatcher | None = None  # made by the first dispatch (`dispatcher`)
        self.views = ClusterViews(self.state)
        self.engine = OrchestrationEngine(orchestration)
        self.phase = Phase.NEW
        self._arq: ArqContext | None = None  # made by the first enqueue_job or job

    @property
    def dispatcher(self) -> Dispatcher:
        """The reply listener and enqueue channels, made on first use: a client that only reads
        or manages clusters (the CLI, the exporter, `kcp serve`) opens no dispatch connections."""
        if self._dispatcher is None:
            self._dispatcher = Dispatcher(self.redis, self.keys)
        return self._dispatcher

    def _require_open(self) -> None:
        """Refuse to work after `aclose`: redis-py's pool would quietly reconnect."""
        if self.phase in (Phase.STOPPING, Phase.STOPPED):
            raise LifecycleError("this KcpClient is closed: create a new one")

    async def start(self) -> None:
        """Open the client; `dispatch` calls it if need be. The reply listener and the notify
        watcher start with the first dispatch and the first wait for a change."""
        self._require_open()
        if self.phase is Phase.NEW:
            self.phase = Phase.RUNNING

    async def aclose(self) -> None:
        """Stop the background tasks and close the pool (if this client created it). Idempotent;
        the client cannot be used afterwards."""
        if self.phase in (Phase.STOPPING, Phase.STOPPED):
            return
        started, self.phase = self.phase is Phase.RUNNING, Phase.STOPPING
        try:
            if started:
                if self._arq is not None:
                    await self._arq.mover.stop()
                await self.views.stop()
                if self._dispatcher is not None:
                    await self._dispatcher.stop()
        finally:
            self.phase = Phase.STOPPED
            if self._own_redis:
                await self.redis.aclose()

    async def __aenter__(self) -> Self:
        if self.phase is not Phase.NEW:
            done = "started" if self.phase is Phase.RUNNING else "closed"
            raise LifecycleError(f"this KcpClient was already {done}: `async with` needs a new one")
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------ clusters
    async def create_cluster(
        self,
        name: str,
        kernel_count: int = 1,
        config: ClusterConfig | Mapping[str, Any] | None = None,
        *,
        wait: float | None = None,
    ) -> ClusterInfo:
        """Create a cluster of `kernel_count` kernels; wait up to `wait` seconds (default
        `ready_timeout`) for them to run. Raises `ClusterExists`, `InvalidRequest`."""
        self._require_open()
        name = validate_name(name)
        cfg = self._config(config)
        count = self._count(kernel_count, cfg, "kernel_count")
        await self.state.create_cluster(name, cfg, count)
        await self._wake_service()
        return await self._await_settled(name, wait)

    async def destroy_cluster(self, name: str, *, wait: float | None = None) -> None:
        """Stop the cluster's kernels and delete its keys (queued jobs get an error).

        Waits up to `wait` seconds (default `ready_timeout`) for the control plane to finish."""
        self._require_open()
        name = validate_name(name)
        await self.state.require_cluster(name)
        await self.state.update_cluster(
            name, status=ClusterStatus.STOPPED.value, stopped_at=f"{time.time():.3f}"
        )
        await self._wake_service()
        deadline = time.monotonic() + (self.settings.ready_timeout if wait is None else wait)
        while time.monotonic() < deadline and await self.state.get_cluster(name) is not None:
            await self.views.wait_change(min(deadline - time.monotonic(), 0.25))

    async def list_clusters(self) -> list[ClusterInfo]:
        self._require_open()
        clusters = [c for c in await self.state.list_clusters() if c.status is not ClusterStatus.STOPPED]
        return [ClusterInfo.of(c, await self.state.kernels(c.name)) for c in clusters]

    async def get_cluster(self, name: str) -> ClusterInfo:
        self._require_open()
        record = await self.state.require_cluster(validate_name(name))
        return ClusterInfo.of(record, await self.state.kernels(name))

    async def scale_cluster(
        self, name: str, target_count: int, *, wait: float | None = None
    ) -> tuple[int, int]:
        """Set the cluster's kernel count; returns (previous, new). Scale-down drains kernels:
        they take no new work and finish what they hold."""
        self._require_open()
        record = await self.state.require_cluster(validate_name(name))
        target = self._count(target_count, record.config, "target_count")
        # the old `reason` was about the old count: the control plane tells anew
        await self.state.update_cluster(name, desired=target, status=ClusterStatus.SCALING.value, reason="")
        if target != record.desired:
            await self._bump(name, {SCALE_UP if target > record.desired else SCALE_DOWN: 1})
        await self._wake_service()
        await self._await_settled(name, wait)
        return record.desired, target

    # ------------------------------------------------------------ work
    async def dispatch(
        self,
        cluster: str,
        request: Mapping[str, Any],
        *,
        kernel: str | None = None,
        engine: OrchestrationEngine | None = None,
    ) -> DispatchResult:
        """Run one syscall on a kernel of `cluster` picked by the engine's strategy, or on
        `kernel` when given (e.g. a READ of memory an earlier WRITE filled): a name
        (`"worker-3"`: the incarnation running it when the job is queued) or one incarnation
        (`"worker-3@17"`, `DispatchResult.incarnation`). A pinned job runs there or fails with
        `KernelGone`, never on another kernel or incarnation.

        A request refused here (bad input, no such cluster, no kernel to take it) is counted by
        reason in the rejections hash (`kcp_dispatch_rejected_total`) before the error is raised."""
        self._require_open()
        try:
            return await self._dispatch(cluster, request, kernel=kernel, engine=engine)
        except InvalidRequest:
            await self._rejected(REJECT_INVALID)
            raise
        except ClusterNotFound:
            await self._rejected(REJECT_NO_CLUSTER)
            raise
        except NoKernelAvailable:
            await self._rejected(REJECT_NO_KERNEL)
            raise

    async def _dispatch(
        self,
        cluster: str,
        request: Mapping[str, Any],
        *,
        kernel: str | None,
        engine: OrchestrationEngine | None,
    ) -> DispatchResult:
        cluster = validate_name(cluster)
        epoch = None
        if kernel is not None:
            kernel, epoch = parse_kernel(kernel)
        req = parse_request(request, max_bytes=self.settings.max_request_bytes)
        parse_args(req)  # builtin syscalls: bad arguments fail here, before any round trip
        engine = engine or self.engine
        await self.start()
        with_loads = engine.config.strategy in (
            RoutingStrategy.LEAST_LOADED,
            RoutingStrategy.CAPABILITY_BASED,
        )
        trace = Trace()  # the kernel of every attempt, for the retries/failovers counters
        target = DispatchTarget(
            cluster,
            req,
            views=self.views,
            dispatcher=self.dispatcher,
            strategy=PINNED if kernel is not None else engine.config.strategy.value,
            with_loads=with_loads,
        )
        began = time.perf_counter()
        try:
            async with amap_redis_errors():
                outcome = await engine.execute(target, req, kernel=kernel, epoch=epoch, trace=trace)
        finally:
            if len(trace.attempts) > 1:
                retries, failovers = len(trace.attempts) - 1, len(set(trace.attempts)) - 1
                await self._bump(cluster, {RETRIES: retries, FAILOVERS: failovers})
        # built from values of our own making: pydantic's validation would only cost time here
        return DispatchResult.model_construct(
            kernel=outcome.kernel,
            result=outcome.value or {},
            attempts=len(trace.attempts),
            job_id=outcome.job_id,
            latency_ms=round((time.perf_counter() - began) * 1000, 3),
            epoch=outcome.epoch,
            all_unhealthy=trace.all_unhealthy,
        )

    async def enqueue_job(
        self,
        cluster: str,
        function: str,
        *args: Any,
        _job_id: str | None = None,
        _defer_until: datetime | None = None,
        _defer_by: float | timedelta | None = None,
        _expires: float | timedelta | None = None,
        **kwargs: Any,
    ) -> Job | None:
        """arq's `enqueue_job` on `cluster`: run arq function `function(ctx, *args, **kwargs)` on a
        kernel picked by the strategy, now or, deferred, when it is due (the kernel is picked
        then). Returns a `Job` handle (arq's `status`, `result`, `info`, `abort`), or None when
        `_job_id` is in use, as arq does. Arguments and results travel as JSON.

        Raises `InvalidRequest` (nothing is queued) for an unknown function, an argument JSON
        cannot carry, a negative `_defer_by` or `_expires`; `NoKernelAvailable` when no kernel
        takes it now. See docs/arq.md."""
        from controlplane.client.arq import enqueue_job

        self._require_open()
        await self.start()
        return await enqueue_job(
            self._arq_context(),
            validate_name(cluster),
            function,
            args,
            kwargs,
            job_id=_job_id,
            defer_until=_defer_until,
            defer_by=_defer_by,
            expires=_expires,
        )

    def job(self, cluster: str, job_id: str) -> Job:
        """The handle of arq job `job_id` of `cluster` (enqueued by any client); this client then
        also routes the cluster's deferred jobs when they are due."""
        from controlplane.client.arq import Job, validate_job_id

        self._require_open()
        arq = self._arq_context()
        cluster, job_id = validate_name(cluster), validate_job_id(job_id)
        arq.mover.watch(cluster)
        return Job(arq, cluster, job_id)

    def watch_deferred(self, cluster: str) -> None:
        """Route `cluster`'s deferred arq jobs when they are due, from this client, until it
        closes (a client that enqueues or watches arq jobs of a cluster does so already)."""
        self._require_open()
        self._arq_context().mover.watch(validate_name(cluster))

    async def watch_all_deferred(self) -> None:
        """`watch_deferred` every cluster that has deferred jobs now, and no other: what `kcp
        serve` runs every 2 s while it leads, so deferred jobs run at their time
        even when no client of their cluster is left."""
        self._require_open()
        heads = await self.state.deferred_heads()
        if not heads and self._arq is None:
            return  # nothing deferred, nothing watched: no dispatch connections opened
        mover = self._arq_context().mover
        for done in mover.watched - heads.keys():
            mover.unwatch(done)
        for name, due_ms in heads.items():
            mover.watch(name, due_ms)

    def _arq_context(self) -> ArqContext:
        from controlplane.client.arq import ArqContext

        if self._arq is None:
            wait = self.engine.config.timeout_ms / 1000
            self._arq = ArqContext(
                self.redis,
                self.keys,
                self.dispatcher,
                self.views,
                self.engine,
                wait,
                self.settings.max_request_bytes,
            )
        return self._arq

    async def get_metrics(self, cluster: str) -> ClusterMetrics:
        """Counters the kernels keep in Redis (every client's dispatches count) and their latest load."""
        self._require_open()
        record = await self.state.require_cluster(validate_name(cluster))
        kernels = [k for k in await self.state.kernels(cluster) if k.state in ACTIVE_KERNEL_STATES]
        stats = await self.state.cluster_stats(cluster)
        loads = list((await self.state.loads(kernels)).values())
        dispatches = int(stats.get("dispatches", 0))
        return ClusterMetrics(
            cluster_name=record.name,
            kernel_count=len(kernels),
            total_dispatches=dispatches,
            total_errors=int(stats.get("errors", 0)),
            avg_latency_ms=round(stats.get("latency_ms_sum", 0.0) / dispatches, 3) if dispatches else 0.0,
            avg_cpu=round(sum(x.cpu for x in loads) / len(loads), 4) if loads else 0.0,
            avg_memory=round(sum(x.memory for x in loads) / len(loads), 6) if loads else 0.0,
        )

    # ------------------------------------------------------------ helpers
    def _config(self, config: ClusterConfig | Mapping[str, Any] | None) -> ClusterConfig:
        if isinstance(config, ClusterConfig):
            return config
        if config is not None and not isinstance(config, Mapping):
            raise InvalidRequest(f"config must be a mapping, got {type(config).__name__}")
        try:
            return ClusterConfig.model_validate(dict(config or {}))
        except pydantic.ValidationError as exc:
            raise InvalidRequest(f"invalid cluster config: {_error_text(exc)}") from None

    def _count(self, count: object, cfg: ClusterConfig, what: str) -> int:
        if not isinstance(count, int) or isinstance(count, bool):
            raise InvalidRequest(f"{what} must be an integer, got {count!r}")
        upper = min(cfg.max_kernels, self.settings.max_kernels_per_cluster)
        if not cfg.min_kernels <= count <= upper:
            raise InvalidRequest(
                f"{what} {count} is outside this cluster's bounds [{cfg.min_kernels}, {upper}] "
                "(set min_kernels/max_kernels in the config)"
            )
        return count

    async def _bump(self, cluster: str, counters: Mapping[str, int]) -> None:
        """Add to event counters of the cluster's stats hash (exported as Prometheus counters)."""
        async with best_effort(), self.redis.pipeline(transaction=False) as pipe:  # never fails the call
            for field, amount in counters.items():
                if amount:
                    pipe.hincrby(self.keys.cluster_stats(cluster), field, amount)
            await pipe.execute()

    async def _rejected(self, reason: str) -> None:
        """Count a refused dispatch; bounded and best effort, so the caller gets its error promptly."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(REJECT_COUNT_TIMEOUT), best_effort():
                await self.redis.hincrby(self.keys.rejections(), reason, 1)

    async def _wake_service(self) -> None:
        async with amap_redis_errors():
            await self.redis.lpush(self.keys.service_wake(), "client")

    async def _await_settled(self, name: str, wait: float | None) -> ClusterInfo:
        deadline = time.monotonic() + (self.settings.ready_timeout if wait is None else wait)
        while True:
            record = await self.state.get_cluster(name)
            if record is None:
                raise ClusterNotFound(name)
            kernels = await self.state.kernels(name)
            info = ClusterInfo.of(record, kernels)
            settled = info.running == info.desired == len(kernels) and info.status is ClusterStatus.RUNNING
            if settled or time.monotonic() >= deadline:
                return info
            await self.views.wait_change(min(deadline - time.monotonic(), 0.25))
