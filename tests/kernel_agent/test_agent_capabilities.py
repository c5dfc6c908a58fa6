"""`kcp agent --capabilities`: the kernels an agent hosts declare its capabilities, so routing's
`requires` finds them.

`declared_capabilities` is the one union (the agent's and the syscalls'), which the kernel
record and work stealing's sibling check both use. End to end (real `kcp serve`, real agents,
real kernel processes), two agents host one cluster, one kernel each: `gpu-0` declares `gpu`,
`cpu-0` nothing. A request requiring `gpu` runs on `gpu-0`'s kernel, every time; one requiring
a capability no agent has fails with `NoKernelAvailable`. Both ways an agent starts kernels are
covered: forked from its fork server (the default) and exec'd (`--no-fork-server`).
"""

from __future__ import annotations

from typing import Any

import fakeredis
import psutil
import pytest
from redis.asyncio import Redis as AsyncRedis

from controlplane import KcpClient, Settings
from controlplane.errors import InvalidRequest, NoKernelAvailable
from controlplane.protocol.keys import Keys
from kernel_agent.kernel.worker import KernelProcess
from kernel_agent.syscalls import SyscallContext, SyscallRegistry, builtin_registry, declared_capabilities
from tests.conftest import ProcessStack, agents_up

PING_GPU = {"type": "PING", "requires": ["gpu"]}


def infer_registry() -> SyscallRegistry:
    registry = builtin_registry()

    def infer(ctx: SyscallContext, args: dict[str, Any]) -> dict[str, Any]:
        return {}

    registry.register("INFER", infer, capabilities=["infer"])
    return registry


@pytest.mark.unit
def test_declared_capabilities_are_the_agents_and_the_syscalls() -> None:
    registry = infer_registry()
    assert declared_capabilities(registry) == {"infer"}
    assert declared_capabilities(registry, ["gpu", "infer", "gpu"]) == {"gpu", "infer"}
    assert declared_capabilities(builtin_registry(), ["gpu"]) == {"gpu"}
    with pytest.raises(InvalidRequest, match="capabilities"):
        declared_capabilities(registry, ["GPU"])


@pytest.mark.unit
async def test_a_kernel_declares_and_compares_siblings_against_one_union(
    fake_redis: fakeredis.FakeAsyncRedis,
) -> None:
    kernel = KernelProcess(
        fake_redis,
        Keys("kcp:"),
        cluster="c",
        name="k0",
        agent="a",
        registry=infer_registry(),
        capabilities=["gpu"],
    )
    assert kernel.capabilities == {"gpu", "infer"}
    assert kernel.siblings.capabilities is kernel.capabilities


#: several OS processes on a real redis-server (so a system test too, by tests/conftest.py's markers)
@pytest.mark.integration
@pytest.mark.system
@pytest.mark.timeout(90)
@pytest.mark.parametrize("spawn", [(), ("--no-fork-server",)], ids=["fork-server", "exec"])
async def test_a_request_requiring_an_agents_capability_runs_on_that_agents_kernel(
    stack: ProcessStack, redis: AsyncRedis, redis_url: str, spawn: tuple[str, ...]
) -> None:
    stack.serve()
    gpu_agent = stack.agent("gpu-0", 1, "--capabilities", "gpu", *spawn)
    stack.agent("cpu-0", 1, *spawn)
    await agents_up(redis, 2)
    async with KcpClient(Settings(redis_url=redis_url, ready_timeout=60)) as kcp:
        info = await kcp.create_cluster("mixed", 2)
        assert info.running == 2
        by_agent = {k.agent: k for k in info.kernels}
        assert set(by_agent) == {"gpu-0", "cpu-0"}, "one kernel on each agent"
        assert by_agent["gpu-0"].capabilities == "gpu", "the kernel record carries the agent's"
        assert by_agent["cpu-0"].capabilities == ""
        exec_d = psutil.Process(by_agent["gpu-0"].pid).ppid() == gpu_agent.pid
        assert exec_d == bool(spawn), "the kernel was started the way the test means"

        gpu_kernel = by_agent["gpu-0"].name
        for _ in range(8):  # not a lucky pick: only that kernel is eligible
            result = await kcp.dispatch("mixed", PING_GPU)
            assert result.kernel == gpu_kernel
            assert result.result["pong"] is True

        with pytest.raises(NoKernelAvailable, match=r"\['tpu'\].*declare: gpu"):
            await kcp.dispatch("mixed", {"type": "PING", "requires": ["tpu"]})
