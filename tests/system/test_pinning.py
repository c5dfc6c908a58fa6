"""Pinned means pinned: a request for one kernel (`kernel="worker-1"`) or one incarnation of it
(`kernel="worker-1@7"`) runs there or fails with `KernelGone`; it never runs on another kernel
or on a restarted process under the same name (whose memory is empty). Real redis-server,
`kcp serve` and agents as separate OS processes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from typing import Any

import pytest
from conftest import ProcessStack, agents_up, wait_for
from redis.asyncio import Redis as AsyncRedis

from controlplane import (
    InvalidRequest,
    KcpClient,
    KernelGone,
    OrchestrationConfig,
    OrchestrationTools,
    RoutingStrategy,
    Settings,
)
from controlplane.protocol.keys import Keys

pytestmark = [pytest.mark.system, pytest.mark.timeout(90), pytest.mark.redis_cluster]

KEYS = Keys()


async def test_a_kernel_restarted_between_write_and_read(
    stack: ProcessStack, redis: AsyncRedis, redis_url: str
) -> None:
    stack.serve()
    stack.agent("host-0", slots=1)
    await agents_up(redis, 1)
    async with KcpClient(Settings(redis_url=redis_url)) as kcp:
        info = await kcp.create_cluster("mem", 1)
        pid = info.kernels[0].pid
        w = await kcp.dispatch("mem", {"type": "WRITE", "address": 0x1000, "data": "cafe", "encoding": "hex"})
        assert w.epoch == info.kernels[0].epoch > 0 and w.incarnation == f"{w.kernel}@{w.epoch}"
        same = await kcp.dispatch("mem", {"type": "READ", "address": 0x1000, "size": 2}, kernel=w.incarnation)
        assert (same.result["data"], same.epoch) == ("cafe", w.epoch)

        # a job queued for this incarnation, pinned by name, when the process dies
        os.kill(pid, signal.SIGSTOP)
        queued = asyncio.create_task(
            kcp.dispatch("mem", {"type": "READ", "address": 0x1000, "size": 2}, kernel=w.kernel)
        )
        await asyncio.sleep(0.3)
        os.kill(pid, signal.SIGKILL)  # the agent restarts it: same name, new epoch, empty memory
        with pytest.raises(KernelGone, match="replaced") as lost:
            await queued
        assert lost.value.kernel == w.kernel

        async def restarted() -> bool:
            k = (await kcp.get_cluster("mem")).kernels[0]
            return k.state.value == "running" and k.epoch > w.epoch

        await wait_for(restarted, 20, "the kernel to restart")
        with pytest.raises(KernelGone, match=rf"{w.incarnation} was replaced") as gone:
            await kcp.dispatch("mem", {"type": "READ", "address": 0x1000, "size": 2}, kernel=w.incarnation)
        assert (gone.value.kernel, gone.value.epoch) == (w.kernel, w.epoch)
        by_name = await kcp.dispatch("mem", {"type": "READ", "address": 0x1000, "size": 2}, kernel=w.kernel)
        assert by_name.kernel == w.kernel and by_name.epoch > w.epoch, "the result names the new incarnation"
        assert by_name.result["data"] == "0000", "a restart keeps nothing of kernel memory"
        with pytest.raises(InvalidRequest, match="incarnation"):
            await kcp.dispatch("mem", {"type": "PING"}, kernel=f"{w.kernel}@x")

    # the dict API: the epoch in the result, KernelGone as an error dict
    async with OrchestrationTools(Settings(redis_url=redis_url)) as tools:
        ok = await tools.dispatch("mem", {"type": "PING", "kernel": by_name.incarnation})
        assert ok["success"] and ok["epoch"] == by_name.epoch
        failed = await tools.dispatch("mem", {"type": "PING", "kernel": w.incarnation})
        assert failed["success"] is False and failed["error_type"] == "KernelGone"
        assert (failed["kernel"], failed["epoch"]) == (w.kernel, w.epoch)

    # the CLI: `--kernel NAME@EPOCH`, and the incarnation in what it prints
    def kcp(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "controlplane.ops.cli", "--redis-url", redis_url, "dispatch", "mem"]
        return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=60)

    ok_cli = kcp('{"type": "PING"}', "--kernel", by_name.incarnation)
    assert ok_cli.returncode == 0 and ok_cli.stdout.startswith(f"{by_name.incarnation} ("), ok_cli.stdout
    gone_cli = kcp('{"type": "PING"}', "--kernel", w.incarnation)
    assert gone_cli.returncode == 1 and f"{w.incarnation} was replaced" in gone_cli.stderr, gone_cli.stderr


async def test_pinned_jobs_of_a_dead_agent_fail_and_unpinned_ones_move(
    stack: ProcessStack, redis: AsyncRedis, redis_url: str
) -> None:
    stack.serve()
    agents = {name: stack.agent(name, 1, "--handlers", "tests.chaos.handlers") for name in ("a", "b")}
    await agents_up(redis, 2)
    config = OrchestrationConfig(strategy=RoutingStrategy.ROUND_ROBIN, timeout_ms=20_000, retry_count=0)
    async with KcpClient(Settings(redis_url=redis_url), orchestration=config) as kcp:
        info = await kcp.create_cluster("pin", 2)
        victim = info.kernels[0]
        survivor = next(k for k in info.kernels if k.agent != victim.agent)
        os.kill(victim.pid, signal.SIGSTOP)  # its jobs wait in its queue (or in its hands)

        def sleep(tag: str) -> dict[str, Any]:
            return {"type": "SLEEP", "ms": 20, "tag": tag}

        pinned = [
            asyncio.create_task(kcp.dispatch("pin", sleep(f"p{i}"), kernel=victim.name)) for i in range(6)
        ]
        pinned_epoch = [
            asyncio.create_task(kcp.dispatch("pin", sleep(f"e{i}"), kernel=f"{victim.name}@{victim.epoch}"))
            for i in range(3)
        ]
        free = [asyncio.create_task(kcp.dispatch("pin", sleep(f"u{i}"))) for i in range(8)]
        await asyncio.sleep(0.5)
        depth = await redis.zcard(KEYS.inflight("pin", victim.name))
        agents[victim.agent].send_signal(signal.SIGKILL)  # its kernels die with it (PDEATHSIG)

        for task in pinned + pinned_epoch:
            with pytest.raises(
                KernelGone, match=f"pinned to kernel {victim.name}@{victim.epoch}, which is gone"
            ):
                await task
        results = await asyncio.gather(*free)
    assert depth >= 9, "the pinned jobs (at least) were on the victim when it died"
    assert {r.result["tag"] for r in results} == {f"u{i}" for i in range(8)}
    assert all(r.kernel != victim.name or r.epoch != victim.epoch for r in results)
    assert any(r.kernel == survivor.name for r in results)
