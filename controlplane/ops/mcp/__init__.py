"""`kcp mcp`: the spec's OrchestrationTools as a Model Context Protocol server, for AI assistants.

    kcp mcp                                         stdio (what a desktop assistant launches)
    KCP_MCP_TOKEN=... kcp mcp --transport http --host 0.0.0.0 --port 8765
                                                    streamable HTTP at http://HOST:PORT/mcp

`tools.py` holds the tools (the spec's six methods and what an agent running clusters needs
besides), `serve.py` the transports and the bearer token. The MCP SDK (the `mcp` extra) is
imported only when the command runs, so the rest of kcp works without it. docs/mcp.md has the
assistant configuration and the security model.
"""

from __future__ import annotations

import argparse
import sys

from controlplane.ops.explain import EXIT_FAILED

#: Port of `kcp mcp --transport http` unless given.
DEFAULT_PORT = 8765


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--transport",
        choices=("stdio", "http"),
        default="stdio",
        help="stdio (default: an assistant launches `kcp mcp`) or streamable HTTP at http://HOST:PORT/mcp",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address for --transport http (default 127.0.0.1; any other needs KCP_MCP_TOKEN)",
    )
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port for --transport http (default {DEFAULT_PORT})"
    )


def run(args: argparse.Namespace) -> int:
    """`kcp mcp`: serve until the client hangs up (stdio) or SIGINT/SIGTERM (http)."""
    try:
        from controlplane.ops.mcp.serve import main
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.partition(".")[0] not in ("mcp", "uvicorn", "starlette"):
            raise
        print(
            "kcp mcp: the MCP SDK is not installed: pip install 'kernel-controlplane[mcp]'", file=sys.stderr
        )
        return EXIT_FAILED
    return main(args)
