"""One `kcp serve` leads at a time, through a TTL lease in Redis; its writes are fenced by it.

Every reconcile decision runs in `LeaderLease.fenced()`: a MULTI/EXEC that WATCHes the lease
key after checking that it still holds our token. If the lease expired or moved to another
instance before EXEC (a slow pass, a paused process), Redis discards the whole transaction,
so a former leader can never overwrite the decisions of the current one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator

from controlplane.protocol import stats
from controlplane.protocol.keys import Keys
from controlplane.redis.connect import AsyncPipeline, AsyncRedis
from controlplane.redis.scripts.kernels import leader
from controlplane.redis.transaction import Conflict, watch_conflicts

logger = logging.getLogger(__name__)


class NotLeader(Exception):
    """Internal: this instance no longer holds the leader lease; the pass stops here."""


def begin_writes(pipe: AsyncPipeline) -> None:
    """Switch a `fenced(..., multi=False)` pipeline from reading to queueing writes (MULTI)."""
    pipe.multi()  # type: ignore[no-untyped-call]


class LeaderLease:
    """Take, renew and release `{prefix}leader`. Renew well within the TTL."""

    def __init__(self, redis: AsyncRedis, keys: Keys, ttl: float, *, token: str | None = None) -> None:
        self.redis = redis
        self.keys = keys
        self.ttl = ttl
        self.ttl_ms = max(int(ttl * 1000), 1)
        # host:pid:random, so `redis-cli GET kcp:leader` tells an operator who leads
        self.token = token or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self.leading = False
        self._renewed_at = 0.0

    async def acquire(self) -> bool:
        """Take or renew the lease; True while we lead."""
        leading = await leader(self.keys, token=self.token, ttl_ms=self.ttl_ms).run(self.redis)
        if leading != self.leading:
            logger.info("%s leadership (token %s)", "took" if leading else "lost", self.token)
        self.leading = leading
        if leading:
            self._renewed_at = time.monotonic()
        return leading

    async def release(self) -> None:
        await leader(self.keys, token=self.token, ttl_ms=0).run(self.redis)
        self.leading = False

    @contextlib.asynccontextmanager
    async def fenced(self, *watch: str, multi: bool = True) -> AsyncIterator[AsyncPipeline]:
        """A transaction that commits only while we still lead.

        Yields a pipeline that WATCHes the lease (and the `watch` keys) in MULTI mode: the caller
        queues its writes and awaits `pipe.execute()`. With `multi=False` the pipeline is still in
        immediate mode, so the caller can read the watched keys first, then `begin_writes(pipe)`.
        Raises `NotLeader` when the lease is not ours, or stopped being ours before EXEC (nothing
        is written then); `Conflict` when only a watched key changed."""
        if not self.leading:
            raise NotLeader("not leading")
        if time.monotonic() - self._renewed_at > self.ttl / 3 and not await self.acquire():
            raise NotLeader("lease lost during the pass")
        key = self.keys.leader()
        async with self.redis.pipeline(transaction=True) as pipe:
            await pipe.watch(key, *watch)
            if await pipe.get(key) != self.token:
                self.leading = False
                raise NotLeader("lease held by another instance")
            if multi:
                begin_writes(pipe)
            try:
                async with watch_conflicts():
                    yield pipe
            except Conflict:
                holder = await self.redis.get(key)
                if holder == self.token:  # only a watched record changed: the caller's decision is stale
                    raise
                self.leading = False
                await self.redis.hincrby(self.keys.reliability(), stats.LEADER_FENCED_WRITES, 1)
                raise NotLeader("lease lost before the write") from None
