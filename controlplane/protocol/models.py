"""The spec's data classes and enums (the records kcp keeps in Redis are in `records`).

Everything that crosses a boundary (a config from a user, a record read from Redis)
is a pydantic model, so bad input becomes a `pydantic.ValidationError` (wrapped in
`InvalidRequest` by the client) instead of corrupt state.
"""

from __future__ import annotations

import time
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

#: Cluster, kernel and agent names: no key separators, glob characters or whitespace.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
Capability = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_.-]{0,31}$")]


class ClusterStatus(StrEnum):
    INITIALIZING = "initializing"
    RUNNING = "running"
    SCALING = "scaling"
    STOPPED = "stopped"
    ERROR = "error"


class KernelState(StrEnum):
    PENDING = "pending"  # placed on an agent, process not up yet
    RUNNING = "running"  # takes work
    DRAINING = "draining"  # finishes its queue, takes nothing new
    STOPPED = "stopped"  # drained and gone


#: Kernels that count towards a cluster's size.
ACTIVE_KERNEL_STATES = frozenset({KernelState.PENDING, KernelState.RUNNING})


class RoutingStrategy(StrEnum):
    ROUND_ROBIN = "round_robin"
    LEAST_LOADED = "least_loaded"
    CAPABILITY_BASED = "capability_based"
    RANDOM = "random"
    PRIMARY_FALLBACK = "primary_fallback"
    #: power of two choices on in-flight counts and load reports, with outlier ejection (docs/routing.md)
    ADAPTIVE = "adaptive"


class BusTopic(StrEnum):
    EVENTS = "events"
    METRICS = "metrics"
    CONTROL = "control"
    DATA = "data"


class ClusterConfig(BaseModel):
    """How a cluster may size itself. `capabilities` are required of every agent hosting it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_kernels: int = Field(1, ge=0, le=10_000)
    max_kernels: int = Field(10, ge=1, le=10_000)
    auto_scale: bool = False
    scale_up_threshold: float = Field(0.8, gt=0, le=1)
    scale_down_threshold: float = Field(0.2, ge=0, lt=1)
    capabilities: list[Capability] = Field(default_factory=list, max_length=16)
    #: an idle kernel takes over the oldest job still queued on a busy sibling (docs/routing.md)
    work_stealing: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> ClusterConfig:
        if self.min_kernels > self.max_kernels:
            raise ValueError(f"min_kernels ({self.min_kernels}) exceeds max_kernels ({self.max_kernels})")
        if self.scale_down_threshold >= self.scale_up_threshold:
            raise ValueError("scale_down_threshold must be below scale_up_threshold")
        return self


class OutlierConfig(BaseModel):
    """When a kernel is ejected from routing, for how long, and how many may be (docs/routing.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: failures in a row (as the clients see them, shared in Redis) that eject a kernel
    consecutive_failures: int = Field(5, ge=1, le=1000)
    #: a kernel whose recent failure rate exceeds its peers' median by this much is ejected
    failure_rate_margin: float = Field(0.3, gt=0, le=1)
    #: outcomes a client must have seen of a kernel before judging its failure rate
    min_requests: int = Field(10, ge=1, le=100_000)
    #: first ejection, ms; each further one doubles it, up to `max_ejection_ms`
    base_ejection_ms: int = Field(1000, ge=1, le=3_600_000)
    max_ejection_ms: int = Field(30_000, ge=1, le=86_400_000)
    #: largest share of a cluster's kernels ejected at once (at least one of two or more)
    max_ejection_share: float = Field(0.34, ge=0, le=1)
    #: after a kernel starts (scale-up, restart) or is readmitted its queue may grow to only a
    #: share of its peers', ramping up linearly from 0.1 over this window, ms (ADAPTIVE)
    slow_start_ms: int = Field(5000, ge=0, le=3_600_000)


class LoadBalancerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cpu_weight: float = Field(0.4, ge=0)
    memory_weight: float = Field(0.3, ge=0)
    queue_weight: float = Field(0.2, ge=0)
    error_weight: float = Field(0.1, ge=0)
    max_latency_ms: float = Field(1000.0, gt=0)
    health_threshold: float = Field(0.8, gt=0)
    #: queue depth that counts as fully loaded (the spec's 0-100 range)
    max_queue_depth: int = Field(100, ge=1)


class OrchestrationConfig(BaseModel):
    """Client-side routing: strategy, concurrency bound, per-attempt timeout and retries."""

    model_config = ConfigDict(extra="forbid")

    strategy: RoutingStrategy = RoutingStrategy.ADAPTIVE  # won bench/routing.py: docs/routing.md
    max_concurrent: int = Field(100, ge=1, le=100_000)
    timeout_ms: int = Field(5000, ge=1, le=3_600_000)
    retry_count: int = Field(2, ge=0, le=10)
    enable_failover: bool = True
    #: the kernel PRIMARY_FALLBACK prefers (default: the first kernel by name)
    primary: Name | None = None
    #: kernels ADAPTIVE compares per request (sampled at random when there are more; the
    #: comparison runs atomically in Redis, so comparing more does not herd, but each costs
    #: enqueue.lua two reads: docs/routing.md)
    adaptive_choices: int = Field(4, ge=2, le=16)
    #: load reports older than this count as unknown, not idle (ADAPTIVE), seconds
    load_expiry_s: float = Field(12.0, gt=0, le=3600)
    #: retries allowed per request on average (on top of `min_retries_per_s`); a sick cluster
    #: gets at most this many extra attempts, whatever `retry_count` says
    retry_budget: float = Field(0.2, ge=0, le=10)
    #: retries always allowed, per second (so a quiet client can still retry)
    min_retries_per_s: float = Field(10.0, ge=0, le=100_000)
    #: outlier ejection shared in Redis; None: on for ADAPTIVE only
    outlier_detection: bool | None = None
    outlier: OutlierConfig = Field(default_factory=OutlierConfig)
    #: weights and health threshold of LEAST_LOADED and CAPABILITY_BASED (the spec's LoadBalancer)
    load_balancer: LoadBalancerConfig = Field(default_factory=LoadBalancerConfig)


class OrchestrationMetrics(BaseModel):
    """What one engine (one client process) has done."""

    total_dispatches: int = 0
    successful: int = 0
    failed: int = 0
    retries: int = 0
    failovers: int = 0
    timeouts: int = 0
    total_latency_ms: float = 0.0
    dispatches_by_kernel: dict[str, int] = Field(default_factory=dict)

    @property
    def avg_latency_ms(self) -> float:
        return self.total_latency_ms / self.successful if self.successful else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**self.model_dump(), "avg_latency_ms": round(self.avg_latency_ms, 3)}


class KernelLoad(BaseModel):
    """A load report for one kernel. Ranges as in the spec: fractions 0..1, queue depth >= 0."""

    name: str
    cpu: float = Field(0.0, ge=0, le=1)
    memory: float = Field(0.0, ge=0, le=1)
    queue_depth: int = Field(0, ge=0)
    latency_ms: float = Field(0.0, ge=0)
    error_rate: float = Field(0.0, ge=0, le=1)
    updated_at: float = Field(default_factory=time.time, description="unix time of the report, seconds")


class BusMessage(BaseModel):
    from_kernel: Name | str
    topic: BusTopic
    payload: dict[str, Any] = Field(default_factory=dict)
    to_kernel: str | None = None
    timestamp: float = Field(default_factory=time.time)


class ClusterMetrics(BaseModel):
    cluster_name: str
    kernel_count: int = 0
    total_dispatches: int = 0
    total_errors: int = 0
    avg_latency_ms: float = 0.0
    avg_cpu: float = 0.0
    avg_memory: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()


class KernelMetricsSnapshot(BaseModel):
    kernel_name: str
    timestamp: float = Field(default_factory=time.time)
    metrics: dict[str, Any] = Field(default_factory=dict)
