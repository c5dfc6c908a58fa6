"""Per-role Redis ACL users (`kcp acl`): least privilege proven against a real redis-server."""

from __future__ import annotations

import asyncio
import fnmatch
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis
from conftest import ProcessStack, RedisServerFactory
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane import KcpClient, Settings
from controlplane.errors import InvalidRequest
from controlplane.ops.acl import AclUser, build_users, passwords_for, setuser_args
from controlplane.ops.cli.main import main as kcp_main
from controlplane.ops.redis_server import RedisClusterProcess, RedisServerProcess
from controlplane.protocol.keys import Keys
from controlplane.protocol.models import NAME_PATTERN
from controlplane.redis.connect import connect_sync

KEYS = Keys()
AGENTS = ("a1", "a2")


def _rw_patterns(user: AclUser) -> list[str]:
    return [r[1:] for r in user.rules if r.startswith("~")]


def _agent_scoped(k: Keys, agent: str) -> list[str]:
    """Keys that belong to `agent` alone."""
    return [k.agent(agent), k.agent_lease(agent), k.agent_wake(agent), k.load(agent, "c", "worker-0")]


# ------------------------------------------------------------------ rules (no server)


@pytest.mark.unit
@settings(max_examples=200, deadline=None)
@given(
    a=st.from_regex(NAME_PATTERN, fullmatch=True),
    b=st.from_regex(NAME_PATTERN, fullmatch=True),
)
def test_an_agents_patterns_never_cover_another_agents_keys(a: str, b: str) -> None:
    """Glob patterns built from names (no glob characters in names) stay inside their agent."""
    if a == b:
        return
    user_a = next(u for u in build_users(KEYS, [a, b]) if u.agent == a)
    for key in [*_agent_scoped(KEYS, b), KEYS.agent_kernels(b)]:
        assert not any(fnmatch.fnmatchcase(key, p) for p in _rw_patterns(user_a)), (key, user_a.rules)
    for key in _agent_scoped(KEYS, a):
        assert any(fnmatch.fnmatchcase(key, p) for p in _rw_patterns(user_a)), key


@pytest.mark.unit
@pytest.mark.parametrize("bad", ["a*", "a:b", "a{b}", "a b", "a\nb", "", "-a", "x" * 65, "a?", "a[1]"])
def test_agent_names_that_could_widen_a_pattern_are_refused(bad: str) -> None:
    with pytest.raises(InvalidRequest, match="invalid agent name"):
        build_users(KEYS, [bad])


@pytest.mark.unit
def test_kcp_acl_cli_exit_codes_and_secrets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert kcp_main(["acl", "--agent", "bad:name"]) == 2
    assert kcp_main(["acl", "--format", "aclfile"]) == 2  # needs --secrets-dir
    secrets = tmp_path / "secrets"
    assert kcp_main(["acl", "--agent", "a1", "--format", "aclfile", "--secrets-dir", str(secrets)]) == 0
    first = capsys.readouterr().out
    env = (secrets / "kcp-agent-a1.env").read_text()
    assert env.startswith("KCP_REDIS_USERNAME=kcp-agent-a1\nKCP_REDIS_PASSWORD=")
    assert (secrets / "kcp-agent-a1.env").stat().st_mode & 0o777 == 0o600
    password = env.split("KCP_REDIS_PASSWORD=")[1].strip()
    assert password not in first, "an aclfile holds only password hashes"
    # a second run with one more agent keeps the existing passwords
    assert (
        kcp_main(
            ["acl", "--agent", "a1", "--agent", "a2", "--format", "aclfile", "--secrets-dir", str(secrets)]
        )
        == 0
    )
    second = capsys.readouterr().out
    line = next(x for x in first.splitlines() if x.startswith("user kcp-agent-a1 "))
    assert line in second.splitlines()
    assert (secrets / "kcp-agent-a2.env").exists()


# ------------------------------------------------------------------ a real server


@pytest.fixture
def acl_server(
    redis_server_factory: RedisServerFactory,
) -> Iterator[tuple[RedisServerProcess, dict[str, str]]]:
    """A private server with the service, client and two agent users (the default user stays
    the test's admin)."""
    server = redis_server_factory()
    users = build_users(KEYS, AGENTS)
    passwords = passwords_for(users, None)
    with redis.Redis.from_url(server.url) as admin:
        for user in users:
            admin.execute_command("ACL", "SETUSER", *setuser_args(user, passwords[user.name]))
    yield server, passwords


def _login(server: RedisServerProcess, user: str, passwords: dict[str, str]) -> redis.Redis:
    return redis.Redis(host=server.host, port=server.port, username=user, password=passwords[user])


def _denied(call: Any) -> bool:
    try:
        call()
    except redis.exceptions.NoPermissionError:
        return True
    except redis.exceptions.ResponseError as exc:  # inside a script: "ERR ... can't access ..."
        return "access" in str(exc) or "NOPERM" in str(exc)
    return False


@pytest.mark.integration
@pytest.mark.timeout(30)
def test_agent_a_gets_noperm_on_agent_b_keys(acl_server: tuple[RedisServerProcess, dict[str, str]]) -> None:
    server, passwords = acl_server
    with _login(server, "kcp-agent-a1", passwords) as a1:
        # its own keys: fine
        a1.hset(KEYS.load("a1", "c", "worker-0"), mapping={"cpu": "0.1"})
        a1.set(KEYS.agent_lease("a1"), "1", px=1000)
        a1.hset(KEYS.agent_running("a1"), "c/worker-0", "1")
        a1.time()  # its heartbeat measures its offset to Redis's clock
        a1.sadd(KEYS.agents(), "a1")
        # its kernels push results to any client's reply list of a cluster and ring its bell
        a1.rpush(KEYS.reply("c", "client-1"), "r")
        a1.zadd(KEYS.reply_bell("client-1"), {"c": 1})
        # ... and publish results on the reply lists' shard channels, where clients subscribe
        a1.execute_command("SPUBLISH", KEYS.reply("c", "client-1"), "r")
        with redis.Redis.from_url(server.url, decode_responses=True) as admin:
            dryrun = ("ACL", "DRYRUN", "kcp-client", "SSUBSCRIBE", KEYS.reply("c", "client-1"))
            assert admin.execute_command(*dryrun) == "OK"
        # agent B's load record, lease, running kernels, record, wake list and assignment: refused
        assert _denied(lambda: a1.hset(KEYS.agent_running("a2"), "c/worker-0", "1"))
        assert _denied(lambda: a1.delete(KEYS.agent_running("a2")))
        assert _denied(lambda: a1.hset(KEYS.heartbeats(), "a2", "1")), "no agent writes heartbeats any more"
        assert _denied(lambda: a1.hset(KEYS.load("a2", "c", "worker-0"), "cpu", "0.9"))
        assert _denied(lambda: a1.set(KEYS.agent_lease("a2"), "1", px=1000))
        assert _denied(lambda: a1.delete(KEYS.agent_lease("a2")))
        assert _denied(lambda: a1.pexpire(KEYS.agent_lease("a2"), 1))
        assert _denied(lambda: a1.hset(KEYS.agent("a2"), "slots", "999"))
        assert _denied(lambda: a1.lpush(KEYS.agent_wake("a2"), "x"))
        assert _denied(lambda: a1.hset(KEYS.agent_kernels("a2"), "c/worker-0", "run"))
        # its own assignment is the control plane's to write
        assert _denied(lambda: a1.hset(KEYS.agent_kernels("a1"), "c/worker-0", "run"))
        a1.hgetall(KEYS.agent_kernels("a1"))
        # it may join the agent set but not evict anyone from it
        assert _denied(lambda: a1.srem(KEYS.agents(), "a2"))
        assert _denied(lambda: a1.delete(KEYS.agents()))
        # control-plane keys
        assert _denied(lambda: a1.set(KEYS.leader(), "me"))
        assert _denied(lambda: a1.hset(KEYS.cluster("c"), "desired", "100"))
        # through a script: the declared KEYS are checked, and so is every command it runs
        assert _denied(lambda: a1.eval("return redis.call('SET', KEYS[1], 'x')", 1, KEYS.agent_lease("a2")))
        assert _denied(lambda: a1.eval(f"return redis.call('DEL', '{KEYS.agent_lease('a2')}')", 0))
        # server-wide commands
        for command in (
            ("FLUSHALL",),
            ("KEYS", "*"),
            ("CONFIG", "GET", "*"),
            ("ACL", "LIST"),
            ("SWAPDB", "0", "1"),
        ):
            assert _denied(lambda c=command: a1.execute_command(*c)), command
        assert _denied(lambda: a1.publish("other-channel", "x"))
    with _login(server, "kcp-client", passwords) as client:
        client.hgetall(KEYS.load("a1", "c", "worker-0"))  # reads load records to route
        assert _denied(lambda: client.hset(KEYS.agent("a1"), "slots", "0"))
        assert _denied(lambda: client.hset(KEYS.agent_kernels("a1"), "c/worker-0", "run"))
        assert _denied(lambda: client.set(KEYS.agent_lease("a1"), "1"))
        assert _denied(lambda: client.sadd(KEYS.agents(), "ghost"))
        assert _denied(lambda: client.set(KEYS.leader(), "me"))
        assert _denied(lambda: client.hset(KEYS.reliability(), "x", 1))
        client.incr(KEYS.cluster_rr("c"))  # the tagged shapes: kcp:cluster:{c}:rr ...
        client.hset(KEYS.cluster("c"), "status", "ready")  # ... kcp:cluster:{c}
        client.rpush(KEYS.reply_taken("c", "client-1"), "r")  # ... kcp:reply:{c}:client-1:taken
        client.zadd(KEYS.reply_bell("client-1"), {"c": 1})  # ... kcp:reply:{client-1}:bell
        client.bzpopmin(KEYS.reply_bell("client-1"), 1)
    with _login(server, "kcp-service", passwords) as service:
        service.set(KEYS.leader(), "token", px=1000)
        assert _denied(lambda: service.set("not-kcp:key", "x"))
        assert _denied(lambda: service.execute_command("FLUSHALL"))


@pytest.mark.integration
@pytest.mark.timeout(30)
def test_generated_aclfile_loads_into_redis(
    redis_server_factory: RedisServerFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`kcp acl --format aclfile` output, as is, is the server's aclfile (plus an admin line)."""
    secrets = tmp_path / "secrets"
    argv = ["acl", "--agent", "a1", "--agent", "a2", "--format", "aclfile", "--secrets-dir", str(secrets)]
    assert kcp_main(argv) == 0
    aclfile = tmp_path / "users.acl"
    aclfile.write_text("user default on nopass ~* &* +@all\n" + capsys.readouterr().out)
    server = redis_server_factory(extra_args=["--aclfile", str(aclfile)])
    users = build_users(KEYS, AGENTS)
    passwords = passwords_for(users, secrets)  # read back from the env files
    with redis.Redis.from_url(server.url) as admin:
        assert set(admin.acl_users()) == {"default", *(u.name for u in users)}
    with _login(server, "kcp-agent-a2", passwords) as a2:
        a2.set(KEYS.agent_lease("a2"), "1")
        assert _denied(lambda: a2.set(KEYS.agent_lease("a1"), "1"))
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(host=server.host, port=server.port, username="kcp-agent-a2", password="wrong").ping()


# ------------------------------------------------------------------ the whole system under these users


def _env(user: str, passwords: dict[str, str]) -> dict[str, str]:
    return {"KCP_REDIS_USERNAME": user, "KCP_REDIS_PASSWORD": passwords[user]}


@pytest.mark.system
@pytest.mark.timeout(120)
async def test_whole_system_runs_under_least_privilege_users(
    acl_server: tuple[RedisServerProcess, dict[str, str]],
) -> None:
    server, passwords = acl_server
    procs = ProcessStack(server.url)  # credentials go in the environment only
    try:
        procs.serve(env=_env("kcp-service", passwords))
        for name in AGENTS:
            procs.agent(name, 2, env=_env(f"kcp-agent-{name}", passwords))
        with redis.Redis.from_url(server.url, decode_responses=True) as admin:
            for _ in range(300):
                if admin.scard(KEYS.agents()) >= 2:
                    break
                await asyncio.sleep(0.1)
            client_settings = Settings(
                redis_url=server.url, redis_username="kcp-client", redis_password=passwords["kcp-client"]
            )
            async with KcpClient(client_settings) as kcp:
                info = await kcp.create_cluster("acl", 4, {"max_kernels": 4}, wait=30)
                assert info.running == 4, info
                assert {k.agent for k in info.kernels} == set(AGENTS)
                results = await asyncio.gather(
                    *(
                        kcp.dispatch("acl", {"type": "COMPUTE", "op": "sum", "data": [i, 1]})
                        for i in range(40)
                    )
                )
                assert sorted(r.result["result"] for r in results) == [float(i + 1) for i in range(40)]
                assert {r.kernel for r in results} == {k.name for k in info.kernels}
                metrics = await kcp.get_metrics("acl")
                assert metrics.total_dispatches == 40
                # the CLI's read-only views work as the client user too
                for argv in (["status", "--json"], ["top", "--once"], ["metrics", "acl"]):
                    cli = await asyncio.create_subprocess_exec(
                        sys.executable, "-m", "controlplane.ops.cli", "--redis-url", server.url, *argv,
                        env={**os.environ, **_env("kcp-client", passwords)},
                        stdout=asyncio.subprocess.DEVNULL,
                    )  # fmt: skip
                    assert await cli.wait() == 0, argv
                await kcp.destroy_cluster("acl", wait=30)
                assert await kcp.state.get_cluster("acl") is None
            # nothing kcp did was refused: the rules cover every key its processes touch
            denied = [e for e in admin.acl_log() if str(e.get("username", "")).startswith("kcp-")]
            assert denied == [], denied
            # and the password never sat on a command line
            for proc in procs.procs:
                cmdline = " ".join(psutil.Process(proc.pid).cmdline())
                assert not any(p in cmdline for p in passwords.values())
            # a clean agent exit: it may not remove itself from the agent set (that right would
            # let it evict others), so the leader forgets it once its lease is gone
            for proc in procs.procs[1:]:
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(30) == 0
            for _ in range(100):
                if admin.scard(KEYS.agents()) == 0:
                    break
                await asyncio.sleep(0.1)
            assert admin.smembers(KEYS.agents()) == set()
            assert not admin.exists(KEYS.agent("a1"), KEYS.agent("a2"))
            # they left on purpose (their records said draining): departures, not deaths
            counted = admin.hgetall(KEYS.reliability())
            assert "agents_dead_total" not in counted and counted["agents_departed_total"] == "2", counted
            assert not admin.exists(KEYS.lapsed_agents())
            refused = {(e["username"], e["object"]) for e in admin.acl_log()}
            assert refused == {("kcp-agent-a1", KEYS.agents()), ("kcp-agent-a2", KEYS.agents())}, (
                admin.acl_log()
            )
    finally:
        procs.stop()


@pytest.mark.integration
@pytest.mark.timeout(30)
def test_kcp_acl_apply_sets_users_on_a_live_server(
    redis_server_factory: RedisServerFactory, tmp_path: Path
) -> None:
    server = redis_server_factory()
    secrets = tmp_path / "secrets"
    argv = ["--redis-url", server.url, "acl", "--agent", "a1", "--apply", "--secrets-dir", str(secrets)]
    assert kcp_main(argv) == 0
    env = dict(line.split("=", 1) for line in (secrets / "kcp-agent-a1.env").read_text().splitlines())
    settings = Settings(
        redis_url=server.url,
        redis_username=env["KCP_REDIS_USERNAME"],
        redis_password=env["KCP_REDIS_PASSWORD"],
    )
    with redis.Redis.from_url(settings.redis_url) as a1:
        assert a1.acl_whoami() == "kcp-agent-a1"
        a1.set(KEYS.agent_lease("a1"), "1")
        assert _denied(lambda: a1.set(KEYS.agent_lease("a2"), "1"))
    # an unreachable server: exit 3, and the password never appears in the message
    assert (
        kcp_main(["--redis-url", "redis://admin:hunter2@127.0.0.1:1/0", "acl", "--agent", "a1", "--apply"])
        == 3
    )


@pytest.mark.integration
@pytest.mark.timeout(30)
def test_command_format_pipes_into_redis_cli(
    redis_server_factory: RedisServerFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    if shutil.which("redis-cli") is None:
        pytest.skip("redis-cli is not installed")
    server = redis_server_factory()
    assert kcp_main(["acl", "--agent", "a1", "--format", "commands"]) == 0
    commands = capsys.readouterr().out
    out = subprocess.run(
        ["redis-cli", "-h", server.host, "-p", str(server.port)],
        input=commands,
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout
    assert out.split() == ["OK"] * 3, out  # every line is a command
    with redis.Redis.from_url(server.url, decode_responses=True) as admin:
        rules = admin.acl_getuser("kcp-agent-a1")
        assert "~kcp:agent:a1:lease" in rules["keys"] and rules["selectors"], rules


@pytest.mark.integration
@pytest.mark.redis_cluster
@pytest.mark.timeout(30)
def test_kcp_acl_apply_on_a_redis_cluster_sets_the_users_on_every_node(
    redis_cluster: RedisClusterProcess, redis_cluster_url: str, tmp_path: Path
) -> None:
    secrets = tmp_path / "secrets"
    argv = [
        "--redis-url",
        redis_cluster_url,
        "acl",
        "--agent",
        "a1",
        "--apply",
        "--secrets-dir",
        str(secrets),
    ]
    try:
        assert kcp_main(argv) == 0
        users = {u.name for u in build_users(KEYS, ["a1"])}
        for node in redis_cluster.nodes:  # ACL users are per node: masters and replicas alike
            with redis.Redis.from_url(node.url, decode_responses=True) as admin:
                assert users <= set(admin.acl_users()), node.port
        env = dict(line.split("=", 1) for line in (secrets / "kcp-agent-a1.env").read_text().splitlines())
        user_url = redis_cluster_url.replace(
            "redis+cluster://", f"redis+cluster://{env['KCP_REDIS_USERNAME']}:{env['KCP_REDIS_PASSWORD']}@"
        )
        with connect_sync(user_url) as a1:
            a1.set(KEYS.agent_lease("a1"), "1")
            a1.sadd(KEYS.agents(), "a1")
            assert _denied(lambda: a1.set(KEYS.agent_lease("a2"), "1"))
    finally:
        for node in redis_cluster.nodes:
            with redis.Redis.from_url(node.url, decode_responses=True) as admin:
                for name in admin.acl_users():
                    if name.startswith("kcp-"):
                        admin.acl_deluser(name)
