"""Pipelined Redis commands over one dedicated connection: the hot path's transport.

redis-py's client takes a connection from its pool, sends one command, waits for its reply
and gives the connection back: about 90 µs of CPU per command here, most of it in that
bookkeeping. A `Channel` keeps one connection to itself and lets one reader task hand the
replies back in order. The first call of a step of the event loop is written at once; calls
made later in the same step are written together when the step ends. So a lone caller waits
for nothing, concurrent callers pipeline for free (100 dispatches made at once cost two
`send()` system calls, not 100: on loopback the system call is the dearest part of a
command), and a caller may send several commands in one write (`execute_many`), e.g. a
kernel's result together with its next blocking pop.

The connection is made by the client's own pool class, so URL options, TLS, auth and
Sentinel work exactly as for the client. Replies are decoded as the client decodes them.
A lost connection fails every waiting call with `redis.exceptions.ConnectionError`; the
next call reconnects. A channel carrying a blocking command (BZPOPMIN, BLPOP) is blocked
for everyone until it returns, so blocking readers get a channel of their own.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import hiredis
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.connection import AbstractConnection
from redis.commands.core import AsyncScript

Command = Sequence[str | int | float | bytes]
#: Bytes waiting in the socket's write buffer above which `send` waits for the peer to read.
WRITE_HIGH_WATER = 4 << 20
ScriptCall = Callable[..., Awaitable[Any]]


class Channel:
    """Commands pipelined on one connection of `redis`'s pool configuration."""

    def __init__(self, redis: aioredis.Redis, *, preload: Sequence[AsyncScript] = ()) -> None:
        self._pool = redis.connection_pool
        self._preload = preload
        self._conn: AbstractConnection | None = None
        self._connecting: asyncio.Lock | None = None
        self._out: list[bytes] = []  # packed commands not written yet
        self._batching = False  # a write went out this loop step: later ones wait for its end
        self._waiters: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._readable = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._dropping: asyncio.Task[None] | None = None  # a drop a failed write started

    async def execute(self, *command: str | int | float | bytes) -> Any:
        """Run one command; raise its error reply as redis-py would."""
        (reply,) = await self.execute_many([command])
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def execute_many(self, commands: Sequence[Command]) -> list[Any]:
        """Send `commands` in one write and return their replies in order; an error reply is
        returned as its exception. A caller that stops waiting (cancelled, timed out) leaves
        the connection usable: the reader drops its replies when they come."""
        futures = await self.send(commands)
        try:
            if len(futures) == 1:
                return [await futures[0]]
            return list(await asyncio.gather(*futures))
        except asyncio.CancelledError:
            for fut in futures:
                fut.cancel()
            raise

    async def send(self, commands: Sequence[Command]) -> list[asyncio.Future[Any]]:
        """Write `commands` (now, or with the others of this loop step when it ends); one
        future per reply, resolved in order (for a caller that acts on the first replies
        before a later, blocking one returns). A lost connection fails them with
        ConnectionError."""
        conn = await self._connection()
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in commands]
        self._waiters.extend(futures)  # in the order of the writes: replies come in this order
        self._readable.set()
        self._out.append(_pack(commands))
        if not self._batching:
            self._batching = True
            loop.call_soon(self._end_batch)
            self._write()
        writer = _writer(conn)
        if writer is not None and writer.transport.get_write_buffer_size() > WRITE_HIGH_WATER:
            await writer.drain()  # the peer is slow to read: wait rather than buffer without bound
        return futures

    async def evalsha(self, script: AsyncScript, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """EVALSHA `script`, loading it first when the server does not know it (a restarted
        or failed-over Redis forgets its scripts)."""
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        try:
            return await self.execute(*command)
        except redis.exceptions.NoScriptError:
            await self.execute("SCRIPT", "LOAD", _source(script))
            return await self.execute(*command)

    async def reset(self, why: str) -> None:
        """Drop the connection: every waiting call fails with ConnectionError(`why`); the next
        call reconnects."""
        await self._drop(redis.exceptions.ConnectionError(f"channel reset: {why}"))

    def script(self, script: AsyncScript) -> ScriptCall:
        """`script` as a callable with redis-py's `AsyncScript` signature, run on this channel."""

        async def call(keys: Sequence[str], args: Sequence[Any]) -> Any:
            return await self.evalsha(script, keys, args)

        return call

    async def aclose(self) -> None:
        await self.reset("closed")

    # ------------------------------------------------------------------ internals
    async def _connection(self) -> AbstractConnection:
        if self._conn is not None:
            return self._conn
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._conn is None:
                # no socket timeout on reads: a blocking command may legitimately take its
                # whole timeout; callers bound their waits, and keepalive finds dead peers
                kwargs = {**self._pool.connection_kwargs, "socket_timeout": None}
                conn: AbstractConnection = self._pool.connection_class(**kwargs)
                await conn.connect()  # type: ignore[no-untyped-call]
                if self._preload:  # so a pipelined EVALSHA never meets NOSCRIPT behind a blocking pop
                    await conn.send_packed_command(
                        _pack([("SCRIPT", "LOAD", _source(s)) for s in self._preload]), check_health=False
                    )
                    for _ in self._preload:
                        await conn.read_response()
                self._conn = conn
                self._reader = asyncio.create_task(self._read(conn), name="kcp-channel-reader")
        return self._conn

    async def _read(self, conn: AbstractConnection) -> None:
        while True:
            while not self._waiters:
                self._readable.clear()
                await self._readable.wait()
            try:
                reply: Any = await conn.read_response()
            except redis.exceptions.ResponseError as exc:
                reply = exc
            except Exception as exc:
                if self._conn is conn:
                    self._conn = self._reader = None
                self._fail_all(
                    exc
                    if isinstance(exc, redis.exceptions.ConnectionError)
                    else redis.exceptions.ConnectionError(f"channel read failed: {exc!r}")
                )
                with contextlib.suppress(Exception):
                    await conn.disconnect(nowait=True)
                return
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(reply)

    def _end_batch(self) -> None:
        self._batching = False
        self._write()

    def _write(self) -> None:
        """Write what is queued on the current connection (`_drop` empties the queue, so what
        is queued belongs to it). Synchronous: nothing can cancel it halfway."""
        if not self._out or self._conn is None:
            return
        data = b"".join(self._out)
        self._out.clear()
        writer = _writer(self._conn)
        try:
            if writer is None:
                raise ConnectionResetError("connection closed")
            writer.write(data)
        except Exception as exc:
            error = redis.exceptions.ConnectionError(f"channel write failed: {exc!r}")
            self._dropping = asyncio.get_running_loop().create_task(self._drop(error))

    def _fail_all(self, exc: Exception) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(exc)

    async def _drop(self, exc: Exception) -> None:
        conn, reader = self._conn, self._reader
        self._conn = self._reader = None
        self._out.clear()
        self._fail_all(exc)
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
            # gather(return_exceptions) waits for it without swallowing a cancellation of our own
            await asyncio.gather(reader, return_exceptions=True)
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.disconnect(nowait=True)


def _writer(conn: AbstractConnection) -> asyncio.StreamWriter | None:
    """The stream redis-py writes `conn` through (None once closed). redis-py has no public
    write that does not wait for the drain; pinned to redis 5 in pyproject.toml."""
    return conn._writer


def _pack(commands: Sequence[Command]) -> bytes:
    """RESP of `commands`, by hiredis's C packer (about 10x faster than redis-py's)."""
    return b"".join(hiredis.pack_command(tuple(command)) for command in commands)  # type: ignore[arg-type]


def _source(script: AsyncScript) -> str | bytes:
    return bytes(script.script) if isinstance(script.script, memoryview) else script.script
