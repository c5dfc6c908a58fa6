"""Sharded pub/sub on a Redis Cluster (`SSUBSCRIBE`, Redis >= 7.0), for what redis-py's asyncio
cluster client has no form of.

A shard channel lives in a slot, like a key, so a script may `SPUBLISH` on one in the slot it
runs in, and only the master of that slot delivers it. `ShardedSubscriber` holds one connection
per master it subscribed on, each subscribed to the channels whose slots that master serves, and
hands every message to its callback. A subscription is a fast path, never the only one: it is
lost when its connection drops or its slot moves (Redis then unsubscribes it with
`sunsubscribe`), and the caller subscribes again when it next needs the channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.crc import key_slot

from controlplane.redis.connect import AsyncRedisCluster, node_client

logger = logging.getLogger(__name__)

#: How long a subscription may take to be confirmed, seconds (then the caller goes on without).
CONFIRM_SECONDS = 1.0
#: After a master refused or dropped a subscription, how long no new one is tried there, seconds.
BACKOFF_SECONDS = 1.0
#: How long a subscribed connection's read waits before it waits again, seconds (its socket
#: timeout would otherwise end an idle subscription).
IDLE_READ_SECONDS = 30.0


@dataclass
class _Node:
    """One master's subscribed connection."""

    client: aioredis.Redis
    connection: AbstractConnection
    channels: set[str] = field(default_factory=set)
    pending: dict[str, asyncio.Future[bool]] = field(default_factory=dict)
    reader: asyncio.Task[None] | None = None


class ShardedSubscriber:
    """Subscriptions to shard channels of `cluster`; `on_message(channel, data)` for each message.
    `aclose()` after use."""

    def __init__(self, cluster: AsyncRedisCluster, on_message: Callable[[str, str], None]) -> None:
        self._cluster = cluster
        self._on_message = on_message
        self._nodes: dict[str, _Node] = {}
        self._failed: dict[str, float] = {}  # master -> when it last refused or dropped us
        self._opening = asyncio.Lock()

    async def subscribe(self, channel: str) -> bool:
        """Subscribe to `channel` on the master of its slot; True once Redis confirmed it (at
        once when it is already), False when that could not be done now (the master is down,
        the slot moved, or it failed less than `BACKOFF_SECONDS` ago)."""
        if not self._cluster.nodes_manager.slots_cache:
            try:
                await self._cluster.initialize()  # a new client reads its slot table at first use
            except (OSError, aioredis.RedisError):
                return False
        name = self._master_of(channel)
        if name is None:
            return False
        node = self._nodes.get(name)
        if node is not None and channel in node.channels:
            return True
        if time.monotonic() - self._failed.get(name, -BACKOFF_SECONDS) < BACKOFF_SECONDS:
            return False
        try:
            async with asyncio.timeout(CONFIRM_SECONDS):
                async with self._opening:  # concurrent first calls open one connection
                    node = self._nodes.get(name) or await self._open(name)
                confirmed = node.pending.get(channel)
                if confirmed is None:
                    confirmed = node.pending[channel] = asyncio.get_running_loop().create_future()
                    await node.connection.send_command("SSUBSCRIBE", channel)
                return await asyncio.shield(confirmed)
        except (TimeoutError, OSError, aioredis.RedisError) as exc:
            logger.debug("no subscription to %s on %s: %s", channel, name, exc)
            self._failed[name] = time.monotonic()
            return False

    async def aclose(self) -> None:
        for name in list(self._nodes):
            await self._drop(name)

    def _master_of(self, channel: str) -> str | None:
        """The master serving `channel`'s slot by the cluster client's slot table (which kcp's
        channels keep up to date as they follow MOVED), None when the table has no such slot."""
        try:
            return str(self._cluster.nodes_manager.slots_cache[key_slot(channel.encode())][0].name)
        except (KeyError, IndexError):
            return None

    async def _open(self, name: str) -> _Node:
        found = self._cluster.get_node(node_name=name)
        if found is None:
            raise aioredis.ConnectionError(f"no node {name} in the slot table")
        client = node_client(self._cluster, found)
        try:
            connection = await client.connection_pool.get_connection()
        except BaseException:
            await client.aclose()
            raise
        node = self._nodes[name] = _Node(client, connection)
        node.reader = asyncio.create_task(self._read(name, node), name=f"kcp-shard-sub-{name}")
        return node

    async def _read(self, name: str, node: _Node) -> None:
        try:
            while True:
                message = await node.connection.read_response(timeout=IDLE_READ_SECONDS)
                if message is not None:
                    self._handle(name, node, message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the connection dropped, or an error reply (MOVED: the slot moved)
            logger.debug("sharded subscriptions on %s lost: %s", name, exc)
            self._failed[name] = time.monotonic()
            task = asyncio.create_task(self._drop(name))  # not from inside this task
            task.add_done_callback(lambda done: done.exception())

    def _handle(self, name: str, node: _Node, message: Any) -> None:
        kind, channel, data = (_text(part) for part in message[:3])
        if kind == "smessage":
            self._on_message(channel, data)
        elif kind == "ssubscribe":
            node.channels.add(channel)
            confirmed = node.pending.pop(channel, None)
            if confirmed is not None and not confirmed.done():
                confirmed.set_result(True)
        elif kind == "sunsubscribe":  # its slot moved to another master
            node.channels.discard(channel)

    async def _drop(self, name: str) -> None:
        node = self._nodes.pop(name, None)
        if node is None:
            return
        for confirmed in node.pending.values():
            if not confirmed.done():
                confirmed.set_result(False)
        if node.reader is not None and node.reader is not asyncio.current_task():
            node.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await node.reader
        with contextlib.suppress(Exception):
            await node.connection.disconnect()
        with contextlib.suppress(Exception):
            await node.client.aclose()


def _text(part: Any) -> str:
    return part.decode() if isinstance(part, bytes) else str(part)
