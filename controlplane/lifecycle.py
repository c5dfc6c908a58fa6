"""One lifecycle for kcp's long-lived objects: NEW -> RUNNING -> STOPPING -> STOPPED, once.

The service, the agent, a kernel process and the client each run background work that must
end cleanly: asked to stop, they finish what they hold for a grace period, then whatever is
left is cancelled by a hard deadline and awaited. None of them starts twice or comes back
after it stopped (a stopped client that silently reconnected would hide a use-after-close
bug): that raises `LifecycleError`.

`Phase` is where an object is in it; `Service` is the shape of a process's main loop
(`run()`, or `async with` to run it as a task); `finish` is the grace-then-cancel step every
owner of a task shares.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import enum
from typing import Any, Self

from controlplane.errors import KcpError

#: How often a task that swallowed its cancellation is cancelled again, seconds.
_RECANCEL_EVERY = 0.1


class Phase(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class LifecycleError(KcpError, RuntimeError):
    """A long-lived object was started twice, or used after it stopped: create a new one."""


async def finish(task: asyncio.Task[Any], grace: float) -> None:
    """Let `task` end by itself for up to `grace` seconds, then cancel it and wait until it
    has ended, cancelling again if it swallowed the cancellation (redis-py can, while it sets
    up a connection). What the task raised is its owner's to log, not re-raised here; a
    cancellation of the caller is, at once."""
    if not task.done():
        await asyncio.wait({task}, timeout=max(grace, 0.0))
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=_RECANCEL_EVERY)
    if not task.cancelled():
        task.exception()  # retrieved: asyncio would otherwise log it again at garbage collection


class Service(abc.ABC):
    """A main loop with a lifecycle. Subclasses implement `_loop` (the loop, ending on its own
    once `_on_stop` was called) and `_on_stop` (a synchronous request, safe in a signal
    handler); `stop_grace` is how long `stop()` waits for them before it cancels.

    Either await `run()` (a process's main coroutine; its signal handlers call
    `request_stop`), or `async with` the object to run it as a task that leaving the block
    stops."""

    #: Named in `LifecycleError`s and in the task's name.
    what = "service"
    stop_grace = 10.0

    def __init__(self) -> None:
        self.phase = Phase.NEW
        self._task: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()

    @abc.abstractmethod
    async def _loop(self) -> None: ...

    @abc.abstractmethod
    def _on_stop(self) -> None: ...

    def _begin(self) -> None:
        if self.phase is not Phase.NEW:
            raise LifecycleError(f"{self.what} was already started ({self.phase.value}): create a new one")
        self.phase = Phase.RUNNING

    async def _lifetime(self) -> None:
        try:
            await self._loop()
        finally:
            self.phase = Phase.STOPPED
            self._stopped.set()

    async def run(self) -> None:
        """Run the loop in the calling task until it stops (after `request_stop`)."""
        self._begin()
        await self._lifetime()

    def request_stop(self) -> None:
        """Ask the loop to finish what it holds and end; idempotent, returns at once."""
        if self.phase is Phase.RUNNING:
            self.phase = Phase.STOPPING
        self._on_stop()

    async def stop(self, grace: float | None = None) -> None:
        """Request a stop and wait for it up to `grace` seconds (default `stop_grace`); then the
        loop's task, if `async with` started it, is cancelled and awaited. Idempotent."""
        grace = self.stop_grace if grace is None else grace
        self.request_stop()
        if self._task is not None and self._task is not asyncio.current_task():
            await finish(self._task, grace)
        elif self._task is None and self.phase is not Phase.NEW:  # run()'s caller owns that task
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), grace)

    async def __aenter__(self) -> Self:
        self._begin()
        self._task = asyncio.create_task(self._lifetime(), name=f"kcp-{self.what}")
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        await self.stop()
        task = self._task
        crashed = None if task is None or task.cancelled() else task.exception()
        if exc_type is None and crashed is not None:  # the loop died of a bug: say so, here
            raise crashed
