"""Chaos: Redis (AOF, appendfsync always) is SIGKILLed mid-load and restarted on the same port.

Every process reconnects with back-off. No accepted job is lost: with callers that retry a
dispatch Redis refused while it was down, every dispatch ends with its own result, and no job
is left behind in Redis (a job that was accepted and then forgotten would still be there)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis
from chaoslib import (
    KEYS,
    Procs,
    cluster_stats,
    collect,
    running_kernels,
    start_clients,
    wait_until,
)

from controlplane.ops.redis_server import RedisServerProcess

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(120)]


def test_redis_sigkill_and_restart_with_aof(redis_server_factory: object, tmp_path: Path) -> None:
    server: RedisServerProcess = redis_server_factory(appendonly=True)  # type: ignore[operator]
    url = server.url
    procs = Procs(url)
    try:
        procs.fleet("aof")
        # patient callers: a dispatch refused while Redis is down (nothing accepted) is tried again
        clients = start_clients(
            url,
            "aof",
            tmp_path,
            procs=4,
            count=200,
            concurrency=8,
            sleep_ms=30,
            retry_unavailable=20,
            owner=procs,
        )
        time.sleep(2.0)
        server.kill()
        down_at = time.monotonic()
        time.sleep(1.0)
        server.restart()
        outage = time.monotonic() - down_at
        resumed = wait_until(lambda: len(running_kernels(url, "aof")) == 3, 30, "kernels after restart")
        report = collect(clients, 90)
        stats = cluster_stats(url, "aof")
        settle = time.monotonic() + 10
        with redis.Redis.from_url(url, decode_responses=True) as r:
            while (left := list(r.scan_iter(KEYS.job_pattern("aof")))) and time.monotonic() < settle:
                time.sleep(0.2)
            agents_dead = int(r.hget("kcp:reliability", "agents_dead_total") or 0)
    finally:
        procs.stop()

    print(f"\nRedis down {outage:.1f}s; kernels running again {resumed:.1f}s after; {report.line()}")
    print(
        f"results delivered {stats.get('dispatches', 0):.0f} for {report.ok} answers; "
        f"errors {report.first_errors()}"
    )
    print(f"agents declared dead across the restart: {agents_dead}")
    assert report.total == 800
    assert report.ok == 800, f"{report.errors}: {report.first_errors()}"
    # every answer the callers got was delivered once; a surplus is a job whose caller lost the
    # enqueue reply with the connection, retried, and so never waited for the first copy
    delivered = stats.get("dispatches", 0)
    assert delivered >= report.ok
    assert left == [], f"accepted jobs left behind: {left[:5]}"
    assert agents_dead == 0, "a Redis restart is not an agent death"
