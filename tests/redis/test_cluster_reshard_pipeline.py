"""A live reshard under kcp's cluster client: a non-transactional pipeline whose commands a moved
slot answers with MOVED still returns, and an agent's load report (a pipeline over its kernels'
load records, one of them in that slot) returns or raises a Redis error, never anything its main
loop would die of (bench/fleet.py --cluster saw both agents of the cluster stack die there, and
their heartbeat threads report a stalled loop until their leases lapsed).

redis-py 5.3's asyncio cluster client closes itself at every `reinitialize_steps`-th MOVED, which
leaves it without a default node until the next command re-reads the slot table; its pipeline then
read `get_default_node().name` after re-sending the MOVED commands: AttributeError on None
(redis/redis-py#3835). The tests put the client one MOVED short of that close, so it happens on the
re-send of the pipeline's moved command, every time (an agent's running main loop survived it
by luck when its pending BLPOP, cut by the close, re-read the slot table first).
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest

from controlplane.ops.redis_server import RedisClusterProcess
from controlplane.protocol.keys import ASSIGN_RUN, Keys
from controlplane.redis.connect import AsyncRedisCluster, connect
from controlplane.redis.errors import amap_redis_errors
from controlplane.settings import Settings
from kernel_agent.agent.daemon import Agent, AgentConfig

pytestmark = [pytest.mark.redis_cluster, pytest.mark.timeout(60)]

KEYS = Keys()


def _cluster_client(url: str) -> AsyncRedisCluster:
    client = connect(url)
    assert isinstance(client, AsyncRedisCluster)
    return client


def _next_moved_closes(client: AsyncRedisCluster) -> None:
    """The next MOVED this client sees is its `reinitialize_steps`-th: it closes itself."""
    client.reinitialize_counter = client.reinitialize_steps - 1


@pytest.mark.integration
async def test_a_pipeline_across_a_moved_slot_returns_when_its_moved_resend_closes_the_client(
    redis_cluster: RedisClusterProcess, redis_cluster_url: str
) -> None:
    keys = [f"{{reshard-{i}}}:k" for i in range(12)]
    moved = keys[-1]
    slot = redis_cluster.keyslot(moved)
    home = redis_cluster.master_of_slot(slot)
    elsewhere = next(m for m in redis_cluster.masters() if m is not home)
    r = _cluster_client(redis_cluster_url)
    try:
        for key in keys:
            await r.set(key, key)
        await asyncio.to_thread(redis_cluster.move_slot, slot, elsewhere)
        _next_moved_closes(r)
        async with r.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.get(key)
            assert await pipe.execute() == keys
        assert r.get_node_from_key(moved).port == elsewhere.port
        assert await r.get(moved) == moved  # and the client works on
    finally:
        await r.aclose()
        redis_cluster.move_slot(slot, home)


class _Proc:
    """What `Agent` uses of a kernel's process handle: one that runs until told to stop."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._exited = asyncio.Event()

    def send_signal(self, sig: int) -> None:
        self.returncode = 0
        self._exited.set()

    def kill(self) -> None:
        self.send_signal(9)

    async def wait(self) -> int:
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode


class _Agent(Agent):
    async def _exec(self, cmd: list[str], env: dict[str, str]) -> Any:
        return _Proc(1 << 22)  # no such pid: sampled as idle


@pytest.mark.integration
async def test_an_agents_load_report_survives_its_load_records_slot_moving(
    redis_cluster: RedisClusterProcess, redis_cluster_url: str
) -> None:
    load = KEYS.load("a1", "moving", "worker-0")
    slot = redis_cluster.keyslot(load)
    home = redis_cluster.master_of_slot(slot)
    elsewhere = next(m for m in redis_cluster.masters() if m is not home)
    r = _cluster_client(redis_cluster_url)
    agent = _Agent(r, Settings(redis_url=redis_cluster_url), AgentConfig(name="a1", slots=2))
    await r.hset(KEYS.agent_kernels("a1"), mapping={"moving/worker-0": ASSIGN_RUN})
    try:
        await agent._tick()  # the kernel started, then its first load record (HSET and PEXPIRE)
        await agent._report_load()
        written = float(await r.hget(load, "updated_at") or 0)
        assert written > 0
        await asyncio.to_thread(redis_cluster.move_slot, slot, elsewhere)
        child = agent.children["moving/worker-0"]
        child.load.at = -math.inf  # due again at once...
        child.load.ttl_at = math.inf  # ... as one HSET: its re-send after the MOVED closes the client
        _next_moved_closes(r)
        async with amap_redis_errors():  # anything but a RedisError would end the agent's loop
            await agent._report_load()
        assert float(await r.hget(load, "updated_at") or 0) > written, "the load record rewritten"
        assert r.get_node_from_key(load).port == elsewhere.port
    finally:
        await r.aclose()
        redis_cluster.move_slot(slot, home)
