"""What one client learned of each kernel, and the retry budget: the engine's memory.

The engine ranks candidates by these estimates and hands them to `lua/enqueue.lua` in the
`Plan`; Redis holds the shared truth (in-flight sets, load and outlier records), these are
only what this client saw. Kept apart from the engine so the policy reads as policy.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from controlplane.client.routing import BAD_REQUEST_ERRORS
from controlplane.protocol.jobs import Outcome
from controlplane.protocol.models import OutlierConfig
from controlplane.protocol.records import KernelRecord

__all__ = [
    "ESTIMATE_DECAY_S",
    "EWMA_ALPHA",
    "PANIC_THRESHOLD",
    "SHRINK_REPLIES",
    "SLOW_FACTOR",
    "Estimates",
    "KernelStats",
    "RetryBudget",
    "median",
]

#: When fewer than this share of the eligible kernels are admitted (not ejected), route to all.
PANIC_THRESHOLD = 0.5
#: Weight of the newest outcome in the per-kernel service-time and failure-rate EWMAs (the
#: service time's first samples weigh 1/n until 1/n falls below it: a running mean, so one
#: slow first reply of a new kernel does not stick for dozens of replies).
EWMA_ALPHA = 0.1
#: A kernel's pessimistic service estimate relaxes towards its peers' median with this time
#: constant while nothing new is seen of it (so one slow reply cannot starve it forever), s.
ESTIMATE_DECAY_S = 3.0
#: A reply this many times slower than the peers' median service time is a slow probe.
SLOW_FACTOR = 4.0
#: Kernels are alike until shown otherwise: an estimate from n replies weighs n against this
#: many of the peers' median (n counts up to the EWMA's memory, (2 - alpha) / alpha = 19).
SHRINK_REPLIES = 10.0
_EWMA_MEMORY = (2 - EWMA_ALPHA) / EWMA_ALPHA


def median(values: Sequence[float]) -> float:
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
class KernelStats:
    """What this client saw of one kernel: service time of successes, failure rate."""

    service_ms: float = 0.0
    error_rate: float = 0.0
    outcomes: int = 0
    samples: int = 0  # successes that gave a service time
    at: float = 0.0  # time.monotonic() of the last outcome
    slow_streak: int = 0  # successes in a row far slower than the peers' median

    def observe(self, ok: bool, service_ms: float | None) -> None:
        self.outcomes += 1
        self.at = time.monotonic()
        self.error_rate += EWMA_ALPHA * ((0.0 if ok else 1.0) - self.error_rate)
        if ok and service_ms is not None:
            self.samples += 1
            self.service_ms += max(EWMA_ALPHA, 1 / self.samples) * (service_ms - self.service_ms)


class Estimates:
    """Per (cluster, kernel): the stats of this client's outcomes and the ejections it knows."""

    def __init__(self) -> None:
        self.stats: dict[tuple[str, str], KernelStats] = {}
        self.ejected: dict[tuple[str, str], int] = {}  # (cluster, kernel) -> until, unix ms

    def get(self, k: KernelRecord) -> KernelStats | None:
        return self.stats.get((k.cluster, k.name))

    def admitted(self, pool: list[KernelRecord], now_ms: float) -> list[KernelRecord]:
        """`pool` without the kernels known to be ejected, unless too few would be left (panic)."""
        admitted = [k for k in pool if self.ejected.get((k.cluster, k.name), 0) <= now_ms]
        return admitted if len(admitted) >= PANIC_THRESHOLD * len(pool) else pool

    def service(self, pool: Sequence[KernelRecord], picks: Sequence[KernelRecord]) -> list[float]:
        """Service-time estimates (ms, 0: unknown) of `picks`: each shrunk towards the pool's
        median by how few replies it rests on (`SHRINK_REPLIES`), and one above the median
        relaxing towards it while the kernel goes unobserved (`ESTIMATE_DECAY_S`)."""
        known = [s.service_ms for k in pool if (s := self.get(k)) is not None and s.service_ms > 0]
        mid = median(known) if known else 0.0
        now = time.monotonic()
        out = []
        for k in picks:
            s = self.get(k)
            if s is None or s.service_ms <= 0:
                out.append(0.0)
                continue
            n = min(s.samples, _EWMA_MEMORY)
            est = (n * s.service_ms + SHRINK_REPLIES * mid) / (n + SHRINK_REPLIES)
            if est > mid:
                # each slow probe in a row doubles the time before the next one (up to 16x)
                decay = ESTIMATE_DECAY_S * 2 ** min(max(s.slow_streak - 1, 0), 4)
                est = mid + (est - mid) * math.exp(-(now - s.at) / decay)
            out.append(est)
        return out

    def rate_outliers(self, pool: Sequence[KernelRecord], cfg: OutlierConfig) -> frozenset[str]:
        """Kernels whose failure rate (as this client saw it) exceeds their peers' median by
        `failure_rate_margin`; only kernels with `min_requests` outcomes are judged."""
        rates = {
            k.name: s.error_rate
            for k in pool
            if (s := self.get(k)) is not None and s.outcomes >= cfg.min_requests
        }
        if len(rates) < 2 or max(rates.values()) < cfg.failure_rate_margin:
            return frozenset()  # (a peers' median is never negative: nobody is that far above it)
        out = set()
        for name, rate in rates.items():
            peers = median([r for n, r in rates.items() if n != name])
            if rate - peers >= cfg.failure_rate_margin:
                out.add(name)
        return frozenset(out)

    def observe(self, cluster: str, name: str, outcome: Outcome | None) -> None:
        """Learn from an attempt that ran on kernel `name`: its service time and failure rate
        (no outcome: it timed out)."""
        stats = self.stats.setdefault((cluster, name), KernelStats())
        if outcome is None:
            stats.observe(False, None)
        elif outcome.success:
            service = max(outcome.finish_ms - outcome.start_ms, 0)
            peers = [
                s.service_ms
                for (c, n), s in self.stats.items()
                if c == cluster and n != name and s.service_ms > 0
            ]
            slow = bool(peers) and service > SLOW_FACTOR * median(peers)
            stats.slow_streak = stats.slow_streak + 1 if slow else 0
            stats.observe(True, service)
        else:
            stats.observe(outcome.error_type in BAD_REQUEST_ERRORS, None)

    def eject(self, cluster: str, ejected: Mapping[str, int]) -> None:
        """Learn ejections Redis reported (kernel -> ejected until, unix ms)."""
        for name, until in ejected.items():
            key = (cluster, name)
            if self.ejected.get(key, 0) < until:
                self.ejected[key] = until
                self.stats[key] = KernelStats()  # judged afresh after readmission
