"""The record fields each Lua script names in its header are fields of the records' models.

A script reads and writes hash fields by name; `controlplane.protocol.records` declares them.
Each header ends with ``Fields read:`` and ``Fields written:`` lists, ``record(field, ...)``;
this test fails when a header names a field its model lacks, or when a script's body uses a
record field name its header does not declare, so a rename on either side cannot drift.
"""

from __future__ import annotations

import re
from importlib import resources

import pytest

from controlplane.protocol import stats
from controlplane.protocol.models import KernelState
from controlplane.protocol.records import (
    AgentRecord,
    ClusterRecord,
    DeferredRecord,
    HealthRecord,
    JobRecord,
    KernelRecord,
    LoadRecord,
    Record,
)
from controlplane.redis.lua import Script

pytestmark = pytest.mark.unit

#: Record names used in the headers -> the fields their hashes have.
RECORDS: dict[str, frozenset[str]] = {
    "cluster": frozenset(ClusterRecord.model_fields),
    "kernel": frozenset(KernelRecord.model_fields),
    "agent": frozenset(AgentRecord.model_fields),
    "load": frozenset(LoadRecord.model_fields),
    "job": frozenset(JobRecord.model_fields),
    "health": frozenset(HealthRecord.model_fields),
    "deferred": frozenset(DeferredRecord.model_fields),
    "stats": frozenset(
        v
        for k, v in vars(stats).items()
        if k.isupper() and isinstance(v, str) and k not in ("LATENCY", "QUEUE", "PINNED")
    ),
}
#: Record field names a script body may not use undeclared (a state value such as 'draining' is data).
ALL_FIELDS = frozenset().union(*RECORDS.values()) - {s.value for s in KernelState}
SCRIPTS = sorted(
    p.name.removesuffix(".lua")
    for p in resources.files("controlplane.redis").joinpath("lua").iterdir()
    if p.name.endswith(".lua")
)
#: Scripts that touch no record hash (the leader key, the collector's and the bus's own hashes).
NO_RECORDS = {"leader", "metric_increment", "bus_publish", "bus_trim"}


def header_and_body(name: str) -> tuple[str, str]:
    lines = Script.load(name).source.split("\n")
    end = next(i for i, line in enumerate(lines) if not line.startswith("--"))
    return "\n".join(lines[:end]), "\n".join(lines[end:])


def declared(header: str, part: str) -> dict[str, set[str]]:
    """``{record: fields}`` of the header's `part` ("read" or "written"), continuation lines included."""
    match = re.search(rf"^-- Fields {part}:(.*?)(?=^-- Fields |\Z)", header, re.S | re.M)
    assert match, f"no 'Fields {part}:' in the header"
    text = match.group(1).replace("\n--", " ")
    out: dict[str, set[str]] = {}
    for record, fields in re.findall(r"(\w+)\(([^)]*)\)", text):
        out.setdefault(record, set()).update(f.strip() for f in fields.split(";")[0].split(",") if f.strip())
    if not out:
        assert text.strip().startswith("none"), (
            f"'Fields {part}:' lists no record(field, ...) and is not 'none'"
        )
    return out


@pytest.mark.parametrize("name", sorted(set(SCRIPTS) - NO_RECORDS))
def test_header_fields_are_fields_of_the_models(name: str) -> None:
    header, body = header_and_body(name)
    named: set[str] = set()
    for part in ("read", "written"):
        for record, fields in declared(header, part).items():
            assert record in RECORDS, f"{name}.lua: unknown record {record!r}"
            assert fields <= RECORDS[record], f"{name}.lua: {record} has no field {fields - RECORDS[record]}"
            named |= fields
    used = set(re.findall(r"'([a-z_]+)'", body)) & ALL_FIELDS
    assert used <= named, f"{name}.lua uses record fields its header does not name: {sorted(used - named)}"


def test_every_script_is_either_checked_or_touches_no_record() -> None:
    assert set(SCRIPTS) >= NO_RECORDS
    for name in NO_RECORDS:
        header, _ = header_and_body(name)
        assert "Fields " not in header  # a script that starts using a record moves out of NO_RECORDS


def test_field_constants_name_model_fields() -> None:
    for model in (ClusterRecord, KernelRecord, AgentRecord, LoadRecord, JobRecord, HealthRecord):
        assert issubclass(model, Record)
        for attr, value in vars(model).items():
            if attr.isupper():
                names = value if isinstance(value, tuple) else (value,)
                assert set(names) <= set(model.model_fields), f"{model.__name__}.{attr}"
