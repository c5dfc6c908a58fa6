"""Fields of the stats hashes, and the histograms counted in them.

`{prefix}cluster:{cluster}:stats` and `{prefix}kernel:{cluster}:{kernel}:stats` are hashes of
cumulative counters. Kernels write the dispatch fields through `finish.lua`, into their own
kernel's hash only: the jobs finished by the strategy that routed them and by the bucket of
each histogram they fell in, all in one field (``dispatches:<strategy>|<bucket>|<bucket>``),
the jobs failed (``errors:<strategy>``), and the latency and queue-wait sums; `derive` splits
the joined field and sums DISPATCHES and ERRORS from the per-strategy counts. The control
plane and clients add event counters to the cluster's hash with a single HINCRBY. A cluster's
dispatch counters are its kernels' summed, plus those of the kernels it no longer has: the
reconciler folds a removed kernel's hash into the cluster's, in the same script that removes
it (`totals`, read in one script call: `controlplane/redis/scripts/jobs.py` `read_stats`). The
exporter (`controlplane/ops/exporter`), `kcp top` and the clients' metrics read them. A new
event needs a field here, an HINCRBY where it happens, and its metric in the exporter.

Histograms: `finish.lua` counts one *non-cumulative* bucket field per histogram (the
smallest upper bound the observation fits under, e.g. ``latency_le_0.005``, part of the joined
field); readers make the buckets cumulative, as Prometheus expects.
"""

from __future__ import annotations

import bisect
import functools
import math
from collections.abc import Iterable, Mapping, Sequence

# ---------------------------------------------------------------- dispatch (finish.lua)
DISPATCHES = "dispatches"  #: jobs finished, successful or not
ERRORS = "errors"  #: jobs whose syscall failed
LATENCY_MS_SUM = "latency_ms_sum"  #: enqueue -> finish, ms
QUEUE_MS_SUM = "queue_ms_sum"  #: enqueue -> claim, ms

# ---------------------------------------------------------------- events (cluster stats only)
RETRIES = "retries"  #: client attempts after the first (engine retry)
FAILOVERS = "failovers"  #: retries that went to a kernel not tried yet for that request
JOBS_REQUEUED = "jobs_requeued"  #: jobs of lost kernels handed to a running kernel (reconciler)
KERNELS_LOST = "kernels_lost"  #: kernels removed because their agent's lease expired (reconciler)
EJECTIONS = "ejections"  #: kernels taken out of routing for failing (written by routing ejection)
STEALS = "steals"  #: queued jobs an idle kernel took over from a busy sibling (claim.lua)
SCALE_UP = "scale_up"  #: scale requests that raised the desired count (client or autoscaler)
SCALE_DOWN = "scale_down"  #: scale requests that lowered it

# ---------------------------------------------------------------- by strategy (finish.lua, kernel hashes)
PINNED = "pinned"  #: the strategy of a job whose request named its kernel (nobody routed it)


def by_strategy(field: str, strategy: str) -> str:
    """The `field` counter (DISPATCHES, ERRORS) of the jobs `strategy` routed: ``dispatches:adaptive``."""
    return f"{field}:{strategy}"


_DISPATCHES_BY = by_strategy(DISPATCHES, "")
_ERRORS_BY = by_strategy(ERRORS, "")
#: Separates the parts of the one counter `finish.lua` increments per job:
#: ``dispatches:<strategy>|<latency bucket>|<queue bucket>``.
_JOINED = "|"


def derive(counters: Mapping[str, float]) -> dict[str, float]:
    """`counters` read from a stats hash as readers want them: each joined counter
    (``dispatches:adaptive|latency_le_0.001|queue_le_0.0005``) split into ``dispatches:adaptive``
    and its bucket fields, and DISPATCHES and ERRORS, the per-strategy counts summed (`finish.lua`
    writes only those). A hash without any keeps its DISPATCHES and ERRORS."""
    out: dict[str, float] = {}
    for field, value in counters.items():
        parts = field.split(_JOINED) if field.startswith(_DISPATCHES_BY) else (field,)
        for part in parts:
            out[part] = out.get(part, 0.0) + value
    dispatches = [v for k, v in out.items() if k.startswith(_DISPATCHES_BY)]
    if dispatches:
        out[DISPATCHES] = float(sum(dispatches))
        out[ERRORS] = float(sum(v for k, v in out.items() if k.startswith(_ERRORS_BY)))
    return out


def totals(cluster: Mapping[str, float], kernels: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """A cluster's counters: its own hash (events, and the dispatch counters of the kernels
    folded into it when they were removed) plus its kernels' hashes, summed field by field."""
    out = dict(cluster)
    for counters in kernels:
        for field, value in counters.items():
            out[field] = out.get(field, 0.0) + value
    return derive(out)


# ---------------------------------------------------------------- the reliability hash (`Keys.reliability`)
# Global failure-handling counters, written by the service; the exporter publishes every
# `*_total` field as a counter and the detection fields as a summary (docs/reliability.md).
AGENTS_SUSPECTED = "agents_suspected_total"  #: agents seen with an overdue lease renewal, not yet dead
AGENTS_DEAD = "agents_dead_total"  #: agents declared dead (lease expired without a goodbye)
AGENTS_DEPARTED = "agents_departed_total"  #: agents that stopped on purpose (draining, or deregistered)
KERNELS_DEAD = "kernels_dead_total"  #: kernels dead by their own lease while their agent lived
JOBS_FAILED_OVER = "jobs_failed_over_total"  #: orphaned jobs moved to a live kernel (reconciler)
LEADER_FENCED_WRITES = "leader_fenced_writes_total"  #: reconcile writes dropped: the lease moved before EXEC
AUTOSCALE_UP = "autoscale_up_total"  #: autoscaler steps up
AUTOSCALE_DOWN = "autoscale_down_total"  #: autoscaler steps down
#: The `*_total` counters above, exported at 0 before their first event (`increase()` needs the 0).
RELIABILITY_COUNTERS = (
    AGENTS_SUSPECTED,
    AGENTS_DEAD,
    AGENTS_DEPARTED,
    KERNELS_DEAD,
    JOBS_FAILED_OVER,
    LEADER_FENCED_WRITES,
    AUTOSCALE_UP,
    AUTOSCALE_DOWN,
)
DETECTION_MS_SUM = "detection_ms_sum"  #: agent death to detection, ms, summed over detections
DETECTION_COUNT = "detection_count"  #: detections summed in DETECTION_MS_SUM
DETECTION_MS_LAST = "detection_ms_last"  #: the last detection's delay, ms
DETECTION_LAST_AT = "detection_last_at"  #: unix ms of the last detection


# ---------------------------------------------------------------- the rejections hash (`Keys.rejections`)
# Dispatches a client refused before enqueueing anything, by reason (one HINCRBY each).
REJECT_INVALID = "invalid_request"  #: the request, a name or an argument does not validate
REJECT_NO_CLUSTER = "unknown_cluster"  #: no such cluster
REJECT_NO_KERNEL = "no_kernel"  #: no kernel could take it within the timeout
REJECTIONS = (REJECT_INVALID, REJECT_NO_CLUSTER, REJECT_NO_KERNEL)


# ---------------------------------------------------------------- histograms
LATENCY = "latency"  #: enqueue -> finish (queue wait + execution)
QUEUE = "queue"  #: enqueue -> claim (queue wait)

#: Upper bounds of the histogram buckets, seconds; the last one catches everything.
BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    math.inf,
)


def _bound(upper: float) -> str:
    return "inf" if math.isinf(upper) else f"{upper:g}"


def bucket_field(histogram: str, seconds: float) -> str:
    """The one field `finish.lua` increments for an observation of `seconds` (non-cumulative)."""
    return _bucket_fields(histogram)[bisect.bisect_left(BUCKETS, seconds)]  # the first bound >= seconds


@functools.cache
def _bucket_fields(histogram: str) -> tuple[str, ...]:
    """Every bucket's field of `histogram`, in `BUCKETS` order (a kernel names two per job)."""
    return tuple(f"{histogram}_le_{_bound(upper)}" for upper in BUCKETS)


def histogram(stats: Mapping[str, float], name: str) -> list[tuple[float, float]]:
    """Cumulative ``(upper bound, count)`` pairs of histogram `name` read from a stats hash."""
    out, running = [], 0.0
    for upper in BUCKETS:
        running += stats.get(f"{name}_le_{_bound(upper)}", 0.0)
        out.append((upper, running))
    return out


def diff(new: Sequence[tuple[float, float]], old: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Buckets observed between two readings (`old` from a previous read; a reset counts from 0)."""
    if not old or new[-1][1] < old[-1][1]:
        return list(new)
    return [(b, n - o) for (b, n), (_, o) in zip(new, old, strict=True)]


def quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """`q`-quantile (0..1) of cumulative buckets, interpolated as PromQL's histogram_quantile.

    None when nothing was observed. Observations in the last (infinite) bucket report the
    largest finite bound."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if math.isinf(upper):
                return lower
            if count == below:
                return upper
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return lower
