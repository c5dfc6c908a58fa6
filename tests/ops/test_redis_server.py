"""controlplane.redis_server: finding, starting, crashing and restarting a private redis-server."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from controlplane.ops.redis_server import RedisServerProcess, find_redis_server, free_port, start_redis_server

pytestmark = pytest.mark.integration


def test_find_redis_server_returns_an_executable() -> None:
    path = find_redis_server()
    assert os.path.isfile(path)
    assert os.access(path, os.X_OK)


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 0 < port < 65536
    assert port != 6379


def test_session_server_answers(redis_server: RedisServerProcess) -> None:
    assert redis_server.alive()
    assert redis_server.port != 6379
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    with Redis.from_url(redis_server.url) as client:
        assert client.ping()
        assert client.config_get("appendonly") == {"appendonly": "no"}


async def test_redis_fixture_starts_empty(redis: AsyncRedis) -> None:
    assert await redis.dbsize() == 0
    await redis.set("k", "v")
    assert await redis.get("k") == "v"


def test_kill_and_restart_with_appendonly_keeps_acknowledged_writes(
    redis_server_factory: Callable[..., RedisServerProcess],
) -> None:
    server = redis_server_factory(appendonly=True)
    with Redis.from_url(server.url, decode_responses=True) as client:
        client.set("survivor", "yes")
    old_pid, port = server.pid, server.port

    server.kill()
    assert not server.alive()
    server.restart()

    assert server.alive()
    assert server.pid != old_pid
    assert server.port == port
    with Redis.from_url(server.url, decode_responses=True) as client:
        assert client.get("survivor") == "yes"


def test_stop_is_idempotent_and_context_manager_stops(tmp_path: Path) -> None:
    with start_redis_server(data_dir=tmp_path) as server:
        assert server.alive()
        server.stop()
        assert not server.alive()
        server.stop()
    server.stop()
    assert not server.alive()


def test_start_failure_reports_the_log(redis_server: RedisServerProcess, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="redis-server") as excinfo:
        start_redis_server(port=redis_server.port, data_dir=tmp_path, wait=5.0)
    assert "last lines of" in str(excinfo.value)
