"""Fleet cost: many real agents in one process on one private Redis, kernel processes stubbed.

    .venv/bin/python bench/fleet.py [--agents 16] [--kernels 8] [--idle 10] [--sizes 3,32,256]
                                    [--dispatches 300] [--repeat 3] [--busy 64] [--busy-rate 100]
                                    [--skip-startup | --only-startup] [--place 64]
                                    [--procs 1] [--real 1x8,4x8,8x8] [--real-only]
    .venv/bin/python bench/fleet.py --cluster [--clusters 30] [--cluster-seconds 10] [--repeat 3]
                                    [--balance-ratio 1.25] [--balance-window 3]

Every figure comes from the private redis-server this script starts (never 127.0.0.1:6379):
commands from `INFO commandstats` deltas (commands that Lua scripts run inside Redis included),
Redis CPU from `INFO cpu` (used_cpu_sys + used_cpu_user) deltas.

1. start-up (real processes): CPU seconds one kernel process takes to import and start (it runs
   kernel_start.lua, finds itself unassigned and exits), exec'd as `python -m kernel_agent.kernel`
   and forked from the agent's fork server (kernel_agent/agent/spawner.py), against a bare
   `python -c pass`; the Redis connections each kernel of a real `kcp agent` holds once running;
   then `--place` real kernels placed on one real `kcp agent`, with its fork server and with
   `--no-fork-server`: wall time until all run, CPU of the agent and its process tree meanwhile,
   USS per kernel.
2. dispatch (in-process kernels): real `Agent`s whose kernels are real `KernelProcess` objects
   in this process (`Agent._exec` is the seam). Redis commands and Redis CPU µs per sequential
   `KcpClient.dispatch` of PING at each cluster size, less the idle traffic measured just before
   over `--idle-window` seconds; median over `--repeat` rounds, ratios to the smallest size.
   Then a busy cluster of `--busy` kernels at `--busy-rate` paced dispatches/s: HGETALL/s (the
   kernels re-reading their siblings' records) and commands/s of the whole stack.
3. idle fleet (stubbed kernels): `--agents` real `Agent`s, each with its heartbeat thread, whose
   kernels are stubs that only run kernel_start.lua (no process, no kernel traffic of their own:
   a real idle kernel adds ~0.4 cmd/s, see bench/dispatch.py). The leader (`ControlPlane`) runs
   in a child process. Idle commands/s and Redis CPU for the leader alone, the agents without
   kernels, then with `--kernels` each (clusters of 8); per agent and per kernel from the
   differences; leader pass p50/p99 in each; time to place every kernel.
   With `--procs N` the agents run in N simulator processes (a share each), so that a big fleet
   (1,000 x 10) is not limited by one process's GIL: each agent still sends what a real one does.
   Stub kernels have a pid that cannot exist (above Linux's pid_max), so their agent samples
   them as an idle process (cpu 0), as it would a real idle kernel.
4. failure: one agent is killed (its heartbeat and main loop stop, nothing is deregistered):
   time until the leader declares it dead, and until its kernels run elsewhere.
5. real idle stack (`--real AxK,...`): `kcp serve` and A `kcp agent` processes with real kernel
   processes, K per agent (clusters of 8): idle commands/s of the whole stack with the agents
   alone, then with their kernels, against the budget of issue 19 (the leader alone, plus 4 per
   agent, plus 1 per kernel).
6. Redis Cluster (`--cluster`, this stage alone): a private 3-master Redis Cluster and a private
   single Redis, each with its own leader (child process) and real agents with in-process
   kernels, `--clusters` kcp clusters of 2 kernels each. Two phases: the kcp clusters where
   their names' hash puts them, then rebalanced by `kcp slots balance` (`controlplane/ops/slots.py`:
   the kcp clusters weighed by their dispatches/s over `--balance-window` s under the load
   window's loops, their slots moved live, keys and all, until the busiest master's weight is
   within `--balance-ratio` of the idlest's). Per round of a phase, on each
   deployment in turn: sequential dispatches of PING spread over the kcp clusters (p50, p99),
   then `--cluster-seconds` of load (8 concurrent dispatch loops) during which every master's
   `INFO commandstats` delta gives its commands/s: the busiest master against the idlest, and
   the cluster's dispatch p50 against single Redis's in the same round. Medians over `--repeat`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import itertools
import math
import multiprocessing
import os
import resource
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import psutil

from controlplane import KcpClient, Settings
from controlplane.ops import slots
from controlplane.ops.redis_server import (
    RedisClusterProcess,
    free_port,
    start_redis_cluster,
    start_redis_server,
)
from controlplane.ops.slots import Balance
from controlplane.protocol import stats
from controlplane.protocol.keys import Keys
from controlplane.protocol.models import KernelState
from controlplane.redis.connect import AsyncRedis, connect, connect_sync
from controlplane.redis.scripts.kernels import NotStarted, kernel_start
from controlplane.redis.state import State
from controlplane.service.app import ControlPlane
from kernel_agent.agent.daemon import Agent, AgentConfig
from kernel_agent.agent.heartbeat import Heartbeat
from kernel_agent.contract import EXIT_UNASSIGNED
from kernel_agent.kernel.worker import KernelProcess
from kernel_agent.syscalls import builtin_registry, declared_capabilities

KEYS = Keys()
_STUB_PIDS = itertools.count(1 << 22)  # above Linux's pid_max (4,194,304 at most)
CLUSTER_SIZE = 8  # kernels per cluster in the idle fleet
DISPATCH_SLOTS = 32  # kernels per agent in the dispatch stage
STARTS = 5  # kernel processes started to measure start-up CPU


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


# ------------------------------------------------------------------ Redis counters
@dataclass(frozen=True)
class Counters:
    at: float
    calls: dict[str, int]
    cpu: float  # used_cpu_sys + used_cpu_user, seconds

    @property
    def total(self) -> int:
        return sum(self.calls.values())


async def counters(r: AsyncRedis) -> Counters:
    info = await r.info("commandstats")
    cpu = await r.info("cpu")
    return Counters(
        time.monotonic(),
        {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items()},
        float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]),
    )


@dataclass(frozen=True)
class Delta:
    seconds: float
    commands: float  # less our own two INFO calls
    cpu: float
    per: dict[str, int]

    @staticmethod
    def of(a: Counters, b: Counters) -> Delta:
        per = {k: v - a.calls.get(k, 0) for k, v in b.calls.items() if v != a.calls.get(k, 0)}
        per["info"] = per.get("info", 0) - 2
        return Delta(b.at - a.at, b.total - a.total - 2, b.cpu - a.cpu, per)

    @property
    def rate(self) -> float:
        return self.commands / self.seconds

    @property
    def cpu_percent(self) -> float:
        return 100 * self.cpu / self.seconds


async def window(r: AsyncRedis, seconds: float) -> Delta:
    a = await counters(r)
    await asyncio.sleep(seconds)
    return Delta.of(a, await counters(r))


async def until(predicate: Callable[[], Awaitable[bool]], limit: float, what: str) -> float:
    start = time.monotonic()
    while not await predicate():
        if time.monotonic() - start > limit:
            raise TimeoutError(f"{what}: not within {limit:.0f}s")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


# ------------------------------------------------------------------ the leader, in a child process
def _leader(url: str, conn: Connection) -> None:
    """Run `kcp serve`'s ControlPlane; answer "passes" with the pass durations since the last ask
    (wall seconds, and the CPU seconds the leader spent in each)."""

    async def main() -> None:
        redis = connect(url)
        async with ControlPlane(redis, Settings(redis_url=url)) as control:
            while (ask := await asyncio.to_thread(conn.recv)) != "stop":
                assert ask == "passes"
                conn.send((list(control.passes), list(control.pass_cpu)))
                control.passes.clear()
                control.pass_cpu.clear()
        await redis.aclose()

    asyncio.run(main())


class Leader:
    def __init__(self, url: str) -> None:
        # sends "passes" or "stop"; receives the passes' wall and CPU seconds
        self.conn: Connection[str, tuple[list[float], list[float]]]
        self.conn, child = multiprocessing.get_context("spawn").Pipe()
        ctx = multiprocessing.get_context("spawn")
        self.proc = ctx.Process(target=_leader, args=(url, child), daemon=True)
        self.proc.start()

    async def passes(self) -> tuple[list[float], list[float]]:
        self.conn.send("passes")
        return await asyncio.to_thread(self.conn.recv)

    def stop(self) -> None:
        if not self.proc.is_alive():
            return
        self.conn.send("stop")
        self.proc.join(15)
        if self.proc.is_alive():
            self.proc.kill()


def quantiles_ms(passes: list[float]) -> tuple[float, float, int]:
    if len(passes) < 2:
        return (passes[0] * 1000 if passes else math.nan), math.nan, len(passes)
    q = statistics.quantiles(passes, n=100)
    return q[49] * 1000, q[98] * 1000, len(passes)


# ------------------------------------------------------------------ agents with in-process kernels
class InProcess:
    """Stands in for the `asyncio.subprocess.Process` of a kernel (what `Agent` uses of it).

    With a `KernelProcess` it runs that kernel as a task (SIGTERM drains it, kill cancels it);
    without one it is a stub that has already run kernel_start.lua and then does nothing."""

    def __init__(self, kernel: KernelProcess | None = None, returncode: int | None = None) -> None:
        # a real kernel shares the bench's pid; a stub gets one no process can have (its agent
        # samples it as an idle process would read: cpu 0)
        self.pid = os.getpid() if kernel is not None else next(_STUB_PIDS)
        self.returncode = returncode
        self.kernel = kernel
        self._exited = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        if kernel is not None:
            self.task = asyncio.get_running_loop().create_task(kernel.run())
            self.task.add_done_callback(self._done)
        elif returncode is not None:
            self._exited.set()

    def _done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            self._exit(-signal.SIGKILL)
        elif task.exception() is not None:
            self._exit(1)
        else:
            self._exit(0 if self.kernel is not None and self.kernel.epoch else EXIT_UNASSIGNED)

    def _exit(self, code: int) -> None:
        if self.returncode is None:
            self.returncode = code
            self._exited.set()

    def send_signal(self, sig: int) -> None:
        if self.kernel is not None:
            self.kernel.drain()
        else:
            self._exit(0)

    def kill(self) -> None:
        if self.task is not None:
            self.task.cancel()
        else:
            self._exit(-signal.SIGKILL)

    async def wait(self) -> int:
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode


class FleetAgent(Agent):
    """A real `Agent` whose kernels run in this process: real ones with `kernel_redis`, else stubs."""

    def __init__(
        self, redis: AsyncRedis, settings: Settings, config: AgentConfig, kernel_redis: AsyncRedis | None
    ) -> None:
        super().__init__(redis, settings, config)
        self.kernel_redis = kernel_redis
        self.registry = builtin_registry(max_request_bytes=settings.max_request_bytes)
        self.task: asyncio.Task[None] | None = None

    async def _exec(self, cmd: list[str], env: dict[str, str]) -> Any:
        flags = dict(zip(cmd[3::2], cmd[4::2], strict=False))  # python -m MODULE --flag value ...
        cluster, name = flags["--cluster"], flags["--name"]
        if self.kernel_redis is not None:
            kernel = KernelProcess(
                self.kernel_redis,
                self.keys,
                cluster=cluster,
                name=name,
                agent=self.config.name,
                registry=self.registry,
                capabilities=self.config.capabilities,
            )
            return InProcess(kernel)
        started = await kernel_start(
            self.keys,
            cluster,
            name,
            agent=self.config.name,
            pid=os.getpid(),
            host="fleet",
            now_s=f"{time.time():.3f}",
            syscalls=self.registry.names(),
            capabilities=sorted(declared_capabilities(self.registry, self.config.capabilities)),
        ).run(self.redis)
        return InProcess(returncode=EXIT_UNASSIGNED if isinstance(started, NotStarted) else None)

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.run())
        self.task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        """Say so when the loop died of an error: its heartbeat thread lives on in this process
        and would only report it as a stalled loop (a real agent process exits instead)."""
        if not task.cancelled() and (exc := task.exception()) is not None:
            print(f"agent {self.config.name}: main loop died: {exc!r}", file=sys.stderr, flush=True)

    async def kill(self) -> None:
        """As SIGKILL would: the lease stops being renewed, nothing is cleaned up. The tasks that
        watch its kernels' handles (`Agent._watch`) die with it: a stub never exits, so left
        pending they would be garbage-collected pending ("Task was destroyed but it is pending!")."""
        self.heartbeat._stop.set()
        self.heartbeat.stop()  # at once (a pooled beat: leaves the pool)
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        watchers = list(self._waiters)
        for watcher in watchers:
            watcher.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        await asyncio.to_thread(self.heartbeat.stop)

    async def stop(self, grace: float | None = None) -> None:
        self.request_stop()
        if self.task is not None:
            await asyncio.wait([self.task], timeout=grace or self.stop_grace)


@dataclass
class Fleet:
    url: str
    kernels: bool  # real in-process kernels
    agents: list[FleetAgent] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.settings = Settings(redis_url=self.url)
        self.redis = connect(self.url, max_connections=10_000)
        self.kernel_redis = connect(self.url, max_connections=10_000) if self.kernels else None

    def add(self, count: int, slots: int, prefix: str) -> None:
        for i in range(count):
            config = AgentConfig(name=f"{prefix}-{i}", slots=slots)
            agent = FleetAgent(self.redis, self.settings, config, self.kernel_redis)
            agent.start()
            self.agents.append(agent)

    async def stop(self) -> None:
        await asyncio.gather(*(a.stop(30) for a in self.agents))
        for r in (self.redis, self.kernel_redis):
            if r is not None:
                await r.aclose()

    async def kill(self, name: str) -> None:
        victim = next(a for a in self.agents if a.config.name == name)
        await victim.kill()
        self.agents.remove(victim)


class BeatPool:
    """One thread, event loop and connection pool that runs the heartbeats of many simulated
    agents: each beat is the agent's own `Heartbeat._renew` (the same SET, the same TIME every
    minute, the same stall guard), as its own thread would send it, without a thread, an event
    loop and a connection per agent (what limits one simulator process, not Redis)."""

    def __init__(self, url: str, interval: float) -> None:
        self.url, self.interval = url, interval
        self.beats: set[Heartbeat] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._loop()), daemon=True)
        self._thread.start()

    def attach(self, beat: Heartbeat) -> None:
        beat.start = lambda: self.beats.add(beat)  # type: ignore[method-assign]
        beat.stop = lambda: self.beats.discard(beat)  # type: ignore[method-assign]

    async def _loop(self) -> None:
        client = connect(self.url, max_connections=256)
        while not self._stop.is_set():
            started = time.monotonic()
            beats = list(self.beats)
            for i in range(0, len(beats), 256):  # spread over the interval, 256 at a time
                await asyncio.gather(*(b._renew(client) for b in beats[i : i + 256]), return_exceptions=True)
            await asyncio.sleep(max(self.interval - (time.monotonic() - started), 0.0))
        await client.aclose()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _simulator(url: str, names: list[str], slots: int, conn: Connection) -> None:
    """A simulator process: stub-kernel agents `names`; answers "kill NAME" and "stop"."""

    async def main() -> None:
        fleet = Fleet(url, kernels=False)
        pool = BeatPool(url, fleet.settings.heartbeat_interval)
        for name in names:
            agent = FleetAgent(fleet.redis, fleet.settings, AgentConfig(name=name, slots=slots), None)
            pool.attach(agent.heartbeat)
            agent.start()
            fleet.agents.append(agent)
        while (ask := await asyncio.to_thread(conn.recv)) != "stop":
            await fleet.kill(ask.removeprefix("kill "))
            conn.send("killed")
        await fleet.stop()
        pool.stop()
        conn.send("stopped")

    asyncio.run(main())


class AgentProcs:
    """`Fleet`'s idle-stage interface over several simulator processes (agents dealt round robin)."""

    def __init__(self, url: str, procs: int) -> None:
        self.url, self.procs = url, procs
        self.children: list[tuple[multiprocessing.process.BaseProcess, Connection, list[str]]] = []

    def add(self, count: int, slots: int, prefix: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        for p in range(self.procs):
            names = [f"{prefix}-{i}" for i in range(p, count, self.procs)]
            conn, child = ctx.Pipe()
            proc = ctx.Process(target=_simulator, args=(self.url, names, slots, child), daemon=True)
            proc.start()
            self.children.append((proc, conn, names))

    async def kill(self, name: str) -> None:
        _, conn, _ = next(c for c in self.children if name in c[2])
        conn.send(f"kill {name}")
        assert await asyncio.to_thread(conn.recv) == "killed"

    async def stop(self) -> None:
        for _, conn, _ in self.children:
            conn.send("stop")
        for proc, conn, _ in self.children:
            await asyncio.to_thread(conn.recv)
            proc.join(30)


async def settled(r: AsyncRedis, sizes: dict[str, int], avoid: str = "") -> bool:
    """Every cluster of `sizes` (name: kernels) has that many running kernels, none on `avoid`."""
    state = State(r, KEYS)
    for name, size in sizes.items():
        kernels = await state.kernels(name)
        if sum(k.state is KernelState.RUNNING and k.agent != avoid for k in kernels) < size:
            return False
    return True


# ------------------------------------------------------------------ 1. start-up
def startup_cpu(url: str) -> tuple[float, float]:
    """CPU seconds (user + sys) of a kernel process that starts, runs kernel_start.lua and exits
    (unassigned), and of a bare `python -c pass`; medians over STARTS runs."""

    def child_cpu(cmd: list[str]) -> float:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run(cmd, env={**os.environ, "KCP_REDIS_URL": url}, check=False, capture_output=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        return after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime

    kernel = [sys.executable, "-m", "kernel_agent.kernel", "--cluster", "c", "--name", "k", "--agent", "a"]
    bare = [sys.executable, "-c", "pass"]
    return (
        statistics.median(child_cpu(kernel) for _ in range(STARTS)),
        statistics.median(child_cpu(bare) for _ in range(STARTS)),
    )


async def forked_cpu(url: str) -> float:
    """CPU seconds per kernel forked from a real fork server (`Spawner`'s), started as the exec'd
    ones are; the server reaps them, so their CPU is in its children's times. Median of STARTS."""
    from kernel_agent.agent.spawner import ForkServer
    from kernel_agent.contract import KERNEL_MODULE, KERNEL_PRELOAD

    server = await ForkServer.start(KERNEL_PRELOAD)
    env = {**os.environ, "KCP_REDIS_URL": url}
    argv = ["--cluster", "c", "--name", "k", "--agent", "a"]
    try:
        ps, out = psutil.Process(server.proc.pid), []
        for _ in range(STARTS):
            before = ps.cpu_times()
            kernel = await server.fork(KERNEL_MODULE, argv, env)
            assert await kernel.wait() == EXIT_UNASSIGNED
            after = ps.cpu_times()
            out.append(
                after.children_user - before.children_user + after.children_system - before.children_system
            )
    finally:
        await server.close()
    return statistics.median(out)


def tree_cpu(proc: psutil.Process) -> tuple[float, list[psutil.Process]]:
    """CPU seconds (user + sys) of `proc` and its live descendants, and those descendants."""
    procs = [proc, *proc.children(recursive=True)]
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            t = p.cpu_times()
            total += t.user + t.system
    return total, procs[1:]


@dataclass(frozen=True)
class Placement:
    mode: str
    kernels: int
    seconds: float  # from create_cluster until all run
    cpu: float  # of the agent and its process tree meanwhile
    uss_mib: list[float]  # of each kernel
    server_uss_mib: float  # the agent's other children: its fork server (or kernels it lost)
    drain: float  # destroy_cluster(wait=...): its kernels drained and exited
    running: int  # when all ran, or at the time limit
    agent_deaths: int  # times the leader declared the agent dead meanwhile (a starved main loop)


async def place_on_one_agent(url: str, n: int, fork_server: bool, limit: float = 240.0) -> Placement:
    """A real `kcp agent --slots n` (and a leader): one cluster of `n` kernels, timed until all
    run (or `limit`); the CPU of the agent and its live children (fork server, kernels) meanwhile:
    a kernel that died before the end is not counted."""
    env = {**os.environ, "KCP_REDIS_URL": url}
    cmd = [sys.executable, "-m", "controlplane.ops.cli", "--log-level", "WARNING", "agent"]
    cmd += ["--name", f"place-{int(fork_server)}", "--slots", str(n)]
    cmd += [] if fork_server else ["--no-fork-server"]
    agent = await asyncio.create_subprocess_exec(*cmd, env=env)
    name = "place" if fork_server else "place-exec"
    try:
        r = connect(url)
        await until(lambda: _count_agents(r, 1), 60, "agent registered")
        await asyncio.sleep(1.0)
        ps = psutil.Process(agent.pid)
        cpu0, _ = tree_cpu(ps)
        t0 = time.monotonic()
        async with KcpClient(Settings(redis_url=url)) as kcp:
            dead0 = int(await r.hget(KEYS.reliability(), stats.AGENTS_DEAD) or 0)
            await kcp.create_cluster(name, n, {"max_kernels": n}, wait=0)
            try:
                await until(lambda: settled(r, {name: n}), limit, "kernels placed")
                seconds = time.monotonic() - t0
            except TimeoutError:
                seconds = math.inf
            cpu1, children = tree_cpu(ps)
            kernels = await State(r, KEYS).kernels(name)
            running = sum(k.state is KernelState.RUNNING for k in kernels)
            deaths = int(await r.hget(KEYS.reliability(), stats.AGENTS_DEAD) or 0) - dead0
            kernel_pids = {k.pid for k in kernels}
            uss = [p.memory_full_info().uss / 2**20 for p in children if p.pid in kernel_pids]
            server = [p.memory_full_info().uss / 2**20 for p in children if p.pid not in kernel_pids]
            t1 = time.monotonic()
            await kcp.destroy_cluster(name, wait=120)  # its kernels drain (SIGTERM) and exit
            drain = time.monotonic() - t1
        await r.aclose()
        agent.send_signal(signal.SIGTERM)
        await asyncio.wait_for(agent.wait(), 60)
    finally:
        if agent.returncode is None:
            agent.kill()
            await agent.wait()
    mode = "fork server" if fork_server else "exec (--no-fork-server)"
    return Placement(mode, n, seconds, cpu1 - cpu0, uss, sum(server), drain, running, deaths)


def redis_connections(pid: int, port: int) -> int:
    """TCP connections of process `pid` to the Redis server on `port`."""
    return sum(1 for c in psutil.Process(pid).net_connections(kind="tcp") if c.raddr and c.raddr.port == port)


async def connections_per_kernel(url: str, port: int) -> tuple[float, list[int], int]:
    """Start a real `kcp agent` (2 slots) and a 2-kernel cluster; count each kernel process's TCP
    connections to Redis, and the agent's."""
    env = {**os.environ, "KCP_REDIS_URL": url}
    cmd = [sys.executable, "-m", "controlplane.ops.cli", "--log-level", "WARNING"]
    agent = await asyncio.create_subprocess_exec(*cmd, "agent", "--name", "real-0", "--slots", "2", env=env)
    try:
        async with KcpClient(Settings(redis_url=url, ready_timeout=60)) as kcp:
            info = await kcp.create_cluster("real", 2)
            await kcp.dispatch("real", {"type": "PING"})
            await asyncio.sleep(1.0)
            counts = [redis_connections(k.pid, port) for k in info.kernels]
            of_agent = redis_connections(agent.pid, port)
            await kcp.destroy_cluster("real")
    finally:
        agent.send_signal(signal.SIGTERM)
        await asyncio.wait_for(agent.wait(), 30)
    return statistics.mean(counts), counts, of_agent


# ------------------------------------------------------------------ 2. dispatch
@dataclass
class PerDispatch:
    commands: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    per: dict[str, float] = field(default_factory=dict)  # last round, per dispatch


async def dispatch_costs(
    url: str, sizes: list[int], n: int, repeat: int, idle_window: float, busy_load: tuple[int, float, float]
) -> tuple[dict[int, PerDispatch], tuple[Delta, int] | None]:
    fleet = Fleet(url, kernels=True)
    fleet.add(math.ceil(max(*sizes, busy_load[0]) / DISPATCH_SLOTS), DISPATCH_SLOTS, "disp")
    out: dict[int, PerDispatch] = {}
    try:
        async with KcpClient(Settings(redis_url=url, ready_timeout=180)) as kcp:
            for size in sizes:
                name = f"d{size}"
                t0 = time.monotonic()
                await kcp.create_cluster(name, size, {"max_kernels": max(size, 8)})
                print(f"  cluster of {size}: running in {time.monotonic() - t0:.1f}s", flush=True)
                for _ in range(50):  # warm up
                    await kcp.dispatch(name, {"type": "PING"})
                await asyncio.sleep(2.5)  # past the siblings' refresh after the warm-up
                figures = out[size] = PerDispatch()
                for _ in range(repeat):
                    idle = await window(kcp.redis, idle_window)
                    a = await counters(kcp.redis)
                    for _ in range(n):
                        await kcp.dispatch(name, {"type": "PING"})
                    measured = Delta.of(a, await counters(kcp.redis))  # the window of the n dispatches
                    commands = measured.commands - idle.rate * measured.seconds
                    cpu = measured.cpu - idle.cpu / idle.seconds * measured.seconds
                    figures.commands.append(commands / n)
                    figures.cpu_us.append(cpu / n * 1e6)
                    figures.per = {
                        k: (v - idle.per.get(k, 0) / idle.seconds * measured.seconds) / n
                        for k, v in measured.per.items()
                    }
                await kcp.destroy_cluster(name, wait=120)
            busy = await busy_cluster(kcp, *busy_load) if busy_load[0] else None
    finally:
        await fleet.stop()
    return out, busy


async def busy_cluster(kcp: KcpClient, size: int, rate: float, seconds: float) -> tuple[Delta, int]:
    """`rate` dispatches/s (paced, not waiting for each other) to a cluster of `size` for `seconds`:
    the Redis commands of the whole stack meanwhile, and how many dispatches were sent."""
    name = f"busy{size}"
    await kcp.create_cluster(name, size, {"max_kernels": max(size, 8)})
    tasks: list[asyncio.Task[Any]] = []
    loop = asyncio.get_running_loop()

    async def paced(until_t: float) -> None:
        start, sent = loop.time(), 0
        while (now := loop.time()) < until_t:
            tasks.append(asyncio.ensure_future(kcp.dispatch(name, {"type": "PING"})))
            sent += 1
            await asyncio.sleep(max(start + sent / rate - now, 0))

    await paced(loop.time() + 3.0)  # every kernel has worked, its sibling list is read
    a = await counters(kcp.redis)
    sent = len(tasks)
    await paced(loop.time() + seconds)
    delta = Delta.of(a, await counters(kcp.redis))
    await asyncio.gather(*tasks)
    await kcp.destroy_cluster(name, wait=120)
    return delta, len(tasks) - sent


# ------------------------------------------------------------------ 3 and 4. idle fleet, failure
@dataclass
class Stage:
    name: str
    agents: int
    kernels: int
    idle: Delta
    passes: list[float]
    pass_cpu: list[float]


async def create_clusters(url: str, kernels: int, prefix: str) -> dict[str, int]:
    """Clusters of `CLUSTER_SIZE` (the last one smaller) holding `kernels` in all, created
    without waiting; their names and sizes."""
    names = [f"{prefix}{i}" for i in range(math.ceil(kernels / CLUSTER_SIZE))]
    sizes = {name: min(CLUSTER_SIZE, kernels - i * CLUSTER_SIZE) for i, name in enumerate(names)}
    async with KcpClient(Settings(redis_url=url)) as kcp:
        for name, size in sizes.items():
            await kcp.create_cluster(name, size, {"max_kernels": CLUSTER_SIZE}, wait=0)
    return sizes


async def idle_fleet(
    url: str, agents: int, kernels: int, idle_seconds: float, leader: Leader, procs: int = 1
) -> tuple[list[Stage], float, dict[str, float], dict[str, int]]:
    r = connect(url)
    stages: list[Stage] = []

    async def measure(name: str, a: int, k: int) -> None:
        await leader.passes()  # drop those before the window
        idle = await window(r, idle_seconds)
        stages.append(Stage(name, a, k, idle, *await leader.passes()))
        p50, p99, count = quantiles_ms(stages[-1].passes)
        cpu50, cpu99, _ = quantiles_ms(stages[-1].pass_cpu)
        print(
            f"  {name}: {idle.rate:.0f} cmd/s, Redis CPU {idle.cpu_percent:.1f} %, "
            f"{count} passes p50 {p50:.1f} ms p99 {p99:.1f} ms (CPU p50 {cpu50:.1f} ms p99 {cpu99:.1f} ms)",
            flush=True,
        )

    reliability0 = await r.hgetall(KEYS.reliability())
    await asyncio.sleep(2.0)  # the leader has taken the lease
    await measure("leader alone", 0, 0)
    fleet: Fleet | AgentProcs = Fleet(url, kernels=False) if procs <= 1 else AgentProcs(url, procs)
    fleet.add(agents, 2 * kernels, "fleet")  # room to re-place a dead agent's kernels
    await until(lambda: _count_agents(r, agents), 60, "agents registered")
    await asyncio.sleep(1.0)
    await measure(f"{agents} agents, no kernels", agents, 0)
    total = agents * kernels
    t0 = time.monotonic()
    sizes = await create_clusters(url, total, "c")

    await until(lambda: settled(r, sizes), 900, "kernels placed")
    placement = time.monotonic() - t0
    # and the leader has settled them (status written): the window below is idle
    await until(lambda: _statuses_running(r, list(sizes)), 600, "clusters running")
    print(f"  {total} kernels placed in {placement:.1f}s", flush=True)
    await asyncio.sleep(2.5)
    await measure(f"{agents} agents x {kernels} kernels", agents, total)

    # 4. kill one agent; its kernels must run elsewhere
    victim = "fleet-0"
    dead0 = int(await r.hget(KEYS.reliability(), stats.AGENTS_DEAD) or 0)
    t0 = time.monotonic()
    await fleet.kill(victim)

    async def declared() -> bool:
        return int(await r.hget(KEYS.reliability(), stats.AGENTS_DEAD) or 0) > dead0

    failure = {"detection": await until(declared, 60, "dead agent detected")}
    failure["leader_ms"] = float(await r.hget(KEYS.reliability(), stats.DETECTION_MS_LAST) or math.nan)
    print(f"  killed agent declared dead after {failure['detection']:.2f}s", flush=True)
    try:
        await until(lambda: settled(r, sizes, victim), 120, "kernels re-placed")
        failure["replaced"] = time.monotonic() - t0
    except TimeoutError as exc:  # reported, with the rest
        print(f"  {exc}", flush=True)
        failure["replaced"] = math.nan
    reliability1 = await r.hgetall(KEYS.reliability())
    changes = {
        k: int(v) - int(reliability0.get(k, 0))
        for k, v in reliability1.items()
        if k in (stats.AGENTS_DEAD, stats.AGENTS_SUSPECTED, stats.KERNELS_DEAD, stats.KERNELS_LOST)
    }
    leader.stop()  # before the agents: a leader watching them stop would declare them all dead
    await fleet.stop()
    await r.aclose()
    return stages, placement, failure, changes


async def _statuses_running(r: AsyncRedis, names: list[str]) -> bool:
    records = await State(r, KEYS).clusters(names)
    return len(records) == len(names) and all(c.status.value == "running" for c in records)


async def _count_agents(r: AsyncRedis, n: int) -> bool:
    return int(await r.scard(KEYS.agents())) >= n


# ------------------------------------------------------------------ 5. real idle stack
async def real_idle(url: str, configs: list[tuple[int, int]], idle_seconds: float) -> list[Stage]:
    """`kcp serve` plus real `kcp agent`s with real kernels: the whole stack's idle traffic."""
    env = {**os.environ, "KCP_REDIS_URL": url}
    cmd = [sys.executable, "-m", "controlplane.ops.cli", "--log-level", "WARNING"]
    r = connect(url)
    stages: list[Stage] = []

    async def measure(name: str, a: int, k: int) -> None:
        idle = await window(r, idle_seconds)
        stages.append(Stage(name, a, k, idle, [], []))
        print(f"  {name}: {idle.rate:.1f} cmd/s, Redis CPU {idle.cpu_percent:.2f} %", flush=True)

    serve = await asyncio.create_subprocess_exec(*cmd, "serve", env=env)
    try:
        await asyncio.sleep(3.0)
        await measure("kcp serve alone", 0, 0)
        for agents, per in configs:
            procs = [
                await asyncio.create_subprocess_exec(
                    *cmd, "agent", "--name", f"real-{i}", "--slots", str(per), env=env
                )
                for i in range(agents)
            ]
            try:
                await until(functools.partial(_count_agents, r, agents), 60, "real agents registered")
                await asyncio.sleep(3.0)
                await measure(f"{agents} agents, no kernels", agents, 0)
                total = agents * per
                t0 = time.monotonic()
                sizes = await create_clusters(url, total, f"r{agents}x{per}-")
                await until(functools.partial(settled, r, sizes), 900, "real kernels running")
                print(f"  {total} real kernels running in {time.monotonic() - t0:.1f}s", flush=True)
                await asyncio.sleep(5.0)  # past their start-up writes
                await measure(f"{agents} agents x {per} kernels", agents, total)
                async with KcpClient(Settings(redis_url=url)) as kcp:
                    for name in sizes:
                        await kcp.destroy_cluster(name, wait=120)
            finally:
                for proc in procs:
                    proc.send_signal(signal.SIGTERM)
                for proc in procs:
                    await asyncio.wait_for(proc.wait(), 90)
            await until(lambda: _no_agents(r), 30, "real agents deregistered")
    finally:
        serve.send_signal(signal.SIGTERM)
        await asyncio.wait_for(serve.wait(), 30)
        await r.aclose()
    return stages


async def _no_agents(r: AsyncRedis) -> bool:
    return int(await r.scard(KEYS.agents())) == 0


def report_real(stages: list[Stage]) -> None:
    print(
        "\nReal idle stack (kcp serve + kcp agent processes + real kernels)\n"
        f"  {'':<28}{'cmd/s':>9}{'Redis CPU %':>13}{'budget':>9}   top commands/s"
    )
    alone = stages[0].idle.rate
    for s in stages:
        budget = alone + 4 * s.agents + 1 * s.kernels
        top = " ".join(
            f"{k}={v / s.idle.seconds:.1f}" for k, v in sorted(s.idle.per.items(), key=lambda kv: -kv[1])[:6]
        )
        print(f"  {s.name:<28}{s.idle.rate:9.1f}{s.idle.cpu_percent:13.2f}{budget:9.1f}   {top}")
    bare = {s.agents: s for s in stages if s.agents and not s.kernels}
    for s in stages:
        if s.kernels and s.agents in bare:
            per_agent = (bare[s.agents].idle.rate - alone) / s.agents
            per_kernel = (s.idle.rate - bare[s.agents].idle.rate) / s.kernels
            print(
                f"  {s.name}: {per_agent:.2f} cmd/s per agent, {per_kernel:.2f} per kernel "
                "(the kernel's own traffic and its cluster's share included)"
            )
            base = bare[s.agents].idle
            per = {
                k: (v / s.idle.seconds - base.per.get(k, 0) / base.seconds) / s.kernels
                for k, v in s.idle.per.items()
            }
            print(
                "    per kernel, by command: "
                + " ".join(f"{k}={v:.3f}" for k, v in sorted(per.items(), key=lambda kv: -kv[1]) if v > 0.005)
            )


# ------------------------------------------------------------------ report
def report_dispatch(out: dict[int, PerDispatch], n: int) -> None:
    base = min(out)
    c0, u0 = statistics.median(out[base].commands), statistics.median(out[base].cpu_us)
    print(
        f"\nSequential dispatch of PING, {n} per round, medians over rounds (idle traffic subtracted)\n"
        f"  {'kernels':>8}{'rounds':>8}{'commands':>10}{'x ' + str(base):>8}{'Redis CPU µs':>14}"
        f"{'x ' + str(base):>8}   top commands per dispatch"
    )
    for size, f in sorted(out.items()):
        c, u = statistics.median(f.commands), statistics.median(f.cpu_us)
        top = sorted(f.per.items(), key=lambda kv: -kv[1])[:6]
        tops = " ".join(f"{k}={v:.1f}" for k, v in top)
        print(f"  {size:>8}{len(f.commands):>8}{c:10.1f}{c / c0:8.2f}{u:14.0f}{u / u0:8.2f}   {tops}")
    print("  every command per dispatch (last round; 0.1 or more):")
    for size, f in sorted(out.items()):
        every = sorted(((k, v) for k, v in f.per.items() if v >= 0.1), key=lambda kv: -kv[1])
        print(f"  {size:>8}: " + " ".join(f"{k}={v:.1f}" for k, v in every))


def report_fleet(
    stages: list[Stage], placement: float, failure: dict[str, float], changes: dict[str, int]
) -> None:
    print(
        "\nIdle fleet (stubbed kernels; leader in its own process)\n"
        f"  {'':<28}{'cmd/s':>9}{'Redis CPU %':>13}{'passes':>8}{'pass p50 ms':>13}{'p99 ms':>9}"
        f"{'CPU p50 ms':>12}{'p99 ms':>9}"
    )
    for s in stages:
        p50, p99, count = quantiles_ms(s.passes)
        cpu50, cpu99, _ = quantiles_ms(s.pass_cpu)
        print(
            f"  {s.name:<28}{s.idle.rate:9.0f}{s.idle.cpu_percent:13.1f}{count:>8}{p50:13.1f}{p99:9.1f}"
            f"{cpu50:12.1f}{cpu99:9.1f}"
        )
    leader, bare, full = stages
    per_agent = (bare.idle.rate - leader.idle.rate) / bare.agents
    per_kernel = (full.idle.rate - bare.idle.rate) / full.kernels
    print(
        f"  per agent: {per_agent:.2f} cmd/s; per kernel: {per_kernel:.2f} cmd/s "
        f"(clusters of {CLUSTER_SIZE}: a cluster's share included; the kernel's own traffic not)\n"
        f"  Redis CPU per 1,000 kernels: "
        f"{(full.idle.cpu_percent - leader.idle.cpu_percent) / full.kernels * 1000:.1f} % of a core\n"
        f"  top idle commands/s: "
        + " ".join(
            f"{k}={v / full.idle.seconds:.0f}"
            for k, v in sorted(full.idle.per.items(), key=lambda kv: -kv[1])[:8]
        )
    )
    print(
        f"  placement of {full.kernels} kernels: {placement:.1f}s "
        f"({placement / full.kernels * 1000:.0f} ms per kernel)\n"
        f"  killed agent: declared dead after {failure['detection']:.2f}s "
        f"(leader: {failure['leader_ms']:.0f} ms after its last heartbeat), "
        f"its kernels running elsewhere after {failure['replaced']:.2f}s\n"
        f"  reliability counters over the run: {changes or '-'} (one agent dead is the kill)"
    )


async def startup(url: str, port: int, place: int) -> None:
    print("start-up (real processes)", flush=True)
    kernel_cpu, bare_cpu = startup_cpu(url)
    fork_cpu = await forked_cpu(url)
    leader = Leader(url)
    try:
        mean, counts, of_agent = await connections_per_kernel(url, port)
        print(
            f"  kernel process import+start: exec'd {kernel_cpu:.3f} s CPU, forked from the fork server "
            f"{fork_cpu:.3f} s (medians of {STARTS}); bare python: {bare_cpu:.3f} s\n"
            f"  Redis connections per running kernel: {mean:.1f} ({counts}); of its agent: {of_agent}",
            flush=True,
        )
        for fork_server in (True, False) if place else ():
            p = await place_on_one_agent(url, place, fork_server)
            print(
                f"  {p.kernels} kernels on one agent, {p.mode}: {p.running} running after {p.seconds:.1f}s "
                f"(agent declared dead {p.agent_deaths} times meanwhile), "
                f"agent+fork server+kernels CPU {p.cpu:.1f}s ({p.cpu / p.kernels * 1000:.0f} ms per kernel); "
                f"USS per kernel median {statistics.median(p.uss_mib or [math.nan]):.1f} MiB "
                f"(max {max(p.uss_mib or [math.nan]):.1f}), "
                f"other children (the fork server) {p.server_uss_mib:.1f} MiB; "
                f"cluster destroyed in {p.drain:.1f}s  [{uptime()}]",
                flush=True,
            )
    finally:
        leader.stop()


# ------------------------------------------------------------------ 6. Redis Cluster
SPREAD_KERNELS = 2  # kernels per kcp cluster in the Redis Cluster stage
SPREAD_LOOPS = 8  # concurrent dispatch loops of its load window


@dataclass
class Spread:
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    rate: float = math.nan  # dispatches/s in the load window
    per_master: list[float] = field(default_factory=list)  # commands/s of each master meanwhile


def master_counts(urls: list[str]) -> list[int]:
    """Total commands each node has served (`INFO commandstats`, Lua's inner commands included)."""
    totals = []
    for url in urls:
        with connect_sync(url, timeout=5.0) as r:
            totals.append(sum(int(v["calls"]) for v in r.info("commandstats").values()))
    return totals


async def spread_round(
    kcp: KcpClient, names: list[str], masters: list[str], args: argparse.Namespace
) -> Spread:
    """Sequential dispatches spread over `names`, then the load window: one round's figures."""
    out = Spread()
    latencies = []
    for i in range(args.dispatches):
        t = time.perf_counter()
        await kcp.dispatch(names[i % len(names)], {"type": "PING"})
        latencies.append(time.perf_counter() - t)
    q = statistics.quantiles(latencies, n=100)
    out.p50_ms, out.p99_ms = q[49] * 1000, q[98] * 1000
    before = await asyncio.to_thread(master_counts, masters)
    loop = asyncio.get_running_loop()
    start = loop.time()
    end, done = start + args.cluster_seconds, 0

    async def dispatching(offset: int) -> None:
        nonlocal done
        i = offset
        while loop.time() < end:
            await kcp.dispatch(names[i % len(names)], {"type": "PING"})
            i += SPREAD_LOOPS
            done += 1

    await asyncio.gather(*(dispatching(k) for k in range(SPREAD_LOOPS)))
    took = loop.time() - start
    after = await asyncio.to_thread(master_counts, masters)
    out.rate = done / took
    out.per_master = [(b - a) / took for a, b in zip(before, after, strict=True)]
    return out


@dataclass
class SpreadStack:
    """A leader, real agents with in-process kernels and `clusters` running kcp clusters on `url`."""

    url: str
    masters: list[str]  # the nodes whose commands are counted
    clusters: int
    label: str  # its agents' name prefix (the two stacks' logs tell them apart)

    async def start(self) -> None:
        self.leader = Leader(self.url)
        self.fleet = Fleet(self.url, kernels=True)
        self.fleet.add(math.ceil(self.clusters * SPREAD_KERNELS / DISPATCH_SLOTS), DISPATCH_SLOTS, self.label)
        self.kcp = KcpClient(Settings(redis_url=self.url, ready_timeout=180))
        await self.kcp.__aenter__()
        self.names = [f"s{i}" for i in range(self.clusters)]
        for name in self.names:
            await self.kcp.create_cluster(name, SPREAD_KERNELS, wait=0)
        await until(lambda: _statuses_running(self.kcp.redis, self.names), 180, "kcp clusters running")
        for name in self.names:  # warm up: every kernel has worked, every view is cached
            for _ in range(10):
                await self.kcp.dispatch(name, {"type": "PING"})

    async def round(self, args: argparse.Namespace) -> Spread:
        return await spread_round(self.kcp, self.names, self.masters, args)

    async def stop(self) -> None:
        await self.kcp.__aexit__(None, None, None)
        await self.fleet.stop()
        self.leader.stop()


def homes(cluster: RedisClusterProcess, names: list[str]) -> dict[int, list[str]]:
    """Master port -> the kcp clusters whose slot it serves."""
    out: dict[int, list[str]] = {m.port: [] for m in cluster.masters()}
    for name in names:
        out[cluster.master_of_key(KEYS.cluster(name)).port].append(name)
    return out


async def rebalance(stack: SpreadStack, args: argparse.Namespace) -> Balance:
    """`kcp slots balance` on the cluster stack: its plan from the kcp clusters' dispatches/s over
    `--balance-window` s, its moves made live, all the while under the load window's dispatch
    loops (which go on until the last move is made)."""
    stop = asyncio.Event()

    async def dispatching(offset: int) -> None:
        i = offset
        while not stop.is_set():
            await stack.kcp.dispatch(stack.names[i % len(stack.names)], {"type": "PING"})
            i += SPREAD_LOOPS

    loops = [asyncio.create_task(dispatching(k)) for k in range(SPREAD_LOOPS)]
    try:
        with slots.cluster_client(Settings(redis_url=stack.url)) as client:
            return await asyncio.to_thread(
                slots.balance, client, KEYS, ratio=args.balance_ratio, window=args.balance_window
            )
    finally:
        stop.set()
        await asyncio.gather(*loops)


async def cluster_stage(args: argparse.Namespace, tmp: Path) -> None:
    single = start_redis_server(data_dir=tmp / "single", extra_args=["--maxclients", "20000"])
    cluster = start_redis_cluster(data_dir=tmp / "cluster", masters=3)
    one = SpreadStack(single.url, [single.url], args.clusters, "single")
    many = SpreadStack(cluster.url, [m.url for m in cluster.masters()], args.clusters, "cluster")
    phases: dict[str, list[tuple[Spread, Spread]]] = {"as hashed": [], "rebalanced": []}
    try:
        for stack in (one, many):
            await stack.start()
        for phase, rounds in phases.items():
            if phase == "rebalanced":
                done = await rebalance(many, args)
                print(
                    f"  moved {len(done.moves)} slot(s) live in {done.seconds:.2f}s (`kcp slots balance "
                    f"--ratio {args.balance_ratio:g} --window {args.balance_window:g}`: busiest / idlest "
                    f"master by {done.before.unit} {done.before.spread:.2f}x -> {done.after.spread:.2f}x)",
                    flush=True,
                )
            counts = {port: len(names) for port, names in sorted(homes(cluster, many.names).items())}
            print(f"  {phase}: {args.clusters} kcp clusters of {SPREAD_KERNELS}, per master {counts}")
            for i in range(args.repeat):
                pair = (await one.round(args), await many.round(args))
                rounds.append(pair)
                for name, r in zip(("single Redis", "Redis Cluster"), pair, strict=True):
                    print(
                        f"  {phase} round {i + 1} {name}: p50 {r.p50_ms:.3f} ms, p99 {r.p99_ms:.3f} ms; "
                        f"load {r.rate:.0f} dispatches/s, commands/s per master "
                        + ", ".join(f"{c:.0f}" for c in r.per_master),
                        flush=True,
                    )
    finally:
        for stack in (one, many):
            with contextlib.suppress(Exception):
                await stack.stop()
        cluster.stop()
        single.stop()
    print(f"uptime: {uptime()}")
    print(f"\nmedians of {args.repeat} rounds per phase:")
    for phase, rounds in phases.items():
        ratios = [b.p50_ms / a.p50_ms for a, b in rounds]
        spread = [max(b.per_master) / min(b.per_master) for _, b in rounds]
        p50 = (statistics.median(a.p50_ms for a, _ in rounds), statistics.median(b.p50_ms for _, b in rounds))
        rates = (statistics.median(a.rate for a, _ in rounds), statistics.median(b.rate for _, b in rounds))
        print(
            f"  {phase}: dispatch p50 single Redis {p50[0]:.3f} ms, Redis Cluster {p50[1]:.3f} ms: "
            f"{statistics.median(ratios):.2f}x (by round {', '.join(f'{x:.2f}' for x in ratios)}); "
            f"load ({SPREAD_LOOPS} loops) {rates[0]:.0f} / {rates[1]:.0f} dispatches/s; busiest master / "
            f"idlest {statistics.median(spread):.2f}x (by round {', '.join(f'{x:.2f}' for x in spread)})"
        )


async def amain(args: argparse.Namespace, url: str, port: int) -> None:
    print(f"uptime: {uptime()}", flush=True)
    if args.real:
        print("real idle stack", flush=True)
        report_real(await real_idle(url, args.real, args.idle))
        print(f"uptime: {uptime()}", flush=True)
        if args.real_only:
            return
    if not args.skip_startup:
        await startup(url, port, args.place)
        if args.only_startup:
            return
    leader = Leader(url)
    try:
        print("dispatch (in-process kernels)", flush=True)
        busy_load = (args.busy, args.busy_rate, args.busy_seconds)
        out, busy = await dispatch_costs(
            url, args.sizes, args.dispatches, args.repeat, args.idle_window, busy_load
        )
        print(f"uptime: {uptime()}", flush=True)
        report_dispatch(out, args.dispatches)
        if busy is not None:
            delta, sent = busy
            print(
                f"\nBusy cluster of {args.busy} at {sent / delta.seconds:.0f} dispatches/s "
                f"over {delta.seconds:.1f}s: {delta.per.get('hgetall', 0) / delta.seconds:.0f} HGETALL/s, "
                f"{delta.rate:.0f} commands/s, Redis CPU {delta.cpu_percent:.1f} %"
            )
        print(f"\nidle fleet: {args.agents} agents x {args.kernels} kernels", flush=True)
        stages, placement, failure, changes = await idle_fleet(
            url, args.agents, args.kernels, args.idle, leader, args.procs
        )
        report_fleet(stages, placement, failure, changes)
    finally:
        leader.stop()
    print(f"uptime: {uptime()}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--agents", type=int, default=16, help="simulated agents in the idle fleet")
    parser.add_argument("--kernels", type=int, default=8, help="stubbed kernels per agent")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of each idle window")
    parser.add_argument(
        "--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[3, 32, 256], help="cluster sizes"
    )
    parser.add_argument("--dispatches", type=int, default=300, help="sequential dispatches per round")
    parser.add_argument("--repeat", type=int, default=3, help="dispatch rounds per size")
    parser.add_argument("--idle-window", type=float, default=2.0, help="idle seconds before each round")
    parser.add_argument("--busy", type=int, default=64, help="size of the busy cluster (0: none)")
    parser.add_argument("--busy-rate", type=float, default=100.0, help="its dispatches/s")
    parser.add_argument("--busy-seconds", type=float, default=6.0, help="seconds measured")
    stages = parser.add_mutually_exclusive_group()
    stages.add_argument("--skip-startup", action="store_true", help="leave out the real-process stage")
    stages.add_argument("--only-startup", action="store_true", help="run the real-process stage only")
    parser.add_argument("--place", type=int, default=64, help="real kernels placed on one agent (0: none)")
    parser.add_argument("--procs", type=int, default=1, help="simulator processes of the idle fleet")
    parser.add_argument(
        "--real",
        type=lambda s: [tuple(int(x) for x in c.split("x")) for c in s.split(",")],
        default=[],
        help="real idle stacks, agents x kernels each, e.g. 1x8,4x8,8x8",
    )
    parser.add_argument("--real-only", action="store_true", help="only the real idle stacks")
    parser.add_argument("--cluster", action="store_true", help="only the Redis Cluster stage (6)")
    parser.add_argument("--clusters", type=int, default=30, help="kcp clusters in the Redis Cluster stage")
    parser.add_argument("--cluster-seconds", type=float, default=10.0, help="its load window per round, s")
    parser.add_argument(
        "--balance-ratio", type=float, default=slots.RATIO, help="its `kcp slots balance --ratio`"
    )
    parser.add_argument(
        "--balance-window", type=float, default=3.0, help="its `kcp slots balance --window`, s"
    )
    args = parser.parse_args()
    os.chdir(Path(__file__).resolve().parents[1])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the private redis-server too
    with TemporaryDirectory(prefix="kcp-fleet-") as tmp:
        if args.cluster:
            print(f"uptime: {uptime()}", flush=True)
            asyncio.run(cluster_stage(args, Path(tmp)))
            return
        port = free_port()
        server = start_redis_server(port=port, data_dir=Path(tmp), extra_args=["--maxclients", "20000"])
        try:
            asyncio.run(amain(args, server.url, port))
        finally:
            server.stop()


if __name__ == "__main__":
    main()
