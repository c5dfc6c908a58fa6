"""The load-balancing policy: score kernels from their load reports and pick the least loaded.

Pure and synchronous: no I/O, no asyncio, no Redis. The control plane feeds it `KernelLoad`
records (`update_load`) and asks it for a kernel (`select_kernel`).

Score of a load report, with the weights of `LoadBalancerConfig`::

    score = cpu_weight * cpu
          + memory_weight * memory
          + queue_weight * min(queue_depth / max_queue_depth, 1)
          + error_weight * error_rate
          + LATENCY_WEIGHT * min(latency_ms / max_latency_ms, 1)     # only when latency_ms > 0

`LATENCY_WEIGHT` is 0.1: latency is a tie-breaker between otherwise similar kernels, worth at
most as much as the smallest default weight, and a report with no latency (the spec's example)
scores exactly the weighted sum of the spec. Slowness beyond `max_latency_ms` is handled by the
health check rather than the score.

A kernel is *unhealthy* when its score is >= `health_threshold` or its `latency_ms` exceeds
`max_latency_ms`. A registered kernel with no load report yet is *unknown*, not idle: it gets
the average score of the reported kernels (0 when none has reported), so a fresh kernel does not
attract every request before its first report, nor is it starved.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from statistics import fmean
from typing import Any

import pydantic

from controlplane.errors import InvalidRequest
from controlplane.protocol.models import KernelLoad, LoadBalancerConfig

__all__ = ["LATENCY_WEIGHT", "LoadBalancer"]

#: Weight of the latency term (latency_ms / max_latency_ms, capped at 1).
LATENCY_WEIGHT = 0.1
#: Scores closer than this are a tie (so float rounding does not decide a pick).
_TIE_TOLERANCE = 1e-9


class LoadBalancer:
    """Least-loaded kernel selection with health filtering, random tie-breaking and panic mode."""

    def __init__(
        self,
        config: LoadBalancerConfig | None = None,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Create a balancer; `rng` breaks ties (seed it in tests), `clock` stamps load reports."""
        # model_validate({}) rather than LoadBalancerConfig(): type-checks without the pydantic mypy plugin
        self.config = config if config is not None else LoadBalancerConfig.model_validate({})
        self._rng = rng if rng is not None else random.Random()
        self._clock = clock
        self._loads: dict[str, KernelLoad | None] = {}

    @property
    def kernels(self) -> list[str]:
        """The registered kernel names, sorted."""
        return sorted(self._loads)

    def register(self, name: str) -> None:
        """Add a kernel with no load report yet; registering a known kernel keeps its report."""
        self._loads.setdefault(name, None)

    def unregister(self, name: str) -> None:
        """Forget a kernel and its load report; an unknown name is ignored."""
        self._loads.pop(name, None)

    def update_load(
        self,
        name: str,
        cpu: float = 0.0,
        memory: float = 0.0,
        queue_depth: int = 0,
        latency_ms: float = 0.0,
        error_rate: float = 0.0,
    ) -> KernelLoad:
        """Record a load report (registering the kernel if needed) and return it.

        Raises `InvalidRequest` for out-of-range values (fractions outside 0..1, negative depth
        or latency, NaN); nothing changes then, not even the registration.
        """
        try:
            load = KernelLoad(
                name=name,
                cpu=cpu,
                memory=memory,
                queue_depth=queue_depth,
                latency_ms=latency_ms,
                error_rate=error_rate,
                updated_at=self._clock(),
            )
        except pydantic.ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, err['loc']))}={err['input']!r}: {err['msg']}" for err in exc.errors()
            )
            raise InvalidRequest(f"invalid load report for kernel {name!r}: {problems}") from None
        self._loads[name] = load
        return load

    def get_load(self, name: str) -> KernelLoad | None:
        """The latest load report of `name`, or None if unregistered or not reported yet."""
        return self._loads.get(name)

    def score(self, name: str) -> float | None:
        """The weighted load score of `name` (see the module doc), or None if unregistered."""
        if name not in self._loads:
            return None
        return self._scores()[name]

    def is_healthy(self, name: str) -> bool:
        """Whether `name` is registered and may take work (score and latency within limits)."""
        score = self.score(name)
        return score is not None and self._healthy(self._loads[name], score)

    def select_kernel(self, exclude: list[str] | None = None) -> str | None:
        """Pick the healthy, non-excluded kernel with the lowest score; ties are broken at random.

        When no candidate is healthy, fall back to the lowest score among all candidates
        (panic mode: a sick cluster still serves). None when no candidate is left.
        """
        excluded = set(exclude or ())
        scores = {name: s for name, s in self._scores().items() if name not in excluded}
        healthy = [name for name, s in scores.items() if self._healthy(self._loads[name], s)]
        pool = healthy or list(scores)
        if not pool:
            return None
        best = min(scores[name] for name in pool)
        tied = sorted(name for name in pool if scores[name] - best <= _TIE_TOLERANCE)
        return self._rng.choice(tied)

    def get_summary(self) -> dict[str, Any]:
        """Counts and load statistics over all registered kernels, rounded to 4 decimals."""
        scores = self._scores()
        if not scores:
            return {"kernels": 0, "avg_load": 0.0, "max_load": 0.0, "min_load": 0.0, "healthy": 0}
        values = scores.values()
        return {
            "kernels": len(scores),
            "avg_load": round(fmean(values), 4),
            "max_load": round(max(values), 4),
            "min_load": round(min(values), 4),
            "healthy": sum(self._healthy(self._loads[name], s) for name, s in scores.items()),
        }

    # ------------------------------------------------------------------ internals

    def _load_score(self, load: KernelLoad) -> float:
        cfg = self.config
        score = (
            cfg.cpu_weight * load.cpu
            + cfg.memory_weight * load.memory
            + cfg.queue_weight * min(load.queue_depth / cfg.max_queue_depth, 1.0)
            + cfg.error_weight * load.error_rate
        )
        if load.latency_ms > 0:
            score += LATENCY_WEIGHT * min(load.latency_ms / cfg.max_latency_ms, 1.0)
        return score

    def _scores(self) -> dict[str, float]:
        """Every registered kernel's score; unknown kernels get the reported kernels' average."""
        reported = {name: self._load_score(load) for name, load in self._loads.items() if load is not None}
        default = fmean(reported.values()) if reported else 0.0
        return {name: reported.get(name, default) for name in self._loads}

    def _healthy(self, load: KernelLoad | None, score: float) -> bool:
        too_slow = load is not None and load.latency_ms > self.config.max_latency_ms
        return score < self.config.health_threshold and not too_slow
