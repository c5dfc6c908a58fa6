"""One `kcp serve` leads at a time, through a TTL lease in Redis; its writes are fenced by terms.

Taking the lease afresh hands out a new, higher term (leader.lua INCRs `leader:term`). Every
leader write to a cluster's keys is one fence.lua call in the cluster's slot
(`LeaderLease.commit`): it is refused, whole, when the cluster's stored term
(`cluster:{c}:term`) is above the caller's, and otherwise lifts it to the caller's. A new leader
lifts the term of every cluster before it reads what it decides on (`raise_terms`), so from then
on nothing a deposed leader sends to that cluster is written. No MULTI/EXEC and no WATCH of a
global key: each write stays in one slot (Redis Cluster). docs/reliability.md has the argument.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Iterable

from controlplane.protocol import stats
from controlplane.protocol.keys import Keys
from controlplane.redis.connect import AsyncRedis
from controlplane.redis.errors import amap_redis_errors
from controlplane.redis.scripts.fenced import Fence, FencedWrite
from controlplane.redis.scripts.kernels import leader

logger = logging.getLogger(__name__)


class NotLeader(Exception):
    """Internal: this instance no longer holds the leader lease; the pass stops here."""


class LeaderLease:
    """Take, renew and release `{prefix}leader`. Renew well within the TTL."""

    def __init__(self, redis: AsyncRedis, keys: Keys, ttl: float, *, token: str | None = None) -> None:
        self.redis = redis
        self.keys = keys
        self.ttl = ttl
        self.ttl_ms = max(int(ttl * 1000), 1)
        # host:pid:random, so `redis-cli GET kcp:leader` tells an operator who leads
        self.token = token or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self.term = 0  # the term we lead in; 0 while we do not
        self._renewed_at = 0.0

    @property
    def leading(self) -> bool:
        return self.term > 0

    async def acquire(self) -> bool:
        """Take or renew the lease; True while we lead. A lease taken afresh comes with a new
        term: the caller lifts the clusters' terms (`raise_terms`) before deciding anything."""
        term = await leader(self.keys, token=self.token, ttl_ms=self.ttl_ms, term=self.term).run(self.redis)
        if term != self.term:
            logger.info("%s leadership (token %s, term %d)", "took" if term else "lost", self.token, term)
        self.term = term
        if term:
            self._renewed_at = time.monotonic()
        return self.leading

    async def release(self) -> None:
        await leader(self.keys, token=self.token, ttl_ms=0).run(self.redis)
        self.term = 0

    def write(self, cluster: str) -> FencedWrite:
        """A fenced write to `cluster`'s keys; send it with `commit`."""
        return FencedWrite(self.keys, cluster)

    async def check(self) -> int:
        """Our term, the lease renewed if due; raises `NotLeader` when we do not lead."""
        if not self.leading:
            raise NotLeader("not leading")
        if time.monotonic() - self._renewed_at > self.ttl / 3 and not await self.acquire():
            raise NotLeader("lease lost during the pass")
        return self.term

    async def commit(self, write: FencedWrite) -> Fence:
        """Send `write` in our term: `Fence.OK` (written) or `Fence.GUARDED` (its guard refused;
        nothing written). Raises `NotLeader` when a newer leader wrote to the cluster (nothing
        written; counted in `leader_fenced_writes_total`)."""
        term = await self.check()
        async with amap_redis_errors():
            result = await write.call(term).run(self.redis)
        if result is Fence.FENCED:
            await self._deposed(1)
        return result

    async def raise_terms(self, clusters: Iterable[str]) -> None:
        """Lift the term of `clusters` to ours (pipelined, not a transaction: each call is one
        script on its own cluster's slot, atomic by itself, and the calls are independent)."""
        term = await self.check()
        calls = [FencedWrite(self.keys, c).call(term) for c in clusters]
        if not calls:
            return
        async with amap_redis_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                for call in calls:
                    pipe.execute_command(*call.command)
                replies = await pipe.execute(raise_on_error=False)
            results = [
                await call.settle(reply, self.redis) for call, reply in zip(calls, replies, strict=True)
            ]
        if fenced := sum(r is Fence.FENCED for r in results):
            await self._deposed(fenced)

    async def _deposed(self, writes: int) -> None:
        self.term = 0
        await self.redis.hincrby(self.keys.reliability(), stats.LEADER_FENCED_WRITES, writes)
        raise NotLeader("a newer leader took over: write refused")
