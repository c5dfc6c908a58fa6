"""`kcp demo` / `make demo`: a real local stack doing real work, start to clean shutdown."""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from collections import Counter
from typing import Any

from controlplane.client.core import KcpClient
from controlplane.errors import KcpError
from controlplane.ops.stack import LocalStack
from controlplane.settings import Settings


def _requests(rng: random.Random, n: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i in range(n):
        kind = i % 5
        if kind == 0:
            out.append({"type": "PING", "payload": i})
        elif kind == 1:
            out.append({"type": "COMPUTE", "data": [rng.uniform(-100, 100) for _ in range(50)]})
        elif kind == 2:
            out.append({"type": "ALLOC", "size": rng.choice([64, 256, 4096])})
        elif kind == 3:
            out.append({"type": "COMPUTE", "op": "sort", "data": [rng.randint(0, 999) for _ in range(20)]})
        else:
            out.append({"type": "READ", "address": 0x1000, "size": 32})
    return out


async def _burst(
    kcp: KcpClient, cluster: str, requests: list[dict[str, Any]]
) -> tuple[Counter[str], list[float]]:
    per_kernel: Counter[str] = Counter()
    latencies: list[float] = []
    sem = asyncio.Semaphore(32)

    async def one(req: dict[str, Any]) -> None:
        async with sem:
            t0 = time.perf_counter()
            res = await kcp.dispatch(cluster, req)
            latencies.append((time.perf_counter() - t0) * 1000)
            per_kernel[res.kernel] += 1

    await asyncio.gather(*(one(r) for r in requests))
    return per_kernel, latencies


def _report(label: str, per_kernel: Counter[str], latencies: list[float]) -> None:
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    spread = ", ".join(f"{k}={v}" for k, v in sorted(per_kernel.items()))
    print(f"  {label}: {len(latencies)} dispatches, p50 {q[49]:.2f} ms, p99 {q[98]:.2f} ms  [{spread}]")


async def _scenario(settings: Settings) -> None:
    rng = random.Random(7)
    async with KcpClient(settings) as kcp:
        t0 = time.perf_counter()
        info = await kcp.create_cluster("demo", kernel_count=3)
        print(
            f"created cluster 'demo': {info.running}/{info.desired} kernels running "
            f"({time.perf_counter() - t0:.1f}s) on {sorted({k.agent for k in info.kernels})}"
        )

        w = await kcp.dispatch("demo", {"type": "WRITE", "address": 0x2000, "data": "hello, kcp"})
        r = await kcp.dispatch("demo", {"type": "READ", "address": 0x2000, "size": 10}, kernel=w.kernel)
        print(f"WRITE then READ on {r.kernel}: {bytes.fromhex(r.result['data'])!r}")
        try:
            await kcp.dispatch("demo", {"type": "READ", "address": -1, "size": 8})
        except KcpError as exc:
            print(f"a bad request is refused: {exc}")

        _report("3 kernels", *await _burst(kcp, "demo", _requests(rng, 300)))

        before, after = await kcp.scale_cluster("demo", 5)
        print(f"scaled {before} -> {after}")
        _report("5 kernels", *await _burst(kcp, "demo", _requests(rng, 200)))

        scale_down = asyncio.create_task(kcp.scale_cluster("demo", 2))
        per_kernel, lat = await _burst(kcp, "demo", _requests(rng, 200))
        before, after = await scale_down
        print(f"scaled {before} -> {after} while dispatching (draining kernels finish their work)")
        _report("during scale-down", per_kernel, lat)

        metrics = await kcp.get_metrics("demo")
        print("metrics:", json.dumps(metrics.to_dict()))
        await kcp.destroy_cluster("demo")
        print("destroyed cluster 'demo'")


def run_demo(settings: Settings, *, redis_url_given: bool) -> int:
    """Start a stack (a private Redis unless a URL was given), run the scenario, stop it all."""
    started = time.perf_counter()
    stack = LocalStack(settings, agents=3, slots=4, own_redis=not redis_url_given)
    with stack:
        print(f"stack up: Redis {stack.redis_url}, control plane, 3 agents x 4 slots")
        asyncio.run(_scenario(settings.model_copy(update={"redis_url": stack.redis_url})))
        print("shutting down (agents drain their kernels) ...")
    print(f"demo finished in {time.perf_counter() - started:.1f}s")
    return 0
