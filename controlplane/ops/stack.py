"""A local kcp stack in child processes: Redis (when none answers), `kcp serve`, N agents."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

from controlplane.errors import InvalidRequest, RedisError
from controlplane.ops.redis_server import RedisServerProcess, free_port, start_redis_server
from controlplane.redis.connect import connect_sync
from controlplane.redis.errors import map_redis_errors
from controlplane.settings import Settings

logger = logging.getLogger(__name__)


def redis_answers(url: str, timeout: float = 1.0) -> bool:
    """Whether a Redis answers at `url`; a server that refuses the credentials raises
    (`AuthenticationFailed`, `PermissionDenied`): starting another one would not help."""
    try:
        with map_redis_errors():
            client = connect_sync(url, timeout=timeout)
            try:
                return bool(client.ping())
            finally:
                client.close()
    except RedisError as exc:
        if exc.transient:
            return False
        raise
    except InvalidRequest:  # a URL kcp cannot use (e.g. redis+cluster://): no Redis to start
        raise
    except (OSError, ValueError):
        return False


class LocalStack:
    """Start with `start()`, stop everything with `stop()` (idempotent); a context manager too.

    `own_redis=True` always starts a private redis-server on a free loopback port (the demo
    does, so it never touches a Redis someone else uses); otherwise one is started only
    when nothing answers at `settings.redis_url`, on that URL's port.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        agents: int = 3,
        slots: int = 4,
        own_redis: bool = False,
        log_level: str = "WARNING",
        handlers: tuple[str, ...] = (),
    ) -> None:
        self.settings = settings
        self.agents = agents
        self.slots = slots
        self.own_redis = own_redis
        self.log_level = log_level
        self.handlers = handlers
        self.redis_server: RedisServerProcess | None = None
        self.procs: list[subprocess.Popen[bytes]] = []
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def redis_url(self) -> str:
        return self.redis_server.url if self.redis_server else self.settings.redis_url

    def start(self) -> None:
        if self.own_redis or not redis_answers(self.settings.redis_url):
            self._tmp = tempfile.TemporaryDirectory(prefix="kcp-redis-")
            parsed = urlparse(self.settings.redis_url)
            port = free_port() if self.own_redis else (parsed.port or 6379)
            host = "127.0.0.1" if self.own_redis else (parsed.hostname or "127.0.0.1")
            self.redis_server = start_redis_server(port=port, host=host, data_dir=Path(self._tmp.name))
            logger.info("started redis-server at %s", self.redis_server.url)
        base = [
            sys.executable,
            "-m",
            "controlplane.ops.cli",
            "--prefix",
            self.settings.prefix,
            "--log-level",
            self.log_level,
        ]
        # the URL (it may hold a password) goes in the environment: argv is visible to every user
        env = {**os.environ, "KCP_REDIS_URL": self.redis_url}
        self.procs.append(subprocess.Popen([*base, "serve"], env=env))
        for i in range(self.agents):
            cmd = [*base, "agent", "--name", f"agent-{i}", "--slots", str(self.slots)]
            for module in self.handlers:
                cmd += ["--handlers", module]
            self.procs.append(subprocess.Popen(cmd, env={**env, "PYTHONPATH": os.getcwd()}))

    def stop(self, grace: float = 15.0) -> None:
        for proc in reversed(self.procs):  # agents first: they drain, then the service
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.procs:
            try:
                proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
        if self.redis_server is not None:
            self.redis_server.stop()
            self.redis_server = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> LocalStack:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
