"""The real `kcp` CLI against a real redis-server with ACL users: each Redis refusal gets the
message that says what to fix, and its own exit code."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import redis
from conftest import RedisServerFactory

from controlplane.errors import EXIT_AUTH, EXIT_PERMISSION
from controlplane.ops.redis_server import RedisServerProcess
from controlplane.protocol.keys import Keys

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture
def server(redis_server_factory: RedisServerFactory) -> RedisServerProcess:
    """A server with `outsider`: every command, but only keys outside kcp's prefix."""
    server = redis_server_factory()
    with redis.Redis.from_url(server.url) as admin:
        admin.execute_command("ACL", "SETUSER", "outsider", "on", ">right", "~other:*", "+@all")
    return server


def kcp(url: str, *argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "controlplane.ops.cli", "--redis-url", url, *argv],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )


def test_a_wrong_password_says_authentication_failed_for_the_user_at_the_url(
    server: RedisServerProcess,
) -> None:
    hostport = f"{server.host}:{server.port}"
    run = kcp(f"redis://outsider:wrong@{hostport}/0", "cluster", "list")
    assert run.returncode == EXIT_AUTH == 4, run.stderr
    assert f"authentication failed for user outsider at redis://outsider:***@{hostport}/0" in run.stderr
    assert "wrong" not in run.stderr.replace("outsider:***", "")
    assert "is Redis running" not in run.stderr
    # the credentials from the environment, as a deployment sets them
    run = kcp(
        f"redis://{hostport}/0", "status", env={"KCP_REDIS_USERNAME": "outsider", "KCP_REDIS_PASSWORD": "no"}
    )
    assert run.returncode == EXIT_AUTH, run.stderr
    assert "authentication failed for user outsider at redis://outsider:***@" in run.stderr


def test_an_acl_denial_names_the_command_and_the_key(server: RedisServerProcess) -> None:
    run = kcp(f"redis://outsider:right@{server.host}:{server.port}/0", "cluster", "list")
    assert run.returncode == EXIT_PERMISSION == 5, run.stderr
    assert (
        f"permission denied for user outsider at redis://outsider:***@{server.host}:{server.port}/0"
        in run.stderr
    )
    assert f"SMEMBERS on key {Keys().clusters()}" in run.stderr, run.stderr
