"""Redis connections from a URL, tuned for kcp's blocking reads; Sentinel- and Cluster-aware.

The one place kcp makes a redis-py client (asyncio `connect`, blocking `connect_sync`). Both speak
RESP2 whatever redis-py's default: the bus reads stream replies in their RESP2 shapes, and redis-py
8 defaults to RESP3 (`tests/redis/test_redis_py_canary.py` pins this).

`redis+cluster://` and `rediss+cluster://` URLs select redis-py's cluster client (issue 20: kcp's
keys are sharded by kcp cluster, its scripts run in one slot). The few commands whose form differs
on a cluster go through `controlplane/redis/portable.py`. `tests/redis/test_redis_cluster_canary.py`
pins what the cluster client gives (docs/architecture.md, "Redis Cluster: what the client gives").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis
import redis.asyncio.cluster
import redis.cluster
import redis.exceptions
from redis.asyncio.client import Pipeline
from redis.asyncio.sentinel import Sentinel

from controlplane.errors import InvalidRequest, RedisError
from controlplane.redis.errors import (
    Where,
    amap_redis_errors,
    annotate,
    map_redis_errors,
    where_from_url,
    where_of,
)
from controlplane.redis.retry import Backoff
from controlplane.tls import redact_url

#: The longest blocking read (BZPOPMIN/BLPOP timeout) any kcp component issues, seconds.
MAX_BLOCK_SECONDS = 5
#: How much longer than its own timeout a blocking read may take before the link counts as dead, s.
BLOCK_GRACE_SECONDS = 5.0


#: The client types the rest of kcp names (from here, never from redis-py: only this layer
#: imports it, so an upgrade of redis-py is this layer's business).
AsyncRedis = aioredis.Redis
SyncRedis = redis.Redis
AsyncPipeline = Pipeline
AsyncRedisCluster = redis.asyncio.cluster.RedisCluster
SyncRedisCluster = redis.cluster.RedisCluster

#: The Redis protocol version every kcp connection speaks.
RESP = 2

#: `redis+sentinel://[[user]:password@]host:port[,host:port...]/service_name[/db]`
SENTINEL_SCHEME = "redis+sentinel"


@dataclass(frozen=True, slots=True)
class SentinelUrl:
    """A parsed `redis+sentinel://` URL. The credentials are the master's; sentinels take none."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None


#: `redis+cluster://[[user]:password@]host:port[,host:port...][/0][?ssl_...]`, and `rediss+cluster://` (TLS).
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")


@dataclass(frozen=True, slots=True)
class ClusterUrl:
    """A parsed `redis+cluster://` URL: the startup nodes, and for the first of them the URL
    redis-py parses itself (credentials, TLS options), which every node connection shares."""

    nodes: tuple[tuple[str, int], ...]
    node_url: str


def is_cluster_url(url: str) -> bool:
    return url.partition("://")[0] in CLUSTER_SCHEMES


def parse_cluster_url(url: str) -> ClusterUrl:
    """Parse `redis+cluster://h1:7000,h2:7001`; ValueError saying what is wrong.

    Any one answering node suffices: the client asks it for the others (CLUSTER SLOTS). A Redis
    Cluster has only database 0, so the path is empty, `/` or `/0`.
    """
    parts = urlsplit(url)
    if parts.scheme not in CLUSTER_SCHEMES:
        raise ValueError(f"not a redis+cluster:// or rediss+cluster:// URL: {redact_url(url)!r}")
    userinfo, at, hosts = parts.netloc.rpartition("@")
    nodes = []
    for item in hosts.split(","):
        host, sep, port = item.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"cluster node {item!r} is not host:port (port 1-65535), in {redact_url(url)!r}")
        nodes.append((host.strip("[]"), int(port)))
    if parts.path not in ("", "/", "/0") or parse_qs(parts.query).get("db", ["0"]) != ["0"]:
        raise ValueError(f"a Redis Cluster has only database 0: drop the database from {redact_url(url)!r}")
    first, first_port = nodes[0]
    netloc = f"{userinfo}{at}{f'[{first}]' if ':' in first else first}:{first_port}"
    scheme = "rediss" if parts.scheme == "rediss+cluster" else "redis"
    return ClusterUrl(tuple(nodes), urlunsplit((scheme, netloc, "/0", parts.query, "")))


def parse_sentinel_url(url: str) -> SentinelUrl:
    """Parse `redis+sentinel://h1:26379,h2:26379/mymaster/0`; ValueError saying what is wrong."""
    parts = urlsplit(url)
    if parts.scheme != SENTINEL_SCHEME:
        raise ValueError(f"not a {SENTINEL_SCHEME}:// URL: {url!r}")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":") if userinfo else ("", "", "")
    sentinels = []
    for item in hosts.split(","):
        host, sep, port = item.strip().rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"sentinel address {item!r} in {url!r} is not host:port")
        sentinels.append((host.strip("[]"), int(port)))
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError(f"{url!r}: expected /service_name or /service_name/db after the sentinels")
    return SentinelUrl(
        sentinels=tuple(sentinels),
        service=unquote(path[0]),
        db=int(path[1]) if len(path) == 2 else 0,
        username=unquote(username) or None,
        password=unquote(password) or None,
    )


class _Redis(aioredis.Redis):
    """redis-py's client, which attaches the URL, the user and the failed command to redis-py's
    exception (`annotate`) so that the kcp error it maps to says what to fix. The exception's
    type is redis-py's still: code that catches redis-py types sees no difference."""

    kcp_where: Where = Where()

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        try:
            return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]
        except redis.exceptions.RedisError as exc:
            annotate(exc, self.kcp_where, args)
            raise

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> Pipeline:
        pipe = _Pipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)
        pipe.kcp_where = self.kcp_where
        return pipe


class _Pipeline(Pipeline):
    """A pipeline whose errors carry the URL and user (redis-py's text names the command)."""

    kcp_where: Where = Where()

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        try:
            return await super().execute(raise_on_error)
        except redis.exceptions.RedisError as exc:
            annotate(exc, self.kcp_where)
            raise


class _SentinelRedis(_Redis):
    """The master's client; closing it closes the connections to the sentinels too."""

    kcp_sentinel: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        if self.kcp_sentinel is not None:
            for client in self.kcp_sentinel.sentinels:
                await client.aclose()


class _RedisCluster(AsyncRedisCluster):
    """redis-py's asyncio cluster client, whose errors carry the URL, the user and the command
    (as `_Redis`'s do)."""

    kcp_where: Where = Where()

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().execute_command(*args, **kwargs)
        except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException) as exc:
            annotate(exc, self.kcp_where, args)
            raise

    def get_default_node(self) -> redis.asyncio.cluster.ClusterNode:
        """The default node, or while there is none (the client was closed: by redis-py itself at
        every `reinitialize_steps`-th MOVED, or after a lost connection, until the next command
        re-reads the slot table) a primary it still knows.

        redis-py 5.3's pipeline reads `get_default_node().name` once it has re-sent the commands a
        resharding answered with MOVED or ASK; when one of those re-sends closed the client, it
        raised AttributeError on None (redis/redis-py#3835), not a Redis error: whoever ran the
        pipeline died of it (an agent's main loop after a live reshard, its lease let lapse)."""
        node = cast("redis.asyncio.cluster.ClusterNode | None", self.nodes_manager.default_node)
        if node is not None:
            return node
        primaries = self.get_primaries()  # the nodes cache outlives a close
        # none known only before the first read of the slot table, which sets the default node
        return primaries[0] if primaries else self.nodes_manager.default_node


def connect(url: str, *, max_connections: int = 64) -> aioredis.Redis:
    """An asyncio Redis client for `url` (redis://, rediss://, unix://, redis+sentinel://,
    redis+cluster://, rediss+cluster://), decoding responses as UTF-8.

    The socket timeout is longer than any blocking read kcp issues, so a blocked BZPOPMIN is never
    mistaken for a dead server; keepalive notices a silently dropped connection. With
    `redis+sentinel://` every new connection asks the sentinels for the current master, so after a
    failover the callers' reconnect-with-backoff loops land on the new master.

    For a cluster URL the client is redis-py's asyncio `RedisCluster` (`max_connections` per
    node), which follows MOVED/ASK and re-reads the slot table after a failover; it has no
    MULTI/EXEC pipelines (kcp uses none) and no pub/sub (`portable.subscribed` has one). It is
    typed as `AsyncRedis` here: it serves the same command methods kcp calls, and what differs
    (MGET across slots, pub/sub, connection pools) is only reached through `portable.py`, which
    tells the two apart at run time.
    """
    keepalive: dict[int, int | bytes] = {}
    for name, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):
            keepalive[getattr(socket, name)] = value
    options: dict[str, Any] = {
        "protocol": RESP,
        "decode_responses": True,
        "max_connections": max_connections,
        "socket_connect_timeout": 5.0,
        "socket_timeout": MAX_BLOCK_SECONDS + 10.0,
        "socket_keepalive": True,
        "socket_keepalive_options": keepalive,
        "health_check_interval": 30,
    }
    client: _Redis | _RedisCluster
    with _url_checked(url):
        if is_cluster_url(url):
            client = _connect_cluster(parse_cluster_url(url), options)
        elif url.startswith(f"{SENTINEL_SCHEME}://"):
            client = _connect_sentinel(parse_sentinel_url(url), {**options, "retry_on_timeout": False})
        else:
            client = _Redis.from_url(url, **options, retry_on_timeout=False)
    client.kcp_where = where_from_url(url)
    return cast(aioredis.Redis, client)  # the cluster client too: see above


def _connect_cluster(spec: ClusterUrl, options: dict[str, Any]) -> _RedisCluster:
    """The asyncio cluster client: every startup node, the first one's URL for the credentials and
    TLS options; full slot coverage required (a kcp key may hash to any slot)."""
    nodes = [redis.asyncio.cluster.ClusterNode(host, port) for host, port in spec.nodes[1:]]
    client: _RedisCluster = _RedisCluster.from_url(
        spec.node_url, startup_nodes=nodes, require_full_coverage=True, **options
    )
    return client


def node_client(cluster: AsyncRedisCluster, node: redis.asyncio.cluster.ClusterNode) -> aioredis.Redis:
    """A plain asyncio client for one node of `cluster`, with the cluster's connection settings
    (TLS, ACL user, timeouts, RESP2): for what the cluster client has no form of (pub/sub).
    The caller closes it."""
    settings = {k: v for k, v in node.connection_kwargs.items() if k != "event_dispatcher"}
    pool = aioredis.ConnectionPool(connection_class=node.connection_class, max_connections=4, **settings)
    client = _Redis(connection_pool=pool)
    where = where_of(cluster)
    client.kcp_where = Where(url=f"{where.url} (node {node.name})", user=where.user)
    return client


def cluster_settings(cluster: SyncRedisCluster) -> dict[str, Any]:
    """The connection settings of the blocking cluster client's default node (host, port, TLS,
    credentials, timeouts), which every node connection of the client shares."""
    node = cluster.get_default_node()  # type: ignore[no-untyped-call]
    return dict(node.redis_connection.connection_pool.connection_kwargs)


def node_sync(
    cluster: SyncRedisCluster, host: str, port: int, *, decode_responses: bool | None = None
) -> redis.Redis:
    """A plain blocking client for the node at `host:port` of `cluster`, with the cluster's
    connection settings (TLS, ACL user, timeouts, RESP2, and its decoding unless
    `decode_responses` says otherwise): for what a node answers for itself (ACL users, CLUSTER
    SETSLOT, MIGRATE). The caller closes it."""
    node = cluster.get_default_node()  # type: ignore[no-untyped-call]
    kind = node.redis_connection.connection_pool.connection_class
    settings = cluster_settings(cluster) | {"host": host, "port": port}
    if decode_responses is not None:
        settings["decode_responses"] = decode_responses
    return redis.Redis(connection_pool=redis.ConnectionPool(connection_class=kind, **settings))


@contextlib.contextmanager
def every_node_sync(client: redis.Redis) -> Iterator[list[redis.Redis]]:
    """`[client]` for one Redis; for a Redis Cluster a plain blocking client for each of its
    nodes, replicas too (from CLUSTER NODES; redis-py's cluster client knows only the masters
    unless it reads from replicas), with the cluster's connection settings, closed on exit: for
    what each node keeps to itself (ACL users)."""
    if not isinstance(client, SyncRedisCluster):
        yield [client]
        return
    # redis-py parses the reply: {"host:port": {"flags": "myself,master", ...}, ...}
    listing = client.execute_command("CLUSTER NODES", target_nodes=SyncRedisCluster.DEFAULT_NODE)
    addresses = []
    for address, node in dict(listing).items():
        if not {"fail", "noaddr", "handshake"} & set(str(node.get("flags", "")).split(",")):
            host, _, port = str(address).partition("@")[0].rpartition(":")
            addresses.append((host, int(port)))
    nodes = [node_sync(client, h, p) for h, p in addresses]
    try:
        yield nodes
    finally:
        for node in nodes:
            node.close()


@contextlib.contextmanager
def _url_checked(url: str) -> Iterator[None]:
    """redis-py's ValueError for a URL it cannot parse (or its cluster client's refusal of an
    argument, e.g. a unix socket), as kcp's bad-input error."""
    try:
        yield
    except InvalidRequest:
        raise
    except (ValueError, redis.exceptions.RedisClusterException) as exc:
        raise InvalidRequest(f"invalid Redis URL {redact_url(url)!r}: {exc}") from None


def _connect_sentinel(spec: SentinelUrl, options: dict[str, Any]) -> _SentinelRedis:
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        list(spec.sentinels),
        min_other_sentinels=0,
        sentinel_kwargs={"socket_connect_timeout": 1.0, "socket_timeout": 1.0, "decode_responses": True},
    )
    client = sentinel.master_for(
        spec.service,
        redis_class=_SentinelRedis,
        db=spec.db,
        username=spec.username,
        password=spec.password,
        **options,
    )
    assert isinstance(client, _SentinelRedis)
    client.kcp_sentinel = sentinel
    return client


def connect_sync(url: str, *, timeout: float | None = 5.0, decode_responses: bool = True) -> redis.Redis:
    """A blocking client for `url` (redis://, rediss://, unix://, redis+cluster://,
    rediss+cluster://): for the synchronous API of the spec's collector and bus, the exporter's
    scrape thread and operator tools. `timeout` bounds connecting and each reply, seconds (None:
    a reply may take any time). InvalidRequest for a scheme it cannot serve (redis+sentinel://
    has no blocking client here). redis-py's blocking cluster client reads the slot table in its
    constructor, so for a cluster this connects (RedisUnavailable, AuthenticationFailed... if it
    cannot); a plain one connects lazily. The cluster client is typed as `SyncRedis`, as
    `connect`'s is (its pipelines take one-key DELs only; kcp sends no other kind)."""
    if url.startswith(f"{SENTINEL_SCHEME}://"):
        raise InvalidRequest(f"no blocking client for {SENTINEL_SCHEME}:// URLs")
    options: dict[str, Any] = {
        "protocol": RESP,
        "decode_responses": decode_responses,
        "socket_timeout": timeout,
        "socket_connect_timeout": 5.0 if timeout is None else min(timeout, 5.0),
    }
    client: redis.Redis | SyncRedisCluster
    with _url_checked(url):
        if is_cluster_url(url):
            spec = parse_cluster_url(url)
            nodes = [redis.cluster.ClusterNode(host, port) for host, port in spec.nodes[1:]]  # type: ignore[no-untyped-call]
            with map_redis_errors(where_from_url(url)):  # it connects at once: RedisUnavailable if it cannot
                cluster = SyncRedisCluster.from_url(
                    spec.node_url, startup_nodes=nodes, require_full_coverage=True, **options
                )
            cluster.kcp_where = where_from_url(url)  # what `where_of` reports: it has no connection_pool
            client = cluster
        else:
            client = redis.Redis.from_url(url, **options)
    return cast(redis.Redis, client)  # the cluster client too: see above


async def wait_for_redis(
    redis: aioredis.Redis | AsyncRedisCluster,
    *,
    log: logging.Logger,
    what: str,
    stop: asyncio.Event | None = None,
) -> bool:
    """A process's first contact with Redis: PING until it answers; True once it did, False
    if `stop` was set first.

    A failure that needs a person (a wrong password, an ACL denial) is raised at once, so the
    process exits at start-up saying what to fix; an unreachable or loading server is waited
    for, with its reason logged once per change rather than once per attempt. A cluster client
    sends PING to every node it knows (from CLUSTER SLOTS), so it answers once they all do."""
    backoff, told, url = Backoff(0.1, 2.0), "", where_of(redis).url
    stop = stop or asyncio.Event()
    while not stop.is_set():
        try:
            async with amap_redis_errors():
                await redis.ping()
        except RedisError as exc:
            if not exc.transient:
                raise
            if str(exc) != told:
                told = str(exc)
                log.warning("%s: waiting for Redis at %s: %s", what, url, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), backoff.next())
            continue
        if told:
            log.info("%s: Redis answers at %s", what, url)
        return True
    return False
