"""OrchestrationEngine: picks a kernel per request and retries elsewhere on failure.

The engine is the client-side policy: which running kernels may take a request (honouring the
syscalls and capabilities each kernel declares), which strategy ranks them, how many
dispatches may be in flight, and when a failed attempt goes to another kernel. It does no I/O
itself: the caller passes the cluster's kernels and a `submit` coroutine. Strategies that need
state every client shares (the round-robin position, in-flight counts, outlier ejection) hand
`submit` a `Route`, and `lua/enqueue.lua` makes the final choice in the enqueue round trip.
See docs/routing.md.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from controlplane.client.balancer import LoadBalancer
from controlplane.client.routing import BAD_REQUEST_ERRORS, KernelBusy, Route, candidates_of, ran_on
from controlplane.errors import DispatchTimeout, InvalidRequest, KernelError, NoKernelAvailable
from controlplane.protocol.jobs import Outcome
from controlplane.protocol.models import (
    KernelLoad,
    KernelState,
    OrchestrationConfig,
    OrchestrationMetrics,
    RoutingStrategy,
)
from controlplane.protocol.records import KernelRecord
from controlplane.protocol.requests import SyscallRequest

__all__ = ["PANIC_THRESHOLD", "KernelBusy", "OrchestrationEngine", "RetryBudget"]

logger = logging.getLogger(__name__)

Submit = Callable[[KernelRecord, float], Awaitable[Outcome]]
Candidates = Callable[[float], Awaitable[tuple[list[KernelRecord], dict[str, KernelLoad]]]]

#: When fewer than this share of the eligible kernels are admitted (not ejected), route to all.
PANIC_THRESHOLD = 0.5
#: Weight of the newest outcome in the per-kernel service-time and failure-rate EWMAs.
EWMA_ALPHA = 0.1
#: A kernel's pessimistic service estimate relaxes towards its peers' median with this time
#: constant while nothing new is seen of it (so one slow reply cannot starve it forever), s.
ESTIMATE_DECAY_S = 3.0
#: A reply this many times slower than the peers' median service time is a slow probe.
SLOW_FACTOR = 4.0


def _median(values: Sequence[float]) -> float:
    """The median of a non-empty `values` (statistics.median costs several times more, and
    the engine takes medians on every dispatch)."""
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


class RetryBudget:
    """A token bucket: each request deposits `ratio` tokens, `floor` tokens arrive per second,
    each retry takes one. Retries stop when it is empty, so a sick cluster sees at most about
    (1 + ratio) times its normal load instead of (1 + retry_count) times."""

    def __init__(self, ratio: float, floor: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ratio, self.floor, self._clock = ratio, floor, clock
        self.cap = max(10.0, floor)
        self.tokens = self.cap
        self._at = clock()

    def deposit(self) -> None:
        self._refill()
        self.tokens = min(self.tokens + self.ratio, self.cap)

    def withdraw(self) -> bool:
        self._refill()
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    def _refill(self) -> None:
        now = self._clock()
        self.tokens = min(self.tokens + (now - self._at) * self.floor, self.cap)
        self._at = now


@dataclass(slots=True)
class _KernelStats:
    """What this client saw of one kernel: service time of successes, failure rate."""

    service_ms: float = 0.0
    error_rate: float = 0.0
    outcomes: int = 0
    at: float = 0.0  # time.monotonic() of the last outcome
    slow_streak: int = 0  # successes in a row far slower than the peers' median

    def observe(self, ok: bool, service_ms: float | None) -> None:
        self.outcomes += 1
        self.at = time.monotonic()
        self.error_rate += EWMA_ALPHA * ((0.0 if ok else 1.0) - self.error_rate)
        if ok and service_ms is not None:
            if self.service_ms <= 0:
                self.service_ms = service_ms
            else:
                self.service_ms += EWMA_ALPHA * (service_ms - self.service_ms)


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
        self._stats: dict[tuple[str, str], _KernelStats] = {}
        self._ejected: dict[tuple[str, str], int] = {}  # (cluster, kernel) -> until, unix ms
        self.budget = RetryBudget(self.config.retry_budget, self.config.min_retries_per_s)

    @property
    def outlier_detection(self) -> bool:
        """Whether outcomes feed the shared outlier detector and ejected kernels are skipped."""
        flag = self.config.outlier_detection
        return self.config.strategy is RoutingStrategy.ADAPTIVE if flag is None else flag

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
            declared = sorted({c for k in able for c in k.capabilities.split()})
            raise NoKernelAvailable(
                f"no running kernel declares the capabilities {sorted(needed)} "
                f"(the running kernels declare: {', '.join(declared) or 'none'})"
            )
        return matching

    def select(
        self, candidates: Sequence[KernelRecord], loads: dict[str, KernelLoad], exclude: set[str]
    ) -> KernelRecord | None:
        """Pick one of `candidates` (not in `exclude`) by the configured strategy.

        A `Route` is returned where Redis makes the final choice (round robin, primary with
        fallback, adaptive); its own fields are those of the locally preferred candidate.
        """
        pool = sorted((k for k in candidates if k.name not in exclude), key=lambda k: (k.index, k.name))
        if not pool:
            return None
        if self.outlier_detection:
            pool = self._admitted(pool)
        strategy = self.config.strategy
        picked: KernelRecord
        if strategy is RoutingStrategy.ROUND_ROBIN:
            # every client shares one counter in Redis; the local one only orders the list
            offset = next(self._rr) % len(pool)
            ordered = pool[offset:] + pool[:offset]
            picked = Route.of(ordered[0], mode="rr", alternates=ordered[1:], tie=offset)
        elif strategy is RoutingStrategy.RANDOM:
            picked = self._rng.choice(pool)
        elif strategy is RoutingStrategy.PRIMARY_FALLBACK:
            primary = self.config.primary or min(candidates, key=lambda k: (k.index, k.name)).name
            ordered = sorted(pool, key=lambda k: k.name != primary)  # stable: the rest by index
            picked = Route.of(ordered[0], mode="first", alternates=ordered[1:])
        elif strategy is RoutingStrategy.ADAPTIVE:
            picked = self._adaptive(pool, len(candidates))
        else:  # LEAST_LOADED and CAPABILITY_BASED
            picked = self._least_loaded(pool, loads)
        if self.outlier_detection:
            route = picked if isinstance(picked, Route) else Route.of(picked)
            route.outlier = self.config.outlier
            route.cluster_size = len(candidates)
            return route
        return picked

    def _admitted(self, pool: list[KernelRecord]) -> list[KernelRecord]:
        """`pool` without the kernels known to be ejected, unless too few would be left (panic)."""
        now_ms = self._clock() * 1000
        admitted = [k for k in pool if self._ejected.get((k.cluster, k.name), 0) <= now_ms]
        return admitted if len(admitted) >= PANIC_THRESHOLD * len(pool) else pool

    def _adaptive(self, pool: list[KernelRecord], cluster_size: int) -> Route:
        """Sample `adaptive_choices` candidates; enqueue.lua takes the lowest expected delay."""
        picks = self._rng.sample(pool, min(self.config.adaptive_choices, len(pool)))
        stats = [self._stats.get((k.cluster, k.name)) for k in picks]
        service = self._service_estimates(pool, picks)
        known = [s for s in service if s > 0]
        default = sum(known) / len(known) if known else 1.0

        def local_score(i: int) -> float:  # the same shape as enqueue.lua's, on what we know
            s = stats[i]
            errors = s.error_rate if s is not None else 0.0
            est = service[i] or default
            return (self._inflight.get(picks[i].name, 0) + 1) * est / max(1 - errors, 0.05) ** 2

        order = sorted(range(len(picks)), key=local_score)
        picks = [picks[i] for i in order]
        stats = [stats[i] for i in order]
        service = [service[i] for i in order]
        return Route.of(
            picks[0],
            mode="p2c",
            alternates=picks[1:],
            service_ms=service,
            error_rate=[s.error_rate if s is not None and s.outcomes else -1.0 for s in stats],
            tie=self._rng.randrange(2),
            load_expiry_ms=round(self.config.load_expiry_s * 1000),
            cluster_size=cluster_size,
            rate_outliers=self._rate_outliers(pool),
        )

    def _service_estimates(self, pool: Sequence[KernelRecord], picks: Sequence[KernelRecord]) -> list[float]:
        """Service-time estimates (ms, 0: unknown) of `picks`; an estimate above the pool's
        median relaxes towards it while the kernel goes unobserved (`ESTIMATE_DECAY_S`)."""
        known = [
            s.service_ms
            for k in pool
            if (s := self._stats.get((k.cluster, k.name))) is not None and s.service_ms > 0
        ]
        median = _median(known) if known else 0.0
        now = time.monotonic()
        out = []
        for k in picks:
            s = self._stats.get((k.cluster, k.name))
            if s is None or s.service_ms <= 0:
                out.append(0.0)
            elif s.service_ms > median:
                # each slow probe in a row doubles the time before the next one (up to 16x)
                decay = ESTIMATE_DECAY_S * 2 ** min(max(s.slow_streak - 1, 0), 4)
                out.append(median + (s.service_ms - median) * math.exp(-(now - s.at) / decay))
            else:
                out.append(s.service_ms)
        return out

    def _rate_outliers(self, pool: Sequence[KernelRecord]) -> frozenset[str]:
        """Kernels whose failure rate (as this client saw it) exceeds their peers' median by
        `failure_rate_margin`; only kernels with `min_requests` outcomes are judged."""
        cfg = self.config.outlier
        rates = {
            k.name: s.error_rate
            for k in pool
            if (s := self._stats.get((k.cluster, k.name))) is not None and s.outcomes >= cfg.min_requests
        }
        if len(rates) < 2 or max(rates.values()) < cfg.failure_rate_margin:
            return frozenset()  # (a peers' median is never negative: nobody is that far above it)
        out = set()
        for name, rate in rates.items():
            peers = _median([r for n, r in rates.items() if n != name])
            if rate - peers >= cfg.failure_rate_margin:
                out.add(name)
        return frozenset(out)

    def _least_loaded(self, pool: list[KernelRecord], loads: dict[str, KernelLoad]) -> KernelRecord:
        """Lowest weighted load (the spec's LoadBalancer), counting our own in-flight work."""
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
                k.name, load.cpu, load.memory, load.queue_depth + own, load.latency_ms, load.error_rate
            )
        name = balancer.select_kernel()
        return next(k for k in pool if k.name == name)

    # ------------------------------------------------------------ execution
    async def execute(
        self,
        candidates: Candidates,
        submit: Submit,
        request: SyscallRequest,
        *,
        kernel: str | None = None,
        attempts: list[str] | None = None,
    ) -> Outcome:
        """Run `request` on a kernel picked by the strategy; on failure retry on another one.

        Timeouts and refusals are retried (up to `retry_count` more attempts, each on a kernel
        not tried yet when `enable_failover`, and only while the retry budget lasts); a kernel
        reporting an error is not retried unless the strategy is PRIMARY_FALLBACK. `kernel`
        pins the request to one kernel by name (for state that lives in one kernel's memory).
        `attempts`, when given, gets the name of the kernel that ran each attempt, in order.
        Raises a `DispatchError` when nothing worked.
        """
        async with self._slots:
            self.metrics.total_dispatches += 1
            self.budget.deposit()
            try:
                return await self._attempts(candidates, submit, request, kernel, attempts)
            except Exception:
                self.metrics.failed += 1
                raise

    async def _attempts(
        self,
        candidates: Candidates,
        submit: Submit,
        request: SyscallRequest,
        kernel: str | None,
        attempts: list[str] | None,
    ) -> Outcome:
        cfg = self.config
        timeout = cfg.timeout_ms / 1000
        deadline = time.monotonic() + timeout * (cfg.retry_count + 1)
        ran_on_each = attempts if attempts is not None else []  # the kernel of every attempt
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
            kernels, loads = await candidates(min(timeout, remaining))
            pool = self.eligible(kernels, request)
            if kernel is not None:
                pool = [k for k in pool if k.name == kernel]
            exclude = tried | refused if cfg.enable_failover else refused
            picked = self.select(pool, loads, exclude)
            if picked is None and exclude:
                picked = self.select(pool, loads, set())  # every kernel tried once: go round again
            if picked is None:
                where = f"kernel {kernel!r} is not running" if kernel else "no running kernel"
                last_error = NoKernelAvailable(f"{where} in the cluster")
                break
            self._inflight[picked.name] = self._inflight.get(picked.name, 0) + 1
            outcome: Outcome | None = None
            try:
                outcome = await submit(picked, min(timeout, remaining))
            except KernelBusy:
                refused.update(k.name for k in candidates_of(picked))
                continue  # not an attempt: the kernel took nothing
            except DispatchTimeout as exc:
                self.metrics.timeouts += 1
                last_error = exc
            finally:
                self._inflight[picked.name] -= 1
            ran = outcome.kernel if outcome is not None and outcome.kernel else ran_on(picked)
            if attempt:
                self.metrics.retries += 1
                if ran not in tried:
                    self.metrics.failovers += 1
            tried.add(ran)
            ran_on_each.append(ran)
            attempt += 1
            self._observe(picked, ran, outcome)
            if outcome is None:
                continue
            if outcome.success:
                self._record_success(outcome)
                return outcome
            last_error = KernelError(outcome.error, kernel=ran, error_type=outcome.error_type)
            if cfg.strategy is not RoutingStrategy.PRIMARY_FALLBACK or outcome.error_type in (
                "InvalidArguments",
                "UnknownSyscall",
            ):
                break
        raise last_error or NoKernelAvailable("no kernel available within the timeout")

    def _observe(self, picked: KernelRecord, name: str, outcome: Outcome | None) -> None:
        """Learn from an attempt that ran on kernel `name`: service time and failure rate, and
        ejections Redis reported."""
        stats = self._stats.setdefault((picked.cluster, name), _KernelStats())
        if outcome is None:
            stats.observe(False, None)
        elif outcome.success:
            service = max(outcome.finish_ms - outcome.start_ms, 0)
            peers = [
                s.service_ms
                for (c, n), s in self._stats.items()
                if c == picked.cluster and n != name and s.service_ms > 0
            ]
            slow = bool(peers) and service > SLOW_FACTOR * _median(peers)
            stats.slow_streak = stats.slow_streak + 1 if slow else 0
            stats.observe(True, service)
        else:
            stats.observe(outcome.error_type in BAD_REQUEST_ERRORS, None)
        if isinstance(picked, Route):
            for ejected, until in picked.ejected.items():
                key = (picked.cluster, ejected)
                if self._ejected.get(key, 0) < until:
                    self._ejected[key] = until
                    self._stats[key] = _KernelStats()  # judged afresh after readmission

    def _record_success(self, outcome: Outcome) -> None:
        m = self.metrics
        m.successful += 1
        m.total_latency_ms += max(outcome.finish_ms - outcome.enqueue_ms, 0)
        m.dispatches_by_kernel[outcome.kernel] = m.dispatches_by_kernel.get(outcome.kernel, 0) + 1
