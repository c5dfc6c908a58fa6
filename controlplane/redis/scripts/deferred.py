"""The scripts of arq jobs that wait: defer (a deferred enqueue, a `Retry`), undefer (a client
moving a due job), abort (arq's `Job.abort` before the job starts)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from controlplane.protocol.keys import Keys
from controlplane.redis.lua import Script
from controlplane.redis.scripts.call import Arg, Call

DEFER = Script.load("defer")
UNDEFER = Script.load("undefer")
ABORT = Script.load("abort")

#: defer.lua's replies.
DEFERRED, DUPLICATE, NOT_OURS = 1, -1, 0


def _job_keys(keys: Keys, cluster: str, job_id: str) -> list[str]:
    return [
        keys.cluster_deferred(cluster),
        keys.job_deferred(cluster, job_id),
        keys.job(cluster, job_id),
        keys.job_result(cluster, job_id),
    ]


def defer(
    keys: Keys,
    cluster: str,
    job_id: str,
    *,
    payload: str,
    now_ms: int,
    due_ms: int,
    ttl_extra_ms: int,
    reply_key: str = "",
    deadline_ms: int = 0,
    strategy: str = "",
    retry_of: tuple[str, int | str] | None = None,
) -> Call[int]:
    """defer.lua: a new deferred job (its `reply_key`, `deadline_ms`, `strategy`), or with
    `retry_of` = (kernel, epoch) the caller's running job deferred again by `Retry`. Returns
    `DEFERRED`, `DUPLICATE` (a new job's id is in use) or `NOT_OURS` (a retry's job moved on)."""
    kernel, epoch = retry_of if retry_of is not None else ("", "")
    klist = [*_job_keys(keys, cluster, job_id), keys.inflight(cluster, kernel or "-")]
    argv: list[Arg] = [job_id, payload, now_ms, due_ms, ttl_extra_ms]
    argv += ["", "", ""] if retry_of else [reply_key, deadline_ms, strategy]
    argv += [kernel, epoch]
    return Call(DEFER, klist, argv, lambda reply: int(reply))


@dataclass(frozen=True, slots=True)
class Due:
    """A deferred job undefer.lua handed over to be routed now."""

    job: str
    reply: str
    enqueued_ms: int
    deadline_ms: int
    strategy: str
    #: the lease's score: `undefer(..., done=lease)` once the job is routed
    lease: int


@dataclass(frozen=True, slots=True)
class NotDue:
    status: Literal["later", "moved", "expired", "gone"]
    due_ms: int = 0  # 'later'


def undefer(
    keys: Keys, cluster: str, job_id: str, *, now_ms: int, lease_ms: int = 0, done: int | None = None
) -> Call[Any]:
    """undefer.lua: take job `job_id` when it is due (`Due` or `NotDue`), holding it for
    `lease_ms`; with `done` (the lease a take returned) mark it routed: True when it still held
    that lease and is now gone from the deferred set."""
    mode = "take" if done is None else "done"
    argv: list[Arg] = [job_id, now_ms, lease_ms if done is None else done, mode]
    return Call(UNDEFER, _job_keys(keys, cluster, job_id), argv, _undeferred if done is None else _flag)


def _undeferred(reply: Any) -> Due | NotDue:
    if reply[0] == "due":
        _, job, reply_key, enqueued, deadline, strategy, lease = reply
        return Due(str(job), str(reply_key), int(enqueued), int(deadline), str(strategy), int(lease))
    status = str(reply[0])
    if status not in ("later", "moved", "expired", "gone"):
        raise ValueError(f"undefer.lua replied {reply!r}")
    return NotDue(status, int(float(reply[1])) if status == "later" else 0)  # type: ignore[arg-type]


def _flag(reply: Any) -> bool:
    return bool(int(reply))


Aborted = Literal["aborted", "running", "moved", "done"]


def abort(
    keys: Keys, cluster: str, job_id: str, *, kernel: str, message: str, keep_ms: int, now_ms: int
) -> Call[Aborted]:
    """abort.lua: abort job `job_id`, deferred or queued on `kernel` (the one its job hash named
    when read; "" for none), keeping `message` as its result."""
    klist = [
        *_job_keys(keys, cluster, job_id),
        keys.queue(cluster, kernel or "-"),
        keys.inflight(cluster, kernel or "-"),
    ]
    return Call(ABORT, klist, [job_id, kernel, message, keep_ms, now_ms], _aborted)


def _aborted(reply: Any) -> Aborted:
    status = str(reply)
    if status not in ("aborted", "running", "moved", "done"):
        raise ValueError(f"abort.lua replied {reply!r}")
    return status  # type: ignore[return-value]
