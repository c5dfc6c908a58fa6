"""The hot path's transport on Redis Cluster: one `Channel` per master node, commands routed by slot.

A `ClusterChannel` has the interface of a `Channel` (`execute`, `execute_many`, `send`, `reset`,
`aclose`, `load_script`) over redis-py's asyncio `RedisCluster`, which has no connection pool
to take a connection from. For each master it reaches it keeps a `Channel` of its own, made
lazily from that node's connection settings (so TLS, ACL user, RESP2 and decoding are the
cluster client's) and preloading the same scripts on every connect. Each command goes to the
master of its slot: the slot of its first key (EVAL/EVALSHA: KEYS[1], after numkeys; XREAD:
the first stream), by redis-py's `keyslot` and slot table (`nodes_manager`). A batch is split
by node; each node's part is written in order on that node's channel (as one write, with the
others of the loop step), and the replies come back in the caller's order. Commands of one
slot thus always share one connection, in order, and a blocking command holds up only the
channel of its node: a channel carrying one kcp cluster's commands (a kernel's) is a channel
to one node, so the rule "a blocking reader gets a channel of its own" is unchanged. A command
without a key (PING, PUBLISH, SCRIPT) goes to the node used last, else to any master.

Topology changes. A MOVED reply (the slot is served elsewhere: resharding, failover; the command
was not run) patches the slot table (as redis-py does) and sends the command again to the node
the reply named; ASK sends it there once behind ASKING; TRYAGAIN is sent again after a short
pause. At most `MAX_REDIRECTIONS` times, then the last error reply is the command's (errors.py
maps all of them to `RedisUnavailable`). A lost node fails its waiting calls with
ConnectionError, as a `Channel` does, and marks the slot table stale: the next call re-reads it
first, so once a replica is promoted the next call reaches it. CLUSTERDOWN is returned as it
came (transient, `RedisUnavailable`) and also marks the table stale.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import redis.exceptions as rex
from redis.asyncio.cluster import ClusterNode, ClusterParser, RedisCluster
from redis.crc import key_slot

from controlplane.redis.channel import Channel, Command
from controlplane.redis.errors import Where, annotate

#: How many times one command follows MOVED / ASK / TRYAGAIN before its error reply is returned.
MAX_REDIRECTIONS = 5
#: Pause before a command refused with TRYAGAIN (a multi-key command during a migration) is sent again.
TRYAGAIN_PAUSE = 0.05
#: Commands without a key: they go to any master (the one used last).
KEYLESS = frozenset(
    {
        "PING", "ECHO", "PUBLISH", "SCRIPT", "TIME", "INFO", "CLIENT", "CLUSTER", "WAIT", "COMMAND",
        "CONFIG", "DBSIZE", "FLUSHALL", "FLUSHDB", "HELLO", "AUTH", "SELECT", "READONLY", "ASKING",
        "FUNCTION", "LASTSAVE", "MEMORY", "SLOWLOG", "LATENCY",
    }
)  # fmt: skip
_SCRIPTED = frozenset({"EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO", "FCALL", "FCALL_RO"})
_STREAMS = frozenset({"XREAD", "XREADGROUP"})
#: Connection arguments of a cluster client that are not a connection's own (ClusterNode's).
_NOT_CONNECTION_KWARGS = ("max_connections", "connection_class", "response_callbacks")


def _text(arg: str | int | float | bytes) -> str:
    return arg.decode("utf-8", "replace") if isinstance(arg, bytes) else str(arg)


#: How a command's name says where its key is (`first_key`), by the name as callers spell it.
_KEY_AT: dict[str | int | float | bytes, int] = {}
_AFTER_NUMKEYS, _AFTER_STREAMS, _NO_KEY, _SECOND = range(4)


def _key_at(name: str | int | float | bytes) -> int:
    upper = _text(name).upper()
    if upper in _SCRIPTED:
        return _AFTER_NUMKEYS
    if upper in _STREAMS:
        return _AFTER_STREAMS
    return _NO_KEY if upper in KEYLESS else _SECOND


def first_key(command: Command) -> str | int | float | bytes | None:
    """The key a command is routed by, or None for a keyless one."""
    name = command[0]
    kind = _KEY_AT.get(name)
    if kind is None:
        kind = _key_at(name)
        if len(_KEY_AT) < 1024:  # callers' command names: a few dozen
            _KEY_AT[name] = kind
    if kind == _SECOND:
        return command[1] if len(command) > 1 else None
    if kind == _AFTER_NUMKEYS:
        return command[3] if len(command) > 3 and int(command[2]) > 0 else None
    if kind == _AFTER_STREAMS:
        for i in range(1, len(command) - 1):
            if _text(command[i]).upper() == "STREAMS":
                return command[i + 1]
    return None


class _Redirect:
    """Where a command refused with MOVED/ASK/TRYAGAIN goes next."""

    __slots__ = ("asking", "node")

    def __init__(self, node: str | None, asking: bool) -> None:
        self.node = node  # "host:port", or None: by the slot table
        self.asking = asking


class ClusterChannel(Channel):
    """Commands pipelined on one connection per master of `redis`, routed by slot.

    A `Channel` subclass so that code typed for a channel takes one; nothing of a single
    connection's state is used (every public method is its own)."""

    def __init__(self, redis: RedisCluster, *, preload: Sequence[str] = ()) -> None:
        """`preload`: Lua sources loaded on every connect of every node's channel."""
        self._cluster = redis
        self._preload = tuple(preload)
        known: Where | None = getattr(redis, "kcp_where", None)
        self._where = known if known is not None and known.url is not None else Where(url=None)
        self._nodes: dict[str, Channel] = {}  # "host:port" -> its channel
        self._last: str | None = None  # the node keyless commands go to
        self._stale = False  # the slot table is re-read before the next command is routed
        self._generation = 0  # slot table reads done, so concurrent callers share one
        self._refreshing: asyncio.Lock | None = None
        self._resends: set[asyncio.Task[None]] = set()
        self._pending: list[tuple[_Routed, _Redirect]] = []  # redirected by a reply, to send again
        self._encode: Callable[[object], bytes] = redis.encoder.encode
        self._encoding: str = redis.encoder.encoding

    # ------------------------------------------------------------------ the Channel interface
    async def execute(self, *command: str | int | float | bytes) -> Any:
        """Run one command on its slot's master; raise its error reply as redis-py would."""
        if self._stale or not self._cluster.nodes_manager.slots_cache:
            await self._refresh()
        name = self._node_of(command)
        try:
            (reply,) = await self._channel(name).execute_many([command])
        except rex.ConnectionError:
            self._node_lost(name)
            raise
        if isinstance(reply, rex.ResponseError):
            if self._redirect(reply) is not None:  # MOVED, ASK, TRYAGAIN: sent again where it says
                replies = [reply]
                await self._follow([command], replies)
                (reply,) = replies
            if isinstance(reply, Exception):
                annotate(reply, self._where, command)
                raise reply
        return reply

    async def execute_many(self, commands: Sequence[Command]) -> list[Any]:
        """Send `commands`, each to its slot's master (each node's part in one write, in
        order), and return their replies in the caller's order; an error reply is returned as
        its exception. A lost node raises ConnectionError (the others' replies are dropped)."""
        if not commands:
            return []
        if self._stale or not self._cluster.nodes_manager.slots_cache:
            await self._refresh()
        names = [self._node_of(command) for command in commands]
        name = names[0]
        if names.count(name) == len(names):  # one node (a kernel's step): its channel as such
            try:
                replies = await self._channel(name).execute_many(commands)
            except rex.ConnectionError:
                self._node_lost(name)
                raise
            if any(isinstance(r, rex.ResponseError) and self._redirect(r) for r in replies):
                await self._follow(commands, replies)
            return replies
        replies = [None] * len(commands)
        await self._run(list(enumerate(commands)), replies, None)
        return replies

    async def send(self, commands: Sequence[Command]) -> list[asyncio.Future[Any]]:
        """Write `commands` (each node's part with the others of this loop step) and return
        one future per reply: a node's replies resolve in order as they come (a caller may act
        on the first before a later, blocking one returns). A redirected command's future
        resolves once it has run where the slot is now. A node that cannot be reached raises
        ConnectionError (as a `Channel` does; what went to other nodes then has no reader)."""
        loop = asyncio.get_running_loop()
        if self._stale or not self._cluster.nodes_manager.slots_cache:
            await self._refresh()
        names = [self._node_of(command) for command in commands]
        futures: list[asyncio.Future[Any]] = [
            _Routed(self, name, command, loop) for name, command in zip(names, commands, strict=True)
        ]
        if not names:
            return futures
        first = names[0]
        if names.count(first) == len(names):  # one node (a kernel's step): as it is
            groups = {first: list(range(len(names)))}
        else:
            groups = {}
            for index, name in enumerate(names):
                groups.setdefault(name, []).append(index)
        for name, indices in groups.items():
            try:
                await self._channel(name)._send([commands[i] for i in indices], [futures[i] for i in indices])
            except rex.ConnectionError:
                self._node_lost(name)
                for fut in futures:
                    fut.cancel()
                raise
        return futures

    async def reset(self, why: str) -> None:
        """Drop every node's connection: waiting calls fail with ConnectionError(`why`); the
        next call reconnects."""
        for channel in list(self._nodes.values()):
            await channel.reset(why)

    async def aclose(self) -> None:
        await self.reset("closed")
        self._nodes.clear()

    async def load_script(self, source: str, key: str | None = None) -> Any:
        """SCRIPT LOAD `source` on the master of `key`'s slot (any master without a key)."""
        command: Command = ("SCRIPT", "LOAD", source)
        if key is None:
            return await self.execute(*command)
        groups = await self._route([(0, ("GET", key))], None)
        (name,) = groups
        return await self._channel(name).execute(*command)

    # ------------------------------------------------------------------ internals
    async def _run(
        self, items: list[tuple[int, Command]], replies: list[Any], to: dict[int, _Redirect] | None
    ) -> None:
        """Run `items` (index into `replies`, command), `to` where redirections said, and store
        each reply at its index, following redirections up to `MAX_REDIRECTIONS` times."""
        for hop in range(MAX_REDIRECTIONS + 1):
            groups = await self._route(items, to)
            parts: list[tuple[str, list[tuple[int, Command]], list[asyncio.Future[Any]], list[int]]] = []
            try:
                for name, group in groups.items():
                    sent, positions = _asking(group, to)
                    try:
                        futures = await self._channel(name).send(sent)
                    except rex.ConnectionError:
                        self._node_lost(name)
                        raise
                    parts.append((name, group, futures, positions))
                every = [f for part in parts for f in part[2]]
                await (every[0] if len(every) == 1 else asyncio.gather(*every))
            except asyncio.CancelledError:
                for part in parts:
                    for fut in part[2]:
                        fut.cancel()
                raise
            except rex.ConnectionError:
                for name, _, futures, _ in parts:
                    if any(f.done() and not f.cancelled() and f.exception() is not None for f in futures):
                        self._node_lost(name)
                raise
            again: list[tuple[int, Command]] = []
            to = {}
            for _, group, futures, positions in parts:
                for (index, command), position in zip(group, positions, strict=True):
                    reply = futures[position].result()
                    redirect = self._redirect(reply) if hop < MAX_REDIRECTIONS else None
                    if redirect is None:
                        replies[index] = reply
                    else:
                        again.append((index, command))
                        to[index] = redirect
            if not again:
                return
            if any(r.node is None for r in to.values()):  # TRYAGAIN
                await asyncio.sleep(TRYAGAIN_PAUSE)
            items = again

    def _again(self, fut: _Routed, redirect: _Redirect) -> None:
        """Queue `fut`'s command to run again where `redirect` says; the commands redirected in
        one step of the loop are sent again together, in the order their replies came."""
        self._pending.append((fut, redirect))
        if len(self._pending) == 1:
            fut.get_loop().call_soon(self._resend)

    def _resend(self) -> None:
        pending, self._pending = self._pending, []
        task = asyncio.get_running_loop().create_task(self._rerun(pending))
        self._resends.add(task)
        task.add_done_callback(self._resends.discard)

    async def _rerun(self, pending: list[tuple[_Routed, _Redirect]]) -> None:
        replies: list[Any] = [None] * len(pending)
        to = {index: redirect for index, (_, redirect) in enumerate(pending)}
        try:
            if any(r.node is None for r in to.values()):  # TRYAGAIN
                await asyncio.sleep(TRYAGAIN_PAUSE)
            await self._run([(i, fut.command) for i, (fut, _) in enumerate(pending)], replies, to)
        except asyncio.CancelledError:
            for fut, _ in pending:
                fut.cancel()
            raise
        except Exception as exc:
            for fut, _ in pending:
                if not fut.done():
                    asyncio.Future.set_exception(fut, exc)
            return
        for (fut, _), reply in zip(pending, replies, strict=True):
            if not fut.done():
                asyncio.Future.set_result(fut, reply)  # as it is: redirections were followed

    async def _follow(self, commands: Sequence[Command], replies: list[Any]) -> None:
        """Run again the `commands` whose `replies` redirect them (they did not run), where
        the replies say; the others' replies stay."""
        to: dict[int, _Redirect] = {}
        for index, reply in enumerate(replies):
            redirect = self._redirect(reply)
            if redirect is not None:
                to[index] = redirect
        if any(r.node is None for r in to.values()):  # TRYAGAIN
            await asyncio.sleep(TRYAGAIN_PAUSE)
        await self._run([(i, commands[i]) for i in to], replies, to)

    def _redirect(self, reply: Any) -> _Redirect | None:
        """Where to send a command again after `reply`, or None: `reply` is its answer."""
        if isinstance(reply, rex.MovedError):  # before AskError: MovedError is one
            self._moved(reply)
            return _Redirect(f"{reply.host}:{reply.port}", asking=False)
        if isinstance(reply, rex.AskError):
            return _Redirect(f"{reply.host}:{reply.port}", asking=True)
        if isinstance(reply, rex.TryAgainError):
            return _Redirect(None, asking=False)
        if isinstance(reply, rex.ClusterDownError):
            self._stale = True
        return None

    def _moved(self, reply: rex.MovedError) -> None:
        """Patch the slot table with what MOVED said, as redis-py's client does (a whole re-read
        would replace every node object and drop the client's pooled connections); if that
        fails, re-read it before the next command."""
        manager = self._cluster.nodes_manager
        try:
            manager._moved_exception = reply  # what redis-py's own MOVED handling sets
            manager.get_node_from_slot(reply.slot_id)  # which applies it
        except Exception:  # a slot the table does not hold, ...: the whole table then
            manager._moved_exception = None  # type: ignore[assignment]  # redis-py resets it so
            self._stale = True

    async def _route(
        self, items: list[tuple[int, Command]], to: dict[int, _Redirect] | None
    ) -> dict[str, list[tuple[int, Command]]]:
        """`items` grouped by the node each goes to, in their order."""
        if self._stale or not self._cluster.nodes_manager.slots_cache:
            await self._refresh()
        groups: dict[str, list[tuple[int, Command]]] = {}
        for index, command in items:
            redirect = to.get(index) if to is not None else None
            if redirect is not None and redirect.node is not None:
                name = redirect.node
            else:
                name = self._node_of(command)
            groups.setdefault(name, []).append((index, command))
        return groups

    def _node_of(self, command: Command) -> str:
        """The master of `command`'s slot by the slot table ("host:port"); a keyless command's
        is the node used last."""
        key = first_key(command)
        if key is None:
            return self._keyless()
        try:
            raw = key.encode(self._encoding) if isinstance(key, str) else self._encode(key)
            slots = self._cluster.nodes_manager.slots_cache[key_slot(raw)]
            name: str = slots[0].name
        except (KeyError, IndexError):
            self._stale = True
            raise rex.SlotNotCoveredError(f"slot of {key!r} not covered by the cluster") from None
        self._last = name
        return name

    def _keyless(self) -> str:
        if self._last is not None:
            return self._last
        manager = self._cluster.nodes_manager
        node = manager.default_node or manager.get_node_from_slot(0)
        return str(node.name)

    async def _refresh(self) -> None:
        """Re-read the slot table (one read for concurrent callers) and close the channels of
        nodes that are no longer masters."""
        if self._refreshing is None:
            self._refreshing = asyncio.Lock()
        generation = self._generation
        async with self._refreshing:
            if self._generation != generation:  # another caller read it meanwhile
                return
            manager = self._cluster.nodes_manager
            try:
                if not manager.slots_cache:
                    await self._cluster.initialize()
                else:
                    await manager.initialize()
            except rex.RedisClusterException as exc:  # no startup node answered
                raise rex.ConnectionError(f"Redis Cluster slot table not read: {exc}") from exc
            self._generation += 1
            self._stale = False
            masters = {node.name for node in self._cluster.get_primaries()}
            for name in [n for n in self._nodes if n not in masters]:
                await self._nodes.pop(name).aclose()
            if self._last not in masters:
                self._last = None

    def _node_lost(self, name: str) -> None:
        """`name`'s connection failed: read the slot table again before the next command."""
        self._stale = True
        if self._last == name:
            self._last = None

    def _channel(self, name: str) -> Channel:
        channel = self._nodes.get(name)
        if channel is None:
            manager = self._cluster.nodes_manager
            node = manager.get_node(node_name=name)
            if node is None:  # a node the slot table does not know yet (named by MOVED/ASK)
                host, _, port = name.rpartition(":")
                node = ClusterNode(host, int(port), **manager.connection_kwargs)
            kwargs = {k: v for k, v in node.connection_kwargs.items() if k not in _NOT_CONNECTION_KWARGS}
            channel = Channel.to_node(
                node.connection_class,
                kwargs,
                replace(self._where, url=self._where.url or f"redis+cluster://{name}"),
                preload=self._preload,
                parse_error=ClusterParser.parse_error,
            )
            self._nodes[name] = channel
        return channel


def _asking(
    group: list[tuple[int, Command]], to: dict[int, _Redirect] | None
) -> tuple[list[Command], list[int]]:
    """What to write for `group`: its commands, each one redirected by ASK behind an ASKING;
    and where each command's reply is among the replies."""
    if to is None or not any((r := to.get(i)) is not None and r.asking for i, _ in group):
        return [command for _, command in group], list(range(len(group)))
    sent: list[Command] = []
    positions: list[int] = []
    for index, command in group:
        redirect = to.get(index)
        if redirect is not None and redirect.asking:
            sent.append(("ASKING",))
        positions.append(len(sent))
        sent.append(command)
    return sent, positions


class _Routed(asyncio.Future[Any]):
    """The future of one command `send` wrote: the node's channel resolves it in place with
    the reply, unless the reply redirects the command (MOVED/ASK/TRYAGAIN): then the command is
    queued to run again (`ClusterChannel._again`) and the future waits for that reply."""

    __slots__ = ("command", "node", "owner")

    def __init__(
        self, owner: ClusterChannel, node: str, command: Command, loop: asyncio.AbstractEventLoop
    ) -> None:
        super().__init__(loop=loop)
        self.owner = owner
        self.node = node
        self.command = command

    def set_result(self, result: Any, /) -> None:
        if isinstance(result, rex.ResponseError):
            redirect = self.owner._redirect(result)
            if redirect is not None:
                self.owner._again(self, redirect)
                return
        super().set_result(result)

    def set_exception(self, exception: type | BaseException, /) -> None:
        if isinstance(exception, rex.ConnectionError):
            self.owner._node_lost(self.node)
        super().set_exception(exception)
