"""The agent's fork server (kernel_agent/agent/spawner.py): what a forked kernel gets, how its
exit and signals travel, that it dies with the server and the server with the agent, and the
exec fallback; then a real `kcp agent` whose kernels are forked: start, restart, drain, SIGKILL."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest
import pytest_asyncio
from redis.asyncio import Redis as AsyncRedis

from controlplane import KcpClient, Settings
from controlplane.protocol.keys import Keys
from controlplane.protocol.models import KernelState
from controlplane.redis.state import State
from kernel_agent.agent.spawner import ForkedKernel, ForkServer, Spawner
from kernel_agent.contract import KERNEL_PRELOAD
from tests.conftest import ProcessStack, agents_up, wait_for

ROOT = Path(__file__).resolve().parents[2]
CHILD = "tests.kernel_agent.forked"
KEYS = Keys()


@pytest.fixture(autouse=True)
def importable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fork server (a new interpreter) must find this repository's `tests` package."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


@pytest_asyncio.fixture
async def server() -> AsyncIterator[ForkServer]:
    server = await ForkServer.start(KERNEL_PRELOAD)
    yield server
    await server.close()


async def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# ---------------------------------------------------------------- the fork server on its own


@pytest.mark.integration
@pytest.mark.timeout(60)
async def test_a_forked_kernel_gets_its_argv_and_env_nothing_of_the_server_and_its_exit_code(
    server: ForkServer, tmp_path: Path
) -> None:
    out = tmp_path / "seen.json"
    env = {"KCP_PREFIX": "t:", "PATH": os.environ["PATH"], "PYTHONPATH": os.environ["PYTHONPATH"]}
    kernel = await server.fork(CHILD, ["report", str(out), "7"], env)
    assert await asyncio.wait_for(kernel.wait(), 30) == 7
    assert kernel.returncode == 7
    seen = json.loads(out.read_text())
    assert seen["argv"] == ["report", str(out), "7"] and seen["main"] == "__main__"
    assert seen["env"] == env, "exactly the environment asked for, not the server's"
    assert seen["preloaded"], "forked from the warm server: the kernel's modules were already imported"
    assert seen["ppid"] == server.proc.pid
    assert seen["fds"][:3] == [0, 1, 2] and len(seen["fds"]) <= 5, (
        f"only stdio, the report file and listdir's own fd are open: {seen['fds']}"
    )


@pytest.mark.integration
@pytest.mark.timeout(60)
async def test_signals_reach_the_kernel_with_default_dispositions(server: ForkServer) -> None:
    env = dict(os.environ)
    term = await server.fork(CHILD, ["sleep"], env)
    killed = await server.fork(CHILD, ["sleep"], env)
    await asyncio.sleep(0.5)  # past runpy's start: the kernel runs its own code
    term.send_signal(signal.SIGTERM)  # the server ignores SIGTERM; its child must not
    killed.kill()
    assert await asyncio.wait_for(term.wait(), 10) == -signal.SIGTERM
    assert await asyncio.wait_for(killed.wait(), 10) == -signal.SIGKILL
    term.send_signal(signal.SIGTERM)  # reaped: nothing is sent, the pid may belong to anyone now


@pytest.mark.integration
@pytest.mark.timeout(60)
async def test_kernels_die_with_their_fork_server(server: ForkServer) -> None:
    kernels = [await server.fork(CHILD, ["sleep"], dict(os.environ)) for _ in range(3)]
    server.proc.kill()
    codes = await asyncio.wait_for(asyncio.gather(*(k.wait() for k in kernels)), 10)
    assert codes == [-signal.SIGKILL] * 3 and server.lost
    for k in kernels:
        await wait_for(lambda k=k: gone(k.pid), 5, f"forked kernel {k.pid} to die with the server")


@pytest.mark.integration
@pytest.mark.timeout(60)
async def test_the_spawner_starts_another_server_after_one_died(caplog: pytest.LogCaptureFixture) -> None:
    spawner = Spawner(KERNEL_PRELOAD)
    cmd = [sys.executable, "-m", CHILD, "sleep"]
    try:
        first = await spawner.start(cmd, dict(os.environ))
        assert isinstance(first, ForkedKernel) and spawner.server is not None
        spawner.server.proc.kill()
        assert await asyncio.wait_for(first.wait(), 10) == -signal.SIGKILL
        with caplog.at_level(logging.WARNING, logger="kernel_agent.agent.spawner"):
            second = await spawner.start(cmd, dict(os.environ))
        assert isinstance(second, ForkedKernel) and second.returncode is None
        assert "fork server exited with -9; starting another" in caplog.text
        second.kill()
        assert await asyncio.wait_for(second.wait(), 10) == -signal.SIGKILL
    finally:
        await spawner.close()


@pytest.mark.integration
@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("preload", "reason"),
    [
        (["tests.kernel_agent.no_such_module"], "cannot import tests.kernel_agent.no_such_module"),
        (["tests.kernel_agent.starts_a_thread"], "a preloaded module started a thread"),
    ],
)
async def test_a_server_that_cannot_start_leaves_the_agent_on_exec(
    preload: list[str], reason: str, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    spawner = Spawner([*KERNEL_PRELOAD, *preload])
    out = tmp_path / "seen.json"
    with caplog.at_level(logging.WARNING, logger="kernel_agent.agent.spawner"):
        proc = await spawner.start([sys.executable, "-m", CHILD, "report", str(out), "5"], dict(os.environ))
    assert isinstance(proc, asyncio.subprocess.Process), "exec'd, as without a fork server"
    assert await asyncio.wait_for(proc.wait(), 30) == 5
    assert not json.loads(out.read_text())["preloaded"]
    assert "fork server could not start" in caplog.text and reason in caplog.text
    assert not spawner.enabled and spawner.server is None


@pytest.mark.integration
@pytest.mark.timeout(60)
async def test_an_optional_module_that_fails_to_import_does_not_stop_the_server(server: ForkServer) -> None:
    spawner = Spawner(KERNEL_PRELOAD, ["tests.kernel_agent.no_such_module"])
    try:
        kernel = await spawner.start([sys.executable, "-m", CHILD, "sleep"], dict(os.environ))
        assert isinstance(kernel, ForkedKernel), "a user module that fails fails in the kernel, as ever"
        kernel.kill()
        await kernel.wait()
    finally:
        await spawner.close()


# ---------------------------------------------------------------- a real agent


async def running_kernels(redis: AsyncRedis, cluster: str, n: int, avoid: set[int] = frozenset()) -> bool:  # type: ignore[assignment]
    kernels = await State(redis, KEYS).kernels(cluster)
    return sum(k.state is KernelState.RUNNING and k.pid not in avoid for k in kernels) >= n


@pytest.mark.system
@pytest.mark.timeout(120)
async def test_a_real_agent_forks_restarts_drains_and_takes_its_kernels_down_when_killed(
    stack: ProcessStack, redis: AsyncRedis, redis_url: str
) -> None:
    stack.serve()
    agent = stack.agent("fork-0", 3)
    await agents_up(redis, 1)
    async with KcpClient(Settings(redis_url=redis_url, ready_timeout=60)) as kcp:
        info = await kcp.create_cluster("forked", 3)
        pids = {k.pid for k in info.kernels}
        servers = {psutil.Process(pid).ppid() for pid in pids}
        assert len(servers) == 1 and servers != {agent.pid}, (
            "forked from one fork server, not exec'd by the agent"
        )
        (server,) = servers
        assert psutil.Process(server).ppid() == agent.pid
        assert (await kcp.dispatch("forked", {"type": "PING"})).result["pong"] is True

        victim = next(iter(pids))  # a crashed kernel is restarted, forked again
        os.kill(victim, signal.SIGKILL)
        await wait_for(lambda: running_kernels(redis, "forked", 3, {victim}), 30, "the killed kernel back")
        pids = {k.pid for k in await State(redis, KEYS).kernels("forked")}
        assert {psutil.Process(pid).ppid() for pid in pids} == {server}

        await kcp.scale_cluster("forked", 2)  # one kernel drains: SIGTERM through the server, exit 0
        await wait_for(lambda: _count_pids(pids, alive=2), 30, "one kernel drained")
        assert await kcp.dispatch("forked", {"type": "PING"})

        agent.kill()  # SIGKILL: the fork server dies with it, the kernels with the server
        await wait_for(lambda: _count_pids({*pids, server}, alive=0), 10, "kernels and fork server gone")


@pytest.mark.system
@pytest.mark.timeout(120)
async def test_sigterm_drains_forked_kernels_and_the_agent_exits_cleanly(
    stack: ProcessStack, redis: AsyncRedis, redis_url: str
) -> None:
    stack.serve()
    agent = stack.agent("fork-1", 2)
    await agents_up(redis, 1)
    async with KcpClient(Settings(redis_url=redis_url, ready_timeout=60)) as kcp:
        info = await kcp.create_cluster("drained", 2)
        pids = {k.pid for k in info.kernels}
        server = psutil.Process(next(iter(pids))).ppid()
        agent.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert await asyncio.to_thread(agent.wait, 60) == 0
        assert time.monotonic() - started < 30
        await wait_for(lambda: _count_pids({*pids, server}, alive=0), 10, "kernels and fork server gone")


async def _count_pids(pids: set[int], alive: int) -> bool:
    return sum([not await gone(pid) for pid in pids]) == alive
