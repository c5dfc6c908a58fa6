"""The few commands whose form differs between one Redis (or Sentinel's master) and a Redis Cluster.

Everything else kcp sends is the same on both: single-key commands, scripts whose keys share
one hash tag (`protocol/keys.py`), and non-transactional pipelines (redis-py's cluster pipeline
splits them by node). What is left, each in one function used by both deployments:

- `mget`: MGET over keys of several slots (agent leases, cluster versions); the cluster client
  refuses it, and its `mget_nonatomic` sends one MGET per slot. Not atomic on either: callers
  never relied on it.
- `delete_each`: DEL of several keys in a pipeline, one DEL per key (a cluster pipeline refuses a
  multi-key DEL whose keys are in several slots, and a one-key DEL is the same on one Redis).
- `in_order`: writes that must land in a given order (the record before the set that lists it,
  the lease last). A cluster pipeline runs its per-node parts concurrently, so each step is its
  own pipeline there; on one Redis all steps go in one pipeline, which keeps their order.
- `publish` / `subscribed`: classic pub/sub (`kcp:notify`). A Redis Cluster forwards a PUBLISH
  to every node, so it is sent to one node, and a subscriber listens on one master; redis-py 5's
  asyncio cluster client has neither, so the subscriber gets a plain client for one node, with
  the cluster's connection settings (TLS, ACL user), and the next attempt after a failure takes
  the next node.
- `xreadgroup`: one consumer's read of several streams (a bus kernel's inbox and topics). One
  XREADGROUP on one Redis (BLOCK included); on a cluster, when the streams are in several slots,
  one non-blocking XREADGROUP per stream in a pipeline, and when none had anything a pause of
  `CLUSTER_POLL_S` (at most the block) before the caller reads again: Redis cannot block one
  command on streams of several nodes, so there a quiet kernel polls.
- `drop_connections`: close a client's connections so the next command reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub

from controlplane.redis.connect import AsyncPipeline, AsyncRedis, AsyncRedisCluster, node_client

#: A subscription as redis-py gives it (`get_message`, `subscribe`).
AsyncPubSub = PubSub
#: Something that queues commands into a pipeline (one step of `in_order`).
Step = Callable[[AsyncPipeline], object]


#: On a cluster, how long a consumer whose streams are in several slots waits after a read that
#: found nothing, seconds (the latency a message to a quiet kernel may get there).
CLUSTER_POLL_S = 0.05


async def mget(redis: AsyncRedis, keys: Sequence[str]) -> list[Any]:
    """The values of `keys` (None for a missing one), in order, whatever their slots."""
    if not keys:
        return []
    if isinstance(redis, AsyncRedisCluster):
        return list(await redis.mget_nonatomic(list(keys)))
    return list(await redis.mget(list(keys)))


def delete_each(pipe: AsyncPipeline, keys: Sequence[str]) -> int:
    """Queue one DEL per key into `pipe`; returns how many replies that adds (one per key)."""
    for key in keys:
        pipe.delete(key)
    return len(keys)


async def in_order(redis: AsyncRedis, *steps: Step) -> list[Any]:
    """Run `steps` (each queues commands into a pipeline) so that every command of a step is
    applied before any of the next: one round trip on one Redis, one per step on a cluster.
    Returns every reply, in the order the commands were queued; raises the first error."""
    if not isinstance(redis, AsyncRedisCluster):
        async with redis.pipeline(transaction=False) as pipe:
            for step in steps:
                step(pipe)
            return list(await pipe.execute())
    replies: list[Any] = []
    for step in steps:
        async with redis.pipeline(transaction=False) as cpipe:
            step(cpipe)
            replies += await cpipe.execute()
    return replies


async def publish(redis: AsyncRedis, channel: str, message: str) -> int:
    """PUBLISH `message` on `channel`; the number of subscribers of the node it reached."""
    if isinstance(redis, AsyncRedisCluster):
        # any one node: the cluster bus forwards a classic PUBLISH to every other node
        one = AsyncRedisCluster.DEFAULT_NODE
        return int(await redis.execute_command("PUBLISH", channel, message, target_nodes=one))
    return int(await redis.publish(channel, message))


@contextlib.asynccontextmanager
async def subscribed(redis: AsyncRedis, channel: str, *, attempt: int = 0) -> AsyncIterator[AsyncPubSub]:
    """A subscription to `channel`, closed on exit. On a cluster it is held on one node (of the
    nodes the cluster client knows, i.e. its masters, in name order, the `attempt`-th modulo their
    number): a caller that subscribes again after a failure passes the next attempt, and so moves
    to another node."""
    node: aioredis.Redis | None = None
    if isinstance(redis, AsyncRedisCluster):
        await redis.initialize()
        nodes = sorted(redis.get_nodes(), key=lambda n: n.name)
        node = node_client(redis, nodes[attempt % len(nodes)])
        pubsub = node.pubsub(ignore_subscribe_messages=True)
    else:
        pubsub = redis.pubsub(ignore_subscribe_messages=True)
    try:
        await pubsub.subscribe(channel)
        yield pubsub
    finally:
        with contextlib.suppress(Exception):
            await pubsub.aclose()  # type: ignore[no-untyped-call]
        if node is not None:
            with contextlib.suppress(Exception):
                await node.aclose()


async def drop_connections(redis: AsyncRedis) -> None:
    """Close `redis`'s connections (a half-read one among them); the next command reconnects
    (a cluster client re-reads its slot table first)."""
    if isinstance(redis, AsyncRedisCluster):
        await redis.aclose()
    else:
        await redis.connection_pool.disconnect()


async def xreadgroup(
    redis: AsyncRedis,
    group: str,
    consumer: str,
    streams: Mapping[str, str],
    *,
    count: int,
    block_ms: int | None = None,
    acks: Mapping[str, Sequence[str]] | None = None,
) -> Any:
    """XREADGROUP of `streams` (stream -> cursor: `>` or an id) for `consumer` of `group`, after
    XACKing `acks` (stream -> ids) in the same round trip; the reply as the client's XREADGROUP
    callback makes it ([[stream, entries], ...], or None/empty for nothing)."""
    todo = {stream: ids for stream, ids in (acks or {}).items() if ids}
    several = isinstance(redis, AsyncRedisCluster) and len({redis.keyslot(s) for s in streams}) > 1
    wanted: dict[Any, Any] = dict(streams)  # redis-py's parameter type, read-only here
    options: dict[str, Any] = {"count": count}
    if block_ms is not None and not several:
        options["block"] = block_ms
    if not todo and not several:
        return await redis.xreadgroup(group, consumer, wanted, **options)
    pipe = redis.pipeline(transaction=False)
    for stream, ids in todo.items():
        pipe.xack(stream, group, *ids)
    if several:
        for stream, cursor in streams.items():
            pipe.xreadgroup(group, consumer, {stream: cursor}, **options)
    else:
        pipe.xreadgroup(group, consumer, wanted, **options)
    replies = (await pipe.execute())[len(todo) :]
    if not several:
        return replies[0]
    response = [item for reply in replies if reply for item in reply]
    if not response and block_ms:
        await asyncio.sleep(min(block_ms / 1000, CLUSTER_POLL_S))
    return response
