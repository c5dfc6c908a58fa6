"""redis-py's exceptions, translated once into kcp's (`controlplane.errors`)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator

import redis.exceptions

from controlplane.errors import KcpError, RedisUnavailable


def _translate(exc: redis.exceptions.RedisError) -> KcpError:
    if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        return RedisUnavailable(f"Redis unavailable: {exc}")
    return RedisUnavailable(f"Redis error: {exc}")


@contextlib.contextmanager
def map_redis_errors() -> Iterator[None]:
    """Translate redis-py exceptions raised inside the block into `RedisUnavailable`."""
    try:
        yield
    except redis.exceptions.RedisError as exc:
        raise _translate(exc) from exc


@contextlib.asynccontextmanager
async def amap_redis_errors() -> AsyncIterator[None]:
    """Async flavour of `map_redis_errors` for `async with` blocks."""
    try:
        yield
    except redis.exceptions.RedisError as exc:
        raise _translate(exc) from exc
