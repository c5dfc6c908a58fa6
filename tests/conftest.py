"""Shared fixtures: private redis-server processes (never the machine's own on 6379) and fakeredis."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import fakeredis
import hypothesis
import pytest
import pytest_asyncio
from redis import Redis as SyncRedis
from redis.asyncio import Redis as AsyncRedis

from controlplane.ops.redis_server import (
    RedisClusterProcess,
    RedisServerProcess,
    start_redis_cluster,
    start_redis_server,
)
from controlplane.redis.connect import connect, is_cluster_url

# `make fuzz` runs the fuzz suites with `--hypothesis-profile=fuzz` (and KCP_FUZZ_SECONDS for the
# live-system fuzzer); `make test` uses the default budgets, which the fuzz tests keep small.
hypothesis.settings.register_profile("fuzz", max_examples=3000, deadline=None)

#: Every test carries at least one of these (a module-level `pytestmark` counts).
CLASSIFYING_MARKERS = ("unit", "integration", "system")

RedisServerFactory = Callable[..., RedisServerProcess]


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects, and before xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuse to run unclassified tests; chaos tests are system tests too (so `-m system` selects them).

    Under `pytest -n N --dist loadgroup` (`make test`) a file's tests run on one worker, one after
    the other (its module fixtures are built once), and all chaos tests on one worker, so no two
    failure injections (a saturated CPU, a killed Redis) overlap."""
    for item in items:
        chaos = item.get_closest_marker("chaos") is not None
        if chaos and not item.get_closest_marker("system"):
            item.add_marker(pytest.mark.system)
        item.add_marker(pytest.mark.xdist_group("chaos" if chaos else item.nodeid.split("::", 1)[0]))
    unmarked = [item.nodeid for item in items if not any(map(item.get_closest_marker, CLASSIFYING_MARKERS))]
    if unmarked:
        raise pytest.UsageError(
            f"tests without a unit/integration/system (or chaos) marker: {', '.join(unmarked)}"
        )


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServerProcess]:
    """One private redis-server (free loopback port, tmp data dir) for the whole session."""
    with start_redis_server(data_dir=tmp_path_factory.mktemp("redis-session")) as server:
        yield server


@pytest.fixture
def redis_server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServerFactory]:
    """`factory(**kwargs)` starts another server (kwargs of `start_redis_server`; `data_dir` defaults to
    a fresh tmp dir); all of them are stopped at teardown."""
    started: list[RedisServerProcess] = []

    def factory(**kwargs: Any) -> RedisServerProcess:
        kwargs.setdefault("data_dir", tmp_path_factory.mktemp("redis"))
        server = start_redis_server(**kwargs)
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()


@pytest.fixture
def redis_url(request: pytest.FixtureRequest, redis_server: RedisServerProcess) -> str:
    """URL of the session server, emptied (FLUSHALL) for this test (with `--redis-cluster`: the
    session's Redis Cluster, `redis_cluster_url`)."""
    if request.config.getoption(REDIS_CLUSTER_OPTION):
        return str(request.getfixturevalue("redis_cluster_url"))
    with SyncRedis.from_url(redis_server.url) as client:
        client.flushall()
    return redis_server.url


@pytest_asyncio.fixture(name="redis")
async def redis_client(redis_url: str) -> AsyncIterator[AsyncRedis]:
    """An asyncio client (decode_responses=True) on the emptied session server (with
    `--redis-cluster`: kcp's cluster client on the session's Redis Cluster)."""
    client = (
        connect(redis_url)
        if is_cluster_url(redis_url)
        else AsyncRedis.from_url(redis_url, decode_responses=True)
    )
    yield client
    await client.aclose()


@pytest_asyncio.fixture
async def fake_redis() -> AsyncIterator[fakeredis.FakeAsyncRedis]:
    """An in-process fake (decode_responses=True) with its own empty FakeServer, Lua included."""
    client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer(version=(7,)), decode_responses=True)
    yield client
    await client.aclose()


class ProcessStack:
    """kcp processes (`kcp serve`, `kcp agent`) against one Redis; everything is killed at teardown."""

    #: Short leases so failure handling is quick in tests.
    ENV: ClassVar[dict[str, str]] = {
        "KCP_HEARTBEAT_INTERVAL": "0.3",
        "KCP_LEASE_TTL": "1.5",
        "KCP_LEADER_TTL": "1.5",
    }

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self.procs: list[subprocess.Popen[bytes]] = []

    def _spawn(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", "controlplane.ops.cli", "--redis-url", self.redis_url, *args]
        # the repository root on the path, so agents can load `--handlers examples.infer_handlers`
        root = str(Path(__file__).resolve().parents[1])
        proc = subprocess.Popen(cmd, env={**os.environ, **self.ENV, "PYTHONPATH": root, **(env or {})})
        self.procs.append(proc)
        return proc

    def serve(self, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """`extra`: flags of `kcp serve` (e.g. --metrics-port N). `env`: extra variables, e.g.
        KCP_REDIS_USERNAME/PASSWORD (never put secrets on argv)."""
        return self._spawn("--log-level", "INFO", "serve", *extra, env=env)

    def agent(
        self, name: str, slots: int = 4, *extra: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        args = ("--log-level", "INFO", "agent", "--name", name, "--slots", str(slots), *extra)
        return self._spawn(*args, env=env)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def stack(redis_url: str) -> Iterator[ProcessStack]:
    """A factory of kcp processes on the test's private Redis."""
    procs = ProcessStack(redis_url)
    try:
        yield procs
    finally:
        procs.stop()


async def wait_for(predicate: Callable[[], Awaitable[bool]], limit: float, what: str) -> None:
    """Poll `predicate` every 50 ms until it holds; fail saying `what` did not happen in `limit` s."""
    deadline = time.monotonic() + limit
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {limit}s waiting for {what}")
        await asyncio.sleep(0.05)


async def agents_up(redis: AsyncRedis, n: int, prefix: str = "kcp:") -> None:
    """Wait until `n` agents have registered."""

    async def ready() -> bool:
        return await redis.scard(f"{prefix}agents") >= n

    await wait_for(ready, 30, f"{n} agents to register")


# ------------------------------------------------------------------ Redis Cluster
#: `pytest --redis-cluster` runs the tests marked `redis_cluster` that take `redis_url` (and so
#: `redis`, `stack`), with it pointing at a local 3-master Redis Cluster, and deselects every other
#: test: a test that starts its own Redis Cluster (the `redis_cluster` fixture) runs the same in
#: the plain run. `make test` runs both. Which suites carry the marker: README, "Redis Cluster".
REDIS_CLUSTER_OPTION = "--redis-cluster"
REDIS_CLUSTER_MARKER = "redis_cluster"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        REDIS_CLUSTER_OPTION,
        action="store_true",
        help=f"only the tests marked {REDIS_CLUSTER_MARKER} that take redis_url, on a local Redis Cluster",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{REDIS_CLUSTER_MARKER}: also runs against a local Redis Cluster (`pytest {REDIS_CLUSTER_OPTION}`)",
    )
    config.pluginmanager.register(_RedisClusterSelection(), "kcp-redis-cluster-selection")


class _RedisClusterSelection:
    """With `--redis-cluster`, deselect the tests not marked `redis_cluster` or not taking
    `redis_url` (a plugin object, so the module's own `pytest_collection_modifyitems` stays as it is)."""

    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        if not config.getoption(REDIS_CLUSTER_OPTION):
            return

        def on_the_cluster(item: pytest.Item) -> bool:
            uses = getattr(item, "fixturenames", ())
            return item.get_closest_marker(REDIS_CLUSTER_MARKER) is not None and "redis_url" in uses

        kept = [item for item in items if on_the_cluster(item)]
        dropped = [item for item in items if not on_the_cluster(item)]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = kept


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcess]:
    """One local Redis Cluster for the whole session: 3 masters with one replica each (AOF with
    appendfsync always on the replicas), free loopback ports, node timeout 1 s (a killed master's
    replica takes over in about 2 s). Tests that kill or reshard restore a healthy cluster."""
    with start_redis_cluster(
        data_dir=tmp_path_factory.mktemp("redis-cluster"), masters=3, replicas=1, appendonly_replicas=True
    ) as cluster:
        yield cluster


@pytest.fixture
def redis_cluster_url(redis_cluster: RedisClusterProcess) -> str:
    """`redis+cluster://` URL of the session cluster, emptied (FLUSHALL on every master) for this test."""
    for master in redis_cluster.masters():
        with SyncRedis.from_url(master.url) as client:
            client.flushall()
    return redis_cluster.url
