"""arq's job model as kcp carries it: the request an arq call becomes, and arq's job shapes.

An arq call ``function(ctx, *args, **kwargs)`` travels as the kcp request
``{"type": FUNCTION, "args": [...], "kwargs": {...}}`` (the syscall name is the function's name,
upper-cased), inside arq's own job envelope (`controlplane.protocol.jobs.encode_job`, JSON). The
envelope's ``t`` is the try the job runs as next: 1 when enqueued, one more after each `Retry`;
each claim of the job on top of it (a kernel died with it) adds one more, as arq's retry counter
does. Results are arq's result envelope; `job_def` and `job_result` read them back as arq's
own `JobDef` and `JobResult`, which the client's `Job` handle returns. No I/O here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from arq.jobs import JobDef, JobResult, JobStatus, ResultNotFound

from controlplane.errors import InvalidRequest
from controlplane.protocol.jobs import decode_job, decode_result, json_loads
from controlplane.protocol.requests import normalise_syscall_name

__all__ = [
    "ABORTED",
    "EXPIRES_EXTRA_MS",
    "KEEP_RESULT_S",
    "MAX_TRIES",
    "RETRY",
    "JobDef",
    "JobResult",
    "JobStatus",
    "ResultNotFound",
    "arq_arguments",
    "arq_request",
    "job_def",
    "job_result",
]

#: arq's default: a job not started within a day of its time is dropped, ms.
EXPIRES_EXTRA_MS = 86_400_000
#: arq's defaults for a function that does not set them.
KEEP_RESULT_S = 3600.0
MAX_TRIES = 5
#: The error type of a job aborted before it ran, and of a `Retry` that is not retried.
ABORTED = "JobAborted"
RETRY = "Retry"


def _check_json(function: str, where: str, value: object) -> None:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidRequest(
            f"{function}: {where} is not JSON-serialisable ({type(value).__name__}: {exc}); "
            "kcp carries arq arguments and results as JSON, never pickle"
        ) from None


def arq_request(
    function: str, args: Sequence[Any], kwargs: Mapping[str, Any], *, score: int | None = None
) -> dict[str, Any]:
    """The kcp request of the arq call ``function(*args, **kwargs)`` (`score`: when it should run,
    unix ms, arq's ``ctx["score"]``). `InvalidRequest` for a bad function name or an argument
    JSON cannot carry, naming it."""
    name = normalise_syscall_name(function)
    for i, value in enumerate(args):
        _check_json(function, f"argument {i}", value)
    for key, value in kwargs.items():
        if not isinstance(key, str):
            raise InvalidRequest(f"{function}: keyword {key!r} is not a string")
        _check_json(function, f"argument {key!r}", value)
    request: dict[str, Any] = {"type": name, "args": list(args), "kwargs": dict(kwargs)}
    if score is not None:
        request["score"] = score
    return request


def arq_arguments(arguments: Mapping[str, Any]) -> tuple[list[Any], dict[str, Any], int | None]:
    """(args, kwargs, score) of a request `arq_request` made; `InvalidRequest` when it is not one."""
    args, kwargs, score = arguments.get("args", []), arguments.get("kwargs", {}), arguments.get("score")
    extra = set(arguments) - {"args", "kwargs", "score"}
    if (
        not isinstance(args, list)
        or not isinstance(kwargs, dict)
        or not (score is None or (isinstance(score, int) and not isinstance(score, bool)))
        or extra
    ):
        raise InvalidRequest(
            'an arq function takes {"args": [...], "kwargs": {...}, "score": ms}'
            + (f"; unknown fields {sorted(extra)}" if extra else "")
        )
    return args, kwargs, score


def _time(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def job_def(raw_job: str, job_id: str, score: int | None) -> JobDef:
    """arq's `JobDef` of a job still waiting or running (`raw_job`: its envelope)."""
    request, enqueue_ms, job_try = decode_job(raw_job)
    args, kwargs, _ = arq_arguments({k: v for k, v in request.items() if k not in ("type", "requires")})
    return JobDef(str(request["type"]), tuple(args), kwargs, job_try, _time(enqueue_ms), score, job_id)


def job_result(raw_result: str) -> JobResult:
    """arq's `JobResult` of a finished job. `result` is the function's return value when
    `success`; else ``{"error": ..., "error_type": ...}`` (exceptions do not travel as JSON)."""
    outcome = decode_result(raw_result)
    d = json_loads(raw_result)
    value: Any
    if outcome.success and outcome.value is not None:
        value = outcome.value.get("result")
    else:
        value = {"error": outcome.error, "error_type": outcome.error_type}
    return JobResult(
        function=str(d["f"]),
        args=tuple(d["a"]),
        kwargs=dict(d["k"]),
        job_try=outcome.attempt,
        enqueue_time=_time(outcome.enqueue_ms),
        score=None,
        job_id=outcome.job_id,
        success=outcome.success,
        result=value,
        start_time=_time(outcome.start_ms),
        finish_time=_time(outcome.finish_ms),
        queue_name=str(d.get("q", "")),
    )
