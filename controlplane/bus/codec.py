"""Bus messages as flat stream fields, readable with `redis-cli XRANGE`, and the bus settings.

An entry of a topic stream or an inbox stream is a flat field list::

    seq 42  from kernel-1  topic events  ts 1764063312.123456  payload {"event":"ready"}
    [to kernel-2]  [corr 9f0c...  reply_to kernel-1  deadline 1764063317.1]  [kind reply]

`seq` is the stream's own dense sequence (added by `bus_publish.lua`), `ts` the sender's
wall clock in unix seconds and `payload` a JSON object. The optional fields appear on direct
messages (`to`) and on requests and replies (`corr`, `reply_to`, `deadline`, `kind`).
"""

from __future__ import annotations

import json
import re
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from controlplane.errors import InvalidRequest
from controlplane.protocol.models import NAME_PATTERN, BusMessage, BusTopic

_NAME = re.compile(NAME_PATTERN)
_TOPICS = {t.value: t for t in BusTopic}
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_quote = json.encoder.encode_basestring  # a str as a JSON string (the C implementation)
_scan = json.JSONDecoder().scan_once  # type: ignore[attr-defined]  # the C scanner, set in __init__


def _loads(text: str) -> Any:
    """`json.loads` for the compact JSON the bus writes, without its wrapper's cost; anything else
    (whitespace around it, say, from a hand-written `XADD`) goes through `json.loads`."""
    try:
        value, end = _scan(text, 0)
    except StopIteration:
        return json.loads(text)
    return value if end == len(text) else json.loads(text)


class BusConfig(BaseModel):
    """How the bus reads, retries, trims and batches. Durations in seconds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    read_count: int = Field(1000, ge=1, le=100_000, description="entries per XREADGROUP")
    block: float = Field(5.0, gt=0, le=5.0, description="longest blocking read")
    claim_idle: float = Field(
        5.0, gt=0, le=3600, description="an entry pending this long is reclaimed (XAUTOCLAIM) and retried"
    )
    max_deliveries: int = Field(5, ge=1, le=1000, description="deliveries before an entry is dead-lettered")
    keep: int = Field(1000, ge=0, description="entries a stream keeps before safe trimming starts")
    max_len: int = Field(
        100_000, ge=1, description="hard cap per stream; entries past it are counted as gaps"
    )
    trim_every: int = Field(1000, ge=1, description="entries appended to a stream between two trims")
    publish_batch: int = Field(1000, ge=1, le=100_000, description="messages per publish round trip")
    lease_ttl: float = Field(
        5.0, gt=0, le=600, description="lease of a kernel served by a bus process (renewed every third), s"
    )
    max_message_bytes: int = Field(1 << 20, ge=64, description="largest accepted payload (JSON bytes)")
    dead_max_len: int = Field(10_000, ge=1, description="approximate cap of the dead-letter stream")
    stop_grace: float = Field(5.0, ge=0, le=600, description="time a closing bus lets handlers finish")


class ReceivedMessage(BusMessage):
    """A `BusMessage` as a handler receives it: where it came from and how often it was delivered."""

    id: str = ""
    seq: int = 0
    deliveries: int = 1
    correlation_id: str | None = None
    reply_to: str | None = None
    deadline: float | None = None
    kind: str = "message"

    @property
    def is_request(self) -> bool:
        return self.reply_to is not None and self.kind == "request"


class Published(NamedTuple):
    """Where a published message landed: its stream entry id and its sequence number in that stream.

    (A named tuple: one is built per message published, at half the cost of a frozen dataclass.)"""

    id: str
    seq: int


def check_name(name: object, what: str = "kernel name") -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidRequest(f"invalid {what} {name!r}: expected {NAME_PATTERN}")
    return name


def check_topic(topic: object) -> BusTopic:
    found = _TOPICS.get(topic.value if isinstance(topic, BusTopic) else str(topic))
    if found is None:
        raise InvalidRequest(f"unknown topic {topic!r}: expected one of {', '.join(_TOPICS)}")
    return found


def encode(message: BusMessage, max_bytes: int, *, extra: dict[str, str] | None = None) -> bytes:
    """The message as one row of `bus_publish.lua`'s JSON batch: [from, ts, payload, to, k, v, ...].

    (The topic is one argument per batch.) Raises InvalidRequest for anything that is not a
    BusMessage with a JSON-serializable payload within `max_bytes`."""
    if not isinstance(message, BusMessage):
        raise InvalidRequest(f"expected a BusMessage, got {type(message).__name__}")
    payload = message.payload
    if not isinstance(payload, dict):
        raise InvalidRequest("payload must be a JSON object (a dict)")
    try:
        encoded = _dumps(payload)
        row = [str(message.from_kernel), repr(float(message.timestamp)), encoded, message.to_kernel or ""]
        if extra:
            for field, value in extra.items():
                row += [field, value]
        data = ("[" + ",".join(map(_quote, row)) + "]").encode()
    except (TypeError, ValueError) as exc:  # UnicodeEncodeError (a lone surrogate) is a ValueError
        raise InvalidRequest(f"payload is not JSON-serializable: {exc}") from None
    if len(encoded) > max_bytes:
        raise InvalidRequest(f"payload is {len(encoded)} bytes, above the {max_bytes}-byte limit")
    return data


#: An entry's fields as redis-py parses them (a dict), or raw (a flat list, as the consumer reads them).
Fields = dict[str, str] | list[str]
#: The field layout of a plain topic message, as `bus_publish.lua` writes it.
_PLAIN = ("seq", "from", "topic", "ts", "payload")


def as_dict(fields: Fields) -> dict[str, str]:
    if isinstance(fields, dict):
        return fields
    it = iter(fields)
    return dict(zip(it, it, strict=False))


def decode(entry_id: str, fields: Fields, deliveries: int = 1) -> ReceivedMessage:
    """A stream entry as a message, without pydantic validation (hot path). ValueError if malformed."""
    if type(fields) is list and len(fields) == 10 and tuple(fields[0::2]) == _PLAIN:
        data: dict[str, Any]
        try:  # the common case, straight from the flat list
            payload = _loads(fields[9])
            data = {
                "from_kernel": fields[3],
                "topic": _TOPICS[fields[5]],
                "payload": payload,
                "to_kernel": None,
                "timestamp": float(fields[7]),
                "id": entry_id,
                "seq": int(fields[1]),
                "deliveries": deliveries,
                "correlation_id": None,
                "reply_to": None,
                "deadline": None,
                "kind": "message",
            }
        except (KeyError, TypeError, ValueError, RecursionError) as exc:
            raise ValueError(f"malformed bus entry {entry_id}: {exc!r}") from None
        if not isinstance(payload, dict):
            raise ValueError(f"malformed bus entry {entry_id}: payload is not a JSON object")
        return _construct(data)
    fields = as_dict(fields)
    try:
        payload = _loads(fields["payload"])
        topic = _TOPICS[fields["topic"]]
        data = {
            "from_kernel": fields["from"],
            "topic": topic,
            "payload": payload,
            "to_kernel": fields.get("to"),
            "timestamp": float(fields["ts"]),
            "id": entry_id,
            "seq": int(fields["seq"]),
            "deliveries": deliveries,
            "correlation_id": fields.get("corr"),
            "reply_to": fields.get("reply_to"),
            "deadline": float(fields["deadline"]) if "deadline" in fields else None,
            "kind": fields.get("kind", "message"),
        }
    except (KeyError, TypeError, ValueError, RecursionError) as exc:  # RecursionError: nested JSON
        raise ValueError(f"malformed bus entry {entry_id}: {exc!r}") from None
    if not isinstance(payload, dict):
        raise ValueError(f"malformed bus entry {entry_id}: payload is not a JSON object")
    return _construct(data)


_FIELDS_SET = frozenset(ReceivedMessage.model_fields)
_new = object.__new__
_set = object.__setattr__


def _construct(data: dict[str, Any]) -> ReceivedMessage:
    """`ReceivedMessage.model_construct(**data)` for a complete `data`, without its per-call overhead
    (it dominated the consumer's per-message cost). Every field is set, so the instance is whole."""
    message: ReceivedMessage = _new(ReceivedMessage)
    _set(message, "__dict__", data)
    _set(message, "__pydantic_fields_set__", set(_FIELDS_SET))
    _set(message, "__pydantic_extra__", None)
    _set(message, "__pydantic_private__", None)
    return message
