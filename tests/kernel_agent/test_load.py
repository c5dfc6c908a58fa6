"""Load records are written on a change or when due, never every heartbeat: the agent's gate for
cpu and memory, and the kernel's own reporter for its queue, in-flight count and latency."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from conftest import wait_for
from redis.asyncio import Redis as AsyncRedis

from controlplane.protocol.keys import ASSIGN_RUN, Keys
from controlplane.protocol.records import LoadRecord
from controlplane.settings import Settings
from kernel_agent.agent.daemon import Agent, AgentConfig
from kernel_agent.agent.load import LoadGate, ProcessSampler
from kernel_agent.kernel.load_report import LoadReporter

KEYS = Keys()


@pytest.mark.unit
def test_the_agent_writes_cpu_and_memory_on_a_change_or_when_the_refresh_is_due() -> None:
    gate = LoadGate()
    assert gate.due(0.0, 0.1, now=100.0, refresh=5.0), "never written: due"
    assert gate.renew_ttl(100.0, refresh=5.0)
    gate.written(0.0, 0.1, 100.0, ttl=True)
    assert not gate.renew_ttl(105.0, refresh=5.0), "the TTL (15 s) outlives the next refresh"
    assert gate.renew_ttl(110.0, refresh=5.0)
    assert not gate.due(0.02, 0.102, now=100.5, refresh=5.0), "small moves wait for the refresh"
    assert gate.due(0.06, 0.1, now=100.5, refresh=5.0), "cpu moved by 0.05 of a core or more"
    assert gate.due(0.0, 0.106, now=100.5, refresh=5.0), "memory moved by more than 5 %"
    assert gate.due(0.0, 0.1, now=105.0, refresh=5.0), "unchanged, but the record must stay fresh"


@pytest.mark.unit
def test_a_gone_pid_is_sampled_as_idle_without_asking_the_os_again() -> None:
    sampler = ProcessSampler()
    gone = 1 << 22  # above pid_max: no process has it
    assert sampler.sample(gone) == (0.0, 0.0, 0)
    assert gone in sampler._gone
    sampler.forget(gone)  # reaped: the pid may be reused
    assert gone not in sampler._gone


@pytest.mark.integration
@pytest.mark.timeout(30)
async def test_the_kernel_reports_its_load_on_change_at_most_once_per_interval(redis: AsyncRedis) -> None:
    busy = [0]
    report = LoadReporter(KEYS, cluster="c", name="k", agent="a", busy=lambda: busy[0], interval=0.2)
    key = KEYS.load("a", "c", "k")

    async def step() -> int:
        """One worker step: what it sends of the report, as the worker does."""
        commands = report.commands()
        for command in commands:
            await redis.execute_command(*command)
        return len(commands)

    assert report.pending_in() is None and await step() == 0, "no job yet: nothing to say"
    busy[0] = 2
    for latency in (10.0, 20.0, 30.0):  # three jobs in one step: one write
        report.finished(latency, failed=False, queued=5)
    assert report.pending_in() == 0.0 and await step() == 2
    record = LoadRecord.from_fields(await redis.hgetall(key), key)
    assert record is not None and report.writes == 1
    assert (record.queue_depth, record.inflight, record.latency_ms) == (5, 2, 20.0)
    assert 0 < await redis.pttl(key) <= 15_000, "it carries the record's TTL too"
    report.finished(10.0, failed=True, queued=0)  # within the interval: waits for it
    pending = report.pending_in()
    assert pending is not None and 0.1 < pending <= 0.2, "the worker blocks no longer than this"
    assert await step() == 0 and report.writes == 1
    busy[0] = 1  # its result is on its way
    await asyncio.sleep(0.25)
    assert await step() == 2, "the change, once the interval passed"
    busy[0] = 0
    await asyncio.sleep(0.25)
    assert report.pending_in() == 0.0 and await step() == 2, "once more after the work stopped"
    record = LoadRecord.from_fields(await redis.hgetall(key), key)
    assert record is not None and (record.queue_depth, record.inflight) == (0, 0)
    assert record.error_rate > 0
    await asyncio.sleep(0.25)
    assert report.pending_in() is None and await step() == 0, "idle: nothing more is written"


class _Proc:
    """What `Agent` uses of a kernel's process handle; exits when told."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._exited = asyncio.Event()

    def exit(self, code: int) -> None:
        self.returncode = code
        self._exited.set()

    def send_signal(self, sig: int) -> None:
        self.exit(0)

    def kill(self) -> None:
        self.exit(-9)

    async def wait(self) -> int:
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode


class _Agent(Agent):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.procs: list[_Proc] = []

    async def _exec(self, cmd: list[str], env: dict[str, str]) -> Any:
        self.procs.append(_Proc((1 << 22) + len(self.procs)))  # no such pid: sampled as idle
        return self.procs[-1]


async def _calls(redis: AsyncRedis) -> dict[str, int]:
    return {k: int(v["calls"]) for k, v in (await redis.info("commandstats")).items()}


@pytest.mark.integration
@pytest.mark.timeout(30)
async def test_an_idle_agent_beats_once_per_interval_and_sees_a_kernel_exit_at_once(
    redis: AsyncRedis, redis_url: str
) -> None:
    settings = Settings(redis_url=redis_url)
    agent = _Agent(redis, settings, AgentConfig(name="a1", slots=4))
    await redis.hset(KEYS.agent_kernels("a1"), mapping={"c/worker-0": ASSIGN_RUN, "c/worker-1": ASSIGN_RUN})
    task = asyncio.ensure_future(agent.run())
    try:
        await wait_for(lambda: _listed(redis, 2), 10, "both kernels listed as running")
        await asyncio.sleep(1.0)
        before = await _calls(redis)
        await asyncio.sleep(2.0)
        after = await _calls(redis)
        spent = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
        spent["cmdstat_info"] -= 1
        spent = {k: v for k, v in spent.items() if v}
        # 4 beats (one SET each, whatever the kernel count), at most one assignment poll (every
        # 5 s) and one load refresh (every 5 s, HSET per kernel, PEXPIRE every other one): no
        # per-tick reads
        assert 3 <= spent.pop("cmdstat_set") <= 5, spent
        assert set(spent) <= {
            "cmdstat_blpop",
            "cmdstat_exists",
            "cmdstat_hgetall",
            "cmdstat_hset",
            "cmdstat_pexpire",
            "cmdstat_time",
        }, spent
        assert spent.get("cmdstat_hgetall", 0) <= 1 and spent.get("cmdstat_hset", 0) <= 2, spent
        version = (await redis.get(KEYS.agent_lease("a1"))).split()[1]
        agent.procs[0].exit(1)  # a crash: the agent sees it through the handle
        await wait_for(lambda: _listed(redis, 1), 2, "the exit written at once")
        await asyncio.sleep(settings.heartbeat_interval + 0.1)
        assert (await redis.get(KEYS.agent_lease("a1"))).split()[1] != version, "the leader re-reads it"
        await wait_for(lambda: _listed(redis, 2), 5, "restarted after its back-off")
    finally:
        agent.request_stop()
        await asyncio.wait_for(task, 20)
    assert not await redis.exists(KEYS.agent_running("a1"), KEYS.agent_lease("a1"))


async def _listed(redis: AsyncRedis, n: int) -> bool:
    return len(await redis.hgetall(KEYS.agent_running("a1"))) == n
