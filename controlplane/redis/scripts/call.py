"""How a script is sent: EVALSHA, and on NOSCRIPT (a restarted or failed-over Redis forgets
its scripts) SCRIPT LOAD and EVALSHA again. The only place that sends a script.

A `Call` is one script call with its KEYS and ARGV: run it awaited on a redis-py client or a
`Channel` (`run`), on a synchronous client (`run_sync`), or write its `command` into a
`Channel` pipeline and hand the reply to `settle` (the kernel writes finish, a blocking pop
and claim in one go). A pipelined EVALSHA must never meet NOSCRIPT behind a blocking pop, so
such channels load their scripts on every connect (`preloading`).

On a Redis Cluster client (`AsyncRedisCluster`) redis-py routes the EVALSHA by its KEYS (which
must hash to one slot: `protocol/keys.py` tags them), and a NOSCRIPT is answered by loading the
script on the node that owns the first key's slot only. `preloading` on such a client gives a
`ClusterChannel` (a channel per master, routed by slot), whose NOSCRIPT is answered the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import redis
import redis.asyncio as aioredis
import redis.exceptions

from controlplane.redis.channel import Channel, Command
from controlplane.redis.cluster_channel import ClusterChannel
from controlplane.redis.connect import AsyncRedisCluster
from controlplane.redis.lua import Script

R = TypeVar("R")
Arg = str | int | float | bytes


class Call(Generic[R]):
    """One call of `script`: the EVALSHA command, and how its reply becomes an `R`."""

    __slots__ = ("command", "keys", "parse", "script")

    def __init__(
        self, script: Script, keys: Sequence[str], args: Sequence[Arg], parse: Callable[[Any], R]
    ) -> None:
        self.script = script
        self.keys = tuple(keys)
        self.command: Command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        self.parse = parse

    async def run(self, conn: aioredis.Redis | AsyncRedisCluster | Channel) -> R:
        """Send the call on `conn` and parse its reply; an error reply is raised."""
        return self.parse(await self.reply(conn))

    async def reply(self, conn: aioredis.Redis | AsyncRedisCluster | Channel) -> Any:
        """The script's reply as Redis gives it (what the contract tests compare with the
        script's header)."""
        execute = conn.execute if isinstance(conn, Channel) else conn.execute_command
        try:
            return await execute(*self.command)
        except redis.exceptions.NoScriptError:
            if isinstance(conn, Channel):  # a cluster channel loads it on the first key's node
                await conn.load_script(self.script.source, self.keys[0] if self.keys else None)
            elif isinstance(conn, AsyncRedisCluster) and self.keys:
                node = conn.get_node_from_key(self.keys[0])
                await conn.execute_command("SCRIPT", "LOAD", self.script.source, target_nodes=node)
            else:
                await execute("SCRIPT", "LOAD", self.script.source)
            return await execute(*self.command)

    def run_sync(self, conn: redis.Redis) -> R:
        """`run` on a synchronous client."""
        execute: Callable[..., Any] = conn.execute_command  # redis-py leaves it untyped
        try:
            reply = execute(*self.command)
        except redis.exceptions.NoScriptError:
            execute("SCRIPT", "LOAD", self.script.source)
            reply = execute(*self.command)
        return self.parse(reply)

    async def settle(self, reply: Any, conn: aioredis.Redis | AsyncRedisCluster | Channel) -> R:
        """The result of this call from `reply`, what a pipeline returned for its `command`:
        an error reply is raised, and when the server had forgotten the script the call runs
        again on `conn` (not a channel whose next reply is a blocking pop's)."""
        if isinstance(reply, redis.exceptions.NoScriptError):
            return await self.run(conn)
        if isinstance(reply, Exception):
            raise reply
        return self.parse(reply)


def preloading(redis: aioredis.Redis | AsyncRedisCluster, *scripts: Script) -> Channel:
    """A channel that loads `scripts` whenever it connects, so pipelined calls of them never
    meet NOSCRIPT (and what is written behind them is not run against a failed call). On a
    Redis Cluster client: a `ClusterChannel`, one channel per master, each loading `scripts`
    whenever it connects."""
    preload = tuple(s.source for s in scripts)
    if isinstance(redis, aioredis.Redis):
        return Channel(redis, preload=preload)
    return ClusterChannel(redis, preload=preload)
