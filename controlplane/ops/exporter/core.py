"""Prometheus `/metrics` for kcp, read from Redis at scrape time.

`KcpCollector.collect()` reads one fresh `Snapshot` (clusters, kernels, agents and their
counters) per scrape, so every process's work is counted once, wherever it ran, and the
series of a destroyed cluster or a removed kernel are simply not there at the next scrape.
An agent or kernel lost to a lapsed lease stays, as down, for `Settings.down_retention`.

Fleet series come from one instance only: with several `kcp serve`, the leader exports them and
the others export `kcp_control_plane_leader 0`, `kcp_redis_up`, `kcp_build_info` and their own
process metrics, so a query summed over every scraped instance counts the fleet once.

Names follow Prometheus conventions: counters end in `_total`, durations are histograms in
seconds, fractions are `_ratio`; labels are bounded (cluster, kernel, agent, host, strategy,
outcome, state, status, direction; never a job or request id). docs/observability.md lists them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import platform
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from importlib import metadata
from typing import Any, TypeVar
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import (
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from controlplane.errors import InvalidRequest, KcpError, RedisError
from controlplane.ops.exporter.bus import bus_families
from controlplane.ops.exporter.families import Families
from controlplane.protocol.keys import Keys
from controlplane.protocol.records import parse_counters
from controlplane.redis.connect import SENTINEL_SCHEME, AsyncRedis, SyncRedis, connect_sync
from controlplane.redis.errors import amap_redis_errors, map_redis_errors
from controlplane.redis.snapshot import Snapshot, read_snapshot
from controlplane.redis.state import State
from controlplane.settings import Settings

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: What one scrape read: the fleet and the global counter hashes.
Reading = tuple[Snapshot, dict[str, float], dict[str, float]]


def build_version() -> str:
    try:
        return metadata.version("kernel-controlplane")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


class KcpCollector(Collector):
    """A prometheus-client collector that reads Redis on every scrape.

    `read` returns a snapshot and the counter hashes; `ping` only checks that Redis answers (what
    an instance that does not lead needs). Both are called from the HTTP server's thread (see
    `serve_metrics`, which runs them on the service's event loop) and raise on a Redis failure
    or when the scrape deadline passes. Without `leader` the instance exports the fleet."""

    def __init__(
        self,
        read: Callable[[], Reading],
        *,
        lease_ttl: float,
        ping: Callable[[], None] | None = None,
        leader: Callable[[], bool] | None = None,
        bus: Callable[[], Iterable[Metric]] | None = None,
    ) -> None:
        self._read = read
        self._ping = ping
        self._families = Families(lease_ttl)
        self._leader = leader
        self._bus = bus

    def collect(self) -> Iterable[Metric]:
        build = InfoMetricFamily("kcp_build", "version of kcp serving these metrics")
        build.add_metric([], {"version": build_version(), "python": platform.python_version()})
        yield build
        fleet = self._leader is None or self._leader()
        if self._leader is not None:
            leader = GaugeMetricFamily("kcp_control_plane_leader", "1 if this kcp serve holds the lease")
            leader.add_metric([], float(fleet))
            yield leader
        redis_up = GaugeMetricFamily("kcp_redis_up", "1 if Redis answered this scrape in time")
        try:
            got = self._read() if fleet or self._ping is None else self._ping()
        except (KcpError, TimeoutError, OSError) as exc:
            logger.warning("metrics scrape could not read Redis: %s", exc or type(exc).__name__)
            redis_up.add_metric([], 0.0)
            yield redis_up
            return
        redis_up.add_metric([], 1.0)
        yield redis_up
        if got is None:  # not leading: the leader exports the fleet
            return
        yield from self._families.collect(*got)
        if self._bus is not None:
            try:
                with map_redis_errors():
                    bus = list(self._bus())
            except (RedisError, OSError) as exc:
                logger.warning("metrics scrape could not read the bus: %s", exc)
            else:
                yield from bus


async def read_all(state: State) -> Reading:
    """A snapshot plus the global reliability and rejection counters."""
    snap = await read_snapshot(state)
    keys = state.keys
    async with amap_redis_errors(), state.redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.reliability())
        pipe.hgetall(keys.rejections())
        reliability, rejections = await pipe.execute()
    return (
        snap,
        parse_counters(reliability, keys.reliability()),
        parse_counters(rejections, keys.rejections()),
    )


async def _ping(state: State) -> None:
    async with amap_redis_errors():
        await state.redis.ping()


def registry_for(collector: KcpCollector, *, process: bool = False) -> CollectorRegistry:
    """A registry with `collector`; with `process`, this process's own metrics too (cpu, memory,
    open files: prometheus-client's process and platform collectors)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    if process:
        registry.register(PROCESS_COLLECTOR)
        registry.register(PLATFORM_COLLECTOR)
    return registry


def _bus_reader(client: Callable[[], SyncRedis] | None, keys: Keys) -> Callable[[], Iterable[Metric]] | None:
    if client is None:
        return None
    return lambda: bus_families(client(), keys)


class _SyncOnDemand:
    """The scrape thread's blocking client for the bus statistics, made at the first scrape that
    needs it and again after one that could not connect: a Redis Cluster client connects in its
    constructor, and Redis down when `kcp serve` starts must not stop it (the scrape reports it)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.client: SyncRedis | None = None

    def __call__(self) -> SyncRedis:
        if self.client is None:
            self.client = connect_sync(self.settings.redis_url, timeout=self.settings.scrape_timeout)
        return self.client

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None


def _sync_client(settings: Settings) -> _SyncOnDemand | None:
    """The blocking client for the bus statistics (read on the scrape thread); None if the URL
    scheme has no blocking client here (redis+sentinel://): the bus is left out."""
    if settings.redis_url.startswith(f"{SENTINEL_SCHEME}://"):
        logger.warning("bus metrics disabled: no blocking client for %s:// URLs", SENTINEL_SCHEME)
        return None
    return _SyncOnDemand(settings)


async def exposition(
    redis_client: AsyncRedis, settings: Settings, *, bus_client: SyncRedis | None = None
) -> str:
    """The text `/metrics` would serve right now (for tests and one-off checks); the bus
    families only with `bus_client` (a blocking client on the same Redis)."""
    try:
        got = await read_all(State(redis_client, Keys(settings.prefix)))
    except KcpError as exc:
        failure = exc

        def read() -> Reading:
            raise failure

    else:

        def read() -> Reading:
            return got

    bus = _bus_reader(None if bus_client is None else lambda: bus_client, Keys(settings.prefix))
    return generate_latest(registry_for(KcpCollector(read, lease_ttl=settings.lease_ttl, bus=bus))).decode()


@contextlib.asynccontextmanager
async def serve_metrics(
    redis_client: AsyncRedis,
    settings: Settings,
    *,
    port: int | None,
    host: str = "0.0.0.0",
    leader: Callable[[], bool] | None = None,
) -> AsyncIterator[int | None]:
    """Serve `/metrics` on `host:port` while the block runs (nothing when `port` is None).

    Scrapes run on prometheus-client's HTTP thread; each one reads Redis through the
    caller's event loop and client. Yields the bound port (useful with port 0)."""
    if port is None:
        yield None
        return
    loop = asyncio.get_running_loop()
    state = State(redis_client, Keys(settings.prefix))

    def on_loop(coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the service's loop; TimeoutError once `scrape_timeout` passes (a hung Redis)."""
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return future.result(settings.scrape_timeout)
        except TimeoutError:
            future.cancel()
            raise

    sync = _sync_client(settings)
    bus = _bus_reader(sync, state.keys)
    collector = KcpCollector(
        lambda: on_loop(read_all(state)),
        ping=lambda: on_loop(_ping(state)),
        lease_ttl=settings.lease_ttl,
        leader=leader,
        bus=bus,
    )
    registry = registry_for(collector, process=True)
    try:
        server, thread = start_http_server(port, host, registry=registry)
    except (OSError, OverflowError) as exc:  # taken, not an address of this host, not a port
        if sync is not None:
            sync.close()
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise InvalidRequest(f"cannot serve metrics on {host}:{port}: {reason}") from None
    bound = server.server_address[1]
    logger.info("serving Prometheus metrics on http://%s:%d/metrics", host, bound)
    try:
        yield bound
    finally:
        await asyncio.to_thread(_shutdown, server, thread)
        if sync is not None:
            sync.close()


def _shutdown(server: WSGIServer, thread: threading.Thread) -> None:
    server.shutdown()
    server.server_close()
    thread.join(5)
