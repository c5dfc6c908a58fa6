"""Cluster, kernel, agent and load records in Redis: read and write them through their models.

What a record holds and how its fields are parsed is `controlplane.protocol.records`; this
module only moves them. A malformed record is logged and skipped there, never fatal.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import redis.asyncio as aioredis

from controlplane.errors import ClusterExists, ClusterNotFound
from controlplane.protocol.keys import Keys
from controlplane.protocol.models import ClusterConfig, ClusterStatus, KernelLoad
from controlplane.protocol.records import AgentRecord, ClusterRecord, KernelRecord, LoadRecord
from controlplane.redis import portable
from controlplane.redis.connect import AsyncPipeline
from controlplane.redis.errors import amap_redis_errors
from controlplane.redis.scripts import jobs


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
            if not await self.redis.hsetnx(key, ClusterRecord.NAME, name):
                raise ClusterExists(name)

            # not a transaction (several slots); ordered: the record and its version before the
            # cluster set and the wake, so the leader never reads a listed cluster half-written
            def record_(pipe: AsyncPipeline) -> None:
                pipe.hset(key, mapping=record.to_fields())
                # a new cluster's versions start at the clock (ms), so one created again under a
                # destroyed one's name never repeats a version a reader cached
                pipe.set(self.keys.cluster_version(name), now_ms())

            def listed(pipe: AsyncPipeline) -> None:
                pipe.sadd(self.keys.clusters(), name)
                pipe.lpush(self.keys.service_wake(), f"cluster {name}")  # the leader re-reads the set

            await portable.in_order(self.redis, record_, listed)
        return record

    async def get_cluster(self, name: str) -> ClusterRecord | None:
        key = self.keys.cluster(name)
        async with amap_redis_errors():
            fields = await self.redis.hgetall(key)
        return ClusterRecord.from_fields(fields, key)

    async def has_leader(self) -> bool:
        """Whether a `kcp serve` holds the leader lease (something will act on the clusters)."""
        async with amap_redis_errors():
            return bool(await self.redis.exists(self.keys.leader()))

    async def deferred_heads(self) -> dict[str, float]:
        """Each cluster that has deferred arq jobs, and when its earliest one is due (unix ms):
        two round trips, one command per cluster."""
        async with amap_redis_errors():
            names = sorted(await self.redis.smembers(self.keys.clusters()))
            async with self.redis.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.zrange(self.keys.cluster_deferred(name), 0, 0, withscores=True)
                heads = await pipe.execute()
        return {name: float(head[0][1]) for name, head in zip(names, heads, strict=True) if head}

    async def require_cluster(self, name: str) -> ClusterRecord:
        record = await self.get_cluster(name)
        if record is None or record.status is ClusterStatus.STOPPED:
            raise ClusterNotFound(name)
        return record

    async def list_clusters(self) -> list[ClusterRecord]:
        async with amap_redis_errors():
            names = sorted(await self.redis.smembers(self.keys.clusters()))
        return await self.clusters(names)

    async def clusters(self, names: Sequence[str]) -> list[ClusterRecord]:
        """The records of `names`, in that order; absent or malformed ones left out."""
        if not names:
            return []
        async with amap_redis_errors(), self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(self.keys.cluster(name))
            rows = await pipe.execute()
        records = (
            ClusterRecord.from_fields(fields, self.keys.cluster(n))
            for n, fields in zip(names, rows, strict=True)
        )
        return [r for r in records if r is not None]

    async def update_cluster(self, name: str, **fields: str | int | float) -> None:
        """Set some fields of the cluster record (names checked against `ClusterRecord`)."""
        # not a transaction: the record first, then the version that tells readers it moved
        async with amap_redis_errors(), self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(self.keys.cluster(name), mapping=ClusterRecord.fields(**fields))
            pipe.incr(self.keys.cluster_version(name))  # routing and the leader see it moved
            await pipe.execute()

    async def cluster_stats(self, name: str) -> dict[str, float]:
        """The cluster's counters: its events, and its kernels' dispatch counters summed
        (`stats.totals`), DISPATCHES and ERRORS among them."""
        async with amap_redis_errors():
            read = await jobs.read_stats(self.keys, name).run(self.redis)
        return read.totals(self.keys, name)

    # ------------------------------------------------------------ kernels
    async def kernels(self, cluster: str) -> list[KernelRecord]:
        """The cluster's kernel records, ordered by index (worker-0 first)."""
        return (await self.kernels_of([cluster]))[cluster]

    async def kernels_of(self, clusters: Sequence[str]) -> dict[str, list[KernelRecord]]:
        """`kernels` of each of `clusters`, in two round trips however many they are."""
        async with amap_redis_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                for cluster in clusters:
                    pipe.smembers(self.keys.cluster_kernels(cluster))
                members = await pipe.execute()
            refs = [(c, name) for c, names in zip(clusters, members, strict=True) for name in sorted(names)]
            async with self.redis.pipeline(transaction=False) as pipe:
                for cluster, name in refs:
                    pipe.hgetall(self.keys.kernel(cluster, name))
                rows = await pipe.execute()
        out: dict[str, list[KernelRecord]] = {c: [] for c in clusters}
        for (cluster, name), fields in zip(refs, rows, strict=True):
            record = KernelRecord.from_fields(fields, self.keys.kernel(cluster, name))
            if record is not None:
                out[cluster].append(record)
        for records in out.values():
            records.sort(key=lambda r: (r.index, r.name))
        return out

    async def loads(self, kernels: Sequence[KernelRecord]) -> dict[str, KernelLoad]:
        """Fresh load records of `kernels` by kernel name (expired ones are simply absent)."""
        return {name: r.to_load(name) for name, r in (await self.load_records(kernels)).items()}

    async def load_records(self, kernels: Sequence[KernelRecord]) -> dict[str, LoadRecord]:
        """`loads` as stored (with what the spec's `KernelLoad` has no field for)."""
        async with amap_redis_errors(), self.redis.pipeline(transaction=False) as pipe:
            for k in kernels:
                pipe.hgetall(self.keys.load(k.agent, k.cluster, k.name))
            rows = await pipe.execute()
        out: dict[str, LoadRecord] = {}
        for k, fields in zip(kernels, rows, strict=True):
            load = LoadRecord.from_fields(fields, k.name)
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
            record = AgentRecord.from_fields(rows[2 * i], self.keys.agent(name))
            if record is not None:
                out.append((record, bool(rows[2 * i + 1])))
        return out


async def clock_offset(redis: aioredis.Redis) -> float:
    """Redis `TIME` minus `time.monotonic()`, ms, taken at the middle of the round trip: add it to
    `time.monotonic() * 1000` to read Redis's clock without asking it again."""
    sent = time.monotonic()
    async with amap_redis_errors():
        seconds, micros = await redis.time()
    back = time.monotonic()
    return float(seconds) * 1000 + float(micros) / 1000 - (sent + back) * 500


def now_ms() -> int:
    return int(time.time() * 1000)
