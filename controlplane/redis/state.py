"""Cluster, kernel and agent records in Redis: read, parse, write.

Records are hashes of plain fields (the cluster config is one JSON field) so `redis-cli
HGETALL` reads them. Everything read is validated; a malformed record is logged and
skipped, never fatal.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any, TypeVar

import pydantic
import redis.asyncio as aioredis

from controlplane.errors import ClusterExists, ClusterNotFound
from controlplane.protocol.keys import ASSIGN_DRAIN, ASSIGN_RUN, Keys
from controlplane.protocol.models import (
    NAME_PATTERN,
    AgentRecord,
    ClusterConfig,
    ClusterRecord,
    ClusterStatus,
    KernelLoad,
    KernelRecord,
)
from controlplane.redis.errors import amap_redis_errors

logger = logging.getLogger(__name__)

T = TypeVar("T", bound=pydantic.BaseModel)


#: Entries read from Redis that failed validation and were skipped, by kind (this process).
MALFORMED: Counter[str] = Counter()
#: Largest cluster `config` JSON parsed, bytes (a real one is about 150).
MAX_CONFIG_BYTES = 65536
_REF = re.compile(f"{NAME_PATTERN[:-1]}/{NAME_PATTERN[1:]}")


def skip_malformed(kind: str, key: str, why: object) -> None:
    """Log and count an entry that is skipped because it does not parse (never fatal)."""
    MALFORMED[kind] += 1
    logger.warning("skipping malformed %s %s: %.300s", kind, key, why)


def _parse(model: type[T], fields: dict[str, Any], key: str) -> T | None:
    if not fields:
        return None
    try:
        return model.model_validate(fields)
    except pydantic.ValidationError as exc:  # the input is left out: it may be huge
        skip_malformed(model.__name__, key, exc.errors(include_url=False, include_input=False)[:3])
        return None


def parse_counters(fields: dict[str, str], key: str) -> dict[str, float]:
    """A stats hash as finite numbers; a field that is not one is skipped."""
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


def parse_assignment(fields: dict[str, str], key: str) -> dict[str, str]:
    """An agent's assignment hash (``cluster/kernel`` -> ``run`` | ``drain``), malformed fields skipped."""
    out: dict[str, str] = {}
    for ref, wanted in fields.items():
        if _REF.fullmatch(ref) and wanted in (ASSIGN_RUN, ASSIGN_DRAIN):
            out[ref] = wanted
        else:
            skip_malformed("assignment", f"{key} {ref!r:.100}", f"value {wanted!r:.80}")
    return out


def encode(record: pydantic.BaseModel) -> dict[str, str]:
    """A record as hash fields: plain values as strings, nested models as JSON."""
    out: dict[str, str] = {}
    for name, value in record.model_dump(mode="json").items():
        if isinstance(value, dict | list):
            out[name] = json.dumps(value, separators=(",", ":"))
        elif isinstance(value, bool):
            out[name] = "1" if value else "0"
        else:
            out[name] = str(value)
    return out


def parse_cluster(fields: dict[str, Any], key: str) -> ClusterRecord | None:
    if "config" in fields:
        try:
            if len(fields["config"]) > MAX_CONFIG_BYTES:
                raise ValueError(f"config is {len(fields['config'])} bytes")
            fields = {**fields, "config": json.loads(fields["config"])}
        except ValueError as exc:
            skip_malformed("ClusterRecord", key, f"config is not JSON: {exc}")
            return None
        except RecursionError:
            skip_malformed("ClusterRecord", key, "config nests too deeply")
            return None
    return _parse(ClusterRecord, fields, key)


class State:
    """Typed access to the records. Takes a client; owns nothing."""

    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys

    # ------------------------------------------------------------ clusters
    async def create_cluster(self, name: str, config: ClusterConfig, desired: int) -> ClusterRecord:
        """Create the cluster record; `ClusterExists` if the name is taken (atomic on HSETNX)."""
        record = ClusterRecord(name=name, config=config, desired=desired)
        key = self.keys.cluster(name)
        async with amap_redis_errors():
            if not await self.redis.hsetnx(key, "name", name):
                raise ClusterExists(name)
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(key, mapping=encode(record))
                pipe.sadd(self.keys.clusters(), name)
                await pipe.execute()
        return record

    async def get_cluster(self, name: str) -> ClusterRecord | None:
        key = self.keys.cluster(name)
        async with amap_redis_errors():
            fields = await self.redis.hgetall(key)
        return parse_cluster(fields, key)

    async def require_cluster(self, name: str) -> ClusterRecord:
        record = await self.get_cluster(name)
        if record is None or record.status is ClusterStatus.STOPPED:
            raise ClusterNotFound(name)
        return record

    async def list_clusters(self) -> list[ClusterRecord]:
        async with amap_redis_errors():
            names = sorted(await self.redis.smembers(self.keys.clusters()))
            async with self.redis.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.hgetall(self.keys.cluster(name))
                rows = await pipe.execute()
        records = (parse_cluster(fields, self.keys.cluster(n)) for n, fields in zip(names, rows, strict=True))
        return [r for r in records if r is not None]

    async def update_cluster(self, name: str, **fields: str | int | float) -> None:
        async with amap_redis_errors():
            await self.redis.hset(self.keys.cluster(name), mapping={k: str(v) for k, v in fields.items()})

    async def cluster_stats(self, name: str) -> dict[str, float]:
        async with amap_redis_errors():
            raw = await self.redis.hgetall(self.keys.cluster_stats(name))
        return parse_counters(raw, self.keys.cluster_stats(name))

    # ------------------------------------------------------------ kernels
    async def kernels(self, cluster: str) -> list[KernelRecord]:
        """The cluster's kernel records, ordered by index (worker-0 first)."""
        async with amap_redis_errors():
            names = sorted(await self.redis.smembers(self.keys.cluster_kernels(cluster)))
            async with self.redis.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.hgetall(self.keys.kernel(cluster, name))
                rows = await pipe.execute()
        records = [
            _parse(KernelRecord, fields, self.keys.kernel(cluster, name))
            for name, fields in zip(names, rows, strict=True)
        ]
        return sorted((r for r in records if r is not None), key=lambda r: (r.index, r.name))

    async def loads(self, kernels: Sequence[KernelRecord]) -> dict[str, KernelLoad]:
        """Fresh load records of `kernels` by kernel name (expired ones are simply absent)."""
        async with amap_redis_errors(), self.redis.pipeline(transaction=False) as pipe:
            for k in kernels:
                pipe.hgetall(self.keys.load(k.agent, k.cluster, k.name))
            rows = await pipe.execute()
        out: dict[str, KernelLoad] = {}
        for k, fields in zip(kernels, rows, strict=True):
            load = _parse(KernelLoad, {**fields, "name": k.name} if fields else {}, k.name)
            if load is not None:
                out[k.name] = load
        return out

    # ------------------------------------------------------------ agents
    async def agents(self) -> list[tuple[AgentRecord, bool]]:
        """Every registered agent and whether its lease is alive."""
        async with amap_redis_errors():
            names = sorted(await self.redis.smembers(self.keys.agents()))
            async with self.redis.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.hgetall(self.keys.agent(name))
                    pipe.exists(self.keys.agent_lease(name))
                rows = await pipe.execute()
        out = []
        for i, name in enumerate(names):
            record = _parse(AgentRecord, rows[2 * i], self.keys.agent(name))
            if record is not None:
                out.append((record, bool(rows[2 * i + 1])))
        return out


def now_ms() -> int:
    return int(time.time() * 1000)
