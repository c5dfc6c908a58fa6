"""controlplane.requests: the envelope, the builtin argument models and their error messages."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from controlplane.errors import InvalidRequest
from controlplane.protocol.requests import (
    ARG_MODELS,
    BUILTIN_SYSCALLS,
    AllocArgs,
    CloseArgs,
    ComputeArgs,
    FreeArgs,
    OpenArgs,
    PingArgs,
    ReadArgs,
    SyscallRequest,
    WriteArgs,
    check_size,
    normalise_syscall_name,
    parse_args,
    parse_request,
    validate_capabilities,
)

pytestmark = pytest.mark.unit


def args_of(request: dict[str, Any]) -> BaseModel | None:
    return parse_args(parse_request(request))


def rejected(request: Any, **kwargs: Any) -> str:
    """The message of the InvalidRequest that parsing (envelope then arguments) raises."""
    with pytest.raises(InvalidRequest) as info:
        parse_args(parse_request(request, **kwargs))
    return str(info.value)


# ------------------------------------------------------------------ envelope


def test_builtin_names_match_the_argument_models() -> None:
    assert frozenset(ARG_MODELS) == BUILTIN_SYSCALLS
    assert {"READ", "WRITE", "ALLOC", "FREE", "OPEN", "CLOSE", "PING", "COMPUTE"} == BUILTIN_SYSCALLS


def test_type_is_upper_cased_and_requires_defaults_to_empty() -> None:
    req = parse_request({"type": "ping"})
    assert isinstance(req, SyscallRequest)
    assert req.type == "PING"
    assert req.requires == []


def test_user_syscall_keeps_its_fields() -> None:
    req = parse_request({"type": "Infer", "requires": ["infer", "gpu.v100"], "inputs": [1, 2], "seed": 3})
    assert req.type == "INFER"
    assert req.requires == ["infer", "gpu.v100"]
    assert req.arguments == {"inputs": [1, 2], "seed": 3}
    assert parse_args(req) is None


def test_invalid_request_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        parse_request({"type": ""})


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        ([("type", "PING")], "request must be a JSON object (got list)"),
        ("PING", "request must be a JSON object (got str)"),
        (None, "request must be a JSON object (got NoneType)"),
        ({}, "request: type is required"),
        ({"type": 7}, "type must be a string (got int)"),
        ({"type": None}, "type must be a string (got NoneType)"),
        ({"type": "foo bar"}, "type must be 1 to 32 characters"),
        ({"type": "9LIVES"}, "type must be 1 to 32 characters"),
        ({"type": "A" * 33}, "type must be 1 to 32 characters"),
        ({"type": ""}, "type must be 1 to 32 characters"),
        ({1: "PING"}, "request keys must be strings (got 1)"),
        ({"type": "X", "blob": object()}, "request is not JSON-serialisable"),
        ({"type": "X", "requires": "gpu"}, "X: requires must be a list (got str)"),
        ({"type": "X", "requires": ["GPU"]}, "X: requires[0] must match"),
        (
            {"type": "X", "requires": [f"c{i}" for i in range(17)]},
            "requires must have between 0 and 16 items",
        ),
    ],
)
def test_bad_envelopes(request_: Any, expected: str) -> None:
    assert expected in rejected(request_)


def test_size_limit() -> None:
    request = {"type": "INFER", "blob": "x" * 100}
    size = check_size(request, max_bytes=1000)
    assert size == len(json.dumps(request, separators=(",", ":")))
    assert "limit is 50" in rejected(request, max_bytes=50)
    assert parse_request(request, max_bytes=size).type == "INFER"
    with pytest.raises(InvalidRequest, match=f"request is {size} bytes of JSON; the limit is {size - 1}"):
        parse_request(request, max_bytes=size - 1)


def test_normalise_name_and_capabilities() -> None:
    assert normalise_syscall_name("my_call2") == "MY_CALL2"
    with pytest.raises(InvalidRequest):
        normalise_syscall_name("my-call")
    assert validate_capabilities(["gpu", "infer", "gpu"]) == frozenset({"gpu", "infer"})
    with pytest.raises(InvalidRequest, match=r"capabilities: \[1\] must match"):
        validate_capabilities(["gpu", "Bad Cap"])


# ------------------------------------------------------------------ builtin happy paths


def test_builtin_argument_models() -> None:
    assert args_of({"type": "READ", "address": 0x1000, "size": 256}) == ReadArgs(address=4096, size=256)
    assert args_of({"type": "ALLOC", "size": 1 << 20}) == AllocArgs(size=1 << 20)
    assert args_of({"type": "FREE", "address": 4096}) == FreeArgs(address=4096)
    assert args_of({"type": "OPEN", "path": "/tmp/x"}) == OpenArgs(path="/tmp/x", mode="r")
    assert args_of({"type": "OPEN", "path": "é/ü", "mode": "rw"}) == OpenArgs(path="é/ü", mode="rw")
    assert args_of({"type": "CLOSE", "fd": 3}) == CloseArgs(fd=3)
    assert args_of({"type": "PING"}) == PingArgs(payload=None)
    assert args_of({"type": "PING", "payload": {"a": [1, "b"]}}) == PingArgs(payload={"a": [1, "b"]})
    compute = args_of({"type": "COMPUTE", "data": [1, 2.5]})
    assert compute == ComputeArgs(data=[1.0, 2.5], op="stats")
    dot = args_of({"type": "COMPUTE", "data": [1, 2], "op": "dot", "other": [3, 4]})
    assert isinstance(dot, ComputeArgs) and dot.other == [3.0, 4.0]


def test_requires_and_type_are_not_arguments() -> None:
    assert args_of({"type": "ping", "requires": ["gpu"], "payload": 1}) == PingArgs(payload=1)


@pytest.mark.parametrize(
    ("data", "encoding", "expected"),
    [
        ("héllo", None, "héllo".encode()),
        ("00ff10", "hex", b"\x00\xff\x10"),
        ("aGk=", "base64", b"hi"),
        ([0, 255, 7], None, b"\x00\xff\x07"),
        ("", None, b""),
    ],
)
def test_write_data_encodings(data: Any, encoding: str | None, expected: bytes) -> None:
    request: dict[str, Any] = {"type": "WRITE", "address": 4096, "data": data}
    if encoding:
        request["encoding"] = encoding
    args = args_of(request)
    assert isinstance(args, WriteArgs)
    assert args.to_bytes() == expected


# ------------------------------------------------------------------ bad arguments


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        ({"type": "READ", "address": 4096, "size": 0}, "READ: size must be between 1 and 65536 (got 0)"),
        (
            {"type": "read", "address": 4096, "size": 65537},
            "READ: size must be between 1 and 65536 (got 65537)",
        ),
        ({"type": "READ", "address": -1, "size": 1}, "READ: address must be >= 0 (got -1)"),
        ({"type": "READ", "address": "0x1000", "size": 1}, "READ: address must be an integer (got str)"),
        ({"type": "READ", "address": 1.0, "size": 1}, "READ: address must be an integer (got float)"),
        ({"type": "READ", "address": True, "size": 1}, "READ: address must be an integer (got bool)"),
        ({"type": "READ", "size": 1}, "READ: address is required"),
        ({"type": "READ", "address": 1, "size": 1, "sise": 2}, "READ: unknown field 'sise'"),
        ({"type": "READ"}, "READ: address is required; size is required"),
        ({"type": "WRITE", "address": 1}, "WRITE: data is required"),
        ({"type": "WRITE", "address": 1, "data": 5}, "WRITE: data must be a string or a list of byte values"),
        ({"type": "WRITE", "address": 1, "data": [1, 256]}, "WRITE: data[1] must be a byte value 0..255"),
        ({"type": "WRITE", "address": 1, "data": [-1]}, "WRITE: data[0] must be a byte value 0..255"),
        ({"type": "WRITE", "address": 1, "data": [True]}, "WRITE: data[0] must be a byte value 0..255"),
        ({"type": "WRITE", "address": 1, "data": "xyz", "encoding": "hex"}, "WRITE: data is not valid hex"),
        (
            {"type": "WRITE", "address": 1, "data": "a!", "encoding": "base64"},
            "WRITE: data is not valid base64",
        ),
        (
            {"type": "WRITE", "address": 1, "data": "a", "encoding": "latin-1"},
            "WRITE: encoding must be one of",
        ),
        ({"type": "WRITE", "address": 1, "data": [1], "encoding": "hex"}, "encoding applies only to string"),
        ({"type": "WRITE", "address": 1, "data": "a" * 65537}, "WRITE: data must be at most 65536 bytes"),
        ({"type": "WRITE", "address": 1, "data": "00" * 65537, "encoding": "hex"}, "at most 65536 bytes"),
        ({"type": "ALLOC", "size": 0}, "ALLOC: size must be between 1 and 1048576 (got 0)"),
        ({"type": "ALLOC", "size": "8"}, "ALLOC: size must be an integer (got str)"),
        ({"type": "FREE", "address": -16}, "FREE: address must be >= 0 (got -16)"),
        ({"type": "FREE"}, "FREE: address is required"),
        ({"type": "OPEN", "path": ""}, "OPEN: path must have between 1 and 255 characters (got 0)"),
        ({"type": "OPEN", "path": "p" * 256}, "OPEN: path must have between 1 and 255 characters (got 256)"),
        ({"type": "OPEN", "path": "a\x00b"}, "OPEN: path must not contain NUL or control characters"),
        ({"type": "OPEN", "path": "a\nb"}, "OPEN: path must not contain NUL or control characters"),
        (
            {"type": "OPEN", "path": "/x", "mode": "x"},
            "OPEN: mode must be one of 'r', 'w', 'a' or 'rw' (got 'x')",
        ),
        ({"type": "OPEN", "path": 5}, "OPEN: path must be a string (got int)"),
        ({"type": "CLOSE", "fd": -1}, "CLOSE: fd must be >= 0 (got -1)"),
        ({"type": "CLOSE", "fd": None}, "CLOSE: fd must be an integer (got NoneType)"),
        ({"type": "PING", "payload": "x" * 5000}, "PING: payload must be at most 4096 bytes of JSON"),
        ({"type": "PING", "extra": 1}, "PING: unknown field 'extra'"),
        ({"type": "COMPUTE", "data": []}, "COMPUTE: data must have between 1 and 100000 items (got 0)"),
        ({"type": "COMPUTE", "data": [1, math.nan]}, "COMPUTE: data[1] must be a finite number (got nan)"),
        ({"type": "COMPUTE", "data": [math.inf]}, "COMPUTE: data[0] must be a finite number (got inf)"),
        ({"type": "COMPUTE", "data": [1, "2"]}, "COMPUTE: data[1] must be a number (got str)"),
        ({"type": "COMPUTE", "data": [True]}, "COMPUTE: data[0] must be a number (got bool)"),
        ({"type": "COMPUTE", "data": "1,2"}, "COMPUTE: data must be a list (got str)"),
        ({"type": "COMPUTE", "data": [1], "op": "median"}, "COMPUTE: op must be one of"),
        ({"type": "COMPUTE", "data": [1], "op": "dot"}, "op 'dot' needs other"),
        ({"type": "COMPUTE", "data": [1], "op": "dot", "other": [1, 2]}, "other must have as many items"),
        ({"type": "COMPUTE", "data": [1], "op": "dot", "other": [-math.inf]}, "other[0] must be a finite"),
        ({"type": "COMPUTE", "data": [1], "op": "sum", "other": [1]}, "other is only used by op 'dot'"),
    ],
)
def test_bad_arguments_name_the_field(request_: dict[str, Any], expected: str) -> None:
    message = rejected(request_)
    assert expected in message
    assert "pydantic" not in message and "Input should be" not in message


def test_compute_accepts_its_maximum() -> None:
    args = args_of({"type": "COMPUTE", "data": [0.5] * 100_000})
    assert isinstance(args, ComputeArgs) and len(args.data) == 100_000
    assert "100000 items (got 100001)" in rejected(
        {"type": "COMPUTE", "data": [0] * 100_001}, max_bytes=1 << 21
    )


# ------------------------------------------------------------------ properties

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
field_names = st.sampled_from(
    [
        "type",
        "requires",
        "address",
        "size",
        "data",
        "encoding",
        "path",
        "mode",
        "fd",
        "payload",
        "op",
        "other",
    ]
) | st.text(max_size=8)
type_values = (
    st.sampled_from(sorted(BUILTIN_SYSCALLS)).map(lambda t: t.lower() if len(t) % 2 else t)
    | st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,32}", fullmatch=True)
    | json_values
)


@st.composite
def request_like(draw: st.DrawFn) -> Any:
    body = draw(st.dictionaries(field_names, json_values, max_size=6))
    if draw(st.booleans()):
        body["type"] = draw(type_values)
    return draw(st.sampled_from([body, body, body, list(body.items()), draw(json_values)]))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request_like())
def test_parse_never_raises_anything_but_invalid_request(request_: Any) -> None:
    try:
        req = parse_request(request_)
    except InvalidRequest as exc:
        assert str(exc)
        return
    assert isinstance(req, SyscallRequest)
    assert req.type == req.type.upper()
    try:
        args = parse_args(req)
    except InvalidRequest as exc:
        assert str(exc).startswith(f"{req.type}: ")
        return
    assert (args is None) == (req.type not in BUILTIN_SYSCALLS)
