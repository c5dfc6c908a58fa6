"""The Redis side of a routing decision: `Route`, the routed enqueue, and outcome reports.

The engine decides *which kernels are candidates*; `lua/enqueue.lua` decides *which one takes
the job*, in the same round trip that enqueues it, from state every client shares: the
round-robin counter, each candidate's in-flight set (queued + running jobs of every client),
its load record and its outlier-detection record. `report` tells the shared outlier detector
(`lua/outlier.lua`) what a client saw. See docs/routing.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from controlplane.protocol.keys import Keys
from controlplane.protocol.models import OutlierConfig
from controlplane.protocol.records import KernelRecord
from controlplane.redis.channel import Channel
from controlplane.redis.connect import AsyncRedis
from controlplane.redis.scripts import jobs
from controlplane.redis.scripts.kernels import outlier

__all__ = [
    "BAD_REQUEST_ERRORS",
    "EnqueueResult",
    "KernelBusy",
    "Route",
    "candidates_of",
    "enqueue",
    "max_ejected",
    "ran_on",
    "report",
]

#: Error types that are the caller's fault, not the kernel's: never held against a kernel.
BAD_REQUEST_ERRORS = frozenset({"InvalidArguments", "UnknownSyscall", "MalformedJob"})
#: The shared round-robin counter expires when no client has used it for this long, ms.
RR_COUNTER_TTL_MS = 3_600_000

Mode = Literal["first", "rr", "p2c"]


class KernelBusy(Exception):
    """Internal: no candidate took the job (draining, stopped, gone). Nothing was enqueued."""


class Route(KernelRecord):
    """A routing decision left to Redis: the first candidate's record plus the others.

    It *is* a `KernelRecord` (the first candidate), so code that passes a kernel through to
    `Dispatcher.submit` passes a route unchanged. `enqueue` fills in the result fields.
    """

    mode: Mode = "first"
    alternates: list[KernelRecord] = Field(default_factory=list)
    #: per candidate: the client's service-time estimate, ms (0: none yet)
    service_ms: list[float] = Field(default_factory=list)
    #: per candidate: the client's failure-rate estimate (-1: none yet)
    error_rate: list[float] = Field(default_factory=list)
    #: 0 or 1: which candidate wins a tie in `p2c`
    tie: int = 0
    load_expiry_ms: int = 3000
    #: set when outcomes go to the shared outlier detector
    outlier: OutlierConfig | None = None
    #: kernels of the cluster, for the ejection cap
    cluster_size: int = 0
    #: kernels whose failure rate this client found well above their peers'
    rate_outliers: frozenset[str] = frozenset()
    # ---- filled in by `enqueue` / `report`
    chosen: str = ""
    consecutive: int = 0
    ejected: dict[str, int] = Field(default_factory=dict)

    @classmethod
    def of(cls, first: KernelRecord, **fields: object) -> Route:
        """A route whose first candidate is `first`."""
        # validating the fields as they are is cheaper than model_dump() or model_construct()
        return cls.model_validate(first.__dict__ | fields)

    @property
    def candidates(self) -> list[KernelRecord]:
        return [self, *self.alternates]

    @property
    def routed(self) -> bool:
        """Whether enqueue.lua chooses (several candidates, or outcomes to report)."""
        return bool(self.alternates) or self.mode != "first" or self.outlier is not None


def ran_on(picked: KernelRecord) -> str:
    """The kernel an attempt went to: Redis's choice for a route, else the record itself."""
    return picked.chosen or picked.name if isinstance(picked, Route) else picked.name


def candidates_of(picked: KernelRecord) -> list[KernelRecord]:
    """The kernels an attempt could have gone to."""
    return picked.candidates if isinstance(picked, Route) else [picked]


@dataclass(frozen=True, slots=True)
class EnqueueResult:
    kernel: str
    inflight: int


async def enqueue(
    conn: AsyncRedis | Channel,
    keys: Keys,
    route: KernelRecord,
    *,
    job_id: str,
    payload: str,
    reply_key: str,
    now_ms: int,
    deadline_ms: int,
    ttl_ms: int,
    strategy: str,
) -> EnqueueResult:
    """Run enqueue.lua on `conn` for `route` (a plain `KernelRecord` is a route of one).
    Raises `KernelBusy` when no candidate took the job."""
    r = route if isinstance(route, Route) and route.routed else None
    choice = None
    if r is not None:
        choice = jobs.Routing(
            mode=r.mode,
            tie=r.tie,
            load_expiry_ms=r.load_expiry_ms,
            slow_start_ms=r.outlier.slow_start_ms if r.outlier else 0,
            rr_ttl_ms=RR_COUNTER_TTL_MS,
            kernels=[(k.name, k.agent) for k in r.candidates],
            service_ms=r.service_ms,
            error_rate=r.error_rate,
        )
    call = jobs.enqueue(
        keys,
        route.cluster,
        route.name,
        job_id=job_id,
        payload=payload,
        reply_key=reply_key,
        now_ms=now_ms,
        deadline_ms=deadline_ms,
        ttl_ms=ttl_ms,
        strategy=strategy,
        routing=choice,
    )
    result = await call.run(conn)
    if isinstance(result, jobs.NotEnqueued):
        if r is None:
            raise KernelBusy(f"{route.cluster}/{route.name}: {result.detail}")
        raise KernelBusy(f"{route.cluster}: {result.detail or 'no candidate takes work'}")
    if r is None:
        if isinstance(route, Route):
            route.chosen = route.name
        return EnqueueResult(route.name, result.inflight)
    r.chosen = r.candidates[result.chosen].name
    r.consecutive = result.consecutive
    r.ejected.update(result.ejected)
    return EnqueueResult(r.chosen, result.inflight)


def max_ejected(cluster_size: int, share: float) -> int:
    """How many of `cluster_size` kernels may be ejected at once: the share, rounded down,
    but at least one of two or more (so a two-kernel cluster can eject its bad half)."""
    if cluster_size < 2:
        return 0
    return max(1, math.floor(cluster_size * share + 1e-9))


async def report(
    redis: AsyncRedis, keys: Keys, route: KernelRecord, *, ok: bool, now_ms: int, ran_on: str = ""
) -> None:
    """Tell the shared outlier detector how an attempt went on the kernel that ran it: `ran_on`
    when the result named it (an idle sibling may have taken the job over), else
    `route.chosen`. A no-op for plain records, routes without outlier detection, and successes
    after a clean streak (a sibling takes jobs over only without a failure streak)."""
    if not isinstance(route, Route) or route.outlier is None or not route.chosen:
        return
    cfg, name = route.outlier, ran_on or route.chosen
    if ok and (route.consecutive == 0 or name != route.chosen):
        return  # the common case costs no round trip
    event = "ok" if ok else ("rate" if name in route.rate_outliers else "fail")
    health = await outlier(
        keys,
        route.cluster,
        name,
        now_ms=now_ms,
        event=event,
        consecutive_failures=cfg.consecutive_failures,
        base_ejection_ms=cfg.base_ejection_ms,
        max_ejection_ms=cfg.max_ejection_ms,
        max_ejected=max_ejected(route.cluster_size, cfg.max_ejection_share),
        slow_start_ms=cfg.slow_start_ms,
    ).run(redis)
    if health.ejected:
        route.ejected[name] = health.until_ms
