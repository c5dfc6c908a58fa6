"""The Redis side of a routing decision: the `Plan`, the routed enqueue, and outcome reports.

The engine decides *which kernels are candidates* and hands the dispatcher an immutable `Plan`;
`lua/enqueue.lua` decides *which one takes the job*, in the same round trip that enqueues it,
from state every client shares: the round-robin counter, each candidate's in-flight set
(queued + running jobs of every client), its load record and its outlier-detection record.
`enqueue` says where the job went (`Placed`); `report` tells the shared outlier detector
(`lua/outlier.lua`) what a client saw and returns the ejection it learned. See docs/routing.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from controlplane.errors import DispatchTimeout, KernelGone
from controlplane.protocol.jobs import Outcome
from controlplane.protocol.keys import Keys
from controlplane.protocol.models import OutlierConfig
from controlplane.protocol.records import KernelRecord
from controlplane.redis.channel import Channel
from controlplane.redis.connect import AsyncRedis
from controlplane.redis.scripts import jobs
from controlplane.redis.scripts.kernels import outlier

__all__ = [
    "BAD_REQUEST_ERRORS",
    "Attempt",
    "KernelBusy",
    "Placed",
    "Plan",
    "enqueue",
    "kernel_gone",
    "max_ejected",
    "report",
]

#: Error types that are the caller's fault, not the kernel's: never held against a kernel.
BAD_REQUEST_ERRORS = frozenset({"InvalidArguments", "UnknownSyscall", "MalformedJob"})
#: The shared round-robin counter expires when no client has used it for this long, ms.
RR_COUNTER_TTL_MS = 3_600_000

Mode = Literal["first", "rr", "p2c"]


class KernelBusy(Exception):
    """Internal: no candidate took the job (draining, stopped, gone). Nothing was enqueued."""


@dataclass(frozen=True, slots=True)
class Plan:
    """Where one attempt may go: the candidates in the client's order of preference, and what
    `enqueue.lua` needs to choose among them. A plan of one candidate, without outlier
    detection, is a plain enqueue on that kernel (random, least loaded, pinned)."""

    cluster: str
    #: never empty; the first is the client's own choice
    candidates: tuple[KernelRecord, ...]
    mode: Mode = "first"
    #: per candidate: the client's service-time estimate, ms (0: none yet)
    service_ms: tuple[float, ...] = ()
    #: per candidate: the client's failure-rate estimate (-1: none yet)
    error_rate: tuple[float, ...] = ()
    #: `p2c`: a uniform draw in [0, 1) that picks among near-tied candidates; `rr`: how far
    #: `candidates` are rotated from the cluster's order
    tie: float = 0
    load_expiry_ms: int = 3000
    #: `p2c`: how long a kernel warms up after it started or was readmitted, ms (0: never)
    slow_start_ms: int = 0
    #: set when outcomes go to the shared outlier detector
    outlier: OutlierConfig | None = None
    #: kernels of the cluster, for the ejection cap
    cluster_size: int = 0
    #: kernels whose failure rate this client found well above their peers'
    rate_outliers: frozenset[str] = frozenset()
    #: the incarnation (epoch) of the single candidate the request is pinned to (`kernel@epoch`)
    epoch: int | None = None
    #: the load balancer picked the first candidate although every one was above its
    #: `health_threshold` (LEAST_LOADED, CAPABILITY_BASED)
    all_unhealthy: bool = False

    @property
    def first(self) -> KernelRecord:
        return self.candidates[0]

    @property
    def routed(self) -> bool:
        """Whether enqueue.lua chooses (several candidates, or outcomes to report)."""
        return len(self.candidates) > 1 or self.mode != "first" or self.outlier is not None


@dataclass(frozen=True, slots=True)
class Placed:
    """Where `enqueue` put a job, and what Redis said of the candidates on the way."""

    kernel: str
    #: jobs in flight on `kernel`, this one included
    inflight: int
    #: consecutive failures of `kernel` (routed plans; else 0)
    consecutive: int = 0
    #: candidates (or, after `report`, the kernel itself) seen ejected: name -> until, unix ms
    ejected: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Attempt:
    """One attempt that enqueued a job: where, and its outcome, or the timeout that ended the
    wait for it (`KernelBusy` is raised instead when nothing was enqueued)."""

    placed: Placed
    outcome: Outcome | None
    error: DispatchTimeout | None = None


async def enqueue(
    conn: AsyncRedis | Channel,
    keys: Keys,
    plan: Plan,
    *,
    job_id: str,
    payload: str,
    reply_key: str,
    now_ms: int,
    deadline_ms: int,
    ttl_ms: int,
    strategy: str,
) -> Placed:
    """Run enqueue.lua on `conn` for `plan`. Raises `KernelBusy` when no candidate took the job,
    `KernelGone` when the plan is pinned to an incarnation that is no longer the kernel's."""
    first = plan.candidates[0]
    choice = None
    if plan.routed:
        choice = jobs.Routing(
            mode=plan.mode,
            tie=plan.tie,
            load_expiry_ms=plan.load_expiry_ms,
            slow_start_ms=plan.slow_start_ms,
            rr_ttl_ms=RR_COUNTER_TTL_MS,
            kernels=[(k.name, k.agent) for k in plan.candidates],
            service_ms=plan.service_ms,
            error_rate=plan.error_rate,
            started_at=[k.started_at for k in plan.candidates],
            consecutive=plan.outlier is not None,  # `report` needs the streak only then
        )
    call = jobs.enqueue(
        keys,
        plan.cluster,
        first.name,
        job_id=job_id,
        payload=payload,
        reply_key=reply_key,
        now_ms=now_ms,
        deadline_ms=deadline_ms,
        ttl_ms=ttl_ms,
        strategy=strategy,
        routing=choice,
        epoch=plan.epoch,
    )
    result = await call.run(conn)
    if isinstance(result, jobs.NotEnqueued):
        if plan.epoch is not None and result.detail.startswith("epoch="):
            current = result.detail.removeprefix("epoch=")
            raise kernel_gone(first.name, plan.epoch, int(current) if current else None)
        if choice is None:
            raise KernelBusy(f"{plan.cluster}/{first.name}: {result.detail}")
        raise KernelBusy(f"{plan.cluster}: {result.detail or 'no candidate takes work'}")
    chosen = plan.candidates[result.chosen]  # the plain form: 0, the kernel itself
    return Placed(chosen.name, result.inflight, result.consecutive, result.ejected)


def kernel_gone(kernel: str, epoch: int, current: int | None) -> KernelGone:
    """The error for a request pinned to `kernel@epoch` when the kernel's epoch is now `current`
    (None: the cluster has no kernel of that name)."""
    if current is None:
        return KernelGone(
            f"kernel {kernel}@{epoch} is gone: the cluster has no kernel {kernel}", kernel=kernel, epoch=epoch
        )
    if current < epoch:  # epochs only grow: that incarnation never ran (a typo, another cluster's)
        return KernelGone(
            f"kernel {kernel} has no incarnation {epoch}: it runs as {kernel}@{current}",
            kernel=kernel,
            epoch=epoch,
        )
    return KernelGone(
        f"kernel {kernel}@{epoch} was replaced by {kernel}@{current}, which starts with empty memory; "
        f"pin {kernel!r} by name to use the new incarnation",
        kernel=kernel,
        epoch=epoch,
    )


def max_ejected(cluster_size: int, share: float) -> int:
    """How many of `cluster_size` kernels may be ejected at once: the share, rounded down,
    but at least one of two or more (so a two-kernel cluster can eject its bad half)."""
    if cluster_size < 2:
        return 0
    return max(1, math.floor(cluster_size * share + 1e-9))


async def report(
    redis: AsyncRedis,
    keys: Keys,
    plan: Plan,
    placed: Placed,
    *,
    ok: bool,
    now_ms: int,
    ran_on: str = "",
) -> Placed:
    """Tell the shared outlier detector how an attempt went on the kernel that ran it: `ran_on`
    when the result named it (an idle sibling may have taken the job over), else
    `placed.kernel`. Returns `placed`, with that kernel's ejection added when the detector
    ejected it. A no-op for plans without outlier detection, and for successes after a clean
    streak (a sibling takes jobs over only without a failure streak)."""
    cfg, name = plan.outlier, ran_on or placed.kernel
    if cfg is None or (ok and (placed.consecutive == 0 or name != placed.kernel)):
        return placed  # the common case costs no round trip
    event = "ok" if ok else ("rate" if name in plan.rate_outliers else "fail")
    health = await outlier(
        keys,
        plan.cluster,
        name,
        now_ms=now_ms,
        event=event,
        consecutive_failures=cfg.consecutive_failures,
        base_ejection_ms=cfg.base_ejection_ms,
        max_ejection_ms=cfg.max_ejection_ms,
        max_ejected=max_ejected(plan.cluster_size, cfg.max_ejection_share),
        slow_start_ms=cfg.slow_start_ms,
    ).run(redis)
    if not health.ejected:
        return placed
    ejected = {**placed.ejected, name: health.until_ms}
    return Placed(placed.kernel, placed.inflight, placed.consecutive, ejected)
