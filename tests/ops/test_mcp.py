"""`kcp mcp` driven by the official MCP SDK's client (`ClientSession`) against a real stack:
over stdio (the client spawns `kcp mcp`) and over streamable HTTP behind a bearer token."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx2
import jsonschema
import pytest
from conftest import ProcessStack, RedisServerFactory
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client

from controlplane.ops.redis_server import free_port
from controlplane.redis.connect import connect_sync

pytestmark = [pytest.mark.system, pytest.mark.timeout(120)]

ROOT = str(Path(__file__).resolve().parents[2])
TOKEN = "test-token-0123456789abcdef"
TOOLS = {
    "create_cluster",
    "destroy_cluster",
    "list_clusters",
    "dispatch",
    "get_metrics",
    "scale_cluster",
    "cluster_status",
    "cluster_syscalls",
    "bus_publish",
    "send_direct",
    "bus_stats",
}


def kcp_mcp(redis_url: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "controlplane.ops.cli", "--redis-url", redis_url, "mcp", *args]


class Tools:
    """A `ClientSession` whose calls check both result channels agree."""

    def __init__(self, session: ClientSession) -> None:
        self.session = session

    async def call(self, tool: str, /, **arguments: Any) -> dict[str, Any]:
        result = await self.session.call_tool(tool, arguments)
        assert not result.is_error, f"{tool}: {result.content}"
        assert result.structured_content == json.loads(result.content[0].text)  # the same dict as text
        return result.structured_content

    async def error(self, tool: str, /, **arguments: Any) -> str:
        result = await self.session.call_tool(tool, arguments)
        assert result.is_error, f"{tool} did not fail: {result.structured_content}"
        return str(result.content[0].text)


@asynccontextmanager
async def over_stdio(redis_url: str) -> AsyncIterator[Tools]:
    params = StdioServerParameters(
        command=sys.executable,
        args=kcp_mcp(redis_url)[1:],
        env={"PYTHONPATH": ROOT, "KCP_READY_TIMEOUT": "30"},
    )
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        yield Tools(session)


@asynccontextmanager
async def over_http(url: str, token: str = TOKEN) -> AsyncIterator[Tools]:
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        httpx2.AsyncClient(headers=headers) as http,
        streamable_http_client(url, http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield Tools(session)


def wait_for_agents(redis_url: str, count: int) -> None:
    with connect_sync(redis_url) as client:  # redis:// or redis+cluster://
        deadline = time.monotonic() + 30
        while client.scard("kcp:agents") < count:
            assert time.monotonic() < deadline, f"{count} agents did not register"
            time.sleep(0.1)


# on the Redis Cluster too: every tool through `kcp mcp` (the weak-token refusal never reaches
# Redis, and the docs' snippets repeat these calls, so they stay single Redis to save time)
@pytest.mark.redis_cluster
async def test_stdio_session_runs_a_cluster_and_survives_bad_input(
    stack: ProcessStack, redis_url: str
) -> None:
    stack.serve()
    stack.agent("mcp-agent", slots=4)
    wait_for_agents(redis_url, 1)
    async with over_stdio(redis_url) as mcp:
        listed = {t.name: t for t in (await mcp.session.list_tools()).tools}
        assert set(listed) == TOOLS
        create = listed["create_cluster"].input_schema
        assert create["required"] == ["name"] and create["properties"]["kernel_count"]["default"] == 1
        config = create["properties"]["config"]["anyOf"][0]
        assert {"min_kernels", "max_kernels", "auto_scale", "scale_up_threshold"} <= set(config["properties"])
        request = listed["dispatch"].input_schema["properties"]["request"]
        variants = {v["title"]: v for v in request["anyOf"]}
        assert set(variants) >= {"READ", "WRITE", "ALLOC", "FREE", "OPEN", "CLOSE", "PING", "COMPUTE"}
        assert variants["READ"]["required"] == ["type", "address", "size"]
        schema = listed["dispatch"].input_schema
        jsonschema.validate({"cluster": "c", "request": {"type": "READ", "address": 0, "size": 4}}, schema)
        jsonschema.validate({"cluster": "c", "request": {"type": "INFER", "prompt": "hi"}}, schema)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({"cluster": "c", "request": {"type": "READ", "size": 4}}, schema)
        hints = {name: tool.annotations for name, tool in listed.items()}
        for name in ("list_clusters", "get_metrics", "cluster_status", "cluster_syscalls", "bus_stats"):
            assert hints[name].read_only_hint is True, name
        assert hints["destroy_cluster"].destructive_hint and hints["destroy_cluster"].idempotent_hint
        assert hints["scale_cluster"].destructive_hint and hints["scale_cluster"].idempotent_hint
        assert (
            hints["create_cluster"].destructive_hint is False and not hints["create_cluster"].read_only_hint
        )

        created = await mcp.call("create_cluster", name="mcp", kernel_count=2, config={"max_kernels": 4})
        assert created | {"status": "running"} == {
            "success": True,
            "cluster_name": "mcp",
            "kernel_count": 2,
            "status": "running",
            "running": 2,
        }
        syscalls = {s["name"]: s for s in (await mcp.call("cluster_syscalls", cluster="mcp"))["syscalls"]}
        assert syscalls["READ"]["kernels"] == ["worker-0", "worker-1"]
        assert syscalls["READ"]["arguments"]["required"] == ["address", "size"]

        wrote = await mcp.call(
            "dispatch", cluster="mcp", request={"type": "WRITE", "address": 4096, "data": "hello"}
        )
        kernel = wrote["kernel"]
        read = await mcp.call(
            "dispatch", cluster="mcp", request={"type": "READ", "address": 4096, "size": 5, "kernel": kernel}
        )
        assert (read["success"], read["kernel"], read["result"]["data"]) == (True, kernel, b"hello".hex())
        metrics = (await mcp.call("get_metrics", cluster="mcp"))["metrics"]
        assert metrics["cluster_name"] == "mcp" and metrics["total_dispatches"] >= 2
        status = (await mcp.call("cluster_status", cluster="mcp"))["cluster"]
        assert sorted(k["name"] for k in status["kernels"]) == ["worker-0", "worker-1"]
        assert all("load" in k for k in status["kernels"])

        # bad inputs: a tool error with the CLI's message, and the session goes on
        assert "kernel_count -3 is outside this cluster's bounds" in await mcp.error(
            "create_cluster", name="neg", kernel_count=-3
        )
        assert "cluster 'ghost' does not exist" in await mcp.error(
            "dispatch", cluster="ghost", request={"type": "PING"}
        )
        assert "NOSUCH" in await mcp.error("dispatch", cluster="mcp", request={"type": "NOSUCH"})
        assert "READ: size must be between 1 and 65536 (got 0)" in await mcp.error(
            "dispatch", cluster="mcp", request={"type": "READ", "address": 0, "size": 0}
        )
        assert "type is required" in await mcp.error("dispatch", cluster="mcp", request={"address": 0})
        assert "request" in await mcp.error("dispatch", cluster="mcp", request=[1, 2])
        assert "target_count 99 is outside" in await mcp.error(
            "scale_cluster", cluster="mcp", target_count=99
        )

        up = await mcp.call("scale_cluster", cluster="mcp", target_count=3)
        assert (up["previous_count"], up["new_count"]) == (2, 3)
        down = await mcp.call("scale_cluster", cluster="mcp", target_count=1)
        assert (down["previous_count"], down["new_count"]) == (3, 1)
        listing = await mcp.call("list_clusters")
        assert (listing["count"], listing["clusters"][0]["kernel_count"]) == (1, 1)
        resource = await mcp.session.read_resource("kcp://clusters/mcp")
        assert json.loads(resource.contents[0].text)["desired"] == 1

        assert await mcp.call("destroy_cluster", name="mcp") == {"success": True, "cluster_name": "mcp"}
        assert (await mcp.call("list_clusters"))["count"] == 0


def wait_listening(proc: subprocess.Popen[bytes], port: int) -> None:
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None, "kcp mcp exited"
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        assert time.monotonic() < deadline, "kcp mcp --transport http did not listen"
        time.sleep(0.1)


@pytest.fixture
def http_server(redis_server_factory: RedisServerFactory) -> Iterator[tuple[str, Any]]:
    """`kcp mcp --transport http` with a token, and a stack, on a Redis of its own (restartable, AOF)."""
    server = redis_server_factory(appendonly=True)
    stack = ProcessStack(server.url)
    stack.serve()
    stack.agent("http-agent", slots=2)
    port = free_port()
    proc = subprocess.Popen(
        kcp_mcp(server.url, "--transport", "http", "--port", str(port)),
        env={**os.environ, "PYTHONPATH": ROOT, "KCP_MCP_TOKEN": TOKEN},
    )
    try:  # a failed setup stops them too: left running, they would join the next server on the port
        wait_listening(proc, port)
        wait_for_agents(server.url, 1)
        yield f"http://127.0.0.1:{port}/mcp", server
    finally:
        proc.terminate()
        stack.stop()
        assert proc.wait(15) == 0


async def test_http_needs_the_token_and_outlives_a_redis_restart(http_server: tuple[str, Any]) -> None:
    url, server = http_server
    initialize = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "t", "version": "0"},
        },
    }
    accept = {"Accept": "application/json, text/event-stream"}
    async with httpx2.AsyncClient() as http:
        for auth in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": TOKEN}):
            response = await http.post(url, json=initialize, headers=accept | auth)
            assert response.status_code == 401, (auth, response.text)
            assert response.headers["www-authenticate"].startswith("Bearer")

    async with over_http(url) as mcp:
        assert (await mcp.call("create_cluster", name="web"))["running"] == 1
        ping = await mcp.call("dispatch", cluster="web", request={"type": "PING", "payload": {"n": 1}})
        assert (ping["kernel"], ping["result"]["payload"]) == ("worker-0", {"n": 1})
        published = await mcp.call("bus_publish", topic="events", payload={"event": "ready"})
        assert (published["success"], published["stream"], published["seq"]) == (True, "events", 1)
        assert "unknown topic 'nope'" in await mcp.error("bus_publish", topic="nope", payload={})
        assert "registered_kernels" in await mcp.call("bus_stats")

        server.kill()
        assert "is Redis running at" in await mcp.error("list_clusters")
        server.restart()
        listed = await mcp.call("list_clusters")  # the first call after the restart
        assert [c["name"] for c in listed["clusters"]] == ["web"]  # Redis's AOF kept it
        published = await mcp.call("bus_publish", topic="events", payload={"event": "back"})
        assert published["seq"] == 2


def test_http_refuses_a_weak_token(redis_url: str) -> None:
    # (an address beyond loopback without a token: test_docs_examples_run_as_written)
    run = subprocess.run(
        kcp_mcp(redis_url, "--transport", "http"),
        env=os.environ | {"PYTHONPATH": ROOT, "KCP_MCP_TOKEN": "short"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 2, run.stderr
    assert "must be at least 16 characters" in run.stderr and "Traceback" not in run.stderr


def doc_blocks(language: str) -> list[str]:
    text = (Path(ROOT) / "docs" / "mcp.md").read_text()
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.DOTALL)


@pytest.fixture
def kcp_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """`kcp` and `python` on PATH as a user has them, running this checkout; the environment."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    kcp = bin_dir / "kcp"
    kcp.write_text(f'#!/bin/sh\nPYTHONPATH={ROOT} exec {sys.executable} -m controlplane.ops.cli "$@"\n')
    kcp.chmod(0o755)
    (bin_dir / "python").symlink_to(sys.executable)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return {**os.environ, "PYTHONPATH": ROOT}


def run_python(code: str, env: dict[str, str]) -> str:
    run = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=90, check=False
    )
    assert run.returncode == 0, run.stderr
    return run.stdout


async def tool_names(params: StdioServerParameters) -> set[str]:
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        return {t.name for t in (await session.list_tools()).tools}


def test_docs_examples_run_as_written(
    stack: ProcessStack, redis_url: str, kcp_on_path: dict[str, str]
) -> None:
    """docs/mcp.md's snippets, as written but for the Redis URL (never the machine's Redis) and
    the HTTP port (a free one)."""
    stack.serve()
    stack.agent("docs-agent", slots=4)
    wait_for_agents(redis_url, 1)
    env = kcp_on_path | {"KCP_REDIS_URL": redis_url}

    # the assistant's configuration, launched as an assistant does
    entry = json.loads(doc_blocks("json")[0])["mcpServers"]["kcp"]
    params = StdioServerParameters(
        command=entry["command"], args=entry["args"], env=entry["env"] | {"KCP_REDIS_URL": redis_url}
    )
    assert asyncio.run(tool_names(params)) == TOOLS

    stdio_example, http_example = doc_blocks("python")
    out = run_python(stdio_example, env).splitlines()
    assert out[0] == str(sorted(TOOLS))
    assert out[1].startswith("{'success': True, 'cluster_name': 'compute', 'kernel_count': 2")
    assert out[2] == "{'address': 4096, 'size': 2, 'data': '6869'}"
    assert out[3].startswith("True Error executing tool scale_cluster: target_count -1 is outside")

    export, serve = doc_blocks("sh")[1].strip().splitlines()
    env["KCP_MCP_TOKEN"] = subprocess.run(
        ["sh", "-c", f'{export} && echo "$KCP_MCP_TOKEN"'],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert len(env["KCP_MCP_TOKEN"]) >= 32
    port = free_port()
    proc = subprocess.Popen(["sh", "-c", f"exec {serve.replace('8765', str(port))}"], env=env)
    try:
        wait_listening(proc, port)
        assert (
            run_python(http_example.replace("8765", str(port)), env).strip() == "{'clusters': [], 'count': 0}"
        )
    finally:
        proc.terminate()
        assert proc.wait(15) == 0

    refusal = subprocess.run(
        [*kcp_mcp(redis_url, "--transport", "http", "--host", "0.0.0.0")],
        env={k: v for k, v in env.items() if k != "KCP_MCP_TOKEN"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (refusal.returncode, refusal.stderr.strip()) == (2, doc_blocks("text")[0].strip())
