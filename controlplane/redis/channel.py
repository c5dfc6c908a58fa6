"""Pipelined Redis commands over one dedicated connection: the hot path's transport.

redis-py's client takes a connection from its pool, sends one command, waits for its reply
and gives the connection back: about 90 µs of CPU per command here, most of it in that
bookkeeping. A `Channel` keeps one connection to itself. The first call of a step of the
event loop is written at once; calls made later in the same step are written together when
the step ends. So a lone caller waits for nothing, concurrent callers pipeline for free (100
dispatches made at once cost two `send()` system calls, not 100: on loopback the system call
is the dearest part of a command), and a caller may send several commands in one write
(`execute_many`), e.g. a kernel's result together with its next blocking pop. Replies are
parsed (hiredis) as the socket delivers them and each goes straight to its waiting future:
no reader task and no stream buffer sit between the socket and the caller.

The connection is made, and its handshake done, by the client's own pool class, so URL
options, TLS, auth and Sentinel work exactly as for the client; then the channel takes the
transport over from redis-py's stream (`_Link`). Replies are decoded as the client decodes them.
A lost connection fails every waiting call with `redis.exceptions.ConnectionError`; the
next call reconnects. A channel carrying a blocking command (BZPOPMIN, BLPOP) is blocked
for everyone until it returns, so blocking readers get a channel of their own.

Redis Cluster's client has no pool: `cluster_channel.ClusterChannel` keeps one `Channel` per
master (`Channel.to_node`, from the node's connection settings) and routes by slot.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import hiredis
import redis.asyncio as aioredis
import redis.exceptions
from redis._parsers.base import BaseParser
from redis.asyncio.connection import AbstractConnection

from controlplane.redis.errors import Where, annotate, where_of

Command = Sequence[str | int | float | bytes]
#: Bytes waiting in the socket's write buffer above which `send` waits for the peer to read.
WRITE_HIGH_WATER = 4 << 20


class Channel:
    """Commands pipelined on one connection of `redis`'s pool configuration."""

    def __init__(self, redis: aioredis.Redis, *, preload: Sequence[str] = ()) -> None:
        """`preload`: Lua sources loaded on every connect (see `scripts.call.preloading`)."""
        pool = redis.connection_pool
        self._setup(pool.connection_class, pool.connection_kwargs, where_of(redis), preload)

    @classmethod
    def to_node(
        cls,
        connection_class: type[AbstractConnection],
        connection_kwargs: dict[str, Any],
        where: Where,
        *,
        preload: Sequence[str] = (),
        parse_error: Callable[[str], Exception] = BaseParser.parse_error,
    ) -> Channel:
        """A channel whose connections are `connection_class(**connection_kwargs)`: a Redis
        Cluster node's settings (`cluster_channel`), whose error replies `parse_error` types
        (MOVED, ASK, TRYAGAIN, CLUSTERDOWN with redis-py's `ClusterParser`)."""
        channel = cls.__new__(cls)
        channel._setup(connection_class, connection_kwargs, where, preload, parse_error)
        return channel

    def _setup(
        self,
        connection_class: type[AbstractConnection],
        connection_kwargs: dict[str, Any],
        where: Where,
        preload: Sequence[str],
        parse_error: Callable[[str], Exception] = BaseParser.parse_error,
    ) -> None:
        self._connection_class = connection_class
        self._connection_kwargs = connection_kwargs
        self._parse_error = parse_error
        self._where = where  # for the errors' messages (`annotate`)
        self._preload = preload
        self._link: _Link | None = None
        self._connecting: asyncio.Lock | None = None
        self._out: list[bytes] = []  # packed commands not written yet
        self._batching = False  # a write went out this loop step: later ones wait for its end

    async def execute(self, *command: str | int | float | bytes) -> Any:
        """Run one command; raise its error reply as redis-py would."""
        (reply,) = await self.execute_many([command])
        if isinstance(reply, Exception):
            annotate(reply, self._where, command)
            raise reply
        return reply

    async def execute_many(self, commands: Sequence[Command]) -> list[Any]:
        """Send `commands` in one write and return their replies in order; an error reply is
        returned as its exception. A caller that stops waiting (cancelled, timed out) leaves
        the connection usable: its replies are dropped when they come."""
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
        return await self._send(commands, None)

    async def _send(
        self, commands: Sequence[Command], futures: list[asyncio.Future[Any]] | None
    ) -> list[asyncio.Future[Any]]:
        """`send`, resolving `futures` (one per command: a cluster channel's, which see their
        reply first) rather than new ones."""
        link = self._link or await self._connect()
        if link.closed:  # lost while we connected: its waiters were failed already
            raise redis.exceptions.ConnectionError("connection to Redis lost")
        loop = asyncio.get_running_loop()
        if futures is None:
            futures = [loop.create_future() for _ in commands]
        link.waiters.extend(futures)  # in the order of the writes: replies come in this order
        self._out.append(_pack(commands))
        if not self._batching:
            self._batching = True
            loop.call_soon(self._end_batch)
            self._write()
        if link.paused is not None:  # the peer is slow to read: wait rather than buffer without bound
            await asyncio.shield(link.paused)
        return futures

    async def reset(self, why: str) -> None:
        """Drop the connection: every waiting call fails with ConnectionError(`why`); the next
        call reconnects."""
        self._drop(redis.exceptions.ConnectionError(f"channel reset: {why}"))

    async def aclose(self) -> None:
        await self.reset("closed")

    async def load_script(self, source: str, key: str | None = None) -> Any:
        """SCRIPT LOAD `source` where a call of it with first key `key` runs (here: this
        channel's server; a cluster channel picks the key's node)."""
        return await self.execute("SCRIPT", "LOAD", source)

    # ------------------------------------------------------------------ internals
    async def _connect(self) -> _Link:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._link is None:
                # no socket timeout on reads: a blocking command may legitimately take its
                # whole timeout; callers bound their waits, and keepalive finds dead peers
                kwargs = {**self._connection_kwargs, "socket_timeout": None}
                conn: AbstractConnection = self._connection_class(**kwargs)
                try:
                    await conn.connect()  # type: ignore[no-untyped-call]
                except redis.exceptions.RedisError as exc:  # e.g. a wrong password
                    annotate(exc, self._where)
                    raise
                try:
                    if self._preload:  # so a pipelined EVALSHA never meets NOSCRIPT behind a blocking pop
                        await conn.send_packed_command(
                            _pack([("SCRIPT", "LOAD", source) for source in self._preload]),
                            check_health=False,
                        )
                        for _ in self._preload:
                            await conn.read_response()
                    self._link = _Link(conn, self._lost, self._parse_error)
                except BaseException:
                    with contextlib.suppress(Exception):
                        await conn.disconnect(nowait=True)
                    raise
            return self._link

    def _end_batch(self) -> None:
        self._batching = False
        self._write()

    def _write(self) -> None:
        """Write what is queued on the current connection (`_drop` empties the queue, so what
        is queued belongs to it). Synchronous: nothing can cancel it halfway."""
        if not self._out or self._link is None:
            return
        data = b"".join(self._out)
        self._out.clear()
        try:
            self._link.write(data)
        except Exception as exc:
            self._drop(redis.exceptions.ConnectionError(f"channel write failed: {exc!r}"))

    def _lost(self, link: _Link) -> None:
        """`link` closed (by us, the peer, or a bad reply): forget it and what was not written."""
        if self._link is link:
            self._link = None
            self._out.clear()

    def _drop(self, exc: Exception) -> None:
        if self._link is not None:
            self._link.close(exc)  # which calls `_lost`


class _Link(asyncio.Protocol):
    """The protocol of a channel's connection once redis-py has made it: it feeds what the
    socket delivers to a hiredis reader and resolves the future of each reply in place, in
    the order of the writes. redis-py's stream is bypassed from then on; its connection
    object is kept only to close it."""

    def __init__(
        self,
        conn: AbstractConnection,
        on_lost: Callable[[_Link], None],
        parse_error: Callable[[str], Exception] = BaseParser.parse_error,
    ) -> None:
        encoder = conn.encoder
        self.conn = conn
        self.waiters: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.paused: asyncio.Future[None] | None = None  # while the transport's buffer is full
        self._on_lost = on_lost
        self._closed = False
        self._parser = hiredis.Reader(
            protocolError=redis.exceptions.InvalidResponse,
            replyError=parse_error,
            notEnoughData=_MORE,
            **(
                {"encoding": encoder.encoding, "errors": encoder.encoding_errors}
                if encoder.decode_responses
                else {}
            ),
        )
        writer = conn._writer  # redis-py has no public handle on its transport: pinned in pyproject.toml
        if writer is None:
            raise redis.exceptions.ConnectionError("connection closed during set-up")
        self.transport: asyncio.WriteTransport = writer.transport
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self.transport.set_protocol(self)

    @property
    def closed(self) -> bool:
        return self._closed

    def write(self, data: bytes) -> None:
        if self._closed or self.transport.is_closing():
            raise ConnectionResetError("connection closed")
        self.transport.write(data)

    def close(self, exc: Exception) -> None:
        """Tell the channel, fail every waiter with `exc` and close the connection."""
        if self._closed:
            return
        self._closed = True
        self._on_lost(self)
        self._fail_all(exc)
        self.transport.abort()
        # redis-py's bookkeeping (its stream is closed with the transport)
        self.conn._reader = self.conn._writer = None

    # ---- asyncio.Protocol
    def data_received(self, data: bytes) -> None:
        parser, waiters = self._parser, self.waiters
        try:
            parser.feed(data)
            while (reply := parser.gets()) is not _MORE:
                fut = waiters.popleft()  # IndexError: a reply nobody asked for
                if not fut.done():
                    fut.set_result(reply)
        except Exception as exc:
            self.close(redis.exceptions.ConnectionError(f"channel read failed: {exc!r}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.close(
            redis.exceptions.ConnectionError(
                f"connection to Redis lost: {exc!r}" if exc else "connection closed by server"
            )
        )

    def eof_received(self) -> bool:
        return False  # close the transport: connection_lost follows

    def pause_writing(self) -> None:
        self.paused = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self.paused is not None and not self.paused.done():
            self.paused.set_result(None)
        self.paused = None

    def _fail_all(self, exc: Exception) -> None:
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_exception(exc)
        self.resume_writing()


#: What the hiredis reader returns when no whole reply is buffered.
_MORE = object()


def _pack(commands: Sequence[Command]) -> bytes:
    """RESP of `commands`, by hiredis's C packer (about 10x faster than redis-py's)."""
    return b"".join(hiredis.pack_command(tuple(command)) for command in commands)  # type: ignore[arg-type]
