"""Redis connections from a URL, tuned for kcp's blocking reads."""

from __future__ import annotations

import socket

import redis.asyncio as aioredis

#: The longest blocking read (BZPOPMIN/BLPOP timeout) any kcp component issues, seconds.
MAX_BLOCK_SECONDS = 5


def connect(url: str, *, max_connections: int = 64) -> aioredis.Redis:
    """An asyncio Redis client for `url` (redis://, rediss://, unix://), decoding responses as UTF-8.

    The socket timeout is longer than any blocking read kcp issues, so a blocked BZPOPMIN is never
    mistaken for a dead server; keepalive notices a silently dropped connection.
    """
    keepalive: dict[int, int | bytes] = {}
    for name, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):
            keepalive[getattr(socket, name)] = value
    client: aioredis.Redis = aioredis.Redis.from_url(
        url,
        decode_responses=True,
        max_connections=max_connections,
        socket_connect_timeout=5.0,
        socket_timeout=MAX_BLOCK_SECONDS + 10.0,
        socket_keepalive=True,
        socket_keepalive_options=keepalive,
        health_check_interval=30,
        retry_on_timeout=False,
    )
    return client
