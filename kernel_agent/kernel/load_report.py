"""The kernel's share of its load record: queue depth, jobs in flight, latency and error rate.

The kernel process knows these itself (claim.lua says how many jobs are still queued, and the
kernel times its own jobs), so nobody has to read its queue and counters back from Redis to
publish them. The worker calls `LoadReporter.finished` once per job; the reporter writes the
fields of `records.LoadRecord` it owns (with `updated_at`) to
`agent:{agent}:load:{cluster}:{kernel}`:

- only when one of them changed (rounded as written), at most once per `interval` (a
  heartbeat), so a busy kernel costs at most two commands per interval and an idle one none;
- once more an interval after the last job, with what is still in flight, so the record says
  idle when the work stopped.

The agent writes cpu and memory into the same record and keeps it fresh (`load_refresh`) with its
TTL; the kernel sets the TTL too, so a record written after its kernel was removed still goes.
Latency and error rate are EWMAs over the intervals (weight `EWMA_ALPHA` for the newest).
A failed write is logged and forgotten: the next change writes again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from controlplane.errors import RedisError
from controlplane.protocol.keys import Keys
from controlplane.protocol.records import LoadRecord
from controlplane.redis.connect import AsyncRedis
from controlplane.redis.errors import amap_redis_errors

logger = logging.getLogger(__name__)

#: Weight of the newest interval in the latency and error-rate EWMAs.
EWMA_ALPHA = 0.3
#: At most one write per this many seconds (the default heartbeat interval).
REPORT_INTERVAL = 0.5
#: How long the record lives without being rewritten, seconds (3 x the default `load_refresh`).
RECORD_TTL = 15.0


@dataclass(slots=True)
class RateTracker:
    """Latency and error-rate EWMAs, fed with the cumulative counts at each report."""

    dispatches: float = 0.0
    errors: float = 0.0
    latency_sum: float = 0.0
    latency_ms: float = 0.0
    error_rate: float = 0.0
    primed: bool = False

    def update(self, dispatches: float, errors: float, latency_sum: float) -> None:
        done = dispatches - self.dispatches
        if self.primed and done > 0:
            interval_latency = (latency_sum - self.latency_sum) / done
            interval_errors = min(max((errors - self.errors) / done, 0.0), 1.0)
            self.latency_ms += EWMA_ALPHA * (interval_latency - self.latency_ms)
            self.error_rate += EWMA_ALPHA * (interval_errors - self.error_rate)
        elif not self.primed and dispatches > 0:
            self.latency_ms = latency_sum / dispatches
            self.error_rate = min(errors / dispatches, 1.0)
        self.dispatches, self.errors, self.latency_sum, self.primed = dispatches, errors, latency_sum, True


class LoadReporter:
    """One per kernel process. `finished()` per job; the writes happen on their own."""

    def __init__(
        self,
        redis: AsyncRedis,
        keys: Keys,
        *,
        cluster: str,
        name: str,
        agent: str,
        busy: Callable[[], int],
        interval: float = REPORT_INTERVAL,
    ) -> None:
        self.redis = redis
        self.key = keys.load(agent, cluster, name)
        self.busy = busy
        self.interval = interval
        self.rates = RateTracker()
        self.writes = 0
        self._done = self._errors = 0
        self._latency_sum = 0.0
        self._queued = 0
        self._written: dict[str, str] = {}
        self._last_write = -float("inf")
        self._jobs_at_flush = 0  # `_done` when the last flush ran
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None

    def finished(self, latency_ms: float, *, failed: bool, queued: int) -> None:
        """A job ended after `latency_ms` (queue wait included); `queued` jobs wait behind it."""
        self._done += 1
        self._errors += failed
        self._latency_sum += latency_ms
        self._queued = max(queued, 0)
        self._schedule()

    def _schedule(self) -> None:
        if self._timer is not None or (self._task is not None and not self._task.done()):
            return
        delay = max(self._last_write + self.interval - time.monotonic(), 0.0)
        self._timer = asyncio.get_running_loop().call_later(delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._task = asyncio.ensure_future(self._flush())

    async def _flush(self) -> None:
        worked = self._done > self._jobs_at_flush
        self._jobs_at_flush = self._done
        self.rates.update(self._done, self._errors, self._latency_sum)
        inflight = max(self.busy(), 0)
        queued = self._queued if worked or inflight else 0
        fields = LoadRecord.fields(
            queue_depth=queued,
            inflight=inflight,
            latency_ms=round(self.rates.latency_ms, 3),
            error_rate=round(self.rates.error_rate, 4),
        )
        self._last_write = time.monotonic()
        if fields != self._written:
            with contextlib.suppress(RedisError):
                try:
                    async with amap_redis_errors(), self.redis.pipeline(transaction=False) as pipe:
                        stamp = LoadRecord.fields(updated_at=round(time.time(), 3))
                        pipe.hset(self.key, mapping=fields | stamp)
                        pipe.pexpire(self.key, int(RECORD_TTL * 1000))
                        await pipe.execute()
                except RedisError as exc:
                    logger.debug("load report of %s not written: %s", self.key, exc)
                    raise
                self._written = fields
                self.writes += 1
        if worked:  # once more after the work stops, so the record says what is left
            self._task = None
            self._schedule()

    async def aclose(self) -> None:
        """Cancel a pending write (the kernel is stopping)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
