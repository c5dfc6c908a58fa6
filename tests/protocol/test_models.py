"""controlplane.models (validation, the spec's metric dict) and controlplane.jobs (arq JSON encoding)."""

from __future__ import annotations

import json
import pickle
import re
from typing import Any

import pydantic
import pytest
from arq.jobs import deserialize_job

from controlplane.protocol.jobs import Outcome, decode_job, decode_result, encode_job, encode_result
from controlplane.protocol.models import NAME_PATTERN, ClusterConfig, ClusterMetrics, Name

pytestmark = pytest.mark.unit

NOW = 1_700_000_000_000

# ---------------------------------------------------------------- ClusterConfig


def test_cluster_config_defaults_are_valid() -> None:
    config = ClusterConfig()
    assert config.min_kernels <= config.max_kernels
    assert config.scale_down_threshold < config.scale_up_threshold


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"min_kernels": 5, "max_kernels": 4}, "exceeds max_kernels"),
        ({"scale_up_threshold": 0.5, "scale_down_threshold": 0.5}, "below scale_up_threshold"),
        ({"scale_up_threshold": 0.3, "scale_down_threshold": 0.6}, "below scale_up_threshold"),
        ({"min_kernels": -1}, "greater than or equal"),
        ({"max_kernels": 0}, "greater than or equal"),
        ({"scale_up_threshold": 1.5}, "less than or equal"),
        ({"replicas": 3}, "Extra inputs are not permitted"),
        ({"capabilities": ["GPU"]}, "pattern"),
        ({"capabilities": ["gpu", "has space"]}, "pattern"),
        ({"capabilities": ["-gpu"]}, "pattern"),
        ({"capabilities": ["x" * 33]}, "pattern"),
        ({"capabilities": [f"c{i}" for i in range(17)]}, "at most 16"),
    ],
    ids=[
        "min-above-max",
        "thresholds-equal",
        "thresholds-inverted",
        "negative-min",
        "zero-max",
        "up-above-1",
        "extra-key",
        "upper-case-capability",
        "capability-with-space",
        "capability-leading-dash",
        "capability-too-long",
        "too-many-capabilities",
    ],
)
def test_cluster_config_rejects(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=message):
        ClusterConfig(**fields)


def test_cluster_config_accepts() -> None:
    config = ClusterConfig(
        min_kernels=2,
        max_kernels=2,
        scale_up_threshold=0.9,
        scale_down_threshold=0.1,
        capabilities=["gpu", "fp64", "x" * 32, "a.b_c-d"],
    )
    assert config.capabilities == ["gpu", "fp64", "x" * 32, "a.b_c-d"]


# ---------------------------------------------------------------- names

NAME = pydantic.TypeAdapter(Name)


@pytest.mark.parametrize(
    "name",
    ["k", "kernel-1", "worker_7", "a.b-c_d", "K9", "0start", "x" * 64],
)
def test_name_pattern_accepts(name: str) -> None:
    assert NAME.validate_python(name) == name
    assert re.fullmatch(NAME_PATTERN, name)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "*",
        "k*",
        "k?",
        "k[1]",
        "a:b",
        "{tag}",
        "a{b",
        "a b",
        " a",
        "a\t",
        "a\n",
        "a\r",
        "a\x00b",
        "a\x1b",
        "a\x7f",
        "-lead",
        ".lead",
        "_lead",
        "x" * 65,
        "é",
    ],
)
def test_name_pattern_rejects(name: str) -> None:
    with pytest.raises(pydantic.ValidationError):
        NAME.validate_python(name)
    assert re.fullmatch(NAME_PATTERN, name) is None


# ---------------------------------------------------------------- ClusterMetrics


def test_cluster_metrics_to_dict_has_exactly_the_spec_keys() -> None:
    metrics = ClusterMetrics(cluster_name="c1", kernel_count=3, total_dispatches=10, total_errors=1)
    data = metrics.to_dict()
    assert set(data) == {
        "cluster_name",
        "kernel_count",
        "total_dispatches",
        "total_errors",
        "avg_latency_ms",
        "avg_cpu",
        "avg_memory",
    }
    assert data["cluster_name"] == "c1"
    assert (data["kernel_count"], data["total_dispatches"], data["total_errors"]) == (3, 10, 1)
    json.dumps(data)


# ---------------------------------------------------------------- jobs


def result(**overrides: Any) -> str:
    fields: dict[str, Any] = {
        "job_id": "j1",
        "function": "PING",
        "kernel": "kernel-1",
        "queue": "kcp:kernel:c1:kernel-1:queue",
        "attempt": 2,
        "enqueue_ms": NOW,
        "start_ms": NOW + 3,
        "finish_ms": NOW + 7,
        "value": {"pong": True, "n": [1, 2.5, "x"]},
    }
    return encode_result(**(fields | overrides))


def test_job_round_trip() -> None:
    request = {"type": "WRITE", "address": 16, "data": [1, 2, 3], "requires": ["gpu"]}
    raw = encode_job(request, job_try=1, enqueue_ms=NOW)
    assert decode_job(raw) == (request, NOW, 1)


def test_encoded_job_is_arq_json_without_pickle() -> None:
    request = {"type": "PING", "payload": {"x": 1}}
    raw = encode_job(request, job_try=1, enqueue_ms=NOW)
    assert not raw.encode().startswith(pickle.PROTO)  # every pickle since protocol 2 starts with it
    assert json.loads(raw) == {"t": 1, "f": "PING", "a": [], "k": request, "et": NOW}
    job = deserialize_job(raw.encode(), deserializer=json.loads)
    assert (job.function, job.kwargs, job.job_try) == ("PING", request, 1)
    assert int(job.enqueue_time.timestamp() * 1000) == NOW


def test_success_result_round_trip() -> None:
    outcome = decode_result(result())
    assert outcome == Outcome(
        job_id="j1",
        kernel="kernel-1",
        success=True,
        value={"pong": True, "n": [1, 2.5, "x"]},
        error="",
        error_type="",
        attempt=2,
        enqueue_ms=NOW,
        start_ms=NOW + 3,
        finish_ms=NOW + 7,
    )


def test_error_result_round_trip() -> None:
    outcome = decode_result(result(value=None, error="size must be >= 1", error_type="InvalidArguments"))
    assert not outcome.success
    assert outcome.value is None
    assert (outcome.kernel, outcome.error, outcome.error_type) == (
        "kernel-1",
        "size must be >= 1",
        "InvalidArguments",
    )
    assert (outcome.job_id, outcome.attempt) == ("j1", 2)


def test_encoded_result_is_json() -> None:
    data = json.loads(result())
    assert data["s"] is True
    assert data["r"] == {"kernel": "kernel-1", "epoch": 0, "value": {"pong": True, "n": [1, 2.5, "x"]}}
    assert decode_result(result(epoch=17)).epoch == 17, "the incarnation that ran the job"
    assert (data["id"], data["f"], data["t"]) == ("j1", "PING", 2)


@pytest.mark.parametrize("value", [{"x": float("inf")}, {"x": float("nan")}, {"x": object()}])
def test_an_unserializable_value_becomes_a_failed_result(value: dict[str, Any]) -> None:
    raw = result(value=value)  # no exception
    json.loads(raw)
    outcome = decode_result(raw)
    assert not outcome.success
    assert outcome.value is None
    assert outcome.error_type == "SerializationError"
    assert "serialize" in outcome.error
    assert (outcome.job_id, outcome.attempt, outcome.finish_ms) == ("j1", 2, NOW + 7)


def test_result_times_round_trip_exactly() -> None:
    ms = 2_147_486_217_483  # 2038-01-19T03:56:57.483Z
    outcome = decode_result(result(enqueue_ms=ms, start_ms=ms, finish_ms=ms))
    assert (outcome.enqueue_ms, outcome.start_ms, outcome.finish_ms) == (ms, ms, ms)
