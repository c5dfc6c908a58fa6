"""The spec's Quick Start, unchanged but for the import line, against a stack started by `kcp up`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from controlplane import ClusterMetrics
from controlplane.redis.connect import connect_sync

pytestmark = [pytest.mark.system, pytest.mark.timeout(180)]


@pytest.fixture
def kcp_up(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[subprocess.Popen[bytes]]:
    """`kcp up` (3 agents of 4 slots) on `redis_url`, stopped with Ctrl-C at teardown. If the setup
    or the stop fails, its whole process group is killed: a stack left running would go on
    retrying the test Redis's ports and join whatever server listens there later (on the session
    Redis Cluster: its `kcp serve` took the lead and its agents took placements in later tests)."""
    argv = ["--redis-url", redis_url, "up", "--agents", "3", "--slots", "4"]
    proc = subprocess.Popen([sys.executable, "-m", "controlplane.ops.cli", *argv], start_new_session=True)
    stopped = False
    try:
        with connect_sync(redis_url) as client:
            deadline = time.monotonic() + 30
            while client.scard("kcp:agents") < 3:
                assert time.monotonic() < deadline, "kcp up did not bring 3 agents up"
                time.sleep(0.1)
            monkeypatch.setenv("KCP_REDIS_URL", redis_url)  # OrchestrationTools() reads it
            yield proc
            proc.send_signal(signal.SIGINT)  # Ctrl-C stops everything
            assert proc.wait(40) == 0
            stopped = True
            assert client.scard("kcp:agents") == 0, "agents deregistered on the way out"
    finally:
        if not stopped:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # `kcp up`, its serve, agents and kernels
            proc.wait()


@pytest.mark.redis_cluster  # (the CLI's exit codes below: single Redis only, to save time)
async def test_quick_start_snippets(kcp_up: object) -> None:
    from controlplane import OrchestrationTools

    tools = OrchestrationTools()

    result = await tools.create_cluster(name="compute", kernel_count=3)
    assert {k: result[k] for k in ("success", "cluster_name", "kernel_count")} == {
        "success": True,
        "cluster_name": "compute",
        "kernel_count": 3,
    }
    result = await tools.create_cluster(
        name="compute2",
        kernel_count=5,
        config={
            "min_kernels": 2,
            "max_kernels": 10,
            "auto_scale": True,
            "scale_up_threshold": 0.8,
            "scale_down_threshold": 0.2,
        },
    )
    assert result["success"] is True and result["kernel_count"] == 5

    result = await tools.dispatch(cluster="compute", request={"type": "READ", "address": 0x1000, "size": 256})
    assert result["success"] is True
    assert result["kernel"] in {"worker-0", "worker-1", "worker-2"}
    assert result["result"]["data"] == "00" * 256

    metrics = await tools.get_metrics("compute")
    assert metrics["success"] is True
    assert set(metrics["metrics"]) == set(ClusterMetrics.model_fields)  # the spec's keys: see test_models
    assert metrics["metrics"]["total_dispatches"] == 1 and metrics["metrics"]["kernel_count"] == 3

    clusters = await tools.list_clusters()
    assert clusters["count"] == 2 and {c["name"] for c in clusters["clusters"]} == {"compute", "compute2"}

    result = await tools.scale_cluster(cluster="compute", target_count=5)
    assert result == {"success": True, "cluster": "compute", "previous_count": 3, "new_count": 5}

    for name in ("compute", "compute2"):
        assert await tools.destroy_cluster(name) == {"success": True, "cluster_name": name}

    # errors come back as dicts a person can read
    missing = await tools.dispatch("compute", {"type": "PING"})
    assert missing["success"] is False and "does not exist" in missing["error"]
    await tools.aclose()
    await asyncio.sleep(0)


def test_cli_json_and_exit_codes(redis_url: str) -> None:
    env = {**os.environ, "KCP_REDIS_URL": redis_url}

    def kcp(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "controlplane.ops.cli", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    assert kcp("--json", "cluster", "list").stdout.strip() == "[]"
    assert kcp("dispatch", "nope", "{not json").returncode == 2
    bad = kcp("cluster", "create", "bad:name")
    assert bad.returncode == 2 and "invalid cluster name" in bad.stderr
    assert kcp("metrics", "nope").returncode == 1
    for where in ("before", "after"):  # the common options work on either side of the subcommand
        url = ["--redis-url", "redis://127.0.0.1:1/0"]
        args = [*url, "status"] if where == "before" else ["status", *url]
        down = subprocess.run(
            [sys.executable, "-m", "controlplane.ops.cli", *args], capture_output=True, text=True, timeout=60
        )
        assert down.returncode == 3 and "Redis unavailable" in down.stderr, where
