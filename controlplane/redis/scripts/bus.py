"""The bus's scripts: append a batch of messages to a stream, trim a stream."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from controlplane.protocol.keys import Keys
from controlplane.redis.lua import Script
from controlplane.redis.scripts.call import Call

BUS_PUBLISH = Script.load("bus_publish")
BUS_TRIM = Script.load("bus_trim")


@dataclass(frozen=True, slots=True)
class Appended:
    first_seq: int  # message i got sequence first_seq + i
    ids: Sequence[str]  # the entries' stream ids, in order (as the client decodes them)


def bus_publish(keys: Keys, stream: str, *, target: str, topic: str, batch: bytes) -> Call[Appended | None]:
    """bus_publish.lua: append `batch` (a JSON array of messages) to `stream`; with `target`,
    only while that kernel is registered, i.e. its inbox exists (None: nothing written)."""
    klist = [stream, keys.bus_seq(stream)]
    return Call(BUS_PUBLISH, klist, [target, topic, batch], _appended)


def _appended(reply: Any) -> Appended | None:
    first = int(reply[0])
    return None if first < 0 else Appended(first, reply[1:])


@dataclass(frozen=True, slots=True)
class Trimmed:
    safely: int  # entries every group had read and acknowledged
    by_cap: int  # entries dropped by the hard cap, read or not


def bus_trim(keys: Keys, stream: str, *, keep: int, cap: int, label: str) -> Call[Trimmed]:
    """bus_trim.lua: trim `stream` below its slowest group past `keep` entries, then to `cap`
    (counting what each group lost under `label`, in the stream's `bus_gaps` hash)."""
    return Call(BUS_TRIM, [stream, keys.bus_gaps(stream)], [keep, cap, label], _trimmed)


def _trimmed(reply: Any) -> Trimmed:
    safely, by_cap = reply
    return Trimmed(int(safely), int(by_cap))
