"""A kernel incarnation's scripts (start, stop, rebind), its shared health record (outlier)
and the control plane's leader lease."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from controlplane.protocol.keys import Keys
from controlplane.protocol.records import JobRecord
from controlplane.redis.lua import Script
from controlplane.redis.scripts.call import Arg, Call

KERNEL_START = Script.load("kernel_start")
KERNEL_STOP = Script.load("kernel_stop")
REBIND = Script.load("rebind")
OUTLIER = Script.load("outlier")
LEADER = Script.load("leader")


@dataclass(frozen=True, slots=True)
class Started:
    epoch: int  # the incarnation's fencing epoch
    state: str  # the kernel record's state (a restarted draining kernel drains on)


@dataclass(frozen=True, slots=True)
class NotStarted:
    reason: str  # the kernel is not (any more) assigned to this agent


def kernel_start(
    keys: Keys,
    cluster: str,
    kernel: str,
    *,
    agent: str,
    pid: int,
    host: str,
    now_s: float | str,
    syscalls: Sequence[str],
    capabilities: Sequence[str],
) -> Call[Started | NotStarted]:
    """kernel_start.lua: a kernel process comes up and takes a new fencing epoch."""
    argv: list[Arg] = [agent, pid, host, now_s, " ".join(syscalls), " ".join(capabilities)]
    klist = [keys.kernel(cluster, kernel), keys.cluster_epoch(cluster), keys.cluster_version(cluster)]
    return Call(KERNEL_START, klist, argv, _started)


def _started(reply: Any) -> Started | NotStarted:
    epoch, state = reply
    return Started(int(epoch), str(state)) if int(epoch) else NotStarted(str(state))


class Stop(enum.IntEnum):
    """kernel_stop.lua's reply."""

    STOPPED = 1
    BUSY = 0  # marked draining; work remains in flight
    NOT_OURS = -1  # another incarnation owns the record (or it is gone)


def kernel_stop(keys: Keys, cluster: str, kernel: str, *, epoch: int | str) -> Call[Stop]:
    """kernel_stop.lua: mark the kernel draining, stopped once nothing is in flight."""
    klist = [keys.kernel(cluster, kernel), keys.inflight(cluster, kernel), keys.cluster_version(cluster)]
    return Call(KERNEL_STOP, klist, [epoch], _stop)


def _stop(reply: Any) -> Stop:
    return Stop(int(reply))


@dataclass(frozen=True, slots=True)
class Rebound:
    """rebind.lua's reply."""

    moved: int  # jobs queued on the target; -1 when it takes no work
    #: the reply lists an error answer was pushed to (ring their clients' bells: `Keys.reply_bell_for`)
    answered: tuple[str, ...] = ()


def rebind(
    keys: Keys,
    cluster: str,
    target: str,
    *,
    source: str,
    job_ids: Sequence[str],
    replies: Sequence[str | None] = (),
) -> Call[Rebound]:
    """rebind.lua: move `job_ids` from the set `source` onto `target`'s queue. `replies`: the
    jobs' `reply` fields as read before (None or "" when a job had none), the lists a job
    answered with an error (exhausted, or pinned to a kernel that is gone) is pushed to: a
    job whose list is not among them gets no answer (read them with `reply_fields`)."""
    lists = list(dict.fromkeys(r for r in replies if isinstance(r, str) and r))
    klist = [
        source,
        keys.kernel(cluster, target),
        keys.queue(cluster, target),
        keys.inflight(cluster, target),
        keys.kernel_wake(cluster, target),
        *(keys.job(cluster, j) for j in job_ids),
        *lists,
    ]
    return Call(REBIND, klist, [target, *job_ids], _rebound)


def reply_fields(keys: Keys, cluster: str, job_ids: Sequence[str]) -> list[tuple[str, ...]]:
    """The commands that read each job's `reply` field (rebind's `replies`), one HGET a job."""
    return [("HGET", keys.job(cluster, j), JobRecord.REPLY) for j in job_ids]


def _rebound(reply: Any) -> Rebound:
    return Rebound(int(reply[0]), tuple(str(r) for r in reply[1:]))


@dataclass(frozen=True, slots=True)
class Health:
    """What outlier.lua left in a kernel's health record."""

    ejected: bool  # ejected now (or still)
    until_ms: int  # ejected until, unix ms; 0 when not ejected
    consecutive: int  # consecutive failures


def outlier(
    keys: Keys,
    cluster: str,
    kernel: str,
    *,
    now_ms: int,
    event: str,
    consecutive_failures: int,
    base_ejection_ms: int,
    max_ejection_ms: int,
    max_ejected: int,
    slow_start_ms: int,
) -> Call[Health]:
    """outlier.lua: record `event` ('ok', 'fail' or 'rate') of `kernel`; eject it when it is an
    outlier and fewer than `max_ejected` kernels of the cluster are."""
    klist = [
        keys.kernel_health(cluster, kernel),
        keys.cluster_ejected(cluster),
        keys.cluster_version(cluster),
    ]
    argv: list[Arg] = [
        now_ms,
        event,
        consecutive_failures,
        base_ejection_ms,
        max_ejection_ms,
        max_ejected,
        kernel,
        slow_start_ms,
    ]
    return Call(OUTLIER, klist, argv, _health)


def _health(reply: Any) -> Health:
    ejected, until, consecutive = reply
    return Health(bool(int(ejected)), int(until), int(consecutive))


def leader(keys: Keys, *, token: str, ttl_ms: int, term: int = 0) -> Call[int]:
    """leader.lua: take or renew the lease (`ttl_ms` 0 releases it), `term` the one held (0 when
    not leading). The term `token` leads in (a new one when taken afresh); 0 when it does not."""
    return Call(LEADER, [keys.leader(), keys.leader_term()], [token, ttl_ms, term], int)
