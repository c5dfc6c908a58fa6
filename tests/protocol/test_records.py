"""Each record model reads back what it writes, and refuses to write a field it does not have."""

from __future__ import annotations

import pytest

from controlplane.protocol.models import ClusterConfig, ClusterStatus, KernelLoad, KernelState
from controlplane.protocol.records import (
    MALFORMED,
    AgentRecord,
    ClusterRecord,
    HealthRecord,
    JobRecord,
    KernelRecord,
    LoadRecord,
    Record,
)

pytestmark = pytest.mark.unit

RECORDS: list[Record] = [
    ClusterRecord(name="c", config=ClusterConfig(capabilities=["gpu"]), desired=2, stopped_at=1.5),
    KernelRecord(cluster="c", name="worker-0", agent="a", state=KernelState.RUNNING, placed_at=2.25),
    AgentRecord(name="a", slots=3, capabilities="gpu x", labels='{"zone": "b"}', draining=True),
    LoadRecord(cpu=0.5, memory=0.25, queue_depth=3, inflight=4, latency_ms=12.5, error_rate=0.1),
    JobRecord(job="{}", reply="kcp:reply:x", kernel="worker-0", epoch=7, strategy="adaptive"),
    HealthRecord(consecutive=2, ejections=1, ejected_until=10, last_ejected=5),
]


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: type(r).__name__)
def test_a_record_reads_back_what_it_writes(record: Record) -> None:
    fields = record.to_fields()
    assert all(isinstance(v, str) for v in fields.values())
    assert type(record).from_fields(fields, "k") == record


def test_fields_that_are_none_are_not_stored() -> None:
    fields = KernelRecord(cluster="c", name="k", agent="a").to_fields()
    assert "placed_at" not in fields and "max_deliveries" not in fields
    assert fields["state"] == "pending" and fields["epoch"] == "0"


def test_partial_fields_are_encoded_like_the_record_and_checked_by_name() -> None:
    assert ClusterRecord.fields(status=ClusterStatus.SCALING, desired=3) == {
        "status": "scaling",
        "desired": "3",
    }
    assert AgentRecord.fields(draining=True) == {"draining": "1"}
    with pytest.raises(ValueError, match="no field stauts"):
        ClusterRecord.fields(stauts="running")


def test_the_load_record_converts_to_the_spec_class() -> None:
    record = LoadRecord.from_fields({"cpu": "0.5", "inflight": "4", "updated_at": "1e9"}, "k")
    assert record is not None
    load = record.to_load("worker-0")
    assert isinstance(load, KernelLoad) and "inflight" not in KernelLoad.model_fields
    assert (load.name, load.cpu, load.updated_at) == ("worker-0", 0.5, 1e9)


def test_a_malformed_load_record_is_counted_under_the_spec_name() -> None:
    before = MALFORMED["KernelLoad"]
    assert LoadRecord.from_fields({"cpu": "2"}, "k") is None
    assert MALFORMED["KernelLoad"] == before + 1
