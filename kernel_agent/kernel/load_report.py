"""The kernel's share of its load record: queue depth, jobs in flight, latency and error rate.

The kernel process knows these itself (claim.lua says how many jobs are still queued, and the
kernel times its own jobs), so nobody has to read its queue and counters back from Redis to
publish them. The worker calls `LoadReporter.finished` once per job, and asks `commands()` at
each of its steps for the write to send along (on its own connection, in the same round trip
as the step: a kernel keeps one connection). The write sets the fields of `records.LoadRecord`
the kernel owns (with `updated_at`) on `agent:{agent}:load:{cluster}:{kernel}`:

- only when one of them changed (rounded as written), at most once per `interval` (a
  heartbeat), so a busy kernel costs at most two commands per interval and an idle one none;
- once more after the last job, with what is still in flight, so the record says idle when
  the work stopped (`pending_in()` tells the worker how soon, so it blocks no longer).

The agent writes cpu and memory into the same record and keeps it fresh (`load_refresh`) with its
TTL; the kernel sets the TTL too, so a record written after its kernel was removed still goes.
Latency and error rate are EWMAs over the intervals (weight `EWMA_ALPHA` for the newest).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from controlplane.protocol.keys import Keys
from controlplane.protocol.records import LoadRecord
from controlplane.redis.channel import Command

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
    """One per kernel process: `finished()` per job, `commands()` at each worker step."""

    def __init__(
        self,
        keys: Keys,
        *,
        cluster: str,
        name: str,
        agent: str,
        busy: Callable[[], int],
        interval: float = REPORT_INTERVAL,
    ) -> None:
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
        self._jobs_at_flush = 0  # `_done` when the last report was made
        self._pending = False  # jobs finished since, or the report after the work stopped

    def finished(self, latency_ms: float, *, failed: bool, queued: int) -> None:
        """A job ended after `latency_ms` (queue wait included); `queued` jobs wait behind it."""
        self._done += 1
        self._errors += failed
        self._latency_sum += latency_ms
        self._queued = max(queued, 0)
        self._pending = True

    def pending_in(self) -> float | None:
        """Seconds until a report is due (0: now), or None when nothing is left to report."""
        if not self._pending:
            return None
        return max(self._last_write + self.interval - time.monotonic(), 0.0)

    def commands(self) -> list[Command]:
        """The write to send now (HSET and its TTL), or none: not due, or nothing changed."""
        if self.pending_in() != 0.0:
            return []
        worked = self._done > self._jobs_at_flush
        self._jobs_at_flush = self._done
        self._pending = worked  # once more after the work stops, so the record says what is left
        self.rates.update(self._done, self._errors, self._latency_sum)
        inflight = max(self.busy(), 0)
        fields = LoadRecord.fields(
            queue_depth=self._queued if worked or inflight else 0,
            inflight=inflight,
            latency_ms=round(self.rates.latency_ms, 3),
            error_rate=round(self.rates.error_rate, 4),
        )
        self._last_write = time.monotonic()
        if fields == self._written:
            return []
        # taken as written: a write lost with the connection is made again at the next change
        self._written = fields
        self.writes += 1
        stamped = fields | LoadRecord.fields(updated_at=round(time.time(), 3))
        return [
            ("HSET", self.key, *(x for kv in stamped.items() for x in kv)),
            ("PEXPIRE", self.key, int(RECORD_TTL * 1000)),
        ]
