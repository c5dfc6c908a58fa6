"""Chaos: three test hosts as network namespaces (created and removed here), an agent in each,
Redis reached over veth. One host's link is cut mid-load: the control plane declares its agent
dead and moves its kernels' work; the link then comes back while the cut-off kernels still hold
results of jobs that were moved. Fencing must reject those: no dispatch is answered twice and
no result is delivered twice."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from chaoslib import (
    NetnsHosts,
    Procs,
    cluster_stats,
    collect,
    create_cluster,
    registered_agents,
    reliability,
    running_kernels,
    start_clients,
    wait_until,
)

from controlplane.ops.redis_server import RedisServerProcess

pytestmark = [
    pytest.mark.chaos,
    pytest.mark.timeout(120),
    pytest.mark.skipif(
        shutil.which("ip") is None or os.geteuid() != 0, reason="needs iproute2 (`ip netns`) and root"
    ),
]


def test_partitioned_host_loses_its_kernels_without_duplicates(
    redis_server_factory: object, tmp_path: Path
) -> None:
    try:
        hosts = NetnsHosts(3)
    except NetnsHosts.Conflict as exc:
        pytest.skip(str(exc))
    procs: Procs | None = None
    server: RedisServerProcess | None = None
    try:
        binds = ["127.0.0.1", *(hosts.gateway(i) for i in range(3))]
        server = redis_server_factory(  # type: ignore[operator]
            extra_args=["--bind", *binds, "--protected-mode", "no"]
        )
        url = server.url
        procs = Procs(url)
        procs.serve()
        for i in range(3):
            procs.agent(
                f"host-{i}", slots=2, netns=hosts.netns(i), url=f"redis://{hosts.gateway(i)}:{server.port}/0"
            )
        wait_until(lambda: len(registered_agents(url)) == 3, 30, "3 agents in their namespaces")
        create_cluster(url, "part", 3)
        assert set(running_kernels(url, "part").values()) == {"host-0", "host-1", "host-2"}

        clients = start_clients(
            url, "part", tmp_path, procs=2, count=300, concurrency=6, sleep_ms=60, owner=procs
        )
        time.sleep(2.0)
        dead_before = int(reliability(url).get("agents_dead_total", 0))
        hosts.cut(1)
        detected = wait_until(
            lambda: int(reliability(url).get("agents_dead_total", 0)) > dead_before,
            20,
            "host-1 declared dead",
        )
        moved = wait_until(
            lambda: len(k := running_kernels(url, "part")) == 3 and "host-1" not in k.values(),
            30,
            "host-1's kernel replaced elsewhere",
        )
        time.sleep(2.0)
        hosts.restore(1)
        wait_until(lambda: "host-1" in registered_agents(url), 30, "host-1 to register again")
        report = collect(clients, 90)
        time.sleep(1.0)  # late results of the cut-off kernel, if any, have arrived by now
        stats = cluster_stats(url, "part")
    finally:
        if procs is not None:
            procs.stop()
        if server is not None:
            server.stop()  # before the namespaces go: no packet may leave for their addresses
        hosts.remove()

    print(
        f"\npartition: host-1 declared dead {detected:.2f}s after the cut; its kernel running "
        f"elsewhere {detected + moved:.2f}s after; {report.line()}"
    )
    assert report.total == 600
    assert set(report.errors) <= {"DispatchTimeout", "NoKernelAvailable"}, report.errors
    assert stats.get("dispatches", 0) == report.ok, "a result was delivered twice (a zombie got through)"
