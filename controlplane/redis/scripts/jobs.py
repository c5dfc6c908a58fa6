"""A job's scripts: enqueue (the client's hot path), claim and finish (the kernel's), cancel; and
the read of the stats finish writes."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from controlplane.protocol import stats
from controlplane.protocol.keys import Keys
from controlplane.protocol.records import parse_counters
from controlplane.redis.channel import Command
from controlplane.redis.lua import Script
from controlplane.redis.scripts.call import Arg, Call

ENQUEUE = Script.load("enqueue")
CLAIM = Script.load("claim")
FINISH = Script.load("finish")
CANCEL = Script.load("cancel")
TAKE_REPLIES = Script.load("take_replies")
STATS_READ = Script.load("stats_read")

_NONE_EJECTED: Mapping[str, int] = MappingProxyType({})


# ---------------------------------------------------------------- enqueue
@dataclass(frozen=True, slots=True)
class Routing:
    """ARGV of enqueue.lua's routed form: the script chooses among `kernels`."""

    mode: str  # 'first' | 'rr' | 'p2c'
    #: p2c: a uniform draw in [0, 1) that picks among near-ties; rr: the rotation offset
    tie: float
    load_expiry_ms: int
    slow_start_ms: int
    rr_ttl_ms: int
    #: (name, agent) of each candidate; the first is the `kernel` passed to `enqueue`
    kernels: Sequence[tuple[str, str]]
    #: per candidate, the client's service-time estimate, ms (missing or 0: none)
    service_ms: Sequence[float] = ()
    #: per candidate, the client's failure-rate estimate (missing or -1: none)
    error_rate: Sequence[float] = ()
    #: per candidate, its start as the client's view has it (unix s; 0: unknown): p2c's slow start
    started_at: Sequence[float] = ()
    #: whether the reply carries the chosen kernel's consecutive failures (outlier detection on)
    consecutive: bool = True


@dataclass(frozen=True, slots=True)
class Enqueued:
    inflight: int
    #: index of the candidate that took the job (0: the kernel itself, in the plain form)
    chosen: int
    #: consecutive failures of the chosen kernel (routed form; else 0)
    consecutive: int
    #: candidates seen ejected: name -> ejected-until ms (routed form; else empty)
    ejected: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class NotEnqueued:
    """Nothing was written: the kernel's state, 'name=state ...' of the candidates, or
    'duplicate' when the job id exists."""

    duplicate: bool
    detail: str


def enqueue(
    keys: Keys,
    cluster: str,
    kernel: str,
    *,
    job_id: str,
    payload: str,
    reply_key: str,
    now_ms: int,
    deadline_ms: int,
    ttl_ms: int,
    strategy: str,
    routing: Routing | None = None,
    epoch: int | None = None,
) -> Call[Enqueued | NotEnqueued]:
    """enqueue.lua: queue job `job_id` on `kernel`, or with `routing` on the candidate the
    script chooses (it reads a bounded number of keys whatever the number of candidates; only
    p2c's are few by design, see `OrchestrationConfig.adaptive_choices`). `epoch` (plain form
    only) pins the job to that incarnation of `kernel`: `NotEnqueued(detail='epoch=<current>')`
    when it is not the one running."""
    klist = [
        keys.kernel(cluster, kernel),
        keys.queue(cluster, kernel),
        keys.inflight(cluster, kernel),
        keys.job(cluster, job_id),
        keys.kernel_wake(cluster, kernel),
    ]
    argv: list[Arg] = [job_id, payload, reply_key, now_ms, deadline_ms, ttl_ms, strategy, kernel]
    if epoch is not None:
        if routing is not None:
            raise ValueError("a job pinned to an incarnation goes to that kernel only (no routing)")
        argv.append(epoch)
    if routing is not None:
        r = routing
        klist += [keys.cluster_rr(cluster), keys.cluster_ejected(cluster)]
        if r.mode == "p2c":  # the only mode that reads load records
            klist += [keys.load(agent, cluster, name) for name, agent in r.kernels]
        argv[7] = keys.kernel(cluster, "")  # the prefix the script builds each candidate's keys from
        argv += [r.mode, r.tie, r.load_expiry_ms, r.slow_start_ms, r.rr_ttl_ms, 1 if r.consecutive else 0]
        for i, (name, _agent) in enumerate(r.kernels):
            service = r.service_ms[i] if i < len(r.service_ms) else 0.0
            errors = r.error_rate[i] if i < len(r.error_rate) else -1.0
            started = r.started_at[i] if i < len(r.started_at) else 0.0
            argv += [name, f"{service:.3f}", f"{errors:.4f}", f"{started:.3f}"]
    return Call(ENQUEUE, klist, argv, _enqueued)


def _enqueued(reply: Any) -> Enqueued | NotEnqueued:
    code = int(reply[0])
    if code != 1:
        return NotEnqueued(code < 0, str(reply[1] or ""))
    if len(reply) == 2:
        return Enqueued(int(reply[1]), 0, 0, _NONE_EJECTED)
    _, inflight, index, consecutive, seen = reply
    ejected = {}
    for item in str(seen or "").split():
        name, _, until = item.partition("=")
        ejected[name] = int(float(until))
    return Enqueued(int(inflight), int(index) - 1, int(consecutive), ejected)


# ---------------------------------------------------------------- claim
class Skip(enum.StrEnum):
    """Why claim.lua handed out no job (see its header)."""

    EMPTY = "empty"
    GONE = "gone"
    FENCED = "fenced"
    ZOMBIE = "zombie"
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class Claimed:
    job: str  # the arq-serialized job
    reply: str  # the waiting client's reply list key (`Keys.reply`, in the cluster's slot)
    attempt: int
    id: str
    #: jobs still queued on the caller's queue or, when it has none, on its siblings' (work it may take next)
    queued: int
    #: the cluster's version when the claim asked for it ("" when it has none), else None
    version: str | None = None


@dataclass(frozen=True, slots=True)
class NotClaimed:
    status: Skip
    id: str = ""  # the job concerned; "" for EMPTY
    #: EMPTY only: the cluster's version when the claim asked for it, else None
    version: str | None = None


#: claim.lua found nothing to take (one value: an idle kernel's claims allocate nothing).
EMPTY = NotClaimed(Skip.EMPTY)


def claim(
    keys: Keys,
    cluster: str,
    kernel: str,
    *,
    epoch: int | str,
    now_ms: int | str = "",
    siblings: Sequence[tuple[str, int | str]] | None = None,
    version: bool = False,
    after_pop: bool = False,
) -> Call[Claimed | NotClaimed]:
    """claim.lua: the oldest job queued on `kernel`; with `siblings` ((name, epoch last seen)
    pairs, possibly none) it may take over the oldest queued job of one, and with `version` too
    it returns the cluster's version (`Claimed.version`, `NotClaimed.version`). `now_ms=""`
    leaves the time to the Redis clock (a claim written behind a blocking pop runs when it
    returns); `after_pop`: it is written behind a blocking pop of the wake token."""
    klist = [
        keys.inflight(cluster, kernel),
        keys.queue(cluster, kernel),
        keys.kernel_wake(cluster, kernel),
        keys.kernel(cluster, kernel),
    ]
    argv: list[Arg] = [
        kernel,
        epoch,
        now_ms,
        keys.job(cluster, ""),
        1 if version else 0,
        1 if after_pop else 0,
    ]
    if siblings is not None:
        klist += [
            keys.kernel_health(cluster, kernel),
            keys.cluster_stats(cluster),
            keys.cluster_version(cluster),
        ]
        for name, sibling_epoch in siblings:
            klist += [keys.kernel(cluster, name), keys.queue(cluster, name), keys.inflight(cluster, name)]
            argv += [name, sibling_epoch]
    return Call(CLAIM, klist, argv, _claimed)


def _claimed(reply: Any) -> Claimed | NotClaimed:
    if reply[0] == "ok":
        _, job, reply_key, attempt, job_id, queued, *version = reply
        seen = str(version[0]) if version else None
        return Claimed(str(job), str(reply_key), int(attempt), str(job_id), int(queued), seen)
    if reply[0] == "empty":
        return EMPTY if len(reply) == 1 else NotClaimed(Skip.EMPTY, "", str(reply[1]))
    return NotClaimed(Skip(reply[0]), str(reply[1]))


# ---------------------------------------------------------------- finish, cancel
#: What finish.lua gives for a result delivered to its reply list, and for one also published
#: to a subscriber of that list's shard channel.
DELIVERED, PUBLISHED = 1, 2


def finish(
    keys: Keys,
    cluster: str,
    kernel: str,
    *,
    job_id: str,
    epoch: int | str,
    reply_key: str,
    message: str,
    success: bool,
    latency_ms: float | str,
    reply_ttl_ms: int,
    queue_ms: int | None = None,
    buckets: Sequence[str] = (),
    keep_ms: int = 0,
    bell: str | None = None,
    publish: bool = False,
) -> Call[int]:
    """finish.lua: deliver `message` to `reply_key`; `DELIVERED` (`PUBLISHED` when `publish`ed
    to a subscriber too), or 0 when rejected (the job is gone or belongs to someone else).
    `bell` (the client's, `Keys.reply_bell_for`; on one Redis only, it is in the client's slot):
    add the reply to it in the same call, else `express` it once delivered (unless published).
    `publish` (on a Redis Cluster): also SPUBLISH it on the shard channel named as `reply_key`.
    `buckets`: histogram fields to count, which need `queue_ms`. `keep_ms` > 0 (arq jobs) also
    keeps the result at `Keys.job_result` for that long."""
    klist = [
        keys.job(cluster, job_id),
        keys.inflight(cluster, kernel),
        reply_key,
        keys.cluster_stats(cluster),
        keys.kernel_stats(cluster, kernel),
    ]
    argv: list[Arg] = [job_id, kernel, epoch, message, 1 if success else 0, latency_ms, reply_ttl_ms, keep_ms]
    if keep_ms > 0 or bell is not None:
        klist.append(keys.job_result(cluster, job_id))  # written only when keep_ms > 0
    if bell is not None:
        klist.append(bell)
    if queue_ms is not None or publish:
        argv += [queue_ms or 0, 1 if publish else 0, *buckets]
    return Call(FINISH, klist, argv, int)


@dataclass(frozen=True, slots=True)
class StatsRead:
    """stats_read.lua's reply: the cluster's stats hash, and each of its kernels' by name."""

    cluster: Mapping[str, str]
    kernels: Mapping[str, Mapping[str, str]]

    def totals(self, keys: Keys, cluster: str) -> dict[str, float]:
        """The cluster's counters (`stats.totals`: its events, its kernels' dispatch counters
        summed, DISPATCHES and ERRORS among them); a malformed field is logged and skipped."""
        return stats.totals(
            parse_counters(self.cluster, keys.cluster_stats(cluster)),
            (parse_counters(h, keys.kernel_stats(cluster, k)) for k, h in self.kernels.items()),
        )


def read_stats(keys: Keys, cluster: str) -> Call[StatsRead]:
    """stats_read.lua: the cluster's stats hash and those of every kernel in its kernel set, read
    at one instant (a kernel's removal folds its hash into the cluster's and SREMs it in one
    script: `controlplane.protocol.stats.totals` sums them)."""
    prefix = keys.kernel(cluster, "")
    suffix = keys.kernel_stats(cluster, "")[len(prefix) :]
    return Call(
        STATS_READ,
        [keys.cluster_stats(cluster), keys.cluster_kernels(cluster)],
        [prefix, suffix],
        _stats_read,
    )


def _hash(flat: Sequence[Any]) -> dict[str, str]:
    return {str(f): str(v) for f, v in zip(flat[::2], flat[1::2], strict=True)}


def _stats_read(reply: Any) -> StatsRead:
    own, names, *theirs = reply
    return StatsRead(_hash(own), {str(n): _hash(h) for n, h in zip(names, theirs, strict=True)})


def cancel(keys: Keys, cluster: str, kernel: str, *, job_id: str) -> Call[bool]:
    """cancel.lua: True when the job was still pending (now cancelled), False when it had
    already finished."""
    klist = [keys.job(cluster, job_id), keys.queue(cluster, kernel), keys.inflight(cluster, kernel)]
    return Call(CANCEL, klist, [job_id], _flag)


def _flag(reply: Any) -> bool:
    return bool(int(reply))


# ---------------------------------------------------------------- the client's replies
def take_replies(keys: Keys, cluster: str, client_id: str, *, count: int, ttl_ms: int) -> Call[list[str]]:
    """take_replies.lua on the client's lists of `cluster`: drop the replies taken last time
    (delivered), take up to `count` more."""
    klist = [keys.reply(cluster, client_id), keys.reply_taken(cluster, client_id)]
    return Call(TAKE_REPLIES, klist, [count, ttl_ms], list)


def ring(keys: Keys, cluster: str, reply_key: str, now_ms: int, *, ttl_ms: int) -> tuple[Command, ...]:
    """The commands that ring the bell of the client whose reply list of `cluster` is
    `reply_key` with the cluster's name (a ZADD, and a PEXPIRE so a dead client's bell goes like
    its lists), to send once a push there is known to have happened: its listener then takes
    from that list. None for a list with no bell."""
    bell = keys.reply_bell_for(reply_key)
    return () if bell is None else (("ZADD", bell, now_ms, cluster), ("PEXPIRE", bell, ttl_ms))


def express(keys: Keys, reply_key: str, message: str, *, ttl_ms: int) -> tuple[Command, ...]:
    """The commands that add a reply itself to the bell of the client whose reply list is
    `reply_key` (what finish.lua does with its `bell` on one Redis), to send once finish.lua
    delivered `message` there: the listener has the reply as it wakes, and takes the list's
    copy later. The score is 0: a reply is woken for before any ring. None for a list with no bell."""
    bell = keys.reply_bell_for(reply_key)
    return () if bell is None else (("ZADD", bell, 0, message), ("PEXPIRE", bell, ttl_ms))
