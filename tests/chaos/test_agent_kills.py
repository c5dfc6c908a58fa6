"""Chaos: 3 agents, 2,000 dispatches from 4 client processes, one agent SIGKILLed every few
seconds and restarted. Every dispatch must come back once, with its own result or a clear
error; the figures (detection, recovery, re-executions) are printed."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from chaoslib import (
    Procs,
    cluster_stats,
    collect,
    create_cluster,
    median,
    registered_agents,
    reliability,
    running_kernels,
    start_clients,
    wait_until,
)

from controlplane.ops.redis_server import RedisServerProcess

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(150)]

AGENTS = ("agent-0", "agent-1", "agent-2")
KERNELS = 6


def test_agent_sigkill_under_load_loses_nothing(redis_server_factory: object, tmp_path: Path) -> None:
    server: RedisServerProcess = redis_server_factory()  # type: ignore[operator]
    url = server.url
    procs = Procs(url)
    try:
        procs.serve()
        for name in AGENTS:
            procs.agent(name, slots=4)
        wait_until(lambda: registered_agents(url) >= set(AGENTS), 30, "3 agents")
        create_cluster(url, "chaos", KERNELS)

        clients = start_clients(
            url, "chaos", tmp_path, procs=4, count=500, concurrency=8, sleep_ms=40, owner=procs
        )
        detections: list[float] = []
        recoveries: list[float] = []
        victim = 0
        time.sleep(2.0)
        while any(p.poll() is None for p, _ in clients) and victim < 6:
            name = AGENTS[victim % len(AGENTS)]
            victim += 1
            if name not in set(running_kernels(url, "chaos").values()):
                continue  # it hosts nothing right now: killing it would test nothing
            dead_before = int(reliability(url).get("agents_dead_total", 0))
            procs.kill(name)
            detections.append(
                wait_until(
                    lambda b=dead_before: int(reliability(url).get("agents_dead_total", 0)) > b,
                    15,
                    f"{name} declared dead",
                )
            )
            recoveries.append(
                detections[-1]
                + wait_until(
                    lambda n=name: len(k := running_kernels(url, "chaos")) == KERNELS and n not in k.values(),
                    30,
                    "replacement kernels running",
                )
            )
            procs.restart(name)
            time.sleep(1.0)
        report = collect(clients, 120)
        stats = cluster_stats(url, "chaos")
        rel = reliability(url)
    finally:
        procs.stop()

    print(
        f"\nagent kills: {len(detections)}; detection s (kill -> declared dead): "
        f"{[round(d, 2) for d in detections]} median {median(detections):.2f}"
    )
    print(
        f"recovery s (kill -> {KERNELS} kernels running again): "
        f"{[round(r, 2) for r in recoveries]} median {median(recoveries):.2f}"
    )
    print(report.line())
    print(f"reliability counters: {rel}")
    assert detections, "no agent was killed while the load ran"
    assert report.total == 2000, "every dispatch returned"
    # a clear, typed error at worst; kernels' own errors would be a bug here (SLEEP cannot fail)
    assert set(report.errors) <= {"DispatchTimeout", "NoKernelAvailable", "RedeliveryExhausted"}, (
        report.errors
    )
    delivered = stats.get("dispatches", 0)
    assert delivered == report.ok, f"results delivered ({delivered}) != results received ({report.ok})"
