"""A clean stop is a departure, not a death: an agent that stops on purpose (SIGTERM,
`Agent.stop`) says so first (its record says `draining`), and the leader then sees its lease go
without declaring it dead; an agent killed without a word is still declared dead within a lease
TTL and its kernels are placed elsewhere (docs/reliability.md, "A clean stop is a departure,
not a death")."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from redis.asyncio import Redis as AsyncRedis

from controlplane import Settings
from controlplane.protocol.keys import Keys
from controlplane.protocol.models import ClusterConfig
from controlplane.redis.state import State
from controlplane.service.leader import LeaderLease
from controlplane.service.reconciler import Reconciler
from kernel_agent.agent.daemon import Agent, AgentConfig

KEYS = Keys()


class _Kernel:
    """What `Agent` uses of a kernel's process handle. SIGTERM drains it as a real kernel does
    (`kernel_stop.lua` marks its record `stopped`), then it exits 0; a kill ends it at once."""

    def __init__(self, redis: AsyncRedis, cluster: str, name: str, pid: int) -> None:
        self.redis, self.key, self.pid = redis, KEYS.kernel(cluster, name), pid
        self.returncode: int | None = None
        self._exited = asyncio.Event()
        self._draining: asyncio.Task[None] | None = None

    def send_signal(self, sig: int) -> None:
        if self._draining is None:
            self._draining = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        await self.redis.hset(self.key, "state", "stopped")
        self._exit(0)

    def kill(self) -> None:
        self._exit(-9)

    def _exit(self, code: int) -> None:
        if self.returncode is None:
            self.returncode = code
        self._exited.set()

    async def wait(self) -> int:
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode


class _Agent(Agent):
    """A real agent (registration, heartbeat thread, lease, shutdown) with stub kernels."""

    def __init__(self, redis: AsyncRedis, settings: Settings, name: str) -> None:
        super().__init__(redis, settings, AgentConfig(name=name, slots=1))
        self.task: asyncio.Task[None] | None = None

    async def _exec(self, cmd: list[str], env: dict[str, str]) -> Any:
        flags = dict(zip(cmd[3::2], cmd[4::2], strict=False))  # python -m MODULE --flag value ...
        return _Kernel(self.redis, flags["--cluster"], flags["--name"], 1 << 22)  # no such pid

    def start(self) -> None:
        self.task = asyncio.ensure_future(self.run())

    async def kill(self) -> None:
        """As SIGKILL would: the lease stops being renewed, nothing is cleaned up."""
        self.heartbeat._stop.set()
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await asyncio.to_thread(self.heartbeat.stop)


async def _passes(
    reconciler: Reconciler, done: Callable[[], Awaitable[bool]], limit: float, what: str
) -> None:
    """Leader passes every 50 ms until `done`. No pass takes the agents' announcements
    (`service:wake`): as a pass woken by another agent's message, or by the lease timer, which
    may come first."""
    deadline = time.monotonic() + limit
    while True:
        reconciler.announced.clear()
        await reconciler.reconcile_all()
        if await done():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {limit}s waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.mark.integration
@pytest.mark.timeout(60)
async def test_a_clean_stop_is_a_departure_and_a_kill_is_still_a_death(
    redis: AsyncRedis, redis_url: str
) -> None:
    # default timings (lease 1.5 s, beat 0.5 s); no rolling sweep to re-read an agent by chance
    settings = Settings(redis_url=redis_url, full_sweep_interval=3600)
    state = State(redis, KEYS)
    lease = LeaderLease(redis, KEYS, ttl=30)
    assert await lease.acquire()
    reconciler = Reconciler(state, settings, lease)
    agents = {name: _Agent(redis, settings, name) for name in ("a-kept", "a-leaves", "a-killed", "a-spare")}
    for agent in agents.values():
        agent.start()
    try:

        async def registered() -> bool:  # every agent started, but for those stopped or killed
            listed = await redis.smembers(KEYS.agents())
            return listed >= {n for n, a in agents.items() if a.task is None or not a.task.done()}

        async def cluster_placed() -> bool:
            kernels = await state.kernels("c")
            running = [await redis.hgetall(KEYS.agent_running(a)) for a in agents]
            return len(kernels) == 3 and sum(map(len, running)) == 3

        await _passes(reconciler, registered, 10, "agents to register")
        await state.create_cluster("c", ClusterConfig(), 3)
        reconciler.invalidate()  # the pass reads the new cluster (its announcement is not taken)
        await _passes(reconciler, cluster_placed, 10, "3 kernels placed and started")
        placed = {k.agent: k.name for k in await state.kernels("c")}
        assert "a-leaves" in placed and "a-killed" in placed, placed
        spare = next(a for a in agents if a not in placed)
        # a new leader declares no death for one window from its first read (already made)
        await asyncio.sleep(reconciler.detector.window)
        assert not reconciler.detector.blind

        # a clean stop: drain, deregister; the leader's next pass must not call it a death
        leaving = agents["a-leaves"]
        leaving.request_stop()
        assert leaving.task is not None
        await asyncio.wait_for(leaving.task, 10)

        async def replaced() -> bool:
            on = {k.agent for k in await state.kernels("c")}
            return "a-leaves" not in on and spare in on

        await _passes(reconciler, replaced, 10, "the departed agent's kernel on the spare agent")
        stats = await redis.hgetall(KEYS.reliability())
        assert int(stats.get("agents_dead_total", 0)) == 0, f"a clean stop counted as a death: {stats}"
        assert "detection_ms_last" not in stats, stats
        assert int(stats.get("agents_departed_total", 0)) == 1, stats
        assert "a-leaves" not in await redis.smembers(KEYS.agents())
        assert not await redis.exists(KEYS.agent("a-leaves"))
        assert await redis.hgetall(KEYS.lapsed_agents()) == {}, "a departed agent is not shown as down"
        assert await redis.hgetall(KEYS.lapsed_kernels()) == {}, "its kernel drained: not lost"
        assert not await redis.hget(KEYS.cluster_stats("c"), "kernels_lost"), "its kernel drained: not lost"
        assert "a-leaves" not in reconciler.detector.records

        # a kill (no goodbye, nothing deregistered): dead within a lease TTL, its kernel re-placed
        killed_at = time.monotonic()
        await agents["a-killed"].kill()

        async def dead() -> bool:
            return int(await redis.hget(KEYS.reliability(), "agents_dead_total") or 0) == 1

        await _passes(reconciler, dead, 5, "the killed agent to be declared dead")
        detection = time.monotonic() - killed_at
        assert detection <= 2.0, f"declared dead {detection:.2f}s after the kill"
        agents["a-spare-2"] = _Agent(redis, settings, "a-spare-2")  # room for its kernel
        agents["a-spare-2"].start()
        await _passes(reconciler, registered, 10, "the new agent to register")
        reconciler.invalidate()  # its registration's announcement is not taken by these passes

        async def failed_over() -> bool:
            on = {k.agent for k in await state.kernels("c")}
            return "a-killed" not in on and "a-spare-2" in on

        await _passes(reconciler, failed_over, 10, "the killed agent's kernel placed elsewhere")
        stats = await redis.hgetall(KEYS.reliability())
        assert int(stats["agents_dead_total"]) == 1 and int(stats["agents_departed_total"]) == 1, stats
        assert set(await redis.hgetall(KEYS.lapsed_agents())) == {"a-killed"}
        assert await redis.hget(KEYS.cluster_stats("c"), "kernels_lost") == "1", "lost with the killed agent"
    finally:
        for agent in agents.values():
            agent.request_stop()
        await asyncio.gather(*(a.task for a in agents.values() if a.task is not None), return_exceptions=True)
