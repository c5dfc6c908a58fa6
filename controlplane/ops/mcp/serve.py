"""The transports of `kcp mcp`: stdio, and streamable HTTP behind a bearer token (`KCP_MCP_TOKEN`).

The token is checked by the SDK's bearer middleware through a `TokenVerifier` (constant-time
comparison); a request without it, or with another, gets 401 before any MCP message is read.
Serving HTTP on an address other than loopback without a token is refused.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import logging
import signal
import socket
import sys
from typing import Any

import pydantic
import uvicorn
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import MCPServer
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from controlplane.errors import InvalidRequest
from controlplane.ops.explain import EXIT_BAD_INPUT
from controlplane.ops.mcp.tools import KcpTools
from controlplane.ops.redis_server import is_loopback
from controlplane.settings import Settings, explain_settings_error

logger = logging.getLogger(__name__)

#: Shortest token accepted (a guessable token is no protection).
MIN_TOKEN_LENGTH = 16
PATH = "/mcp"
INSTRUCTIONS = (
    "kcp runs clusters of compute kernels spread over many hosts. list_clusters shows what exists; "
    "create_cluster and scale_cluster wait until the kernels run; cluster_syscalls says which "
    "requests a cluster's kernels execute and their fields; dispatch runs one. Memory is per "
    "kernel: to READ what a WRITE wrote, put the WRITE's kernel in the READ request "
    '("kernel": "worker-0"). A tool error says what to change.'
)


class McpSettings(BaseSettings):
    """`KCP_MCP_*` settings of `kcp mcp`."""

    model_config = SettingsConfigDict(env_prefix="KCP_MCP_", extra="ignore")

    token: SecretStr | None = Field(
        None, description="bearer token every HTTP request must carry (`Authorization: Bearer TOKEN`)"
    )

    @field_validator("token")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < MIN_TOKEN_LENGTH:
            raise ValueError(
                f"must be at least {MIN_TOKEN_LENGTH} characters: make one with "
                "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
            )
        return value


class StaticToken:
    """A `TokenVerifier` that accepts one token, compared in constant time."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    async def verify_token(self, token: str) -> AccessToken | None:
        if hmac.compare_digest(token.encode(), self._token):
            return AccessToken(token=token, client_id="kcp-mcp", scopes=[])
        return None


def build_server(kcp: KcpTools, *, token: str | None = None, url: str = "") -> MCPServer[Any]:
    """The MCP server with kcp's tools; with `token`, HTTP requests must carry it (`url`: the
    server's own address, named as the token's issuer: kcp serves no OAuth metadata)."""
    auth: dict[str, Any] = {}
    if token is not None:
        auth = {
            "token_verifier": StaticToken(token),
            "auth": AuthSettings(issuer_url=pydantic.AnyHttpUrl(url), resource_server_url=None),
        }
    server: MCPServer[Any] = MCPServer("kcp", instructions=INSTRUCTIONS, **auth)
    kcp.register(server)
    return server


def check_address(host: str, token: str | None) -> None:
    """Refuse to serve HTTP beyond this host without a token (InvalidRequest)."""
    if token is None and not is_loopback(host):
        raise InvalidRequest(
            f"refusing to serve MCP on {host} without a token: anyone who reaches it could run your "
            "clusters. Set KCP_MCP_TOKEN (docs/mcp.md), or serve on 127.0.0.1"
        )


def base_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except (OSError, OverflowError) as exc:  # taken, not an address of this host, not a port
        sock.close()
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise InvalidRequest(f"cannot serve MCP on {host}:{port}: {reason}") from None
    return sock


async def serve_http(server: MCPServer[Any], host: str, port: int, *, log_level: str) -> None:
    """Streamable HTTP at http://HOST:PORT/mcp until SIGINT or SIGTERM."""
    sock = _bind(host, port)
    app = server.streamable_http_app(streamable_http_path=PATH, host=host)
    config = uvicorn.Config(app, log_level=log_level.lower(), lifespan="on")
    # uvicorn re-raises the signal that stopped it once it has shut down; ignored, so the caller
    # still closes its Redis connections and returns
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    print(f"kcp mcp: serving {base_url(host, sock.getsockname()[1])}{PATH}", file=sys.stderr, flush=True)
    await uvicorn.Server(config).serve(sockets=[sock])


def main(args: argparse.Namespace) -> int:
    try:
        token_secret = McpSettings().token
    except pydantic.ValidationError as exc:
        print(f"kcp mcp: invalid KCP_MCP_* settings: {explain_settings_error(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    token = token_secret.get_secret_value() if token_secret is not None else None
    settings: Settings = args.settings

    async def go() -> None:
        kcp = KcpTools(settings)
        try:
            if args.transport == "stdio":
                await build_server(kcp).run_stdio_async()
            else:
                check_address(args.host, token)
                server = build_server(kcp, token=token, url=base_url(args.host, args.port))
                await serve_http(server, args.host, args.port, log_level=args.log_level)
        finally:
            await kcp.aclose()

    try:
        asyncio.run(go())
    except InvalidRequest as exc:
        print(f"kcp mcp: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0
