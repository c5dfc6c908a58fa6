"""The agent's heartbeat: a dedicated thread, event loop and Redis connection.

Leases are the only liveness signal the control plane trusts, so renewing them must not
wait behind anything else the agent does (spawning kernels, sampling load, a slow Redis
reply on the main connection). The thread sends ONE command every `heartbeat_interval`,
whatever the number of kernels: ``SET agent:{name}:lease "{beat_ms} {version}" PX lease_ttl``.

- `beat_ms` is the beat's time in Redis's clock: the thread measures its offset to Redis
  `TIME` when it starts and every `CLOCK_RESYNC` seconds, so the leader compares every
  agent's last beat with its own reading of the same clock (suspects, detection time).
- `version` is the agent's state version (`version()`): it changes when the agent's record or
  its running kernels (`agent:{name}:running`) change, so the leader re-reads them only then.

Kernels have no lease of their own: a kernel is alive while its agent is and its process is
listed in `agent:{name}:running`, which the main loop rewrites when a process starts or exits.

It stops renewing when the agent's main loop has made no progress for `stall_after` seconds,
so a wedged agent is declared dead instead of being kept alive by its heartbeat alone.

A failed renewal (Redis down, restarting, still loading its data) is retried at least once per
`heartbeat_interval` however long the outage lasts (`Backoff.within`): the leader withholds
deaths for one lease TTL plus one heartbeat interval after Redis answers again, and a live agent
must renew inside that window (docs/reliability.md, "The decision rule").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable

from controlplane.errors import RedisError, RedisUnavailable
from controlplane.protocol.keys import Keys
from controlplane.protocol.records import AgentLease
from controlplane.redis import portable
from controlplane.redis.connect import AsyncRedis, connect
from controlplane.redis.errors import redis_said
from controlplane.redis.retry import Backoff, periodically
from controlplane.redis.state import clock_offset

logger = logging.getLogger(__name__)

#: How often the heartbeat re-measures its offset to Redis's clock, seconds.
CLOCK_RESYNC = 60.0


class Heartbeat:
    """Start with `start()`; `stop()` joins the thread. `touch()` marks main-loop progress."""

    def __init__(
        self,
        *,
        redis_url: str,
        keys: Keys,
        agent: str,
        interval: float,
        ttl: float,
        version: Callable[[], str],
        stall_after: float,
    ) -> None:
        self.redis_url = redis_url
        self.keys = keys
        self.agent = agent
        self.interval = interval
        self.ttl_ms = max(int(ttl * 1000), 1)
        self.version = version
        self.stall_after = stall_after
        self.beats = 0
        self._progress = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._offset_ms: float | None = None  # Redis clock minus monotonic, ms
        self._synced_at = 0.0

    def touch(self) -> None:
        """The main loop is alive (called once per agent tick)."""
        self._progress = time.monotonic()

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._main, name=f"kcp-heartbeat-{self.agent}", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 5)
            self._thread = None

    def _main(self) -> None:
        asyncio.run(self._loop())

    async def _loop(self) -> None:
        client = connect(self.redis_url, max_connections=2)

        async def lost(exc: RedisError) -> None:
            if isinstance(exc, RedisUnavailable) and not redis_said(exc, "LOADING"):  # that link is fine
                with contextlib.suppress(Exception):
                    await portable.drop_connections(client)  # drop a half-read connection

        try:
            await periodically(
                lambda: self._renew(client),
                what=f"heartbeat of {self.agent}",
                log=logger,
                running=lambda: not self._stop.is_set(),
                every=self.interval,
                backoff=Backoff.within(self.interval),
                pause=lambda seconds: asyncio.to_thread(self._stop.wait, seconds),
                on_error=lost,
            )
        finally:
            with contextlib.suppress(Exception):
                await client.aclose()

    async def _renew(self, client: AsyncRedis) -> None:
        stalled = time.monotonic() - self._progress
        if stalled > self.stall_after:
            logger.error("agent %s main loop stalled for %.1fs; not renewing the lease", self.agent, stalled)
            return
        try:
            await self._beat(client)
        except TimeoutError:
            raise RedisUnavailable("heartbeat round trip overdue") from None

    async def _beat(self, client: AsyncRedis) -> None:
        now = time.monotonic()
        if self._offset_ms is None or now - self._synced_at > CLOCK_RESYNC:
            async with asyncio.timeout(max(self.ttl_ms / 1000, 1.0)):
                self._offset_ms = await clock_offset(client)
            self._synced_at = now
        lease = AgentLease(int(time.monotonic() * 1000 + self._offset_ms), self.version())
        # one round trip, bounded: a blackholed connection must not hold the beat forever
        async with asyncio.timeout(max(self.ttl_ms / 1000, 1.0)):
            await client.set(self.keys.agent_lease(self.agent), lease.encode(), px=self.ttl_ms)
        self.beats += 1
