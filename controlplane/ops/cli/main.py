"""`kcp`: run the stack, manage clusters, dispatch, inspect.

    kcp up                      local stack (embedded Redis if none answers), Ctrl-C stops it
    kcp serve                   the control-plane service
    kcp agent --slots 4         a kernel agent on this host
    kcp cluster create NAME --kernels 3 | list | scale NAME N | destroy NAME
    kcp dispatch CLUSTER '{"type": "PING"}' [--kernel worker-1]
    kcp metrics CLUSTER | status | top | demo
    kcp bus publish TOPIC JSON [--to KERNEL] | tail TOPIC|inbox:KERNEL|dead | stats
    kcp slots [balance [--dry-run] [--ratio 1.25] | move CLUSTER --to MASTER]   on a Redis Cluster
    kcp serve --metrics-port 9464   ... with Prometheus /metrics
    kcp mcp [--transport http]      the cluster tools for AI assistants (Model Context Protocol)

Human-readable output by default; `--json` for scripts, errors included: an object with
`error`, `error_type` and `exit_code` on stdout. Exit codes, one per thing to fix:

    0  ok
    1  the operation failed (e.g. the kernel reported an error; Redis refused a command)
    2  bad input (arguments, settings, a request, a Redis URL)
    3  Redis unavailable (not running, unreachable, loading) or read-only (a replica, a failover)
    4  authentication failed: the user name or password (KCP_REDIS_USERNAME/_PASSWORD, the URL)
    5  permission denied: the ACL user may not run the command or touch the key (`kcp acl`)
    6  wrong data: a key holds a type or value kcp did not write (another app on the prefix?)
    7  cluster create/scale: the kernels were not all placed and running in time (reason given)

`kcp serve` and `kcp agent` exit at start-up with 2 for a URL they cannot parse and 4/5 when
Redis refuses their credentials; an unreachable Redis they wait for (logged once per change).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import NoReturn

import pydantic

from controlplane.client.core import KcpClient
from controlplane.errors import EXIT_BAD_INPUT, KcpError
from controlplane.lifecycle import finish
from controlplane.ops.acl import add_arguments as add_acl_arguments
from controlplane.ops.acl import run as run_acl
from controlplane.ops.cli.output import fail, non_negative_int, port, report_error
from controlplane.redis.connect import connect, wait_for_redis
from controlplane.redis.retry import best_effort
from controlplane.settings import Settings, explain_settings_error

logger = logging.getLogger(__name__)


class UsageError(Exception):
    """A flag or argument argparse refused; reported like every other bad input."""

    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message)
        self.parser = parser


class Parser(argparse.ArgumentParser):
    """argparse, but a refused argument raises `UsageError` instead of exiting, so that
    `--json` gets its error object too."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(self, message)


def _run_client(
    args: argparse.Namespace, fn: Callable[[argparse.Namespace, KcpClient], Awaitable[int]]
) -> int:
    async def go() -> int:
        async with KcpClient(args.settings) as kcp:
            return await fn(args, kcp)

    return asyncio.run(go())


# ------------------------------------------------------------------ daemons
#: How often the leading `kcp serve` looks for clusters with deferred arq jobs, seconds.
DEFERRED_RESCAN_S = 2.0


async def _move_deferred(settings: Settings, leading: Callable[[], bool], stop: asyncio.Event) -> None:
    """While this `kcp serve` leads, route every cluster's due deferred arq jobs (docs/arq.md):
    they run at their time even when the client that deferred them is gone."""
    async with KcpClient(settings) as kcp:
        while not stop.is_set():
            if leading():
                async with best_effort():
                    await kcp.watch_all_deferred()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), DEFERRED_RESCAN_S)


def _serve(args: argparse.Namespace) -> int:
    from controlplane.ops.exporter.core import serve_metrics
    from controlplane.service import ControlPlane

    async def go() -> int:
        redis = connect(args.settings.redis_url)
        plane = ControlPlane(redis, args.settings)
        stop = asyncio.Event()

        def on_signal() -> None:
            stop.set()
            plane.request_stop()

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        try:
            async with serve_metrics(  # a port taken is bad input, found at once
                redis,
                args.settings,
                port=args.metrics_port,
                host=args.metrics_host,
                leader=lambda: plane.lease.leading,
            ):
                if await wait_for_redis(redis, log=logger, what="kcp serve", stop=stop):
                    mover = asyncio.create_task(
                        _move_deferred(args.settings, lambda: plane.lease.leading, stop)
                    )
                    try:
                        await plane.run()
                    finally:
                        stop.set()
                        await finish(mover, grace=2.0)
        finally:
            await redis.aclose()
        return 0

    return asyncio.run(go())


def _up(args: argparse.Namespace) -> int:
    from controlplane.ops.stack import LocalStack

    stack = LocalStack(
        args.settings,
        agents=args.agents,
        slots=args.slots,
        log_level=args.log_level,
        handlers=tuple(args.handlers),
    )
    stop = False

    def on_signal(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with stack:
        where = {"redis_url": stack.redis_url, "agents": args.agents, "slots": args.slots}
        print(  # one line with --json, for a script that reads it and goes on
            json.dumps(where)
            if args.json
            else f"kcp up: Redis {stack.redis_url}, control plane, {args.agents} agents x {args.slots} "
            f"slots. Ctrl-C stops everything.\n  export KCP_REDIS_URL={stack.redis_url}",
            flush=True,
        )
        while not stop and all(p.poll() is None for p in stack.procs):
            time.sleep(0.2)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from controlplane.ops.demo import run_demo

    return run_demo(args.settings, redis_url_given=args.redis_url is not None)


# ------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    from controlplane.ops.cli.bus import add_arguments as add_bus_arguments
    from controlplane.ops.cli.client import (
        add_cluster_arguments,
        add_dispatch_arguments,
        add_metrics_arguments,
    )
    from controlplane.ops.cli.slots import add_arguments as add_slots_arguments
    from controlplane.ops.cli.top import add_top_arguments
    from kernel_agent.agent.main import add_arguments as add_agent_arguments

    # The common options work before or after the subcommand (`kcp agent --redis-url URL`);
    # SUPPRESS keeps a subcommand's parser from overwriting what was given before it.
    common = Parser(add_help=False)
    common.add_argument(
        "--redis-url",
        default=argparse.SUPPRESS,
        help="Redis URL (default: $KCP_REDIS_URL or redis://127.0.0.1:6379/0); "
        "give a password in $KCP_REDIS_PASSWORD, not here: command lines are public",
    )
    common.add_argument(
        "--prefix", default=argparse.SUPPRESS, help="key prefix (default: $KCP_PREFIX or kcp:)"
    )
    common.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="machine-readable output; errors too: {error, error_type, exit_code} on stdout",
    )
    common.add_argument(
        "--log-level",
        default=argparse.SUPPRESS,
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        type=str.upper,
        help="default: INFO for serve/agent/up, WARNING otherwise",
    )
    p = Parser(
        prog="kcp",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add = functools.partial(sub.add_parser, parents=[common])

    up = add("up", help="run a local stack: Redis if none answers, the service, agents")
    up.add_argument("--agents", type=non_negative_int, default=3, help="agents to start (default 3)")
    up.add_argument(
        "--slots", type=non_negative_int, default=4, help="kernel slots of each agent (default 4)"
    )
    up.add_argument(
        "--handlers",
        action="append",
        default=[],
        help="module with register(registry) adding syscalls, given to every agent (repeatable)",
    )
    serve = add("serve", help="run the control-plane service (several may run: one leads)")
    serve.add_argument("--metrics-port", type=port, help="serve Prometheus /metrics on this port")
    serve.add_argument("--metrics-host", default="0.0.0.0", help="address for /metrics (default 0.0.0.0)")
    agent = add("agent", help="run a kernel agent on this host")
    add_agent_arguments(agent, common=False)

    add_cluster_arguments(add("cluster", help="create, list, scale, destroy clusters"), common)
    add_dispatch_arguments(add("dispatch", help="run one syscall on a cluster (--help lists them)"))
    add_metrics_arguments(add("metrics", help="a cluster's dispatch, error, latency and load figures"))
    add("status", help="agents, clusters, kernels: one-shot tables")
    add_top_arguments(add("top", help="live view of clusters, kernels and events (refreshes in place)"))
    add("demo", help="a real local stack, a cluster, a few hundred dispatches, scaling")
    add_bus_arguments(add("bus", help="inter-kernel bus: publish, tail a stream, stats"), common)
    add_slots_arguments(
        add("slots", help="Redis Cluster: kcp clusters per master; balance them over the masters"), common
    )
    add_acl_arguments(add("acl", help="Redis ACL users for the service, clients and each agent"))
    from controlplane.ops.mcp import add_arguments as add_mcp_arguments

    add_mcp_arguments(add("mcp", help="serve the cluster tools to AI assistants over MCP (docs/mcp.md)"))
    return p


def _given(argv: list[str] | None, flag: str) -> bool:
    return flag in (sys.argv[1:] if argv is None else argv)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        args = argparse.Namespace(json=_given(argv, "--json"))
        if not args.json:
            exc.parser.print_usage(sys.stderr)
        return fail(args, f"{exc} (see `{exc.parser.prog} --help`)", "UsageError", EXIT_BAD_INPUT)
    for name, default in (("redis_url", None), ("prefix", None), ("json", False), ("log_level", None)):
        setattr(args, name, getattr(args, name, default))  # SUPPRESSed when not given anywhere
    args.log_level = args.log_level or ("INFO" if args.command in ("serve", "agent", "up") else "WARNING")
    if args.command != "agent":
        logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    overrides = {k: v for k, v in (("redis_url", args.redis_url), ("prefix", args.prefix)) if v}
    try:
        args.settings = Settings(**overrides)
    except pydantic.ValidationError as exc:
        return fail(
            args, f"invalid settings: {explain_settings_error(exc)}", "InvalidSettings", EXIT_BAD_INPUT
        )
    try:
        return _command(args)
    except KcpError as exc:
        return report_error(exc, args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `kcp bus tail events | head`: the reader is gone, and so is stdout
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a shell reports SIGPIPE


def _command(args: argparse.Namespace) -> int:
    from controlplane.ops.cli.client import cluster_command, dispatch_command, metrics_command
    from controlplane.ops.cli.top import status_command, top_command

    if args.command == "acl":
        return run_acl(args, args.settings)
    if args.command == "agent":
        from kernel_agent.agent.main import run as run_agent

        return run_agent(args)
    if args.command == "bus":
        from controlplane.ops.cli.bus import run as run_bus

        return run_bus(args)
    if args.command == "slots":
        from controlplane.ops.cli.slots import run as run_slots

        return run_slots(args)
    if args.command == "mcp":
        from controlplane.ops.mcp import run as run_mcp

        return run_mcp(args)
    daemons: dict[str, Callable[[argparse.Namespace], int]] = {"serve": _serve, "up": _up, "demo": _demo}
    if args.command in daemons:
        return daemons[args.command](args)
    commands = {
        "cluster": cluster_command,
        "dispatch": dispatch_command,
        "metrics": metrics_command,
        "status": status_command,
        "top": top_command,
    }
    return _run_client(args, commands[args.command])
