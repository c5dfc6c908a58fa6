"""The spec's bus examples ("Inter-Kernel Communication" and "Complete Example"), unchanged but for
the import line (and, for the snippets written with top-level `await`, an `async def` around them),
run as programs against private Redis servers; plus `kcp bus publish|tail|stats`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import ProcessStack

from controlplane.redis.connect import connect_sync

pytestmark = [pytest.mark.system, pytest.mark.timeout(90)]

SETUP = """\
from controlplane import InterKernelBus, BusTopic, BusMessage

# Create the bus
bus = InterKernelBus()

# Define message handlers
async def kernel1_handler(message: BusMessage):
    print(f"Kernel 1 received: {message.payload}")

async def metrics_handler(message: BusMessage):
    print(f"Metrics: {message.payload}")

# Register kernels
bus.register("kernel-1", kernel1_handler)
bus.register("kernel-2", kernel1_handler)

# Subscribe to topics
bus.subscribe("kernel-1", BusTopic.METRICS, metrics_handler)
bus.subscribe("kernel-2", BusTopic.METRICS, metrics_handler)
"""

PUBLISHING = """\
# Publish an event
await bus.publish(BusMessage(
    from_kernel="kernel-1",
    topic=BusTopic.EVENTS,
    payload={"event": "ready", "timestamp": 1234567890}
))

# Send direct message
await bus.send_direct(
    from_kernel="kernel-1",
    to_kernel="kernel-2",
    payload={"request": "data", "key": "value"}
)
"""

STATS = """\
stats = bus.get_stats()
"""

COMPLETE = """\
import asyncio
from controlplane import (
    OrchestrationTools,
    InterKernelBus,
    BusTopic,
    BusMessage,
    ClusterMetricsCollector,
)

async def main():
    # Create orchestration tools
    tools = OrchestrationTools()

    # Create a compute cluster
    await tools.create_cluster("compute", kernel_count=3)

    # Set up inter-kernel communication
    bus = InterKernelBus()

    # Define a message handler
    async def compute_handler(message: BusMessage):
        print(f"Received: {message.payload}")
        # Forward to cluster
        await tools.dispatch("compute", message.payload)

    # Register kernels on bus
    for i in range(3):
        bus.register(f"worker-{i}", compute_handler)
        bus.subscribe(f"worker-{i}", BusTopic.DATA, compute_handler)

    # Publish a computation request
    await bus.publish(BusMessage(
        from_kernel="client",
        topic=BusTopic.DATA,
        payload={"type": "COMPUTE", "data": [1, 2, 3, 4, 5]}
    ))

    # Get cluster metrics
    metrics = await tools.get_metrics("compute")
    print(f"Cluster metrics: {metrics}")

    # List clusters
    clusters = await tools.list_clusters()
    print(f"Clusters: {clusters}")

    # Clean up
    await tools.destroy_cluster("compute")

if __name__ == "__main__":
    asyncio.run(main())
"""


def run_program(source: str, redis_url: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    program = tmp_path / "example.py"
    program.write_text(source)
    env = {**os.environ, "KCP_REDIS_URL": redis_url, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.run([sys.executable, str(program)], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.redis_cluster  # no job is dispatched (test_complete_example dispatches: not yet on a cluster)
def test_inter_kernel_communication_snippets(redis_url: str, tmp_path: Path) -> None:
    body = PUBLISHING + "await asyncio.sleep(0.5)  # let the consumers run\n" + STATS
    source = (
        "import asyncio, json\n"
        + SETUP
        + "\nasync def main():\n"
        + textwrap.indent(body, "    ")
        + "    print('STATS ' + json.dumps(stats))\n    await bus.aclose()\n\nasyncio.run(main())\n"
    )
    done = run_program(source, redis_url, tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    # the event is on EVENTS, to which nobody subscribed; the direct message reaches kernel-2
    assert "Kernel 1 received: {'request': 'data', 'key': 'value'}" in lines
    stats = json.loads(next(line for line in lines if line.startswith("STATS "))[6:])
    assert stats["registered_kernels"] == 2
    assert stats["subscriptions"] == {"events": 0, "metrics": 2, "control": 0, "data": 0}


def test_complete_example(stack: ProcessStack, redis_url: str, tmp_path: Path) -> None:
    stack.serve()
    stack.agent("host-0", slots=4)
    done = run_program(COMPLETE, redis_url, tmp_path)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "Cluster metrics: {'success': True" in out and "Clusters: {'clusters':" in out
    handled = out.count("Received: {'type': 'COMPUTE', 'data': [1, 2, 3, 4, 5]}")
    # at-least-once: a worker that had no time to handle the message before the program ended still
    # has it in Redis (unread or pending for its group), for its next incarnation
    with connect_sync(redis_url) as client:
        groups = {g["name"]: g for g in client.xinfo_groups("kcp:bus:topic:{data}")}
    assert set(groups) == {"worker-0", "worker-1", "worker-2"}
    # a handler cut short by the end of the program printed but did not acknowledge: it stays pending
    waiting = {name: int(g["pending"]) + int(g["lag"] or 0) for name, g in groups.items()}
    assert handled + sum(waiting.values()) >= 3 and all(w <= 1 for w in waiting.values()), (
        handled,
        waiting,
        out,
    )
    print(f"complete example: {handled} of 3 workers ran the handler before exit; kept in Redis: {waiting}")


def test_cli_publish_tail_stats(redis_url: str) -> None:
    env = {**os.environ, "KCP_REDIS_URL": redis_url}

    def kcp(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "controlplane.ops.cli", "bus", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    published = kcp("publish", "events", '{"event": "ready"}', "--from", "ops", "--count", "3", "--json")
    assert published.returncode == 0, published.stderr
    assert json.loads(published.stdout)["last"]["seq"] == 3
    tail = kcp("tail", "events", "--no-follow", "--json")
    rows = [json.loads(line) for line in tail.stdout.splitlines()]
    assert [(r["seq"], r["from"], json.loads(r["payload"])) for r in rows] == [
        (str(i), "ops", {"event": "ready"}) for i in (1, 2, 3)
    ]
    follower = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "controlplane.ops.cli",
            "bus",
            "tail",
            "events",
            "--last",
            "1",
            "--limit",
            "2",
            "--json",
        ],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    n = 0
    while follower.poll() is None:  # publish until the follower has followed two new entries
        n += 1
        assert n < 60, "kcp bus tail did not follow"
        assert kcp("publish", "events", json.dumps({"n": n})).returncode == 0
        time.sleep(0.3)
    lines = [json.loads(line) for line in follower.communicate()[0].splitlines()]
    assert len(lines) == 3  # one entry of history, then two followed, in order
    seqs = [int(line["seq"]) for line in lines]
    assert seqs == list(range(seqs[0], seqs[0] + 3))
    assert kcp("publish", "data", "{}", "--to", "nobody").returncode == 2  # not registered
    assert kcp("publish", "nope", "{}").returncode == 2
    assert kcp("publish", "events", "[1]").returncode == 2
    assert kcp("tail", "inbox:bad name", "--no-follow").returncode == 2
    stats = kcp("stats", "--json")
    assert json.loads(stats.stdout)["stream_length"]["events"] == 3 + n
    down = subprocess.run(
        [
            sys.executable,
            "-m",
            "controlplane.ops.cli",
            "--redis-url",
            "redis://127.0.0.1:1/0",
            "bus",
            "stats",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert down.returncode == 3 and "Redis unavailable" in down.stderr
