"""OrchestrationEngine: picks a kernel per request and retries elsewhere on failure.

The engine is the client-side policy: which running kernel takes a request (by strategy,
honouring the capabilities and syscalls each kernel declares), how many dispatches may be
in flight, and when a failed attempt goes to another kernel. It does no I/O itself: the
caller passes the cluster's kernels and a `submit` coroutine.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence

from .balancer import LoadBalancer
from .errors import DispatchTimeout, InvalidRequest, KernelError, NoKernelAvailable
from .jobs import Outcome
from .models import (
    KernelLoad,
    KernelRecord,
    KernelState,
    OrchestrationConfig,
    OrchestrationMetrics,
    RoutingStrategy,
)
from .requests import SyscallRequest

logger = logging.getLogger(__name__)


class KernelBusy(Exception):
    """Internal: the picked kernel refused the job (draining, stopped, gone). Pick another."""


Submit = Callable[[KernelRecord, float], Awaitable[Outcome]]
Candidates = Callable[[float], Awaitable[tuple[list[KernelRecord], dict[str, KernelLoad]]]]


class OrchestrationEngine:
    """Routing strategies, the concurrency bound, timeouts, retries and failover."""

    def __init__(
        self, config: OrchestrationConfig | None = None, *, rng: random.Random | None = None
    ) -> None:
        self.config = config or OrchestrationConfig()
        self.metrics = OrchestrationMetrics()
        self._rng = rng or random.Random()
        self._rr = itertools.count(self._rng.randrange(1 << 16))
        self._inflight: dict[str, int] = {}
        self._slots = asyncio.Semaphore(self.config.max_concurrent)

    # ------------------------------------------------------------ policy
    def eligible(self, kernels: Sequence[KernelRecord], request: SyscallRequest) -> list[KernelRecord]:
        """Running kernels that execute `request.type` and declare every capability it requires."""
        running = [k for k in kernels if k.state is KernelState.RUNNING]
        able = [k for k in running if request.type in k.syscalls.split()]
        if running and not able:
            known = sorted({s for k in running for s in k.syscalls.split()})
            raise InvalidRequest(
                f"unknown syscall {request.type!r}; this cluster's kernels run: {', '.join(known)}"
            )
        needed = set(request.requires)
        matching = [k for k in able if needed <= set(k.capabilities.split())]
        if able and not matching:
            raise NoKernelAvailable(f"no running kernel declares the capabilities {sorted(needed)}")
        return matching

    def select(
        self, candidates: Sequence[KernelRecord], loads: dict[str, KernelLoad], exclude: set[str]
    ) -> KernelRecord | None:
        """Pick one of `candidates` (not in `exclude`) by the configured strategy."""
        pool = sorted((k for k in candidates if k.name not in exclude), key=lambda k: (k.index, k.name))
        if not pool:
            return None
        strategy = self.config.strategy
        if strategy is RoutingStrategy.ROUND_ROBIN:
            return pool[next(self._rr) % len(pool)]
        if strategy is RoutingStrategy.RANDOM:
            return self._rng.choice(pool)
        if strategy is RoutingStrategy.PRIMARY_FALLBACK:
            primary = self.config.primary or min(candidates, key=lambda k: (k.index, k.name)).name
            return next((k for k in pool if k.name == primary), pool[0])
        # LEAST_LOADED and CAPABILITY_BASED: lowest weighted load, counting our own in-flight work
        balancer = LoadBalancer(rng=self._rng)
        for k in pool:
            load = loads.get(k.name)
            own = self._inflight.get(k.name, 0)
            if load is None:  # unknown, not idle; but our own work on it is known
                if own:
                    balancer.update_load(k.name, queue_depth=own)
                else:
                    balancer.register(k.name)
                continue
            balancer.update_load(
                k.name,
                load.cpu,
                load.memory,
                load.queue_depth + own,
                load.latency_ms,
                load.error_rate,
            )
        name = balancer.select_kernel()
        return next(k for k in pool if k.name == name)

    # ------------------------------------------------------------ execution
    async def execute(
        self, candidates: Candidates, submit: Submit, request: SyscallRequest, *, kernel: str | None = None
    ) -> Outcome:
        """Run `request` on a kernel picked by the strategy; on failure retry on another one.

        Timeouts and refusals are retried (up to `retry_count` more attempts, each on a kernel
        not tried yet when `enable_failover`); a kernel reporting an error is not retried unless
        the strategy is PRIMARY_FALLBACK. `kernel` pins the request to one kernel by name (for
        state that lives in one kernel's memory). Raises a `DispatchError` when nothing worked.
        """
        async with self._slots:
            self.metrics.total_dispatches += 1
            try:
                return await self._attempts(candidates, submit, request, kernel)
            except Exception:
                self.metrics.failed += 1
                raise

    async def _attempts(
        self, candidates: Candidates, submit: Submit, request: SyscallRequest, kernel: str | None
    ) -> Outcome:
        cfg = self.config
        timeout = cfg.timeout_ms / 1000
        deadline = time.monotonic() + timeout * (cfg.retry_count + 1)
        tried: set[str] = set()
        last_error: Exception | None = None
        attempt = 0
        while attempt <= cfg.retry_count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            kernels, loads = await candidates(min(timeout, remaining))
            pool = self.eligible(kernels, request)
            if kernel is not None:
                pool = [k for k in pool if k.name == kernel]
            picked = self.select(pool, loads, tried if cfg.enable_failover else set())
            if picked is None and tried:
                picked = self.select(pool, loads, set())  # every kernel tried once: go round again
            if picked is None:
                where = f"kernel {kernel!r} is not running" if kernel else "no running kernel"
                last_error = NoKernelAvailable(f"{where} in the cluster")
                break
            if attempt:
                self.metrics.retries += 1
                if picked.name not in tried:
                    self.metrics.failovers += 1
            tried.add(picked.name)
            self._inflight[picked.name] = self._inflight.get(picked.name, 0) + 1
            try:
                outcome = await submit(picked, min(timeout, remaining))
            except KernelBusy:
                continue  # not an attempt: the kernel took nothing
            except DispatchTimeout as exc:
                self.metrics.timeouts += 1
                last_error = exc
            else:
                if outcome.success:
                    self._record_success(outcome)
                    return outcome
                last_error = KernelError(
                    outcome.error, kernel=outcome.kernel or picked.name, error_type=outcome.error_type
                )
                if cfg.strategy is not RoutingStrategy.PRIMARY_FALLBACK or outcome.error_type in (
                    "InvalidArguments",
                    "UnknownSyscall",
                ):
                    break
            finally:
                self._inflight[picked.name] -= 1
            attempt += 1
        raise last_error or NoKernelAvailable("no kernel available within the timeout")

    def _record_success(self, outcome: Outcome) -> None:
        m = self.metrics
        m.successful += 1
        m.total_latency_ms += max(outcome.finish_ms - outcome.enqueue_ms, 0)
        m.dispatches_by_kernel[outcome.kernel] = m.dispatches_by_kernel.get(outcome.kernel, 0) + 1
