"""The service loop: lead or stand by, reconcile on every wake-up or period.

A wake-up (`service:wake`) hands its messages to the reconciler, which reads what they name.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any

from controlplane.errors import RedisError, RedisUnavailable
from controlplane.lifecycle import Service
from controlplane.protocol.keys import Keys
from controlplane.redis.connect import AsyncRedis
from controlplane.redis.retry import best_effort, periodically
from controlplane.redis.state import State
from controlplane.service.leader import LeaderLease
from controlplane.service.reconciler import Reconciler
from controlplane.settings import Settings

logger = logging.getLogger(__name__)

#: How many of the latest pass durations `ControlPlane.passes` keeps.
PASSES_KEPT = 4096
#: `service:wake` messages one wake takes at most (the rest at the next wait)
WAKE_BURST = 4096


class ControlPlane(Service):
    """`kcp serve`. Several may run; the one holding the lease reconciles, the others wait."""

    what = "control plane"

    def __init__(self, redis: AsyncRedis, settings: Settings) -> None:
        super().__init__()
        self.redis = redis
        self.settings = settings
        self.keys = Keys(settings.prefix)
        self.lease = LeaderLease(redis, self.keys, settings.leader_ttl)
        self.reconciler = Reconciler(State(redis, self.keys), settings, self.lease)
        self._stop = asyncio.Event()
        #: Seconds each of the latest leader passes (`reconcile_all`) took; `bench/fleet.py` reads them.
        self.passes: deque[float] = deque(maxlen=PASSES_KEPT)
        #: CPU seconds of this process in each of those passes (on a shared host a pass may wait
        #: for a core: its wall time above is then more than the work it did)
        self.pass_cpu: deque[float] = deque(maxlen=PASSES_KEPT)

    def _on_stop(self) -> None:
        self._stop.set()

    async def _loop(self) -> None:
        await periodically(
            self._pass,
            what=self.what,
            log=logger,
            running=lambda: not self._stop.is_set(),
            pause=lambda seconds: self._wait(seconds, wake=False),
            on_error=self._lost,
        )
        async with best_effort():
            if self.lease.leading:
                await self.lease.release()
        logger.info("control plane stopped")

    async def _pass(self) -> None:
        """Lead and reconcile, or stand by; then wait for the next pass."""
        was_leading = self.lease.leading
        if await self.lease.acquire():
            if not was_leading:  # what a former leader was told is not ours: read it all
                self.reconciler.invalidate()
            started, cpu = time.perf_counter(), time.process_time()
            await self.reconciler.reconcile_all()
            self.passes.append(time.perf_counter() - started)
            self.pass_cpu.append(time.process_time() - cpu)
            # wake when the next agent lease would lapse, so a death is seen at once
            pause = min(self.settings.reconcile_interval, self.reconciler.detector.next_check_in())
            await self._wait(pause, wake=True)
        else:
            await self._wait(self.settings.leader_ttl / 3, wake=False)

    def _lost(self, exc: RedisError) -> None:
        # a pass cut off by any Redis error (an outage, or a refused command such as WRONGTYPE on
        # one bad key) may have taken announcements it never acted on: the next pass reads it all
        self.reconciler.invalidate()
        if isinstance(exc, RedisUnavailable):  # leases could not be renewed meanwhile either
            self.reconciler.detector.grace()

    async def _wait(self, seconds: float, *, wake: bool) -> None:
        """Sleep up to `seconds`; a leader also wakes on `service:wake` pushes, or on stop."""
        stop = asyncio.ensure_future(self._stop.wait())
        waiters: set[asyncio.Future[Any]] = {stop}
        if wake:
            # Redis >= 6 takes fractional BLPOP timeouts; redis-py's stubs say int
            pop = self.redis.blpop([self.keys.service_wake()], timeout=seconds)  # type: ignore[arg-type]
            waiters.add(asyncio.ensure_future(pop))  # type: ignore[arg-type]  # see the mypy override note
        try:
            await asyncio.wait(waiters, timeout=seconds + 0.5, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
            results = await asyncio.gather(*waiters, return_exceptions=True)
        popped = [r for r in results if isinstance(r, list | tuple)]
        if wake and popped:
            # take the burst at once: the pass reads what each message names. One LPOP with a
            # count is atomic by itself (no MULTI: a message pushed meanwhile is never lost);
            # what a huge burst leaves is popped at the next wait, at once
            rest = await self.redis.lpop(self.keys.service_wake(), WAKE_BURST) or []
            self.reconciler.announced += [str(popped[0][1]), *map(str, rest)]
        for r in results:
            if isinstance(r, Exception):  # the pop's Redis error, for the caller's error mapping
                raise r
