"""`kcp`: run the stack, manage clusters, dispatch, inspect.

    kcp up                      local stack (embedded Redis if none answers), Ctrl-C stops it
    kcp serve                   the control-plane service
    kcp agent --slots 4         a kernel agent on this host
    kcp cluster create NAME --kernels 3 | list | scale NAME N | destroy NAME
    kcp dispatch CLUSTER '{"type": "PING"}'
    kcp metrics CLUSTER | status | top | demo
    kcp bus publish TOPIC JSON [--to KERNEL] | tail TOPIC|inbox:KERNEL|dead | stats
    kcp serve --metrics-port 9464   ... with Prometheus /metrics
    kcp mcp [--transport http]      the cluster tools for AI assistants (Model Context Protocol)

Human-readable output by default, `--json` for scripts. Exit codes, one per thing to fix:

    0  ok
    1  the operation failed (e.g. the kernel reported an error; Redis refused a command)
    2  bad input (arguments, settings, a request)
    3  Redis unavailable (not running, unreachable, loading) or read-only (a replica, a failover)
    4  authentication failed: the user name or password (KCP_REDIS_USERNAME/_PASSWORD, the URL)
    5  permission denied: the ACL user may not run the command or touch the key (`kcp acl`)
    6  wrong data: a key holds a type or value kcp did not write (another app on the prefix?)
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable

import pydantic

from controlplane.client.core import KcpClient
from controlplane.errors import InvalidRequest, KcpError
from controlplane.ops.acl import add_arguments as add_acl_arguments
from controlplane.ops.acl import run as run_acl
from controlplane.ops.cli.output import EXIT_BAD_INPUT, emit, report_error, table
from controlplane.redis.connect import connect
from controlplane.settings import Settings, explain_settings_error


# ------------------------------------------------------------------ client commands
async def _cluster(args: argparse.Namespace, kcp: KcpClient) -> int:
    if args.action == "create":
        config = json.loads(args.config) if args.config else None
        info = await kcp.create_cluster(args.name, args.kernels, config)
        emit(
            args,
            info.model_dump(mode="json", exclude={"kernels"}),
            lambda d: f"cluster {d['name']}: {d['running']}/{d['desired']} kernels running ({d['status']})",
        )
    elif args.action == "list":
        clusters = [i.model_dump(mode="json", exclude={"kernels"}) for i in await kcp.list_clusters()]
        emit(
            args,
            clusters,
            lambda cs: (
                table(
                    [(c["name"], c["status"], f"{c['running']}/{c['desired']}", c["reason"]) for c in cs],
                    ("CLUSTER", "STATUS", "KERNELS", "REASON"),
                )
                if cs
                else "no clusters"
            ),
        )
    elif args.action == "scale":
        before, after = await kcp.scale_cluster(args.name, args.count)
        emit(
            args,
            {"cluster": args.name, "previous_count": before, "new_count": after},
            lambda d: f"cluster {d['cluster']}: {d['previous_count']} -> {d['new_count']} kernels",
        )
    else:
        await kcp.destroy_cluster(args.name)
        emit(
            args,
            {"cluster_name": args.name, "destroyed": True},
            lambda d: f"cluster {d['cluster_name']} destroyed",
        )
    return 0


async def _dispatch(args: argparse.Namespace, kcp: KcpClient) -> int:
    try:
        request = json.loads(args.request)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"request is not valid JSON: {exc}") from None
    res = await kcp.dispatch(args.cluster, request, kernel=args.kernel)
    emit(
        args,
        res.model_dump(),
        lambda d: f"{d['kernel']}@{d['epoch']} ({d['latency_ms']:.1f} ms): {json.dumps(d['result'])}",
    )
    return 0


async def _metrics(args: argparse.Namespace, kcp: KcpClient) -> int:
    m = (await kcp.get_metrics(args.cluster)).to_dict()
    emit(args, m, lambda d: "\n".join(f"{k:<18}{v}" for k, v in d.items()))
    return 0


def _run_client(
    args: argparse.Namespace, fn: Callable[[argparse.Namespace, KcpClient], Awaitable[int]]
) -> int:
    async def go() -> int:
        async with KcpClient(args.settings) as kcp:
            return await fn(args, kcp)

    try:
        return asyncio.run(go())
    except KcpError as exc:
        return report_error(exc, args.settings)


# ------------------------------------------------------------------ daemons
def _serve(args: argparse.Namespace) -> int:
    from controlplane.ops.exporter.core import serve_metrics
    from controlplane.service import ControlPlane

    async def go() -> int:
        redis = connect(args.settings.redis_url)
        plane = ControlPlane(redis, args.settings)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, plane.request_stop)
        try:
            async with serve_metrics(
                redis,
                args.settings,
                port=args.metrics_port,
                host=args.metrics_host,
                leader=lambda: plane.lease.leading,
            ):
                await plane.run()
        finally:
            await redis.aclose()
        return 0

    try:
        return asyncio.run(go())
    except InvalidRequest as exc:  # e.g. the metrics port is taken
        print(f"kcp serve: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


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
        print(
            f"kcp up: Redis {stack.redis_url}, control plane, {args.agents} agents x {args.slots} slots. "
            f"Ctrl-C stops everything.\n  export KCP_REDIS_URL={stack.redis_url}",
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
    from controlplane.ops.cli.top import add_top_arguments
    from kernel_agent.agent.main import add_arguments as add_agent_arguments

    # The common options work before or after the subcommand (`kcp agent --redis-url URL`);
    # SUPPRESS keeps a subcommand's parser from overwriting what was given before it.
    common = argparse.ArgumentParser(add_help=False)
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
        "--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output"
    )
    common.add_argument(
        "--log-level", default=argparse.SUPPRESS, help="default: INFO for serve/agent/up, WARNING otherwise"
    )
    p = argparse.ArgumentParser(
        prog="kcp",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    sub = p.add_subparsers(dest="command", required=True)
    add = functools.partial(sub.add_parser, parents=[common])

    up = add("up", help="run a local stack: Redis if none answers, the service, agents")
    up.add_argument("--agents", type=int, default=3)
    up.add_argument("--slots", type=int, default=4)
    up.add_argument("--handlers", action="append", default=[])
    serve = add("serve", help="run the control-plane service")
    serve.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    serve.add_argument("--metrics-host", default="0.0.0.0", help="address for /metrics (default 0.0.0.0)")
    agent = add("agent", help="run a kernel agent on this host")
    add_agent_arguments(agent, common=False)

    cluster = add("cluster", help="create, list, scale, destroy clusters")
    csub = cluster.add_subparsers(dest="action", required=True)
    add_action = functools.partial(csub.add_parser, parents=[common])
    create = add_action("create")
    create.add_argument("name")
    create.add_argument("--kernels", type=int, default=1)
    create.add_argument("--config", help='JSON, e.g. {"max_kernels": 20}')
    add_action("list")
    scale = add_action("scale")
    scale.add_argument("name")
    scale.add_argument("count", type=int)
    destroy = add_action("destroy")
    destroy.add_argument("name")

    dispatch = add("dispatch", help="run one request on a cluster")
    dispatch.add_argument("cluster")
    dispatch.add_argument("request", help='JSON, e.g. {"type": "PING"}')
    dispatch.add_argument(
        "--kernel", help="pin it to a kernel, NAME, or to one incarnation of it, NAME@EPOCH (as printed)"
    )
    metrics = add("metrics", help="cluster metrics")
    metrics.add_argument("cluster")
    add("status", help="agents, clusters, kernels: one-shot table")
    add_top_arguments(add("top", help="live view of clusters, kernels and events (refreshes in place)"))
    add("demo", help="a real local stack, a cluster, a few hundred dispatches, scaling")
    from controlplane.ops.cli.bus import add_arguments as add_bus_arguments

    add_bus_arguments(add("bus", help="inter-kernel bus: publish, tail a stream, stats"), common)
    add_acl_arguments(add("acl", help="Redis ACL users for the service, clients and each agent"))
    from controlplane.ops.mcp import add_arguments as add_mcp_arguments

    add_mcp_arguments(add("mcp", help="serve the cluster tools to AI assistants over MCP (docs/mcp.md)"))
    return p


def main(argv: list[str] | None = None) -> int:
    from controlplane.ops.cli.top import status_command, top_command

    parser = build_parser()
    args = parser.parse_args(argv)
    for name, default in (("redis_url", None), ("prefix", None), ("json", False), ("log_level", None)):
        setattr(args, name, getattr(args, name, default))  # SUPPRESSed when not given anywhere
    args.log_level = args.log_level or ("INFO" if args.command in ("serve", "agent", "up") else "WARNING")
    if args.command != "agent":
        logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    overrides = {k: v for k, v in (("redis_url", args.redis_url), ("prefix", args.prefix)) if v}
    try:
        args.settings = Settings(**overrides)
    except pydantic.ValidationError as exc:
        print(f"kcp: invalid settings: {explain_settings_error(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.command == "acl":
        try:
            return run_acl(args, args.settings)
        except KcpError as exc:  # Redis refused `--apply`
            return report_error(exc, args.settings)
    if args.command == "agent":
        from kernel_agent.agent.main import run as run_agent

        return run_agent(args)
    if args.command == "bus":
        from controlplane.ops.cli.bus import run as run_bus

        return run_bus(args)
    if args.command == "mcp":
        from controlplane.ops.mcp import run as run_mcp

        return run_mcp(args)
    daemons: dict[str, Callable[[argparse.Namespace], int]] = {"serve": _serve, "up": _up, "demo": _demo}
    if args.command in daemons:
        return daemons[args.command](args)
    commands = {
        "cluster": _cluster,
        "dispatch": _dispatch,
        "metrics": _metrics,
        "status": status_command,
        "top": top_command,
    }
    return _run_client(args, commands[args.command])
