"""Helpers of the chaos suite: named kcp processes that can be killed and restarted, load
clients in their own processes, a checker for their results, Sentinel and netns setups."""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from controlplane.protocol import stats
from controlplane.protocol.keys import Keys
from controlplane.protocol.records import parse_counters
from controlplane.redis.connect import connect_sync
from controlplane.redis.scripts import jobs

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("client_worker.py")
HANDLERS = "tests.chaos.handlers"

#: the key schema (the default prefix, what the fleet under test uses)
KEYS = Keys()


class Procs:
    """kcp processes by name. `kill()` is SIGKILL (the agent's kernels die with it, PDEATHSIG)."""

    def __init__(self, redis_url: str, env: dict[str, str] | None = None) -> None:
        self.redis_url = redis_url
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.argv: dict[str, list[str]] = {}
        self.others: list[subprocess.Popen[bytes]] = []  # load clients: killed by stop() if still running

    def start(self, name: str, *args: str, netns: str | None = None, url: str | None = None) -> None:
        cmd = [sys.executable, "-m", "controlplane.ops.cli", "--redis-url", url or self.redis_url, *args]
        if netns:
            cmd = ["ip", "netns", "exec", netns, *cmd]
        self.argv[name] = cmd
        self.procs[name] = subprocess.Popen(cmd, env=self.env, cwd=ROOT)

    def serve(self, name: str = "serve", **kw: Any) -> None:
        self.start(name, "--log-level", "INFO", "serve", **kw)

    def agent(self, name: str, slots: int = 4, **kw: Any) -> None:
        self.start(
            name,
            "--log-level",
            "INFO",
            "agent",
            "--name",
            name,
            "--slots",
            str(slots),
            "--handlers",
            HANDLERS,
            **kw,
        )

    def fleet(self, cluster: str, agents: int = 3, slots: int = 2, kernels: int = 3) -> None:
        """`kcp serve`, agents `agent-0`... registered, and `cluster` running `kernels` kernels."""
        self.serve()
        for i in range(agents):
            self.agent(f"agent-{i}", slots=slots)
        wait_until(lambda: len(registered_agents(self.redis_url)) == agents, 30, f"{agents} agents")
        create_cluster(self.redis_url, cluster, kernels)

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def restart(self, name: str) -> None:
        self.procs[name] = subprocess.Popen(self.argv[name], env=self.env, cwd=ROOT)

    def pid(self, name: str) -> int:
        return self.procs[name].pid

    def stop(self) -> None:
        for proc in self.others:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def start_clients(
    redis_url: str,
    cluster: str,
    out_dir: Path,
    *,
    procs: int,
    count: int,
    concurrency: int,
    sleep_ms: int,
    retry_unavailable: float = 0.0,
    syscall: str = "SLEEP",
    owner: Procs | None = None,
) -> list[tuple[subprocess.Popen[bytes], Path]]:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "CHAOS_RETRY_UNAVAILABLE": str(retry_unavailable),
        "CHAOS_SYSCALL": syscall,
    }
    started = []
    for i in range(procs):
        out = out_dir / f"client-{i}.json"
        cmd = [
            sys.executable,
            str(WORKER),
            redis_url,
            cluster,
            f"c{i}",
            str(count),
            str(concurrency),
            str(out),
        ]
        proc = subprocess.Popen([*cmd, str(sleep_ms)], env=env, cwd=ROOT)
        if owner is not None:  # so that a failing test does not leave load running
            owner.others.append(proc)
        started.append((proc, out))
    return started


@dataclass
class LoadReport:
    """What the load clients saw, checked: each dispatch answered once, with its own result."""

    total: int = 0
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    reexecutions: int = 0  # claims beyond the first, of the jobs that answered
    retries: int = 0  # new attempts the client engines made after a timeout or refusal
    slowest: float = 0.0
    records: list[dict[str, Any]] = field(default_factory=list)

    def first_errors(self, n: int = 3) -> list[str]:
        return [str(r["error"]) for r in self.records if not r["ok"]][:n]

    def resumed_after(self, at: float) -> float:
        """Seconds from `at` (a kill, unix time) until the first dispatch started after it was
        answered with its result; NaN if none was."""
        after = [r["at"] for r in self.records if r["ok"] and r["at"] - r["seconds"] > at]
        return min(after) - at if after else float("nan")

    def line(self) -> str:
        return (
            f"{self.total} dispatches: {self.ok} ok, errors {dict(self.errors) or 0}, "
            f"re-executions {self.reexecutions}, client retries {self.retries}, slowest {self.slowest:.2f}s"
        )


def collect(clients: Sequence[tuple[subprocess.Popen[bytes], Path]], timeout: float) -> LoadReport:
    deadline = time.monotonic() + timeout
    for proc, _ in clients:
        proc.wait(max(deadline - time.monotonic(), 1))
        assert proc.returncode == 0, f"client process exited with {proc.returncode}"
    report = LoadReport()
    for _, out in clients:
        data = json.loads(out.read_text())
        report.records += data["records"]
        report.retries += data["metrics"]["retries"]
    tags = Counter(r["tag"] for r in report.records)
    assert all(n == 1 for n in tags.values()), f"answered twice: {[t for t, n in tags.items() if n > 1][:5]}"
    report.total = len(report.records)
    for r in report.records:
        report.slowest = max(report.slowest, r["seconds"])
        if r["ok"]:
            assert r["echo"] == r["tag"], f"result of another request delivered: {r}"
            report.ok += 1
            report.reexecutions += r["attempts"] - 1
        else:
            report.errors[r["error_type"]] += 1
    jobs = Counter(r["job_id"] for r in report.records if r["ok"])
    assert all(n == 1 for n in jobs.values()), "one job answered two dispatches"
    return report


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def reliability(url: str) -> dict[str, str]:
    with connect_sync(url) as r:
        return r.hgetall(KEYS.reliability())  # type: ignore[return-value]


def wait_until(predicate: Any, limit: float, what: str, step: float = 0.02) -> float:
    """Poll `predicate()` until true; returns the seconds it took. AssertionError after `limit`."""
    start = time.monotonic()
    while True:
        try:
            if predicate():
                return time.monotonic() - start
        except (redis.ConnectionError, redis.TimeoutError):
            pass
        if time.monotonic() - start > limit:
            raise AssertionError(f"timed out after {limit}s waiting for {what}")
        time.sleep(step)


def running_kernels(url: str, cluster: str) -> dict[str, str]:
    """kernel name -> agent, of the cluster's kernels in state `running`."""
    with connect_sync(url, timeout=2) as r:
        out = {}
        for name in r.smembers(KEYS.cluster_kernels(cluster)):  # type: ignore[union-attr]
            state, agent = r.hmget(KEYS.kernel(cluster, name), ["state", "agent"])  # type: ignore[misc]
            if state == "running":
                out[str(name)] = str(agent)
        return out


def registered_agents(url: str) -> set[str]:
    with connect_sync(url, timeout=2) as r:
        return set(r.smembers(KEYS.agents()))  # type: ignore[arg-type]


def create_cluster(url: str, name: str, kernels: int, config: dict[str, Any] | None = None) -> None:
    import asyncio

    from controlplane import KcpClient, Settings

    async def go() -> None:
        async with KcpClient(Settings(redis_url=url, ready_timeout=60)) as kcp:
            info = await kcp.create_cluster(name, kernels, config or {"max_kernels": 16})
            assert info.running == kernels, info

    asyncio.run(go())


def cluster_stats(url: str, cluster: str) -> dict[str, float]:
    """The cluster's counters as readers see them: its hash plus its kernels' (`stats.totals`)."""
    with connect_sync(url) as r:
        read = jobs.read_stats(KEYS, cluster).run_sync(r)
    kernels = [parse_counters(h, cluster) for h in read.kernels.values()]
    return stats.totals(parse_counters(read.cluster, cluster), kernels)


class SentinelSetup:
    """1 master, 1 replica, 3 sentinels (`redis-server conf --sentinel`), all on loopback."""

    SERVICE = "kcpmaster"

    def __init__(self, base: Path) -> None:
        from controlplane.ops.redis_server import find_redis_server, free_port, start_redis_server

        self.master = start_redis_server(data_dir=base / "master")
        self.replica = start_redis_server(
            data_dir=base / "replica", extra_args=["--replicaof", "127.0.0.1", str(self.master.port)]
        )
        self.sentinels: list[subprocess.Popen[bytes]] = []
        self.ports: list[int] = []
        for i in range(3):
            port = free_port()
            conf = base / f"sentinel-{i}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndaemonize no\ndir {base}\n"
                f"sentinel monitor {self.SERVICE} 127.0.0.1 {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {self.SERVICE} 1000\n"
                f"sentinel failover-timeout {self.SERVICE} 5000\n"
                f"sentinel parallel-syncs {self.SERVICE} 1\n"
            )
            with (base / f"sentinel-{i}.log").open("ab") as log:
                self.sentinels.append(
                    subprocess.Popen([find_redis_server(), str(conf), "--sentinel"], stdout=log, stderr=log)
                )
            self.ports.append(port)
        self.url = "redis+sentinel://" + ",".join(f"127.0.0.1:{p}" for p in self.ports) + f"/{self.SERVICE}/0"
        wait_until(self._ready, 30, "sentinels to see the master and its replica", step=0.1)

    def master_port(self) -> int:
        with redis.Redis(port=self.ports[0], decode_responses=True, socket_timeout=1) as s:
            addr = s.execute_command("SENTINEL", "get-master-addr-by-name", self.SERVICE)
        return int(addr[1])

    def _ready(self) -> bool:
        with redis.Redis(port=self.replica.port, decode_responses=True, socket_timeout=1) as r:
            if r.info("replication").get("master_link_status") != "up":
                return False
        for port in self.ports:
            with redis.Redis(port=port, decode_responses=True, socket_timeout=1) as s:
                info = s.execute_command("SENTINEL", "master", self.SERVICE)
                fields = dict(zip(info[::2], info[1::2], strict=True)) if isinstance(info, list) else info
                if int(fields.get("num-slaves", 0)) < 1 or int(fields.get("num-other-sentinels", 0)) < 2:
                    return False
        return True

    def stop(self) -> None:
        for proc in self.sentinels:
            proc.kill()
            proc.wait()
        self.replica.stop()
        self.master.stop()


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


class NetnsHosts:
    """N test hosts as network namespaces, each joined to the root namespace by a veth pair.

    Host i: namespace `kcpchaos{tag}-{i}`, its end `kcn{tag}{i}` at 192.0.2.(BASE+4i+2)/30, the
    root end `kch{tag}{i}` at 192.0.2.(BASE+4i+1)/30 (where Redis listens for it). `cut(i)` takes
    the root end down, a partition; `restore(i)` brings it back. `remove()` deletes everything.

    The /30s sit at the top of 192.0.2.0/24 because a container's own interface may already use
    the bottom of that range (this machine's eth0 is 192.0.2.2/24, gateway 192.0.2.1); a
    conflict with any address already configured or seen as a neighbour raises `Conflict`."""

    BASE = 240

    class Conflict(RuntimeError):
        pass

    def __init__(self, count: int) -> None:
        self.tag = f"{os.getpid() % 10000}"
        self.count = count
        self.created: list[str] = []
        taken = subprocess.run(["ip", "-4", "addr"], capture_output=True, text=True).stdout
        neighbours = subprocess.run(["ip", "-4", "neigh"], capture_output=True, text=True).stdout
        # a neighbour that answered (has a link-layer address) is a real host; FAILED entries are not
        taken += "\n".join(line for line in neighbours.splitlines() if "lladdr" in line)
        for i in range(count):
            for addr in (self.gateway(i), self.address(i)):
                if re.search(rf"\b{re.escape(addr)}\b", taken):
                    raise self.Conflict(f"{addr} is already in use on this machine")
        try:
            for i in range(count):
                ns, host_if, ns_if = self.netns(i), self.host_if(i), f"kcn{self.tag}{i}"
                sh("ip", "netns", "add", ns)
                self.created.append(ns)
                sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if)
                sh("ip", "link", "set", ns_if, "netns", ns)
                sh("ip", "addr", "add", f"{self.gateway(i)}/30", "dev", host_if)
                sh("ip", "link", "set", host_if, "up")
                sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{self.address(i)}/30", "dev", ns_if)
                sh("ip", "netns", "exec", ns, "ip", "link", "set", ns_if, "up")
                sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        except BaseException:
            self.remove()
            raise

    def netns(self, i: int) -> str:
        return f"kcpchaos{self.tag}-{i}"

    def host_if(self, i: int) -> str:
        return f"kch{self.tag}{i}"

    def gateway(self, i: int) -> str:
        """The root-namespace address host i reaches Redis at."""
        return f"192.0.2.{self.BASE + 4 * i + 1}"

    def address(self, i: int) -> str:
        """Host i's own address, inside its namespace."""
        return f"192.0.2.{self.BASE + 4 * i + 2}"

    def cut(self, i: int) -> None:
        sh("ip", "link", "set", self.host_if(i), "down")

    def restore(self, i: int) -> None:
        sh("ip", "link", "set", self.host_if(i), "up")

    def remove(self) -> None:
        for ns in self.created:  # deleting a namespace deletes its veth end, and so the pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.created.clear()
