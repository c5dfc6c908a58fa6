"""Chaos: no false positives under a saturated CPU. Busy-loop processes (4 per core) and
CPU-bound jobs in every kernel run for 10 s while the agents must keep their leases with the
default timings (heartbeat 0.5 s, lease 1.5 s): the heartbeat runs in its own thread, on its own
connection, so it does not wait behind the agent's other work."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from chaoslib import (
    Procs,
    collect,
    reliability,
    running_kernels,
    start_clients,
)

from controlplane.ops.redis_server import RedisServerProcess

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(90)]

BURN_SECONDS = 10


def test_saturated_cpu_declares_nobody_dead(redis_server_factory: object, tmp_path: Path) -> None:
    server: RedisServerProcess = redis_server_factory()  # type: ignore[operator]
    url = server.url
    procs = Procs(url)
    burners: list[subprocess.Popen[bytes]] = []
    try:
        procs.fleet("hot")
        before = running_kernels(url, "hot")
        burners = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    f"import time\nend = time.time() + {BURN_SECONDS}\nwhile time.time() < end: pass",
                ]
            )
            for _ in range(4 * (os.cpu_count() or 1))
        ]
        # CPU-bound jobs keep every kernel busy as well (BURN, 200 ms each)
        clients = start_clients(
            url, "hot", tmp_path, procs=1, count=120, concurrency=6, sleep_ms=200, syscall="BURN", owner=procs
        )
        time.sleep(BURN_SECONDS)
        report = collect(clients, 60)
        rel = reliability(url)
        after = running_kernels(url, "hot")
    finally:
        for b in burners:
            b.kill()
            b.wait()
        procs.stop()

    print(
        f"\n{len(burners)} busy loops on {os.cpu_count()} cores for {BURN_SECONDS}s: "
        f"suspected {rel.get('agents_suspected_total', '0')}, "
        f"dead agents {rel.get('agents_dead_total', '0')}, "
        f"dead kernels {rel.get('kernels_dead_total', '0')}; {report.line()}"
    )
    assert int(rel.get("agents_dead_total", 0)) == 0, "an agent was declared dead while it was alive"
    assert int(rel.get("kernels_dead_total", 0)) == 0, "a kernel was declared dead while it was alive"
    assert after == before, "no kernel was replaced"
