"""The one way a long-running loop survives Redis: map its errors, back off, log, try again.

Every loop that must outlive a Redis outage (the service, the agent and its heartbeat, the
kernel, the bus consumer, the client's reply listener and notify watcher) runs its step
through `retry` (until it succeeds once) or `periodically` (until told to stop). Both map
redis-py's exceptions with `amap_redis_errors` and catch kcp's `RedisError` only, so no loop
outside this layer names a redis-py type; a failure is logged by the caller's logger as
"<what> lost Redis" (transient: unreachable, read-only) or "<what>: Redis refused a command"
(needs a person: ACL, wrong data), then retried after a capped exponential back-off. An outage
is logged once per change of its reason, not at every retry, and "<what>: Redis is back" once
when a step succeeds again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from controlplane.errors import RedisError
from controlplane.redis.errors import amap_redis_errors

T = TypeVar("T")

#: Sleeps up to the given seconds; a loop passes one that returns early when it is stopped.
Pause = Callable[[float], Awaitable[object]]
#: Called with each failure before the pause (e.g. drop a connection, mark "unregistered").
OnError = Callable[[RedisError], Awaitable[None] | None]


class Backoff:
    """Capped exponential delays: `first`, twice that, ... up to `cap`, each shortened by up to
    `jitter` (a fraction) so that processes cut off together do not return in lock-step. The
    cap is never exceeded, so a loop's worst-case reaction time stays what it was."""

    def __init__(self, first: float = 0.1, cap: float = 2.0, *, jitter: float = 0.1) -> None:
        if not 0 < first <= cap or not 0 <= jitter < 1:
            raise ValueError(f"bad back-off: first={first}, cap={cap}, jitter={jitter}")
        self.first, self.cap, self.jitter = first, cap, jitter
        self._next = first
        #: the failure last logged, until a step succeeds: a repeat is not logged again
        self.told: str | None = None

    @classmethod
    def within(cls, period: float) -> Backoff:
        """Retries at least once per `period` however long the failure lasts: for a loop whose
        peers judge it by how soon it is back (the heartbeat must renew within one period of
        Redis answering again, docs/reliability.md)."""
        return cls(min(0.1, period), period)

    def next(self) -> float:
        """The delay before the next attempt; the one after is twice as long (up to `cap`)."""
        delay = self._next
        self._next = min(delay * 2, self.cap)
        return delay * (1 - self.jitter * random.random())

    def reset(self) -> None:
        """A step succeeded: the next failure waits `first` again (and is logged)."""
        self._next = self.first
        self.told = None


def _succeeded(backoff: Backoff, *, what: str, log: logging.Logger) -> None:
    if backoff.told is not None:
        log.warning("%s: Redis is back", what)
    backoff.reset()


async def _failed(
    exc: RedisError,
    *,
    what: str,
    log: logging.Logger,
    backoff: Backoff,
    pause: Pause,
    on_error: OnError | None,
) -> None:
    delay, reason = backoff.next(), f"{type(exc).__name__}: {exc}"
    if reason == backoff.told:
        log.debug("%s: still %s; retrying in %.1fs", what, reason, delay)
    elif exc.transient:
        log.warning("%s lost Redis (%s); retrying every %.1fs at most", what, exc, backoff.cap)
    else:
        log.error("%s: Redis refused a command (%s); retrying every %.1fs at most", what, exc, backoff.cap)
    backoff.told = reason
    if on_error is not None:
        outcome = on_error(exc)
        if outcome is not None:
            await outcome
    await pause(delay)


async def retry(
    step: Callable[[], Awaitable[T]],
    *,
    what: str,
    log: logging.Logger,
    backoff: Backoff | None = None,
    pause: Pause = asyncio.sleep,
    on_error: OnError | None = None,
    transient_only: bool = False,
) -> T:
    """Await `step()` until it returns, retrying after each `RedisError`; returns its result.

    With `transient_only`, an error that needs a person (`transient` False) is raised instead,
    for a process its supervisor restarts anyway. Anything else (a bug, a cancellation) ends
    the retries at once."""
    backoff = backoff or Backoff()
    while True:
        try:
            async with amap_redis_errors():
                result = await step()
        except RedisError as exc:
            if transient_only and not exc.transient:
                raise
            await _failed(exc, what=what, log=log, backoff=backoff, pause=pause, on_error=on_error)
            continue
        _succeeded(backoff, what=what, log=log)
        return result


async def periodically(
    step: Callable[[], Awaitable[object]],
    *,
    what: str,
    log: logging.Logger,
    running: Callable[[], bool],
    every: float | None = None,
    backoff: Backoff | None = None,
    pause: Pause = asyncio.sleep,
    on_error: OnError | None = None,
) -> None:
    """Run `step()` while `running()`: after a success, wait what is left of `every` seconds
    since it began (`None`: the step paces itself, e.g. with a blocking read) and reset the
    back-off; after a `RedisError`, back off and try again."""
    backoff = backoff or Backoff()
    while running():
        began = time.monotonic()
        try:
            async with amap_redis_errors():
                await step()
        except RedisError as exc:
            await _failed(exc, what=what, log=log, backoff=backoff, pause=pause, on_error=on_error)
            continue
        _succeeded(backoff, what=what, log=log)
        if every is not None:
            await pause(max(every - (time.monotonic() - began), 0.0))


@contextlib.asynccontextmanager
async def best_effort() -> AsyncIterator[None]:
    """A write whose failure must not fail its caller (a counter, a goodbye on the way out):
    a Redis error ends the block, silently; any other error still propagates."""
    with contextlib.suppress(RedisError):
        async with amap_redis_errors():
            yield
