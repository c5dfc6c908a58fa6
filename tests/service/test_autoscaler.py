"""The autoscaler: the pure policy (hysteresis, sustain, cool-down, bounds), and a cluster that
grows under CPU-bound load and shrinks back when it stops."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import pytest
from conftest import ProcessStack
from redis.asyncio import Redis as AsyncRedis

from controlplane import ClusterStatus, KcpClient, Settings
from controlplane.protocol.keys import Keys
from controlplane.protocol.models import ClusterConfig, KernelLoad, KernelState
from controlplane.protocol.records import ClusterRecord, KernelRecord
from controlplane.service.autoscaler import Trend, cluster_load, decide

KEYS = Keys()
CFG = ClusterConfig(
    auto_scale=True, min_kernels=1, max_kernels=5, scale_up_threshold=0.8, scale_down_threshold=0.2
)


def cluster(desired: int, cfg: ClusterConfig = CFG) -> ClusterRecord:
    return ClusterRecord(name="c", config=cfg, desired=desired)


def step(
    desired: int, load: float, trend: Trend, now: float, running: int | None = None
) -> tuple[int, Trend]:
    running = desired if running is None else running
    return decide(cluster(desired), running, load, trend, now, sustain=2.0, cooldown=10.0, ceiling=256)


@pytest.mark.unit
def test_scales_up_only_after_the_load_is_sustained() -> None:
    desired, trend = step(2, 0.95, Trend(), now=100.0)
    assert (desired, trend.direction) == (2, "up")  # direction noted, nothing done yet
    desired, trend = step(2, 0.95, trend, now=101.0)
    assert desired == 2
    desired, trend = step(2, 0.95, trend, now=102.5)
    assert desired == 3 and trend.last_step == 102.5  # ceil(2 * 0.95 / 0.8) = 3


@pytest.mark.unit
def test_big_overload_takes_a_big_step_but_never_past_max() -> None:
    desired, _ = step(3, 1.0, Trend("up", 0.0, 0.0), now=100.0)
    assert desired == 4  # ceil(3 * 1.0 / 0.8)
    desired, _ = step(4, 1.0, Trend("up", 0.0, 0.0), now=100.0)
    assert desired == 5
    desired, _ = step(5, 1.0, Trend("up", 0.0, 0.0), now=100.0)
    assert desired == 5, "max_kernels is a ceiling"


@pytest.mark.unit
def test_hysteresis_band_and_cooldown_prevent_flapping() -> None:
    trend = Trend("up", 0.0, 95.0)
    assert step(3, 0.95, trend, now=100.0)[0] == 3, "cool-down: 5 s since the last step"
    assert step(3, 0.95, trend, now=106.0)[0] == 4
    # load between the thresholds resets the trend: no step either way
    desired, between = step(3, 0.5, trend, now=106.0)
    assert desired == 3 and between.direction == ""
    # shrinking is one kernel at a time, and never below min
    assert step(3, 0.05, Trend("down", 0.0, 0.0), now=100.0)[0] == 2
    assert step(1, 0.0, Trend("down", 0.0, 0.0), now=100.0)[0] == 1


@pytest.mark.unit
def test_waits_for_the_last_step_to_land_and_clamps_out_of_bounds() -> None:
    assert step(4, 1.0, Trend("up", 0.0, 0.0), now=100.0, running=3)[0] == 4, "3 of 4 running: wait"
    assert step(4, 0.0, Trend("down", 0.0, 0.0), now=100.0, running=3)[0] == 3, (
        "an unplaceable step is undone"
    )
    assert decide(cluster(9), 9, 0.5, Trend(), 1.0, sustain=2, cooldown=10, ceiling=256)[0] == 5
    assert decide(cluster(0), 0, 0.5, Trend(), 1.0, sustain=2, cooldown=10, ceiling=256)[0] == 1


@pytest.mark.unit
def test_cluster_load_counts_cpu_and_queue_and_skips_kernels_without_records() -> None:
    kernels = [
        KernelRecord(cluster="c", name=f"worker-{i}", agent="a", state=KernelState.RUNNING) for i in range(3)
    ]
    loads = {
        "worker-0": KernelLoad(name="worker-0", cpu=0.9),
        "worker-1": KernelLoad(name="worker-1", cpu=0.1, queue_depth=8),  # queue-bound: full
    }
    assert cluster_load(kernels, loads) == pytest.approx(0.95)
    assert cluster_load(kernels, {}) is None


@pytest.mark.system
@pytest.mark.timeout(120)
@pytest.mark.redis_cluster
async def test_cluster_grows_under_load_and_shrinks_back(
    stack: ProcessStack, redis: AsyncRedis, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(stack.ENV, "KCP_AUTOSCALE_SUSTAIN", "0.5")
    monkeypatch.setitem(stack.ENV, "KCP_AUTOSCALE_COOLDOWN", "1.0")
    stack.serve()
    stack.agent("host-0", 3, "--handlers", "tests.chaos.handlers")
    for _ in range(300):
        if await redis.scard(KEYS.agents()):
            break
        await asyncio.sleep(0.1)
    config: dict[str, Any] = {"auto_scale": True, "min_kernels": 1, "max_kernels": 3}
    seen: set[str] = set()
    sizes: list[int] = []
    async with KcpClient(Settings(redis_url=redis_url)) as kcp:
        await kcp.create_cluster("elastic", 1, config)
        stop = asyncio.Event()

        async def load() -> None:  # keeps every kernel's queue full of CPU-bound jobs
            while not stop.is_set():
                await kcp.dispatch("elastic", {"type": "BURN", "ms": 100, "tag": "x"})

        async def watch(limit: float, until: Any) -> None:
            deadline = time.monotonic() + limit
            while time.monotonic() < deadline:
                record = await redis.hgetall(KEYS.cluster("elastic"))
                seen.add(record["status"])
                sizes.append(int(record["desired"]))
                if until(sizes[-1]):
                    return
                await asyncio.sleep(0.1)

        workers = [asyncio.create_task(load()) for _ in range(30)]
        await watch(40, lambda n: n == 3)
        stop.set()
        await asyncio.gather(*workers)
        grown = max(sizes)
        await watch(40, lambda n: n == 1)
        info = await kcp.get_cluster("elastic")
    print(f"\ndesired over time (sampled): {sizes[:: max(len(sizes) // 20, 1)]}; statuses {sorted(seen)}")
    assert grown == 3, "scaled up to max_kernels under load"
    assert sizes[-1] == 1, "scaled back down to min_kernels once idle"
    assert ClusterStatus.SCALING.value in seen
    assert all(1 <= n <= 3 for n in sizes), "never outside [min, max]"
    assert info.desired == 1
    steps = await redis.hgetall(KEYS.reliability())
    assert int(steps["autoscale_up_total"]) >= 1 and int(steps["autoscale_down_total"]) == 2
    assert os.environ.get("KCP_AUTOSCALE_SUSTAIN") is None  # the settings went to the processes only
