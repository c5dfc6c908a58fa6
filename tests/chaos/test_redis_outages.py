"""Chaos: Redis (AOF, appendfsync always) is down for 5-6 s, several times, under load.

Every lease lapses while Redis is down (their TTL is 1.5 s), so this is the case where a failure
detector that judged liveness from a lease missing *at its first look* after the outage would
declare every agent dead and replace every kernel. kcp judges liveness only from leases that
could have been renewed since Redis answered again (docs/reliability.md): no agent is declared
dead, no kernel is replaced (same names, same epochs), and no call whose job ran times out."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis
from chaoslib import (
    KEYS,
    Procs,
    collect,
    reliability,
    running_kernels,
    start_clients,
)

from controlplane.ops.redis_server import RedisServerProcess

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(90)]

OUTAGES = (5.0, 6.0, 5.5)


def incarnations(url: str, cluster: str) -> dict[str, tuple[str, str]]:
    """kernel name -> (agent, epoch) of the cluster's running kernels."""
    with redis.Redis.from_url(url, decode_responses=True, socket_timeout=2) as r:
        out = {}
        for name in running_kernels(url, cluster):
            agent, epoch = r.hmget(KEYS.kernel(cluster, name), ["agent", "epoch"])  # type: ignore[misc]
            out[name] = (str(agent), str(epoch))
        return out


def test_redis_outages_are_not_deaths(redis_server_factory: object, tmp_path: Path) -> None:
    server: RedisServerProcess = redis_server_factory(appendonly=True)  # type: ignore[operator]
    url = server.url
    procs = Procs(url)
    try:
        procs.fleet("outage")
        before = incarnations(url, "outage")
        # patient callers: a dispatch refused while Redis is down (nothing accepted) is tried again
        clients = start_clients(
            url,
            "outage",
            tmp_path,
            procs=3,
            count=150,
            concurrency=4,
            sleep_ms=40,
            retry_unavailable=30,
            owner=procs,
        )
        time.sleep(1.0)
        outages = []
        for seconds in OUTAGES:
            server.kill()
            down_at = time.monotonic()
            time.sleep(seconds)
            server.restart()
            outages.append(time.monotonic() - down_at)
            # the leader's blind window (lease TTL + heartbeat) and a little: a false death shows here
            time.sleep(2.5)
        report = collect(clients, 60)
        after = incarnations(url, "outage")
        counters = reliability(url)
    finally:
        procs.stop()

    timeouts = report.errors.get("DispatchTimeout", 0)
    print(f"\nRedis down {', '.join(f'{s:.1f}' for s in outages)} s; {report.line()}")
    print(f"kernels before {before}; after {after}; reliability {counters}")
    assert int(counters.get("agents_dead_total", 0)) == 0, "a Redis outage is not an agent death"
    assert int(counters.get("kernels_dead_total", 0)) == 0, "a Redis outage is not a kernel death"
    assert after == before, "no kernel was replaced"
    assert report.total == 450
    # every call succeeds or fails with a typed error (collect checks each answer is its own)
    assert timeouts == 0, report.first_errors()
    assert report.ok == report.total, f"{report.errors}: {report.first_errors()}"
