"""`controlplane.redis.retry`: back-off, the error boundary and the log lines every loop shares.

No real sleeping: each test passes a `pause` that records the delays it is asked for.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
import redis.exceptions

from controlplane.errors import AuthenticationFailed, RedisError, RedisUnavailable
from controlplane.redis.errors import amap_redis_errors, redis_said
from controlplane.redis.retry import Backoff, best_effort, periodically, retry

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]

log = logging.getLogger("tests.retry")


class Pauses:
    """A `pause` that returns at once and remembers what it was asked to wait."""

    def __init__(self) -> None:
        self.asked: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.asked.append(seconds)
        await asyncio.sleep(0)


def test_backoff_doubles_up_to_its_cap_and_resets() -> None:
    b = Backoff(0.1, 1.0, jitter=0)
    assert [round(b.next(), 3) for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    b.reset()
    assert b.next() == pytest.approx(0.1)


def test_backoff_jitter_only_shortens_a_delay() -> None:
    b = Backoff(2.0, 2.0, jitter=0.25)
    delays = [b.next() for _ in range(200)]
    assert all(1.5 <= d <= 2.0 for d in delays)
    assert len(set(delays)) > 1, "processes cut off together do not come back together"


def test_backoff_within_a_period_retries_at_least_once_per_period() -> None:
    """The heartbeat's back-off: however long Redis is away, a live agent tries again within one
    heartbeat interval, so it renews inside the leader's blind window once Redis answers."""
    for period in (0.05, 0.3, 0.5, 2.0):
        b = Backoff.within(period)
        delays = [b.next() for _ in range(40)]
        assert max(delays) <= period
        assert delays[0] <= 0.1


@pytest.mark.parametrize(("first", "cap", "jitter"), [(0, 1, 0), (2, 1, 0), (0.1, 1, 1.0), (0.1, 1, -0.1)])
def test_backoff_refuses_nonsense(first: float, cap: float, jitter: float) -> None:
    with pytest.raises(ValueError):
        Backoff(first, cap, jitter=jitter)


async def test_retry_maps_redis_py_errors_backs_off_and_returns_the_result(
    caplog: pytest.LogCaptureFixture,
) -> None:
    failures = [
        redis.exceptions.ConnectionError("down"),
        redis.exceptions.ConnectionError("down"),
        redis.exceptions.TimeoutError("slow"),
    ]
    seen: list[RedisError] = []

    async def step() -> int:
        if failures:
            raise failures.pop(0)
        return 42

    pauses = Pauses()
    with caplog.at_level(logging.WARNING, logger="tests.retry"):
        result = await retry(
            step, what="thing", log=log, backoff=Backoff(jitter=0), pause=pauses, on_error=seen.append
        )
    assert result == 42
    assert pauses.asked == pytest.approx([0.1, 0.2, 0.4])
    assert all(isinstance(e, RedisUnavailable) for e in seen) and len(seen) == 3
    # once per change of reason, not at every retry; and once when it is back
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert lines[0].startswith("thing lost Redis (") and "down" in lines[0]
    assert lines[0].endswith("retrying every 2.0s at most")
    assert lines[1].startswith("thing lost Redis (") and "slow" in lines[1]
    assert lines[2] == "thing: Redis is back"


async def test_retry_awaits_an_async_on_error() -> None:
    calls: list[str] = []

    async def on_error(exc: RedisError) -> None:
        await asyncio.sleep(0)
        calls.append("reset")

    async def step() -> None:
        if not calls:
            raise RedisUnavailable("gone")

    await retry(step, what="x", log=log, pause=Pauses(), on_error=on_error)
    assert calls == ["reset"]


async def test_an_error_that_needs_a_person_is_logged_as_refused_and_retried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    attempts = 0

    async def step() -> str:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise AuthenticationFailed("WRONGPASS")
        return "ok"

    with caplog.at_level(logging.ERROR, logger="tests.retry"):
        assert await retry(step, what="agent a1", log=log, pause=Pauses()) == "ok"
    assert [r.levelno for r in caplog.records] == [logging.ERROR]
    assert caplog.records[0].getMessage().startswith("agent a1: Redis refused a command (WRONGPASS)")


async def test_transient_only_raises_what_needs_a_person() -> None:
    async def step() -> None:
        raise AuthenticationFailed("WRONGPASS")

    with pytest.raises(AuthenticationFailed):
        await retry(step, what="kernel", log=log, pause=Pauses(), transient_only=True)


async def test_anything_but_a_redis_error_ends_the_retries_at_once() -> None:
    pauses = Pauses()

    async def step() -> None:
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        await retry(step, what="x", log=log, pause=pauses)
    assert pauses.asked == []


async def test_a_cancellation_during_the_back_off_propagates() -> None:
    entered = asyncio.Event()

    async def step() -> None:
        raise RedisUnavailable("gone")

    async def pause(seconds: float) -> None:
        entered.set()
        await asyncio.sleep(3600)

    task = asyncio.create_task(retry(step, what="x", log=log, pause=pause))
    await asyncio.wait_for(entered.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_periodically_paces_successes_and_resets_the_back_off_after_one() -> None:
    outcomes: list[Exception | None] = [
        RedisUnavailable("a"),
        RedisUnavailable("b"),
        None,
        RedisUnavailable("c"),
    ]
    runs = 0

    async def step() -> None:
        nonlocal runs
        runs += 1
        outcome = outcomes.pop(0)
        if outcome is not None:
            raise outcome

    pauses = Pauses()
    await periodically(
        step,
        what="x",
        log=log,
        running=lambda: bool(outcomes),
        every=5.0,
        backoff=Backoff(jitter=0),
        pause=pauses,
    )
    assert runs == 4
    # two back-offs, then the rest of the period after the success, then the first back-off again
    assert pauses.asked[:2] == pytest.approx([0.1, 0.2])
    assert 4.0 < pauses.asked[2] <= 5.0
    assert pauses.asked[3] == pytest.approx(0.1)


async def test_periodically_without_a_period_runs_the_next_step_at_once() -> None:
    runs = 0

    async def step() -> None:
        nonlocal runs
        runs += 1

    pauses = Pauses()
    await periodically(step, what="x", log=log, running=lambda: runs < 3, pause=pauses)
    assert runs == 3 and pauses.asked == []


async def test_best_effort_swallows_redis_errors_only() -> None:
    async with best_effort():
        raise redis.exceptions.ConnectionError("down")
    async with best_effort():
        raise RedisUnavailable("down")
    with pytest.raises(ValueError):
        async with best_effort():
            raise ValueError("a bug")


async def test_redis_said_reads_the_reply_redis_gave() -> None:
    with pytest.raises(RedisError) as caught:
        async with amap_redis_errors():
            raise redis.exceptions.ResponseError("NOGROUP No such key 's' or consumer group 'k'")
    assert redis_said(caught.value, "nogroup") and not redis_said(caught.value, "BUSYGROUP")
