"""Property tests: whatever a caller, a config file or Redis hands the parsers, they either
accept it (and what they accept is safe) or raise the one documented error type.

Budgets are small in `make test`; `make fuzz` runs them with `--hypothesis-profile=fuzz`.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import budget, json_value, requests, tricky_text

from controlplane.bus.codec import check_name, decode
from controlplane.client.core import validate_name
from controlplane.errors import InvalidRequest
from controlplane.protocol.jobs import decode_job, encode_job
from controlplane.protocol.models import ClusterConfig, KernelLoad
from controlplane.protocol.records import (
    MALFORMED,
    AgentRecord,
    ClusterRecord,
    KernelRecord,
    parse_assignment,
    parse_counters,
    parse_record,
)
from controlplane.protocol.requests import SYSCALL_NAME_PATTERN, parse_args, parse_request
from controlplane.settings import Settings

pytestmark = [pytest.mark.unit, pytest.mark.timeout(120 if settings.default.max_examples <= 100 else 1800)]

#: Characters that would break out of a key segment or a SCAN/ACL pattern.
UNSAFE = re.compile(r"[\s*?\[\]{}:/\\\x00-\x1f\x7f]")


# ------------------------------------------------------------------ requests


@budget(150)
@given(requests)
def test_requests_are_accepted_or_refused_with_invalid_request(request: Any) -> None:
    try:
        req = parse_request(request, max_bytes=4096)
        args = parse_args(req)
    except InvalidRequest as exc:
        message = str(exc)
        assert message and "\n" not in message and len(message) < 600, message
        return
    assert re.fullmatch(SYSCALL_NAME_PATTERN, req.type)
    assert len(json.dumps(request, separators=(",", ":"), ensure_ascii=False).encode()) <= 4096
    if args is not None:  # a builtin's arguments: bounded
        for name in ("size", "address", "fd"):
            value = getattr(args, name, None)
            assert value is None or (isinstance(value, int) and value >= 0)
    # what is accepted survives the job encoding the client uses and the kernel reverses
    payload = req.model_dump(mode="json", exclude_defaults=True) | {"type": req.type}
    decoded, _, _ = decode_job(encode_job(payload, job_try=1, enqueue_ms=1))
    assert decoded == payload


@budget(200)
@given(tricky_text)
def test_names_that_pass_validation_are_key_safe(name: str) -> None:
    outcomes = []
    for check in (validate_name, check_name):
        try:
            outcomes.append(check(name))
        except InvalidRequest:
            outcomes.append(None)
    assert outcomes[0] == outcomes[1], "the client and the bus agree on names"
    if outcomes[0] is not None:
        assert not UNSAFE.search(name) and 1 <= len(name) <= 64


# ------------------------------------------------------------------ configs


@budget(80)
@given(st.dictionaries(st.sampled_from([*ClusterConfig.model_fields, "x"]), json_value, max_size=7))
def test_cluster_configs_are_consistent_or_refused(raw: dict[str, Any]) -> None:
    try:
        cfg = ClusterConfig.model_validate(raw)
    except pydantic.ValidationError:
        return
    assert 0 <= cfg.min_kernels <= cfg.max_kernels <= 10_000
    assert 0 <= cfg.scale_down_threshold < cfg.scale_up_threshold <= 1
    assert all(not UNSAFE.search(c) for c in cfg.capabilities)


_SETTINGS_FIELDS = [
    f"KCP_{name}"
    for name in ("PREFIX", "REDIS_URL", "REDIS_USERNAME", "REDIS_PASSWORD", "LEASE_TTL", "HEARTBEAT_INTERVAL",
                 "MAX_REQUEST_BYTES", "MAX_KERNELS_PER_CLUSTER", "REDIS_TLS_CHECK_HOSTNAME")
]  # fmt: skip


@budget(80)
@given(
    st.dictionaries(
        st.sampled_from(_SETTINGS_FIELDS),
        st.one_of(
            st.text(
                alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=30
            ),
            st.sampled_from(["rediss://h:1/0", "redis://u:p@h/0", "kcp:", "0", "-1", "1e9", "true"]),
        ),
        max_size=5,
    )
)
def test_settings_from_the_environment_are_valid_or_refused(env: dict[str, str]) -> None:
    with pytest.MonkeyPatch.context() as mp:
        for name in _SETTINGS_FIELDS:
            mp.delenv(name, raising=False)
        for name, value in env.items():
            mp.setenv(name, value)
        try:
            s = Settings()
        except pydantic.ValidationError:
            return
    assert re.fullmatch(r"[A-Za-z0-9_.-]{1,32}:", s.prefix)
    assert s.lease_ttl >= 2 * s.heartbeat_interval
    # a kernel started with the agent's URL (and the same variables) connects the same way
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        mp.setenv("KCP_REDIS_URL", s.redis_url)
        assert Settings().redis_url == s.redis_url


# ------------------------------------------------------------------ what is read back from Redis

redis_value = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["nan", "inf", "-1", "1e400", "0x10", " 1", "", "9" * 80, "running", "{}", "[]"]),
    st.integers().map(str),
    st.floats().map(repr),
)
record_fields = st.dictionaries(
    st.sampled_from(
        [*KernelRecord.model_fields, *AgentRecord.model_fields, *KernelLoad.model_fields, "config", "desired"]
    ),
    redis_value,
    max_size=10,
)


@budget(150)
@given(record_fields)
def test_records_from_redis_parse_or_are_skipped_and_counted(fields: dict[str, str]) -> None:
    for model in (KernelRecord, AgentRecord, KernelLoad):
        before = sum(MALFORMED.values())
        parsed = parse_record(
            model, {**fields, "name": fields.get("name", "x")} if model is KernelLoad else fields, "k"
        )
        if parsed is None:
            assert sum(MALFORMED.values()) == before + 1 or not fields
        elif model is KernelLoad:
            assert isinstance(parsed, KernelLoad)
            assert 0 <= parsed.cpu <= 1 and 0 <= parsed.memory <= 1 and parsed.queue_depth >= 0
    ClusterRecord.from_fields(fields, "kcp:cluster:x")  # never raises


@budget(200)
@given(st.dictionaries(st.text(max_size=20), redis_value, max_size=8))
def test_counters_and_assignments_keep_only_what_is_well_formed(fields: dict[str, str]) -> None:
    counters = parse_counters(fields, "stats")
    assert all(math.isfinite(v) for v in counters.values())
    assigned = parse_assignment(fields, "assignment")
    for ref, wanted in assigned.items():
        cluster, _, kernel = ref.partition("/")
        assert validate_name(cluster) and validate_name(kernel, "kernel name")
        assert wanted in ("run", "drain")


@budget(100)
@given(
    st.dictionaries(
        st.sampled_from(
            ["payload", "topic", "from", "to", "ts", "seq", "corr", "reply_to", "deadline", "kind"]
        ),
        st.one_of(
            redis_value,
            json_value.map(json.dumps),
            st.sampled_from(["events", "data", "[" * 5000 + "]" * 5000, '{"a": 1}']),
        ),
        max_size=10,
    )
)
def test_bus_entries_decode_or_raise_value_error(fields: dict[str, str]) -> None:
    try:
        message = decode("1-1", fields)
    except ValueError:
        return
    assert isinstance(message.payload, dict)


@budget(80)
@given(st.one_of(st.text(max_size=200), json_value.map(json.dumps), st.just("[" * 50_000)))
def test_job_payloads_decode_or_raise(raw: str) -> None:
    """A corrupt job in Redis raises an ordinary exception (the kernel answers MalformedJob)."""
    try:
        decode_job(raw)
    except Exception as exc:  # what the kernel's job handler catches
        assert not isinstance(exc, SystemExit | KeyboardInterrupt)
