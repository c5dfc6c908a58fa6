"""`controlplane.lifecycle`: phases, grace then cancel, idempotent stop, no second start;
and `KcpClient`, which may not be opened twice nor used after `aclose`."""

from __future__ import annotations

import asyncio

import fakeredis
import pytest

from controlplane.client.core import KcpClient
from controlplane.lifecycle import LifecycleError, Phase, Service, finish

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]

#: Generous: the tests wait on events, never on this, unless something is broken.
PATIENCE = 10.0


class Loop(Service):
    """A fake main loop: ends when asked (unless `stubborn`), after `linger` seconds."""

    what = "fake"

    def __init__(self, *, stubborn: bool = False, swallow: int = 0) -> None:
        super().__init__()
        self.asked = asyncio.Event()
        self.started = asyncio.Event()
        self.stubborn = stubborn
        self.swallow = swallow  # cancellations to ignore, as redis-py can while connecting
        self.cancelled = 0
        self.ended = False

    def _on_stop(self) -> None:
        self.asked.set()

    async def _loop(self) -> None:
        self.started.set()
        try:
            while True:
                try:
                    if self.stubborn:
                        await asyncio.sleep(3600)
                    else:
                        await self.asked.wait()
                        return
                except asyncio.CancelledError:
                    self.cancelled += 1
                    if self.cancelled > self.swallow:
                        raise
                    asyncio.current_task().uncancel()  # type: ignore[union-attr]
        finally:
            self.ended = True


async def test_async_with_runs_the_loop_and_leaving_stops_it() -> None:
    loop = Loop()
    assert loop.phase is Phase.NEW
    async with loop:
        await asyncio.wait_for(loop.started.wait(), PATIENCE)
        assert loop.phase is Phase.RUNNING
    assert loop.phase is Phase.STOPPED and loop.ended and loop.cancelled == 0


async def test_stop_is_idempotent() -> None:
    loop = Loop()
    async with loop:
        await loop.stop(PATIENCE)
        await loop.stop(PATIENCE)
        assert loop.phase is Phase.STOPPED
    await loop.stop()
    assert loop.phase is Phase.STOPPED


async def test_a_loop_that_ignores_the_request_is_cancelled_after_the_grace() -> None:
    loop = Loop(stubborn=True)
    async with loop:
        await asyncio.wait_for(loop.started.wait(), PATIENCE)
        await asyncio.wait_for(loop.stop(grace=0.01), PATIENCE)
        assert loop.asked.is_set() and loop.cancelled == 1 and loop.ended
        assert loop.phase is Phase.STOPPED


async def test_a_swallowed_cancellation_is_repeated_until_the_task_ends() -> None:
    loop = Loop(stubborn=True, swallow=2)
    async with loop:
        await asyncio.wait_for(loop.started.wait(), PATIENCE)
        await asyncio.wait_for(loop.stop(grace=0.0), PATIENCE)
    assert loop.cancelled == 3 and loop.ended


async def test_no_second_start_and_no_restart_after_stop() -> None:
    loop = Loop()
    async with loop:
        with pytest.raises(LifecycleError, match="already started"):
            await loop.__aenter__()
        with pytest.raises(LifecycleError):
            await loop.run()
    with pytest.raises(LifecycleError, match="stopped"):
        async with loop:
            pass
    with pytest.raises(LifecycleError):
        await loop.run()


async def test_run_in_the_calling_task_ends_on_request_stop() -> None:
    loop = Loop()
    runner = asyncio.create_task(loop.run())
    await asyncio.wait_for(loop.started.wait(), PATIENCE)
    loop.request_stop()
    assert loop.phase is Phase.STOPPING
    await asyncio.wait_for(runner, PATIENCE)
    assert loop.phase is Phase.STOPPED
    await asyncio.wait_for(loop.stop(), PATIENCE)  # nothing left to do


async def test_stop_waits_for_a_run_owned_by_another_task_but_never_cancels_it() -> None:
    loop = Loop(stubborn=True)
    runner = asyncio.create_task(loop.run())
    await asyncio.wait_for(loop.started.wait(), PATIENCE)
    await asyncio.wait_for(loop.stop(grace=0.01), PATIENCE)
    assert not runner.done() and loop.cancelled == 0, "its caller owns that task"
    runner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await runner


async def test_a_cancelled_stop_propagates_the_cancellation() -> None:
    loop = Loop(stubborn=True)
    async with loop:
        await asyncio.wait_for(loop.started.wait(), PATIENCE)
        stopper = asyncio.create_task(loop.stop(grace=3600))
        await asyncio.sleep(0.01)
        stopper.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stopper
        assert loop.cancelled == 0, "the grace was cut short, not the loop"
        await asyncio.wait_for(loop.stop(grace=0.0), PATIENCE)
    assert loop.cancelled == 1


async def test_finish_does_not_raise_what_the_task_raised() -> None:
    async def fails() -> None:
        raise ValueError("the owner logs this")

    task = asyncio.create_task(fails())
    await asyncio.wait_for(finish(task, grace=PATIENCE), PATIENCE)
    assert task.done() and isinstance(task.exception(), ValueError)


async def test_leaving_the_block_raises_what_crashed_the_loop() -> None:
    class Crashes(Loop):
        async def _loop(self) -> None:
            raise ValueError("a bug in the loop")

    with pytest.raises(ValueError, match="a bug in the loop"):
        async with Crashes():
            await asyncio.sleep(0.01)


# ---------------------------------------------------------------- KcpClient


def fake_client() -> KcpClient:
    server = fakeredis.FakeServer(version=(7,))
    return KcpClient(redis=fakeredis.FakeAsyncRedis(server=server, decode_responses=True))


async def test_a_closed_client_refuses_to_open_again_or_to_work() -> None:
    kcp = fake_client()
    assert kcp.phase is Phase.NEW
    await kcp.list_clusters()  # a new client works without `async with`
    await kcp.aclose()
    await kcp.aclose()  # idempotent
    assert kcp.phase is Phase.STOPPED
    with pytest.raises(LifecycleError, match="closed"):
        async with kcp:
            pass
    with pytest.raises(LifecycleError, match="closed"):
        await kcp.list_clusters()
    with pytest.raises(LifecycleError, match="closed"):
        await kcp.dispatch("c", {"type": "PING"})
    with pytest.raises(LifecycleError, match="closed"):
        await kcp.start()
