"""Every `kcp` subcommand with good and malformed input, against a real Redis, `kcp serve` and two
agents: the exit code documented for it, no traceback, and `--json` output (errors included)
that parses. The table runs `main(argv)` in-process (what `python -m controlplane.ops.cli`
runs); a few real subprocesses check what only a process shows: the exit status, stray log
lines, start-up behaviour of `kcp serve` and `kcp agent`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from conftest import ProcessStack

from controlplane.errors import (
    EXIT_AUTH,
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_NOT_PLACED,
    EXIT_REDIS,
)
from controlplane.ops.cli.main import main
from controlplane.ops.redis_server import RedisServerProcess, free_port, start_redis_server

pytestmark = [pytest.mark.system, pytest.mark.timeout(60)]

ROOT = Path(__file__).resolve().parents[2]
OK = 0


@pytest.fixture(scope="module")
def stack_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private Redis with `kcp serve`, agents a1 and a2 (2 slots each) and cluster `compute`
    (2 kernels): 2 slots stay free."""
    with start_redis_server(data_dir=tmp_path_factory.mktemp("cli-redis")) as server:
        procs = ProcessStack(server.url)
        procs.serve()
        procs.agent("a1", 2)
        procs.agent("a2", 2)
        try:
            assert main(["--redis-url", server.url, "cluster", "create", "compute", "--kernels", "2"]) == 0
            yield server.url
        finally:
            procs.stop()


@dataclass(frozen=True)
class Case:
    argv: tuple[str, ...]
    code: int
    says: str = ""  # in stdout or stderr
    cleanup: tuple[str, ...] = ()  # argv run after the case (and after its --json run)
    json: bool = True  # also run it with --json: one object (or one per line) on stdout


def case(
    *argv: str, code: int = OK, says: str = "", cleanup: tuple[str, ...] = (), json: bool = True
) -> Case:
    return Case(argv, code, says, cleanup, json)


CASES = [
    # cluster create: placement waited for, and its failure told with the reason
    case(
        "cluster",
        "create",
        "small",
        code=OK,
        says="1/1 kernels running",
        cleanup=("cluster", "destroy", "small"),
    ),
    case(
        "cluster",
        "create",
        "big",
        "--kernels",
        "5",
        "--config",
        '{"max_kernels": 20}',
        code=EXIT_NOT_PLACED,
        says="2 of 5 placed: no agent has a free slot; free slots: 0 on 2 agents",
        cleanup=("cluster", "destroy", "big"),
    ),
    case(
        "cluster",
        "create",
        "gpu",
        "--config",
        '{"capabilities": ["gpu"]}',
        code=EXIT_NOT_PLACED,
        says="0 of 1 placed: no agent offers capability gpu",
        cleanup=("cluster", "destroy", "gpu"),
        json=False,  # the --json error of a placement is the case above's
    ),
    case(
        "cluster",
        "create",
        "later",
        "--no-wait",
        "--config",
        '{"capabilities": ["gpu"]}',
        says="0/1 kernels running",
        cleanup=("cluster", "destroy", "later"),
    ),
    case(
        "--prefix",
        "nobody:",
        "cluster",
        "create",
        "lonely",
        "--timeout",
        "3.5",
        code=EXIT_NOT_PLACED,
        says="none placed: no `kcp serve` leads on this Redis and prefix",
        json=False,
    ),
    case("cluster", "create", "compute", code=EXIT_FAILED, says="already exists"),
    case("cluster", "create", "bad:name", code=EXIT_BAD_INPUT, says="invalid"),
    case("cluster", "create", "x", "--kernels", "three", code=EXIT_BAD_INPUT, says="invalid int value"),
    case(
        "cluster", "create", "x", "--kernels", "-1", code=EXIT_BAD_INPUT, says="outside this cluster's bounds"
    ),
    case(
        "cluster", "create", "x", "--config", "{bad", code=EXIT_BAD_INPUT, says="--config is not valid JSON"
    ),
    case(
        "cluster",
        "create",
        "x",
        "--config",
        "[1]",
        code=EXIT_BAD_INPUT,
        says="--config must be a JSON object",
    ),
    case("cluster", "create", "x", "--config", '{"nope": 1}', code=EXIT_BAD_INPUT, says="nope"),
    case("cluster", "create", "x", "--timeout", "-1", code=EXIT_BAD_INPUT, says="seconds >= 0"),
    case("cluster", "create", code=EXIT_BAD_INPUT, says="required: name"),
    case("cluster", code=EXIT_BAD_INPUT, says="required"),
    case("cluster", "list", says="compute"),
    # cluster scale / destroy
    case(
        "cluster",
        "scale",
        "compute",
        "3",
        says="2 -> 3 kernels, 3 running",
        cleanup=("cluster", "scale", "compute", "2"),
    ),
    case("cluster", "scale", "absent", "3", code=EXIT_FAILED, says="does not exist"),
    case("cluster", "scale", "compute", "many", code=EXIT_BAD_INPUT, says="invalid int value"),
    case("cluster", "scale", "compute", "0", code=EXIT_BAD_INPUT, says="outside this cluster's bounds"),
    case("cluster", "destroy", "absent", code=EXIT_FAILED, says="does not exist"),
    case("cluster", "destroy", "{x}", code=EXIT_BAD_INPUT, says="invalid"),
    # dispatch: pinning, READ's encodings, every problem listed
    case("dispatch", "compute", '{"type": "PING"}', says="ms)"),
    case("dispatch", "compute", "--kernel", "worker-0", '{"type": "WRITE", "address": 4096, "data": "hi!"}'),
    case(
        "dispatch",
        "compute",
        "--kernel",
        "worker-0",
        '{"type": "READ", "address": 4096, "size": 3}',
        says='"hi!"',
    ),
    case(
        "dispatch",
        "compute",
        '{"type": "READ", "address": 4096, "size": 3, "kernel": "worker-0"}',
        says="utf-8",
    ),
    case(
        "dispatch",
        "compute",
        "--kernel",
        "worker-0",
        "--encoding",
        "base64",
        '{"type": "READ", "address": 4096, "size": 3}',
        says="aGkh",
    ),
    case(
        "dispatch",
        "compute",
        "--kernel",
        "worker-1",
        '{"type": "READ", "address": 4096, "size": 3}',
        says="000000",
    ),
    case(
        "dispatch",
        "compute",
        '{"type": "READ"}',
        code=EXIT_BAD_INPUT,
        says="address is required; size is required",
    ),
    case("dispatch", "compute", "not json", code=EXIT_BAD_INPUT, says="not valid JSON"),
    case("dispatch", "compute", "[1, 2]", code=EXIT_BAD_INPUT, says="must be a JSON object"),
    case("dispatch", "compute", '{"type": "bad type!"}', code=EXIT_BAD_INPUT, says="type must be"),
    case(
        "dispatch",
        "compute",
        "--kernel",
        "bad name",
        '{"type": "PING"}',
        code=EXIT_BAD_INPUT,
        says="kernel name",
    ),
    case(
        "dispatch",
        "compute",
        "--kernel",
        "worker-0",
        '{"type": "PING", "kernel": "worker-1"}',
        code=EXIT_BAD_INPUT,
        says="disagree",
    ),
    case(
        "dispatch",
        "compute",
        '{"type": "PING", "kernel": 7}',
        code=EXIT_BAD_INPUT,
        says="kernel must be a string",
    ),
    case("dispatch", "compute", "--encoding", "latin-1", "{}", code=EXIT_BAD_INPUT, says="invalid choice"),
    case(
        "dispatch", "compute", "--kernel", "worker-9", '{"type": "PING"}', code=EXIT_FAILED, says="worker-9"
    ),
    case("dispatch", "absent", '{"type": "PING"}', code=EXIT_FAILED, says="does not exist"),
    # metrics, status, top
    case("metrics", "compute", says="MiB (0."),
    case("metrics", "absent", code=EXIT_FAILED, says="does not exist"),
    case("metrics", "no:such", code=EXIT_BAD_INPUT, says="invalid"),
    case("status", says=" MiB ("),
    case("top", "--once", says="EVENTS"),
    case("top", "--interval", "0", code=EXIT_BAD_INPUT, says="seconds > 0"),
    case("top", "--iterations", "-1", code=EXIT_BAD_INPUT, says=">= 0"),
    # bus
    case("bus", "publish", "events", '{"event": "ready"}', says="published 1 to events"),
    case("bus", "publish", "events", "{}", "--count", "0", code=EXIT_BAD_INPUT, says=">= 1"),
    case("bus", "publish", "nope", "{}", code=EXIT_BAD_INPUT, says="topic"),
    case("bus", "publish", "events", "[1]", code=EXIT_BAD_INPUT, says="JSON object"),
    case("bus", "publish", "data", "{}", "--to", "nobody", code=EXIT_BAD_INPUT, says="bus kernels: none"),
    case(
        "bus",
        "publish",
        "data",
        "{}",
        "--to",
        "worker-0",
        code=EXIT_BAD_INPUT,
        says="kernel of cluster compute",
    ),
    case(
        "bus",
        "publish",
        "data",
        "{}",
        "--to",
        "compute/worker-0",
        code=EXIT_BAD_INPUT,
        says="kcp dispatch compute",
    ),
    case("bus", "tail", "events", "--no-follow", says="ready"),
    case("bus", "tail", "inbox:bad name", "--no-follow", code=EXIT_BAD_INPUT, says="invalid"),
    case("bus", "tail", "events", "--last", "-1", code=EXIT_BAD_INPUT, says=">= 0"),
    case("bus", "stats", says="SUBSCRIBERS"),
    case("bus", code=EXIT_BAD_INPUT, says="required"),
    # slots: a single Redis has none (the Redis Cluster side: tests/ops/test_cli_slots.py)
    case("slots", code=EXIT_BAD_INPUT, says="there are no slots to spread"),
    case("slots", "balance", "--dry-run", code=EXIT_BAD_INPUT, says="there are no slots to spread"),
    case("slots", "balance", "--ratio", "0.5", code=EXIT_BAD_INPUT, says="expected a ratio >= 1"),
    # acl, and the daemons' bad input (they never start)
    case("acl", "--agent", "a1", says="ACL SETUSER"),
    case("acl", "--format", "ldif", code=EXIT_BAD_INPUT, says="invalid choice"),
    case("acl", "--format", "aclfile", code=EXIT_BAD_INPUT, says="needs --secrets-dir"),
    case("agent", "--slots", "-1", code=EXIT_BAD_INPUT, says="slots"),
    case("agent", "--labels", "{bad", code=EXIT_BAD_INPUT, says="invalid agent configuration"),
    case("agent", "--handlers", "nosuch.module", code=EXIT_BAD_INPUT, says="cannot import handler module"),
    case("agent", "--handlers", "json", code=EXIT_BAD_INPUT, says="has no register(registry)"),
    case("serve", "--metrics-port", "70000", code=EXIT_BAD_INPUT, says="TCP port"),
    case("demo", "--redis-url", "http://x", code=EXIT_BAD_INPUT, says="redis_url must be a URL"),
    case("up", "--agents", "x", code=EXIT_BAD_INPUT, says="expected a whole number"),
    case("up", "--slots", "-2", code=EXIT_BAD_INPUT, says=">= 0"),
    case("nosuch", code=EXIT_BAD_INPUT, says="invalid choice"),
    case("--log-level", "LOUD", "status", code=EXIT_BAD_INPUT, says="invalid choice"),
    case("--prefix", "no spaces", "status", code=EXIT_BAD_INPUT, says="prefix must be"),
]


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("c", CASES, ids=lambda c: " ".join(c.argv)[:60])
def test_each_subcommand(c: Case, stack_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--redis-url", stack_url]
    code, out, err = _run([*base, *c.argv], capsys)
    assert code == c.code, f"exit {code}, expected {c.code}\nstdout: {out}\nstderr: {err}"
    assert "Traceback" not in out + err
    assert c.says in out + err, f"{c.says!r} not in\nstdout: {out}\nstderr: {err}"
    if c.code != OK:
        assert err.rstrip().splitlines()[-1].startswith("kcp: "), err  # one line saying what to fix
    if c.cleanup:
        assert main([*base, *c.cleanup]) == 0
        capsys.readouterr()
    if not c.json:
        return
    code, out, err = _run([*base, "--json", *c.argv], capsys)
    assert code == c.code, f"--json: exit {code}\nstdout: {out}\nstderr: {err}"
    assert "Traceback" not in out + err
    if c.code != OK:
        error = json.loads(out)
        assert error["exit_code"] == c.code and error["error"] and error["error_type"], error
        assert c.says in error["error"], error
    elif c.argv[:2] in (("bus", "tail"), ("top", "--once")) or c.argv[0] == "acl":
        assert out.strip(), "no output"
        for line in out.strip().splitlines() if c.argv[0] != "acl" else [out]:
            json.loads(line)
    else:
        json.loads(out)
    if c.cleanup:
        assert main([*base, *c.cleanup]) == 0


def test_json_frames_of_top_and_read_data_for_scripts(
    stack_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--redis-url", stack_url, "--json"]
    code, out, _ = _run([*base, "top", "--iterations", "2", "--interval", "0.05"], capsys)
    frames = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(frames) == 2
    [compute] = [c for c in frames[-1]["clusters"] if c["name"] == "compute"]
    assert {k["name"] for k in compute["kernels"]} == {"worker-0", "worker-1"}
    assert {"agents", "events", "taken_at"} <= set(frames[-1])
    write = '{"type": "WRITE", "address": 8192, "data": "ok"}'
    code, out, _ = _run([*base, "dispatch", "compute", write], capsys)
    assert code == 0, out
    kernel = json.loads(out)["kernel"]
    code, out, _ = _run(
        [*base, "dispatch", "compute", "--kernel", kernel, '{"type": "READ", "address": 8192, "size": 2}'],
        capsys,
    )
    res = json.loads(out)
    assert res["kernel"] == kernel and res["result"]["data"] == "6f6b" and res["result"]["encoding"] == "hex"
    assert isinstance(res["latency_ms"], float) and 0 < res["latency_ms"] < 5000  # fractions of a ms too


def test_help_names_every_option_pinning_and_the_syscalls(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["dispatch", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for word in ("--kernel", "--encoding", "READ", "WRITE", "COMPUTE", "address, size", "requires"):
        assert word in text, word


# ------------------------------------------------------------------ real processes
def _kcp(*argv: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "controlplane.ops.cli", *argv],
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def locked_server(tmp_path: Path) -> Iterator[RedisServerProcess]:
    """A server whose `default` user needs the password `right` (requirepass)."""
    with start_redis_server(data_dir=tmp_path) as server:
        with redis.Redis.from_url(server.url) as admin:
            admin.config_set("requirepass", "right")
        yield server


def test_processes_exit_with_the_documented_code_and_one_line(locked_server: RedisServerProcess) -> None:
    """Started together (each `python -m` costs ~0.3 s): wrong credentials end `serve` and
    `agent` at start-up with 4, an unparsable URL with 2; a client against a dead port prints
    one line (no stray log line from a background task) and exits 3."""
    host = f"{locked_server.host}:{locked_server.port}"
    dead = f"redis://127.0.0.1:{free_port()}/0"
    runs = {
        "serve, wrong password": (_kcp("--redis-url", f"redis://:wrong@{host}/0", "serve"), EXIT_AUTH),
        "agent, no password": (_kcp("--redis-url", f"redis://{host}/0", "agent", "--name", "a"), EXIT_AUTH),
        "agent, password from env": (
            _kcp("--redis-url", f"redis://{host}/0", "agent", env={"KCP_REDIS_PASSWORD": "nope"}),
            EXIT_AUTH,
        ),
        "serve, http URL": (_kcp("--redis-url", "http://x", "serve"), EXIT_BAD_INPUT),
        "agent, bad port": (_kcp("--redis-url", "redis://h:port/0", "agent"), EXIT_BAD_INPUT),
        "client, dead Redis": (_kcp("--redis-url", dead, "cluster", "list"), EXIT_REDIS),
        "client, dead Redis, --json": (
            _kcp("--redis-url", dead, "--json", "dispatch", "c", '{"type": "PING"}'),
            EXIT_REDIS,
        ),
        "client, wrong password": (_kcp("--redis-url", f"redis://:wrong@{host}/0", "status"), EXIT_AUTH),
    }
    for what, (proc, code) in runs.items():
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == code, f"{what}: exit {proc.returncode}\n{err}"
        assert "Traceback" not in out + err, f"{what}: {err}"
        if "--json" in proc.args:
            assert json.loads(out)["exit_code"] == code and err == "", f"{what}: {out} {err}"
        else:
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("kcp: "), f"{what}: {err}"
        if code == EXIT_AUTH:
            assert "authentication failed" in err and "is Redis running" not in err, f"{what}: {err}"


def test_serve_waits_for_an_unreachable_redis_and_says_so_once() -> None:
    proc = _kcp("--redis-url", f"redis://127.0.0.1:{free_port()}/0", "serve")
    try:
        time.sleep(2.5)  # ~6 attempts with the back-off (0.1 s doubling to 2 s)
        assert proc.poll() is None, "kcp serve gave up on a Redis that may come back"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert err.count("waiting for Redis") == 1 and "Traceback" not in err, err


def test_up_starts_a_stack_tells_where_in_json_and_stops_on_sigterm(tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing answers: `kcp up` starts its own redis-server
    proc = _kcp("--redis-url", url, "--json", "up", "--agents", "1", "--slots", "1")
    try:
        assert proc.stdout is not None
        banner = json.loads(proc.stdout.readline())
        assert banner == {"redis_url": url, "agents": 1, "slots": 1}
        with redis.Redis.from_url(url) as r:
            assert r.ping()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:  # SIGTERM: a SIGKILL would leave its children running
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=30)
    assert proc.returncode == 0 and "Traceback" not in err, err


def test_a_reader_that_goes_away_ends_the_output_quietly(locked_server: RedisServerProcess) -> None:
    url = f"redis://:right@{locked_server.host}:{locked_server.port}/0"
    proc = _kcp("--redis-url", url, "--json", "top", "--iterations", "500", "--interval", "0.01")
    assert proc.stdout is not None and proc.stderr is not None
    json.loads(proc.stdout.readline())
    proc.stdout.close()  # as `| head -1` does
    err = proc.stderr.read()
    proc.stderr.close()
    assert proc.wait(timeout=30) == 141 and "Traceback" not in err, err
