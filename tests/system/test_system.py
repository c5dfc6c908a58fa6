"""The spine end to end: real redis-server, `kcp serve` and agents as separate OS processes."""

from __future__ import annotations

import asyncio
import os
import random
import signal
from collections import Counter
from typing import Any

import pytest
from conftest import ProcessStack, agents_up, wait_for
from redis.asyncio import Redis as AsyncRedis

from controlplane import ClusterStatus, KcpClient, KcpError, Settings
from controlplane.protocol.keys import Keys

pytestmark = [pytest.mark.system, pytest.mark.redis_cluster, pytest.mark.timeout(180)]

KEYS = Keys()


def mixed_request(rng: random.Random) -> dict[str, Any]:
    kind = rng.randrange(4)
    if kind == 0:
        return {"type": "PING", "payload": rng.randrange(1000)}
    if kind == 1:
        return {"type": "COMPUTE", "op": "sum", "data": [rng.randrange(100) for _ in range(10)]}
    if kind == 2:
        return {"type": "ALLOC", "size": rng.choice([16, 64, 256])}
    return {"type": "OPEN", "path": f"/data/{rng.randrange(100)}"}


async def write_then_read(kcp: KcpClient, cluster: str, rng: random.Random) -> None:
    """WRITE random bytes, then READ them back from the same kernel."""
    address = 0x1000 + rng.randrange(0, 0xF0000)
    data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
    w = await kcp.dispatch(
        cluster, {"type": "WRITE", "address": address, "data": data.hex(), "encoding": "hex"}
    )
    r = await kcp.dispatch(cluster, {"type": "READ", "address": address, "size": len(data)}, kernel=w.kernel)
    assert r.kernel == w.kernel
    assert bytes.fromhex(r.result["data"]) == data


async def test_cluster_lifecycle_across_processes(
    stack: ProcessStack, redis: AsyncRedis, redis_url: str
) -> None:
    stack.serve()
    for i in range(3):
        stack.agent(f"host-{i}", slots=3)
    await agents_up(redis, 3)
    rng = random.Random(42)

    async with KcpClient(Settings(redis_url=redis_url)) as kcp:
        info = await kcp.create_cluster("sys", 3, {"max_kernels": 8})
        assert (info.status, info.running) == (ClusterStatus.RUNNING, 3)
        assert len({k.agent for k in info.kernels}) == 3, "kernels are spread over the agents"

        # 300 mixed requests, a third of them WRITE/READ pairs checked for consistency
        sem = asyncio.Semaphore(16)
        used: Counter[str] = Counter()
        pairs = 100

        async def one(i: int) -> None:
            async with sem:
                if i % 3 == 0:
                    await write_then_read(kcp, "sys", rng)
                else:
                    used[(await kcp.dispatch("sys", mixed_request(rng))).kernel] += 1

        await asyncio.gather(*(one(i) for i in range(300)))
        assert set(used) == {"worker-0", "worker-1", "worker-2"}, "round robin reaches every kernel"

        # scale 3 -> 5 -> 2 while a steady stream of dispatches runs: none may fail
        failures: list[BaseException] = []
        done = 0
        stop = asyncio.Event()

        async def stream() -> None:
            nonlocal done
            while not stop.is_set():
                try:
                    await kcp.dispatch("sys", mixed_request(rng))
                    done += 1
                except KcpError as exc:
                    failures.append(exc)

        streams = [asyncio.create_task(stream()) for _ in range(4)]
        assert await kcp.scale_cluster("sys", 5) == (3, 5)
        assert (await kcp.get_cluster("sys")).running == 5
        assert await kcp.scale_cluster("sys", 2) == (5, 2)
        info = await kcp.get_cluster("sys")
        assert (info.status, info.running, len(info.kernels)) == (ClusterStatus.RUNNING, 2, 2)
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*streams)
        assert not failures, failures[:3]
        assert done > 50

        metrics = await kcp.get_metrics("sys")
        assert metrics.kernel_count == 2
        assert metrics.total_dispatches == 2 * pairs + sum(used.values()) + done, "each dispatch counted once"
        assert metrics.total_errors == 0

        await kcp.destroy_cluster("sys")
    leftovers = [k async for k in redis.scan_iter(match="kcp:*") if ":sys" in k]
    assert leftovers == []
    for key in [k async for k in redis.scan_iter(match="kcp:*")]:
        if await redis.type(key) == "string":
            assert not (await redis.get(key) or "").startswith("\x80"), f"{key} holds pickled bytes"


async def test_second_control_plane_takes_over(
    stack: ProcessStack, redis: AsyncRedis, redis_url: str
) -> None:
    serves = [stack.serve(), stack.serve()]
    stack.agent("host-0", slots=4)
    await agents_up(redis, 1)

    async def leader_known() -> bool:
        return bool(await redis.get(KEYS.leader()))

    await wait_for(leader_known, 10, "a leader")
    leader_pid = int((await redis.get(KEYS.leader())).split(":")[1])
    leader = next(p for p in serves if p.pid == leader_pid)
    leader.send_signal(signal.SIGKILL)
    leader.wait()

    async with KcpClient(Settings(redis_url=redis_url, ready_timeout=20)) as kcp:
        info = await kcp.create_cluster("after", 2)  # only the survivor can place these
        assert (info.status, info.running) == (ClusterStatus.RUNNING, 2)
        new_leader = int((await redis.get(KEYS.leader())).split(":")[1])
        assert new_leader != leader_pid and new_leader in {p.pid for p in serves}
        assert (await kcp.dispatch("after", {"type": "PING"})).result["pong"] is True


async def test_agent_sigterm_drains_and_work_moves(
    stack: ProcessStack, redis: AsyncRedis, redis_url: str
) -> None:
    stack.serve()
    leaving = stack.agent("leaving", slots=2)
    await agents_up(redis, 1)
    async with KcpClient(Settings(redis_url=redis_url)) as kcp:
        await kcp.create_cluster("moving", 2)
        stack.agent("staying", slots=2)
        await agents_up(redis, 2)
        leaving.send_signal(signal.SIGTERM)
        assert leaving.wait(30) == 0, "a SIGTERMed agent drains and exits cleanly"
        assert not await redis.exists(KEYS.agent("leaving"), KEYS.agent_lease("leaving"))

        async def replaced() -> bool:
            info = await kcp.get_cluster("moving")
            return info.running == 2 and {k.agent for k in info.kernels} == {"staying"}

        await wait_for(replaced, 30, "replacement kernels on the remaining agent")
        assert (await kcp.dispatch("moving", {"type": "PING"})).result["pong"] is True


async def test_crashed_kernel_is_restarted_and_its_jobs_rerun(
    stack: ProcessStack, redis: AsyncRedis, redis_url: str
) -> None:
    stack.serve()
    stack.agent("host-0", slots=1)
    await agents_up(redis, 1)
    async with KcpClient(Settings(redis_url=redis_url)) as kcp:
        info = await kcp.create_cluster("crashy", 1)
        pid, epoch = info.kernels[0].pid, info.kernels[0].epoch
        os.kill(pid, signal.SIGSTOP)  # frozen: the next job waits in its queue
        job = asyncio.create_task(kcp.dispatch("crashy", {"type": "PING", "payload": "survives"}))
        await asyncio.sleep(0.3)
        os.kill(pid, signal.SIGKILL)
        result = await job  # the agent restarts the kernel, which takes the job back
        assert result.result["payload"] == "survives"
        kernel = (await kcp.get_cluster("crashy")).kernels[0]
        assert kernel.pid != pid and kernel.epoch > epoch


async def test_capabilities_steer_placement_and_routing(
    stack: ProcessStack, redis: AsyncRedis, redis_url: str
) -> None:
    """A user syscall loaded with --handlers declares a capability; clusters and requests that
    require it land only on the agents and kernels that have it."""
    stack.agent("plain", 4)
    stack.agent("inference", 4, "--handlers", "examples.infer_handlers")
    stack.serve()
    await agents_up(redis, 2)
    infer = {"type": "INFER", "requires": ["infer"], "inputs": [0.5, 1.0, 2.0], "seed": 7, "outputs": 2}
    async with KcpClient(Settings(redis_url=redis_url)) as kcp:
        info = await kcp.create_cluster("gpu", 2, {"capabilities": ["infer"]})
        assert info.running == 2 and {k.agent for k in info.kernels} == {"inference"}
        first = await kcp.dispatch("gpu", infer)
        again = await kcp.dispatch("gpu", infer)
        assert first.result["outputs"] == again.result["outputs"] and len(first.result["outputs"]) == 2

        await kcp.create_cluster("mixed", 2)  # no constraint: spread over both agents
        mixed = await kcp.get_cluster("mixed")
        assert {k.agent for k in mixed.kernels} == {"plain", "inference"}
        routed = {(await kcp.dispatch("mixed", infer)).kernel for _ in range(6)}
        assert routed == {next(k.name for k in mixed.kernels if k.agent == "inference")}
        with pytest.raises(KcpError, match="INFER"):
            await kcp.dispatch("mixed", {"type": "INFER", "inputs": []})  # bad arguments: a clear error

        info = await kcp.create_cluster("needs-tpu", 1, {"capabilities": ["tpu"]}, wait=2)
        assert info.running == 0 and "tpu" in info.reason  # waits for capacity, says why
