"""A MULTI/EXEC whose WATCHed keys changed: redis-py's `WatchError`, named once for the callers.

Not a failure of Redis (so not a `RedisError`): the transaction was discarded as designed, and
the caller decides again from fresh reads. The leader's fenced writes are the user.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import redis.exceptions


class Conflict(Exception):
    """A WATCHed key changed before EXEC; nothing of the transaction was written."""


@contextlib.asynccontextmanager
async def watch_conflicts() -> AsyncIterator[None]:
    """Raise `Conflict` for a `WatchError` from inside the block."""
    try:
        yield
    except redis.exceptions.WatchError as exc:
        raise Conflict(str(exc)) from exc
