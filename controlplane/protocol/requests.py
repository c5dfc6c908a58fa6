"""Validated request models for kernel syscalls.

A request is a JSON object with a ``type`` (the syscall name, normalised to upper case),
an optional ``requires`` list of capabilities, and the syscall's own arguments as further
top-level fields. The client validates requests with `parse_request` before dispatch; the
kernel parses them again with `parse_request` and `parse_args` before running a handler.

Every failure raises `InvalidRequest` with a message naming the field, for example
``READ: size must be between 1 and 65536 (got 0)``.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import unicodedata
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from controlplane.errors import InvalidRequest
from controlplane.protocol.models import Capability

__all__ = [
    "ARG_MODELS",
    "BUILTIN_SYSCALLS",
    "DEFAULT_MAX_BYTES",
    "MAX_DATA_BYTES",
    "SYSCALL_NAME_PATTERN",
    "AllocArgs",
    "CloseArgs",
    "ComputeArgs",
    "FiniteFloat",
    "FreeArgs",
    "OpenArgs",
    "PingArgs",
    "ReadArgs",
    "SyscallRequest",
    "WriteArgs",
    "check_size",
    "decode_data",
    "explain",
    "normalise_syscall_name",
    "parse_args",
    "parse_request",
    "validate_capabilities",
]

BUILTIN_SYSCALLS: frozenset[str] = frozenset(
    {"READ", "WRITE", "ALLOC", "FREE", "OPEN", "CLOSE", "PING", "COMPUTE"}
)
SYSCALL_NAME_PATTERN = r"^[A-Z][A-Z0-9_]{0,31}$"
#: default bound on a request's compact JSON encoding, in bytes
DEFAULT_MAX_BYTES = 1 << 20
#: most bytes one READ or WRITE moves
MAX_DATA_BYTES = 65536
MAX_ALLOC_BYTES = 1 << 20
MAX_PING_PAYLOAD_BYTES = 4096
MAX_COMPUTE_ITEMS = 100_000

_NAME_RE = re.compile(SYSCALL_NAME_PATTERN)
_CAPABILITIES: TypeAdapter[list[Capability]] = TypeAdapter(list[Capability])
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


#: made once: `json.dumps` with arguments other than its defaults builds an encoder per call
_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def _json_size(value: object) -> int:
    """Bytes of `value`'s compact JSON encoding; InvalidRequest if it has none."""
    try:
        text = _COMPACT.encode(value)
        return len(text.encode("utf-8", "surrogatepass"))
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidRequest(f"request is not JSON-serialisable: {exc}") from exc


def _short(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def normalise_syscall_name(name: object) -> str:
    """Upper-case a syscall name and check it against `SYSCALL_NAME_PATTERN`."""
    if not isinstance(name, str):
        raise InvalidRequest(f"type must be a string (got {type(name).__name__})")
    upper = name.upper()
    if not _NAME_RE.fullmatch(upper):
        raise InvalidRequest(
            f"type must be 1 to 32 characters: a letter, then letters, digits or '_' (got {_short(name)})"
        )
    return upper


def validate_capabilities(capabilities: Iterable[str]) -> frozenset[str]:
    """Check capability names (lower case, `models.Capability`); InvalidRequest names the bad one."""
    try:
        return frozenset(_CAPABILITIES.validate_python(list(capabilities)))
    except ValidationError as exc:
        raise InvalidRequest(explain("capabilities", exc)) from exc


def check_size(request: Mapping[str, Any], max_bytes: int) -> int:
    """Return the size of `request`'s compact JSON encoding; InvalidRequest above `max_bytes`."""
    size = _json_size(dict(request))
    if size > max_bytes:
        raise InvalidRequest(f"request is {size} bytes of JSON; the limit is {max_bytes}")
    return size


def decode_data(data: str | list[int], encoding: str = "utf-8") -> bytes:
    """WRITE's ``data`` as bytes: a list of byte values, or a string in `encoding`."""
    if isinstance(data, list):
        return bytes(data)
    try:
        if encoding == "hex":
            return bytes.fromhex(data)
        if encoding == "base64":
            return base64.b64decode(data, validate=True)
        return data.encode("utf-8")
    except (ValueError, binascii.Error) as exc:  # UnicodeEncodeError is a ValueError
        raise ValueError(f"data is not valid {encoding}: {exc}") from exc


# ------------------------------------------------------------------ error messages

_TYPE_WORDS = {
    "int": "an integer",
    "float": "a number",
    "string": "a string",
    "list": "a list",
    "dict": "an object",
    "bool": "a boolean",
}


def _field(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "request"


def _bounds(model: type[BaseModel] | None, loc: tuple[int | str, ...]) -> tuple[object, object]:
    """(low, high) bounds declared on a top-level field, from its annotated-types metadata."""
    low: object = None
    high: object = None
    if model is None or len(loc) != 1 or not isinstance(loc[0], str) or loc[0] not in model.model_fields:
        return low, high
    for meta in model.model_fields[loc[0]].metadata:
        for attr in ("ge", "gt", "min_length"):
            low = getattr(meta, attr, low)
        for attr in ("le", "lt", "max_length"):
            high = getattr(meta, attr, high)
    return low, high


def _one(err: ErrorDetails, model: type[BaseModel] | None) -> str:
    kind, loc, ctx = err["type"], err["loc"], err.get("ctx", {})
    name, got = _field(loc), err.get("input")
    if kind == "missing":
        return f"{name} is required"
    if kind == "extra_forbidden":
        allowed = ", ".join(["type", "requires", *(model.model_fields if model else ())])
        return f"unknown field {name!r} (allowed: {allowed})"
    if kind in ("value_error", "assertion_error"):
        return str(ctx.get("error", err["msg"]))
    if kind.endswith(("_type", "_parsing")) or kind == "int_from_float":
        expected = kind.split("_")[0]
        return f"{name} must be {_TYPE_WORDS.get(expected, expected)} (got {type(got).__name__})"
    low, high = _bounds(model, loc)
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        if low is not None and high is not None:
            return f"{name} must be between {low} and {high} (got {_short(got)})"
        op, bound = next(
            (o, ctx[k]) for k, o in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")) if k in ctx
        )
        return f"{name} must be {op} {bound} (got {_short(got)})"
    if kind in ("too_short", "too_long", "string_too_short", "string_too_long"):
        low = ctx.get("min_length", 0) if low is None else low
        high = ctx.get("max_length", "any number of") if high is None else high
        unit = "characters" if kind.startswith("string") else "items"
        length = len(got) if isinstance(got, str | list | dict) else ctx.get("actual_length")
        return f"{name} must have between {low} and {high} {unit} (got {length})"
    if kind == "literal_error":
        return f"{name} must be one of {ctx['expected']} (got {_short(got)})"
    if kind == "finite_number":
        return f"{name} must be a finite number (got {got!r})"
    if kind == "string_pattern_mismatch":
        return f"{name} must match {ctx['pattern']} (got {_short(got)})"
    return f"{name}: {err['msg']} (got {_short(got)})"


def explain(prefix: str, exc: ValidationError, model: type[BaseModel] | None = None) -> str:
    """One readable line for a pydantic error, every problem in it:
    ``PREFIX: field must ... (got ...); other is required``."""
    problems = list(dict.fromkeys(_one(e, model) for e in exc.errors(include_url=False)))
    return f"{prefix}: {'; '.join(problems) or 'invalid'}"


# ------------------------------------------------------------------ the request envelope


class SyscallRequest(BaseModel):
    """The envelope every request shares; a syscall's own arguments are the extra fields."""

    model_config = ConfigDict(extra="allow", strict=True)

    type: str
    #: capabilities a kernel must declare to run this request
    requires: list[Capability] = Field(default_factory=list, max_length=16)

    @field_validator("type", mode="before")
    @classmethod
    def _normalise_type(cls, value: object) -> str:
        return normalise_syscall_name(value)

    @property
    def arguments(self) -> dict[str, Any]:
        """The syscall's own fields: everything except ``type`` and ``requires``."""
        return dict(self.model_extra or {})

    @classmethod
    def parse(cls, request: Mapping[str, Any], *, max_bytes: int = DEFAULT_MAX_BYTES) -> SyscallRequest:
        """Same as `parse_request`."""
        return parse_request(request, max_bytes=max_bytes)


# ------------------------------------------------------------------ builtin argument models


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ReadArgs(_Args):
    address: int = Field(ge=0)
    size: int = Field(ge=1, le=MAX_DATA_BYTES)


class WriteArgs(_Args):
    address: int = Field(ge=0)
    data: str | list[int]
    encoding: Literal["utf-8", "hex", "base64"] = "utf-8"

    @field_validator("data", mode="before")
    @classmethod
    def _data_shape(cls, value: object) -> object:
        if isinstance(value, list):
            for i, item in enumerate(value):
                if type(item) is not int or not 0 <= item <= 255:
                    raise ValueError(f"data[{i}] must be a byte value 0..255 (got {_short(item)})")
        elif not isinstance(value, str):
            raise ValueError(f"data must be a string or a list of byte values (got {type(value).__name__})")
        return value

    @model_validator(mode="after")
    def _fits(self) -> WriteArgs:
        if isinstance(self.data, list) and "encoding" in self.model_fields_set:
            raise ValueError("encoding applies only to string data, not to a list of byte values")
        size = len(self.to_bytes())
        if size > MAX_DATA_BYTES:
            raise ValueError(f"data must be at most {MAX_DATA_BYTES} bytes (got {size})")
        return self

    def to_bytes(self) -> bytes:
        """The bytes to write."""
        return decode_data(self.data, self.encoding)


class AllocArgs(_Args):
    size: int = Field(ge=1, le=MAX_ALLOC_BYTES)


class FreeArgs(_Args):
    address: int = Field(ge=0)


class OpenArgs(_Args):
    path: str = Field(min_length=1, max_length=255)
    mode: Literal["r", "w", "a", "rw"] = "r"

    @field_validator("path")
    @classmethod
    def _printable(cls, value: str) -> str:
        if any(unicodedata.category(c) == "Cc" for c in value):
            raise ValueError(f"path must not contain NUL or control characters (got {_short(value)})")
        return value


class CloseArgs(_Args):
    fd: int = Field(ge=0)


class PingArgs(_Args):
    payload: Any | None = None

    @field_validator("payload")
    @classmethod
    def _small(cls, value: Any) -> Any:
        size = _json_size(value)
        if size > MAX_PING_PAYLOAD_BYTES:
            raise ValueError(f"payload must be at most {MAX_PING_PAYLOAD_BYTES} bytes of JSON (got {size})")
        return value


ComputeOp = Literal["stats", "sum", "mean", "min", "max", "sort", "prod", "variance", "stdev", "dot"]


class ComputeArgs(_Args):
    data: list[FiniteFloat] = Field(min_length=1, max_length=MAX_COMPUTE_ITEMS)
    op: ComputeOp = "stats"
    #: the second vector of ``dot``; same length as `data`
    other: list[FiniteFloat] | None = Field(default=None, max_length=MAX_COMPUTE_ITEMS)

    @model_validator(mode="after")
    def _other(self) -> ComputeArgs:
        if self.op == "dot":
            if self.other is None:
                raise ValueError("op 'dot' needs other: a list of numbers as long as data")
            if len(self.other) != len(self.data):
                raise ValueError(
                    f"other must have as many items as data ({len(self.data)}) (got {len(self.other)})"
                )
        elif self.other is not None:
            raise ValueError(f"other is only used by op 'dot' (op is {self.op!r})")
        return self


ARG_MODELS: Mapping[str, type[BaseModel]] = {
    "READ": ReadArgs,
    "WRITE": WriteArgs,
    "ALLOC": AllocArgs,
    "FREE": FreeArgs,
    "OPEN": OpenArgs,
    "CLOSE": CloseArgs,
    "PING": PingArgs,
    "COMPUTE": ComputeArgs,
}


# ------------------------------------------------------------------ entry points


def parse_request(request: Mapping[str, Any], *, max_bytes: int = DEFAULT_MAX_BYTES) -> SyscallRequest:
    """Validate the envelope of a request: a JSON object with a well-formed ``type``.

    Well-formed but unknown types (a user syscall such as ``INFER``) are accepted; the
    kernel decides whether it runs them. Raises `InvalidRequest` on any problem.
    """
    if not isinstance(request, Mapping):
        raise InvalidRequest(f"request must be a JSON object (got {type(request).__name__})")
    bad_key = next((k for k in request if not isinstance(k, str)), None)
    if bad_key is not None:
        raise InvalidRequest(f"request keys must be strings (got {_short(bad_key)})")
    check_size(request, max_bytes)
    try:
        return SyscallRequest.model_validate(dict(request))
    except ValidationError as exc:
        raw = request.get("type")
        prefix = raw.upper() if isinstance(raw, str) and _NAME_RE.fullmatch(raw.upper()) else "request"
        raise InvalidRequest(explain(prefix, exc)) from exc


def parse_args(req: SyscallRequest) -> BaseModel | None:
    """The builtin's argument model for `req`, or None for a user syscall."""
    model = ARG_MODELS.get(req.type)
    if model is None:
        return None
    try:
        return model.model_validate(req.arguments)
    except ValidationError as exc:
        raise InvalidRequest(explain(req.type, exc, model)) from exc
