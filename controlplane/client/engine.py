"""OrchestrationEngine: picks a kernel per request and retries elsewhere on failure.

The engine is the client-side policy: which running kernels may take a request (honouring the
syscalls and capabilities each kernel declares), which strategy ranks them, how many
dispatches may be in flight, and when a failed attempt goes to another kernel. It does no I/O
itself: it drives a `ClusterTarget`, which lists the cluster's kernels and submits an attempt.
`select` turns the strategy into an immutable `Plan` of candidates; where the choice needs
state every client shares (the round-robin position, in-flight counts, outlier ejection),
`lua/enqueue.lua` makes the final choice among them in the enqueue round trip.
See docs/routing.md.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from controlplane.client.balancer import LoadBalancer
from controlplane.client.estimates import Estimates, RetryBudget
from controlplane.client.routing import Attempt, KernelBusy, Plan, kernel_gone
from controlplane.errors import InvalidRequest, KernelError, KernelGone, NoKernelAvailable
from controlplane.protocol.jobs import Outcome
from controlplane.protocol.models import (
    KernelLoad,
    KernelState,
    OrchestrationConfig,
    OrchestrationMetrics,
    OutlierConfig,
    RoutingStrategy,
)
from controlplane.protocol.records import KernelRecord
from controlplane.protocol.requests import SyscallRequest

__all__ = ["ClusterTarget", "KernelBusy", "OrchestrationEngine", "Trace"]

logger = logging.getLogger(__name__)


class ClusterTarget(Protocol):
    """What the engine dispatches into: one cluster, as the client sees it."""

    async def candidates(self, wait: float) -> tuple[Sequence[KernelRecord], Mapping[str, KernelLoad]]:
        """The cluster's kernels and their loads; waits up to `wait` s for a running one."""

    async def submit(self, plan: Plan, wait_s: float) -> Attempt:
        """Enqueue one attempt by `plan` and wait up to `wait_s` s for its outcome. Raises
        `KernelBusy` when no candidate took it (nothing was enqueued)."""


@dataclass(slots=True)
class Trace:
    """What one `execute` did: the kernel that ran each attempt (retries and failovers
    included), and whether the last attempt's kernel was picked although every candidate was
    above the load balancer's `health_threshold`."""

    attempts: list[str] = field(default_factory=list)
    all_unhealthy: bool = False


class OrchestrationEngine:
    """Routing strategies, the concurrency bound, timeouts, retries, failover and ejection."""

    def __init__(
        self,
        config: OrchestrationConfig | None = None,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config or OrchestrationConfig()
        self.metrics = OrchestrationMetrics()
        self._rng = rng or random.Random()
        self._clock = clock
        self._rr = itertools.count(self._rng.randrange(1 << 16))
        self._inflight: dict[str, int] = {}
        self._slots = asyncio.Semaphore(self.config.max_concurrent)
        self.estimates = Estimates()
        self._balancers: dict[str, LoadBalancer] = {}
        self.budget = RetryBudget(self.config.retry_budget, self.config.min_retries_per_s)
        #: the last `eligible` answer: (kernels, (type, requires), the kernels eligible)
        self._eligible_memo: (
            tuple[tuple[KernelRecord, ...], tuple[str, tuple[str, ...]], list[KernelRecord]] | None
        ) = None

    @property
    def outlier_detection(self) -> bool:
        """Whether outcomes feed the shared outlier detector and ejected kernels are skipped."""
        flag = self.config.outlier_detection
        return self.config.strategy is RoutingStrategy.ADAPTIVE if flag is None else flag

    # ------------------------------------------------------------ policy
    def eligible(self, kernels: Sequence[KernelRecord], request: SyscallRequest) -> list[KernelRecord]:
        """Running kernels that execute `request.type` and declare every capability it requires.

        For a tuple of kernels (what the client's cached views hand out until a change) the
        answer is kept and given again while the same tuple comes with the same request kind:
        a sequential dispatch then skips splitting every kernel's declarations."""
        if type(kernels) is not tuple:
            return self._eligible(kernels, request)
        memo, kind = self._eligible_memo, (request.type, tuple(request.requires))
        if memo is None or memo[0] is not kernels or memo[1] != kind:
            memo = self._eligible_memo = (kernels, kind, self._eligible(kernels, request))
        return list(memo[2])

    def _eligible(self, kernels: Sequence[KernelRecord], request: SyscallRequest) -> list[KernelRecord]:
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
            declared = sorted({c for k in able for c in k.capabilities.split()})
            raise NoKernelAvailable(
                f"no running kernel declares the capabilities {sorted(needed)} "
                f"(the running kernels declare: {', '.join(declared) or 'none'})"
            )
        return matching

    def select(
        self,
        candidates: Sequence[KernelRecord],
        loads: Mapping[str, KernelLoad],
        exclude: set[str],
        needs: frozenset[str] = frozenset(),
    ) -> Plan | None:
        """The plan of one attempt on `candidates` (not in `exclude`), by the configured strategy.

        Round robin, primary with fallback and adaptive list several candidates and leave the
        final choice to Redis; random, least loaded and capability based choose here (a plan of
        one). `needs`: the capabilities the request requires (CAPABILITY_BASED prefers the
        kernels declaring least beyond them).
        """
        pool = sorted((k for k in candidates if k.name not in exclude), key=lambda k: (k.index, k.name))
        if not pool:
            return None
        outlier = self.config.outlier if self.outlier_detection else None
        if outlier is not None:
            pool = self.estimates.admitted(pool, self._clock() * 1000)
        strategy, size = self.config.strategy, len(candidates)
        cluster = pool[0].cluster
        if strategy is RoutingStrategy.ROUND_ROBIN:
            # every client shares one counter in Redis; the local one only orders the list
            offset = next(self._rr) % len(pool)
            ordered = (*pool[offset:], *pool[:offset])
            return Plan(cluster, ordered, "rr", tie=offset, outlier=outlier, cluster_size=size)
        if strategy is RoutingStrategy.PRIMARY_FALLBACK:
            primary = self.config.primary or min(candidates, key=lambda k: (k.index, k.name)).name
            ordered = tuple(sorted(pool, key=lambda k: k.name != primary))  # stable: the rest by index
            return Plan(cluster, ordered, "first", outlier=outlier, cluster_size=size)
        if strategy is RoutingStrategy.ADAPTIVE:
            return self._adaptive(pool, size, outlier)
        if strategy is RoutingStrategy.RANDOM:
            return Plan(cluster, (self._rng.choice(pool),), outlier=outlier, cluster_size=size)
        balancer = self.balancer(cluster)
        self._report_loads(balancer, pool, loads)
        if strategy is RoutingStrategy.CAPABILITY_BASED:
            closest = {k.name for k in self._closest_match(balancer, pool, needs)}
            name = balancer.select_kernel(exclude=[n for n in balancer.kernels if n not in closest])
        else:
            name = balancer.select_kernel()
        picked = next(k for k in pool if k.name == name)
        healthy = balancer.is_healthy(picked.name)
        return Plan(cluster, (picked,), outlier=outlier, cluster_size=size, all_unhealthy=not healthy)

    def _adaptive(self, pool: list[KernelRecord], cluster_size: int, outlier: OutlierConfig | None) -> Plan:
        """Sample `adaptive_choices` candidates; enqueue.lua takes the lowest expected delay."""
        picks = self._rng.sample(pool, min(self.config.adaptive_choices, len(pool)))
        stats = [self.estimates.get(k) for k in picks]
        service = self.estimates.service(pool, picks)
        known = [s for s in service if s > 0]
        prior = min(known) if known else 1.0  # optimistic, as in enqueue.lua: unmeasured is explored

        def local_score(i: int) -> float:  # the same shape as enqueue.lua's, on what we know
            s = stats[i]
            errors = s.error_rate if s is not None else 0.0
            est = service[i] or prior
            return (self._inflight.get(picks[i].name, 0) + 1) * est / max(1 - errors, 0.05) ** 2

        order = sorted(range(len(picks)), key=local_score)
        rates = [s.error_rate if s is not None and s.outcomes else -1.0 for s in stats]  # -1: none yet
        return Plan(
            pool[0].cluster,
            tuple(picks[i] for i in order),
            "p2c",
            service_ms=tuple(service[i] for i in order),
            error_rate=tuple(rates[i] for i in order),
            tie=self._rng.random(),
            load_expiry_ms=round(self.config.load_expiry_s * 1000),
            slow_start_ms=self.config.outlier.slow_start_ms,
            outlier=outlier,
            cluster_size=cluster_size,
            rate_outliers=self.estimates.rate_outliers(pool, self.config.outlier),
        )

    def balancer(self, cluster: str) -> LoadBalancer:
        """The spec's `LoadBalancer` of `cluster`, with this engine's `load_balancer` weights:
        LEAST_LOADED and CAPABILITY_BASED pick with it (its view: the latest load reports plus
        this engine's own work in flight)."""
        balancer = self._balancers.get(cluster)
        if balancer is None:
            balancer = self._balancers[cluster] = LoadBalancer(self.config.load_balancer, rng=self._rng)
        return balancer

    def _report_loads(
        self, balancer: LoadBalancer, pool: list[KernelRecord], loads: Mapping[str, KernelLoad]
    ) -> None:
        """Make `balancer` hold the pool's kernels and their load reports, our own in-flight work
        added to the queue depth."""
        names = {k.name for k in pool}
        for name in balancer.kernels:
            if name not in names:
                balancer.unregister(name)
        for k in pool:
            load = loads.get(k.name)
            own = self._inflight.get(k.name, 0)
            if load is None:  # unknown, not idle; but our own work on it is known
                if own:
                    balancer.update_load(k.name, queue_depth=own)
                else:
                    balancer.unregister(k.name)
                    balancer.register(k.name)
                continue
            balancer.update_load(
                k.name, load.cpu, load.memory, load.queue_depth + own, load.latency_ms, load.error_rate
            )

    @staticmethod
    def _closest_match(
        balancer: LoadBalancer, pool: list[KernelRecord], needs: frozenset[str]
    ) -> list[KernelRecord]:
        """The kernels of `pool` declaring the fewest capabilities beyond `needs` among those
        the balancer finds healthy (all unhealthy: the closest of all)."""
        healthy = [k for k in pool if balancer.is_healthy(k.name)] or pool
        surplus = {k.name: len(set(k.capabilities.split()) - needs) for k in healthy}
        fewest = min(surplus.values())
        return [k for k in healthy if surplus[k.name] == fewest]

    # ------------------------------------------------------------ execution
    async def execute(
        self,
        target: ClusterTarget,
        request: SyscallRequest,
        *,
        kernel: str | None = None,
        epoch: int | None = None,
        trace: Trace | None = None,
    ) -> Outcome:
        """Run `request` on a kernel of `target` picked by the strategy; on failure retry on
        another one.

        Timeouts and refusals are retried (up to `retry_count` more attempts, each on a kernel
        not tried yet when `enable_failover`, and only while the retry budget lasts); a kernel
        reporting an error is not retried unless the strategy is PRIMARY_FALLBACK. `kernel`
        pins the request to one kernel by name (for state that lives in one kernel's memory), and
        `epoch` to one incarnation of it: every attempt goes there, or the request fails with
        `KernelGone` once that incarnation died or was replaced (never retried elsewhere).
        `trace`, when given, learns what happened on the way (the kernel of every attempt).
        Raises a `DispatchError` when nothing worked.
        """
        async with self._slots:
            self.metrics.total_dispatches += 1
            self.budget.deposit()
            try:
                return await self._attempts(target, request, kernel, epoch, trace or Trace())
            except Exception:
                self.metrics.failed += 1
                raise

    async def _attempts(
        self,
        target: ClusterTarget,
        request: SyscallRequest,
        kernel: str | None,
        epoch: int | None,
        trace: Trace,
    ) -> Outcome:
        cfg = self.config
        timeout = cfg.timeout_ms / 1000
        deadline = time.monotonic() + timeout * (cfg.retry_count + 1)
        tried: set[str] = set()  # kernels that took an attempt
        refused: set[str] = set()  # kernels that took no work when asked
        last_error: Exception | None = None
        attempt = 0
        while attempt <= cfg.retry_count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if attempt and not self.budget.withdraw():
                logger.debug("retry budget exhausted; not retrying %s", request.type)
                break
            kernels, loads = await target.candidates(min(timeout, remaining))
            pool = self.eligible(kernels, request)
            if kernel is not None:
                pool = [k for k in pool if k.name == kernel]
                if epoch is not None:  # epochs only grow: a later one means `kernel@epoch` was replaced
                    current = next((k.epoch for k in kernels if k.name == kernel), None)
                    if current is not None and current > epoch:
                        raise kernel_gone(kernel, epoch, current)
            exclude = tried | refused if cfg.enable_failover else refused
            needs = frozenset(request.requires)
            plan = self.select(pool, loads, exclude, needs)
            if plan is None and exclude:
                plan = self.select(pool, loads, set(), needs)  # every kernel tried once: go round again
            if plan is None:
                if kernel:
                    running = ", ".join(sorted(k.name for k in self.eligible(kernels, request))) or "none"
                    where = f"kernel {kernel!r} is not running in the cluster (running: {running})"
                else:
                    where = "no running kernel in the cluster"
                last_error = NoKernelAvailable(where)
                if kernel is not None and epoch is not None and all(k.name != kernel for k in kernels):
                    last_error = kernel_gone(kernel, epoch, None)
                break
            if epoch is not None:  # a plain enqueue on that kernel, which checks its epoch
                plan = dataclasses.replace(
                    plan, candidates=plan.candidates[:1], mode="first", outlier=None, epoch=epoch
                )
            first = plan.candidates[0].name
            self._inflight[first] = self._inflight.get(first, 0) + 1
            try:
                done = await target.submit(plan, min(timeout, remaining))
            except KernelBusy:
                refused.update(k.name for k in plan.candidates)
                continue  # not an attempt: the kernel took nothing
            finally:
                self._inflight[first] -= 1
            outcome = done.outcome
            if done.error is not None:
                self.metrics.timeouts += 1
                last_error = done.error
            ran = outcome.kernel if outcome is not None and outcome.kernel else done.placed.kernel
            if attempt:
                self.metrics.retries += 1
                if ran not in tried:
                    self.metrics.failovers += 1
            tried.add(ran)
            trace.attempts.append(ran)
            trace.all_unhealthy = plan.all_unhealthy
            attempt += 1
            self.estimates.observe(plan.cluster, ran, outcome)
            self.estimates.eject(plan.cluster, done.placed.ejected)
            if outcome is None:
                continue
            if outcome.success:
                self._record_success(outcome)
                return outcome
            if outcome.error_type == KernelGone.error_type:  # pinned, its incarnation lost: final
                raise KernelGone(outcome.error, kernel=ran, epoch=outcome.epoch or None)
            last_error = KernelError(outcome.error, kernel=ran, error_type=outcome.error_type)
            if cfg.strategy is not RoutingStrategy.PRIMARY_FALLBACK or outcome.error_type in (
                "InvalidArguments",
                "UnknownSyscall",
            ):
                break
        raise last_error or NoKernelAvailable("no kernel available within the timeout")

    def _record_success(self, outcome: Outcome) -> None:
        m = self.metrics
        m.successful += 1
        m.total_latency_ms += max(outcome.finish_ms - outcome.enqueue_ms, 0)
        m.dispatches_by_kernel[outcome.kernel] = m.dispatches_by_kernel.get(outcome.kernel, 0) + 1
