"""Job and result encoding: arq's job model with a JSON serializer (never pickle).

A job is what `arq.jobs.serialize_job` writes (`{"t", "f", "a", "k", "et"}`): the syscall type
is the function, the request is the kwargs. A result is what `arq.jobs.serialize_result`
writes; its ``r`` holds ``{"kernel", "epoch", "value"}`` or ``{"kernel", "epoch", "error",
"error_type"}`` (`epoch`: the kernel incarnation that ran the job; 0 when none did).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from arq.jobs import deserialize_job_raw, serialize_job, serialize_result

#: How long a pushed result waits for its client before the reply list expires, ms.
REPLY_TTL_MS = 60_000


#: made once: `json.dumps` with arguments other than its defaults builds an encoder per call
_COMPACT = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def json_dumps(obj: Any) -> bytes:
    return _COMPACT.encode(obj).encode()


def json_loads(raw: bytes | str) -> Any:
    return json.loads(raw)


def encode_job(request: dict[str, Any], *, job_try: int, enqueue_ms: int) -> str:
    return serialize_job(
        str(request["type"]), (), request, job_try, enqueue_ms, serializer=json_dumps
    ).decode()


#: Largest encoded job a kernel decodes, bytes: the largest `max_request_bytes` plus the envelope.
MAX_JOB_BYTES = (64 << 20) + 4096


def decode_job(raw: str) -> tuple[dict[str, Any], int, int]:
    """(request, enqueue ms, job try) of an encoded job. ValueError (or arq's
    DeserializationError) when it is too large or not a job: a request object, an integer
    enqueue time and an integer try (1 unless an arq job was retried: `controlplane.protocol.arq`)."""
    if len(raw) > MAX_JOB_BYTES:
        raise ValueError(f"job is {len(raw)} bytes, above {MAX_JOB_BYTES}")
    _function, _args, kwargs, job_try, enqueue_ms = deserialize_job_raw(raw.encode(), deserializer=json_loads)
    job_try = 1 if job_try is None else job_try
    # checked here rather than by a pydantic TypeAdapter: a kernel decodes a job per request
    if not isinstance(kwargs, dict) or not _is_int(enqueue_ms) or not _is_int(job_try):
        raise ValueError(
            "not a job: 'k' must be an object and 'et' and 't' integers "
            f"(got {type(kwargs).__name__}, {enqueue_ms!r}, {job_try!r})"
        )
    return kwargs, enqueue_ms, job_try


def _is_int(value: object) -> bool:
    """An integer, not a bool (JSON's `true` is not a number here)."""
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a kernel reported for one job."""

    job_id: str
    kernel: str
    success: bool
    value: dict[str, Any] | None
    error: str
    error_type: str
    attempt: int
    enqueue_ms: int
    start_ms: int
    finish_ms: int
    #: the incarnation (fencing epoch) of `kernel` that ran the job; 0 when none did
    epoch: int = 0


def encode_result(
    *,
    job_id: str,
    function: str,
    kernel: str,
    queue: str,
    attempt: int,
    enqueue_ms: int,
    start_ms: int,
    finish_ms: int,
    value: dict[str, Any] | None,
    error: str = "",
    error_type: str = "",
    epoch: int = 0,
) -> str:
    body: dict[str, Any] = {"kernel": kernel, "epoch": epoch}
    if error_type:
        body.update(error=error, error_type=error_type)
    else:
        body["value"] = value
    raw = serialize_result(
        function,
        (),
        {},
        attempt,
        enqueue_ms,
        not error_type,
        body,
        start_ms,
        finish_ms,
        f"{job_id}:{function}",
        queue,
        job_id,
        serializer=json_dumps,
    )
    if raw is None:  # arq gives up only when even its fallback cannot be serialized
        raise ValueError(f"result of job {job_id} cannot be serialized")
    return raw.decode()


def decode_result(raw: str) -> Outcome:
    """The `Outcome` in an arq-format result (what `encode_result` writes). Read straight from
    the JSON rather than through `arq.jobs.deserialize_result`, whose datetimes we would only
    turn back into ms (7 µs a reply instead of 10). KeyError, TypeError or ValueError when
    `raw` is not a result."""
    d = json_loads(raw)
    body = d["r"] if isinstance(d["r"], dict) else {"error": str(d["r"])}
    success = d["s"] is True and "value" in body
    return Outcome(
        job_id=str(d["id"]),
        kernel=str(body.get("kernel", "")),
        success=success,
        value=body["value"] if success and isinstance(body["value"], dict) else None,
        error="" if success else str(body.get("error", "result could not be serialized")),
        error_type="" if success else str(body.get("error_type", "SerializationError")),
        attempt=int(d["t"]),
        enqueue_ms=int(d["et"]),
        start_ms=int(d["st"]),
        finish_ms=int(d["ft"]),
        epoch=int(body.get("epoch") or 0),
    )
