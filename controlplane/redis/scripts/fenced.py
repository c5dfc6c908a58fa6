"""The leader's writes to one cluster as one fence.lua call: refused, whole, once a newer leader
wrote to the cluster (its term in `cluster:{c}:term` is higher than the caller's).

`FencedWrite` is built like a pipeline, with the few commands the reconciler needs; every key
is declared (KEYS), so the call stays in the cluster's slot on Redis Cluster.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from controlplane.protocol.keys import Keys
from controlplane.redis.lua import Script
from controlplane.redis.scripts.call import Arg, Call

FENCE = Script.load("fence")


class Fence(enum.Enum):
    """fence.lua's reply."""

    OK = "ok"  # written
    FENCED = "fenced"  # a newer leader wrote to the cluster: nothing written
    GUARDED = "guarded"  # the guard field was absent or held the forbidden value: nothing written


class FencedWrite:
    """Writes to the keys of `cluster`, sent by `call(term)` as one fence.lua call."""

    def __init__(self, keys: Keys, cluster: str) -> None:
        self._keys: list[str] = [keys.cluster_term(cluster)]
        self._index: dict[str, int] = {}
        self._ops: list[Arg] = []
        self._guard: tuple[int, str, str] = (0, "", "")

    def _key(self, key: str) -> int:
        if key not in self._index:
            self._keys.append(key)
            self._index[key] = len(self._keys)  # Lua's KEYS is 1-based
        return self._index[key]

    def _op(self, command: str, *items: tuple[bool, Arg]) -> FencedWrite:
        self._ops += [command, len(items)]
        for is_key, value in items:
            self._ops += ["k", self._key(str(value))] if is_key else ["a", value]
        return self

    def guard(self, key: str, field: str, forbidden: str) -> FencedWrite:
        """Write nothing when the hash `key` lacks `field` or holds `forbidden` in it."""
        self._guard = (self._key(key), field, forbidden)
        return self

    def hset(self, key: str, mapping: Mapping[str, Arg]) -> FencedWrite:
        pairs = [(False, v) for f, value in mapping.items() for v in (f, value)]
        return self._op("HSET", (True, key), *pairs)

    def hdel(self, key: str, *fields: str) -> FencedWrite:
        return self._op("HDEL", (True, key), *((False, f) for f in fields))

    def delete(self, *keys: str) -> FencedWrite:
        return self._op("DEL", *((True, k) for k in keys))

    def sadd(self, key: str, *members: str) -> FencedWrite:
        return self._op("SADD", (True, key), *((False, m) for m in members))

    def srem(self, key: str, *members: str) -> FencedWrite:
        return self._op("SREM", (True, key), *((False, m) for m in members))

    def zrem(self, key: str, *members: str) -> FencedWrite:
        return self._op("ZREM", (True, key), *((False, m) for m in members))

    def incr(self, key: str) -> FencedWrite:
        return self._op("INCR", (True, key))

    def rpush(self, key: str, *values: str) -> FencedWrite:
        return self._op("RPUSH", (True, key), *((False, v) for v in values))

    def pexpire(self, key: str, ms: int) -> FencedWrite:
        return self._op("PEXPIRE", (True, key), (False, ms))

    def hfold(self, src: str, dst: str) -> FencedWrite:
        """Add every counter of hash `src` to hash `dst` (field by field), then delete `src`."""
        return self._op("HFOLD", (True, src), (True, dst))

    def zunionstore_min(self, dest: str, *sources: str) -> FencedWrite:
        """`dest` := the union of `sources` (the lowest score of a member kept)."""
        keys = [(True, s) for s in sources]
        return self._op(
            "ZUNIONSTORE", (True, dest), (False, len(sources)), *keys, (False, "AGGREGATE"), (False, "MIN")
        )

    def call(self, term: int) -> Call[Fence]:
        """The fence.lua call for a leader in `term`; with no writes it only raises the term."""
        guard, field, forbidden = self._guard
        return Call(FENCE, self._keys, [term, guard, field, forbidden, *self._ops], Fence)
