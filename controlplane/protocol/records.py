"""The records kcp keeps in Redis hashes: one model per hash, written and read only through it.

Each model is the one place its hash's field names are declared: Python writes a record with
`to_fields()` (or a few fields with `fields(...)`), reads it with `from_fields()`, and reads
single fields by the model's upper-case constants. The Lua scripts name the fields they read
and write in their headers, and `tests/redis/test_lua_fields.py` checks those names against
these models, so a field renamed on one side fails a test instead of reading as missing.

Records are hashes of plain fields (the cluster config is one JSON field) so `redis-cli
HGETALL` reads them. Everything read is validated; a malformed record is logged and skipped,
never fatal. A field whose value is None is not stored: the hash simply lacks it.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar, Self, TypeVar

import pydantic
from pydantic import BaseModel, Field

from controlplane.protocol.keys import ASSIGN_DRAIN, ASSIGN_RUN
from controlplane.protocol.models import (
    NAME_PATTERN,
    ClusterConfig,
    ClusterStatus,
    KernelLoad,
    KernelState,
    Name,
)

logger = logging.getLogger(__name__)

T = TypeVar("T", bound=BaseModel)

#: Entries read from Redis that failed validation and were skipped, by kind (this process).
MALFORMED: Counter[str] = Counter()
#: Largest cluster `config` JSON parsed, bytes (a real one is about 150).
MAX_CONFIG_BYTES = 65536
_REF = re.compile(f"{NAME_PATTERN[:-1]}/{NAME_PATTERN[1:]}")


def skip_malformed(kind: str, key: str, why: object) -> None:
    """Log and count an entry that is skipped because it does not parse (never fatal)."""
    MALFORMED[kind] += 1
    logger.warning("skipping malformed %s %s: %.300s", kind, key, why)


def parse_record(model: type[T], fields: Mapping[str, Any], key: str, *, kind: str = "") -> T | None:
    """`fields` validated as `model`; None (logged and counted as `kind`, by default the model's
    name) when they do not parse."""
    if not fields:
        return None
    try:
        return model.model_validate(fields)
    except pydantic.ValidationError as exc:  # the input is left out: it may be huge
        errors = exc.errors(include_url=False, include_input=False)[:3]
        skip_malformed(kind or model.__name__, key, errors)
        return None


def parse_counters(fields: Mapping[str, str], key: str) -> dict[str, float]:
    """A counters hash (stats, reliability) as finite numbers; a field that is not one is skipped."""
    out: dict[str, float] = {}
    for name, raw in fields.items():
        try:
            value = float(raw) if len(raw) <= 64 else math.nan
        except ValueError:
            value = math.nan
        if math.isfinite(value):
            out[name] = value
        else:
            skip_malformed("counter", f"{key} {name!r}", f"not a finite number: {raw!r:.80}")
    return out


def parse_assignment(fields: Mapping[str, str], key: str) -> dict[str, str]:
    """An agent's assignment hash (``cluster/kernel`` -> ``run`` | ``drain``), malformed fields skipped."""
    out: dict[str, str] = {}
    for ref, wanted in fields.items():
        if _REF.fullmatch(ref) and wanted in (ASSIGN_RUN, ASSIGN_DRAIN):
            out[ref] = wanted
        else:
            skip_malformed("assignment", f"{key} {ref!r:.100}", f"value {wanted!r:.80}")
    return out


def _encode(value: Any) -> str:
    """One field value as stored: nested models and containers as JSON, booleans as 1/0."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, Enum):
        return str(value.value)
    return str(value)


class Record(BaseModel):
    """A model stored as one Redis hash."""

    def to_fields(self) -> dict[str, str]:
        """The whole record as hash fields (fields that are None are left out)."""
        values = ((name, getattr(self, name)) for name in type(self).model_fields)
        return {name: _encode(value) for name, value in values if value is not None}

    @classmethod
    def fields(cls, **values: Any) -> dict[str, str]:
        """Some fields of the record, encoded as `to_fields` does, for a partial HSET.

        A name that is not a field of the model raises (a typo must not write a stray field)."""
        unknown = values.keys() - cls.model_fields.keys()
        if unknown:
            raise ValueError(f"{cls.__name__} has no field {', '.join(sorted(unknown))}")
        return {name: _encode(value) for name, value in values.items()}

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any], key: str) -> Self | None:
        """The record read back from HGETALL; None when absent or malformed (logged and counted)."""
        return parse_record(cls, fields, key)


class ClusterRecord(Record):
    """`{prefix}cluster:{name}` (a hash: config is JSON, the rest plain fields)."""

    NAME: ClassVar[str] = "name"
    STATUS: ClassVar[str] = "status"
    STOPPED_AT: ClassVar[str] = "stopped_at"
    AUTOSCALE_TREND: ClassVar[tuple[str, str, str]] = ("autoscale_dir", "autoscale_since", "autoscale_at")

    name: Name
    config: ClusterConfig
    desired: int = Field(ge=0)
    status: ClusterStatus = ClusterStatus.INITIALIZING
    reason: str = ""
    created_at: float = Field(default_factory=time.time)
    #: unix seconds of the destroy request (`kcp destroy`); set with status `stopped`
    stopped_at: float | None = None
    #: the cluster load the autoscaler last measured (for operators)
    load: float | None = None
    #: the autoscaler's trend: direction ('up' | 'down' | ''), since when, last step (unix s)
    autoscale_dir: str | None = None
    autoscale_since: float | None = None
    autoscale_at: float | None = None

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any], key: str) -> Self | None:
        if "config" in fields:
            try:
                if len(fields["config"]) > MAX_CONFIG_BYTES:
                    raise ValueError(f"config is {len(fields['config'])} bytes")
                fields = {**fields, "config": json.loads(fields["config"])}
            except ValueError as exc:
                skip_malformed(cls.__name__, key, f"config is not JSON: {exc}")
                return None
            except RecursionError:
                skip_malformed(cls.__name__, key, "config nests too deeply")
                return None
        return parse_record(cls, fields, key)


class KernelRecord(Record):
    """`{prefix}kernel:{cluster}:{name}` (a hash of plain fields)."""

    PLACED_AT: ClassVar[str] = "placed_at"

    cluster: Name
    name: Name
    agent: Name
    state: KernelState = KernelState.PENDING
    epoch: int = 0
    pid: int = 0
    host: str = ""
    syscalls: str = ""  # space-separated names the kernel executes
    capabilities: str = ""  # space-separated
    started_at: float = 0.0
    #: unix seconds of the placement: tells the agent a re-placement under a known name from the old kernel
    placed_at: float | None = None
    #: claims of one job before rebind.lua gives it up (read by rebind.lua; default 3 there)
    max_deliveries: int | None = None
    #: incarnations after the first under this placement (kernel_start.lua counts a start of a
    #: record that already had a process); a new placement starts from 0
    restarts: int = 0

    @property
    def index(self) -> int:
        """`worker-7` -> 7; names outside that pattern sort last."""
        head, _, tail = self.name.rpartition("-")
        return int(tail) if head and tail.isdigit() else 1 << 30


class AgentRecord(Record):
    """`{prefix}agent:{name}` (a hash of plain fields)."""

    name: Name
    host: str = ""
    pid: int = 0
    slots: int = Field(1, ge=0, le=4096)
    capabilities: str = ""  # space-separated
    labels: str = ""  # JSON object
    draining: bool = False
    started_at: float = 0.0

    @property
    def capability_set(self) -> frozenset[str]:
        return frozenset(self.capabilities.split())


@dataclass(frozen=True, slots=True)
class AgentLease:
    """The value of `{prefix}agent:{name}:lease`: ``"{beat_ms} {version}"``.

    `beat_ms` is the time of the beat in Redis's clock (the agent measures its offset to `TIME`),
    so the leader reads every agent's last beat with one MGET and compares it with its own
    reading of the same clock. `version` changes whenever the agent's record or running kernels
    (`agent:{name}:running`) changed, so the leader re-reads those only then."""

    beat_ms: int
    version: str

    def encode(self) -> str:
        return f"{self.beat_ms} {self.version}"

    @classmethod
    def decode(cls, value: str | None) -> AgentLease | None:
        """None for a missing lease; a malformed one (an older agent's bare ms) reads as a beat of
        unknown time and version, so it still counts as alive."""
        if value is None:
            return None
        beat, _, version = value.partition(" ")
        return cls(int(beat) if beat.isdigit() else 0, version)


class LoadRecord(Record):
    """`{prefix}agent:{agent}:load:{cluster}:{kernel}` (with a TTL), written by the kernel's agent
    (cpu, memory, memory_bytes) and by the kernel process (the rest), each with `updated_at`.

    Ranges as in the spec's `KernelLoad`, which it converts to (`to_load`); `inflight` is what
    enqueue.lua weighs (the spec's class has no field for it)."""

    cpu: float = Field(0.0, ge=0, le=1)
    memory: float = Field(0.0, ge=0, le=1)
    queue_depth: int = Field(0, ge=0)
    inflight: int = Field(0, ge=0)
    latency_ms: float = Field(0.0, ge=0)
    error_rate: float = Field(0.0, ge=0, le=1)
    updated_at: float = Field(default_factory=time.time, description="unix time of the report, seconds")
    #: resident memory of the kernel process, bytes (absent in records of older agents)
    memory_bytes: int | None = Field(None, ge=0)

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any], key: str) -> Self | None:
        return parse_record(cls, fields, key, kind=KernelLoad.__name__)  # counted as it always was

    def to_load(self, name: str) -> KernelLoad:
        """The spec's load report of kernel `name`."""
        return KernelLoad.model_construct(name=name, **self.model_dump(exclude={"inflight", "memory_bytes"}))


class LapsedRecord(BaseModel):
    """A field of `{prefix}lapsed:agents` or `{prefix}lapsed:kernels` (JSON): an agent or kernel
    the leader removed because a lease lapsed, kept so readers still show it down until `until`.

    Written by the leader when it removes the entry for that reason; deleted when the name is
    registered or placed again, or removed on purpose; readers ignore it after `until`."""

    model_config = pydantic.ConfigDict(extra="ignore")

    #: unix seconds the agent or kernel was last known alive (its last heartbeat)
    last_seen: float = Field(ge=0)
    #: unix seconds after which it is no longer shown
    until: float = Field(ge=0)
    agent: str = ""
    host: str = ""
    slots: int = Field(0, ge=0)

    def encode(self) -> str:
        return self.model_dump_json()

    @classmethod
    def decode(cls, raw: str, key: str) -> LapsedRecord | None:
        """One field's value; None (logged and counted) when it does not parse."""
        try:
            return cls.model_validate_json(raw[:4096])
        except pydantic.ValidationError as exc:
            skip_malformed(cls.__name__, key, exc.errors(include_url=False, include_input=False)[:3])
            return None


class JobRecord(Record):
    """`{prefix}job:{cluster}:{id}` (with a TTL): one job, written and fenced by the Lua scripts
    (enqueue, claim, rebind, finish, cancel); Python only reads its reply list, of a job it fails
    or moves (rebind.lua's callers, which declare the lists the script pushes to)."""

    REPLY: ClassVar[str] = "reply"

    job: str  # arq-serialized JSON
    reply: str  # the waiting client's reply list key
    kernel: str
    epoch: int
    attempt: int = 0
    enqueued_ms: int = 0
    deadline_ms: int = 0
    state: str = "queued"  # queued | running
    strategy: str = ""  # the strategy that routed it, or 'pinned'
    started_ms: int | None = None  # set by claim.lua
    stolen_from: str | None = None  # the sibling a stolen job was queued on (claim.lua)


class DeferredRecord(Record):
    """`{prefix}job:{cluster}:{id}:deferred` (with a TTL): an arq job waiting for its time in
    `cluster:{cluster}:deferred`, written by defer.lua, taken by undefer.lua, routed then by
    the client that moves it (as enqueue.lua would have had it, with the job's own strategy)."""

    job: str  # arq-serialized JSON; its `t` is the try the job runs as next
    reply: str  # the reply list of the client that enqueued it (or whose job was retried)
    enqueued_ms: int
    due_ms: int
    deadline_ms: int  # after it the job is dropped (arq's `_expires`)
    strategy: str = ""
    taken_until: int | None = None  # unix ms: a client routes it now (undefer.lua)


class HealthRecord(Record):
    """`{prefix}kernel:{cluster}:{kernel}:health` (with a TTL): outlier detection of one kernel
    as every client sees it, written by outlier.lua, read by enqueue.lua and claim.lua."""

    consecutive: int = 0
    ejections: int = 0
    ejected_until: int = 0  # unix ms
    last_ejected: int = 0  # unix ms
