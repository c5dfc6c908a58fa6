"""`kcp cluster|dispatch|metrics`: the commands of a client, with their flags.

`cluster create` and `cluster scale` wait for the placement they asked for (`--no-wait` returns
at once): progress goes to stderr while the kernels start; the command fails with exit 7 and
the control plane's reason as soon as it reports that the kernels cannot be placed ("6 of 12
placed: no agent has a free slot; free slots: 0 on 2 agents"), or when `--timeout` passes
(saying so when no `kcp serve` leads).
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from controlplane.client.core import ClusterInfo, KcpClient
from controlplane.errors import EXIT_NOT_PLACED, InvalidRequest
from controlplane.ops.cli.output import emit, fail, ms, non_negative_seconds, table
from controlplane.protocol.models import ClusterStatus
from controlplane.protocol.requests import ARG_MODELS
from controlplane.redis.snapshot import read_snapshot

#: READ data as the CLI prints it; "auto" is UTF-8 text when the bytes are printable, else hex.
ENCODINGS = ("auto", "utf-8", "hex", "base64")


# ------------------------------------------------------------------ flags
def _wait_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-wait", action="store_true", help="return once the request is recorded; do not wait for kernels"
    )
    parser.add_argument(
        "--timeout",
        type=non_negative_seconds,
        help="seconds to wait for the kernels to run (default: $KCP_READY_TIMEOUT, 30)",
    )


def add_cluster_arguments(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = sub.add_parser(
        "create",
        parents=[common],
        help="create a cluster and wait until its kernels run",
        description="Create a cluster and wait until its kernels run (exit 7 with the reason if they "
        "cannot be placed, e.g. no free agent slot or no agent with a required capability).",
    )
    create.add_argument("name", help="cluster name: letters, digits, '-', '_', '.' (e.g. compute)")
    create.add_argument("--kernels", type=int, default=1, help="number of kernels (default 1)")
    create.add_argument(
        "--config",
        help='ClusterConfig as a JSON object, e.g. {"max_kernels": 20, "capabilities": ["gpu"], '
        '"auto_scale": true}',
    )
    _wait_flags(create)
    sub.add_parser("list", parents=[common], help="clusters with their status, kernel counts and reason")
    scale = sub.add_parser(
        "scale",
        parents=[common],
        help="set a cluster's kernel count and wait until it is reached",
        description="Set a cluster's kernel count; scale-down drains kernels (they finish their jobs).",
    )
    scale.add_argument("name", help="cluster name")
    scale.add_argument("count", type=int, help="the new number of kernels")
    _wait_flags(scale)
    destroy = sub.add_parser(
        "destroy", parents=[common], help="stop a cluster's kernels and delete it (queued jobs fail)"
    )
    destroy.add_argument("name", help="cluster name")


def _syscalls_help() -> str:
    """The builtin syscalls and their fields, for `kcp dispatch --help`."""
    from kernel_agent.syscalls.builtins import builtin_registry

    described = {d["name"]: d["description"] for d in builtin_registry().describe()}
    lines = ["builtin syscalls (request fields; =default):"]
    for name, model in ARG_MODELS.items():
        fields = [
            f if info.is_required() else f"{f}={info.default if info.default is not None else 'null'}"
            for f, info in model.model_fields.items()
        ]
        lines.append(f"  {name:<8} {', '.join(fields):<34} {described.get(name, '')}")
    lines += [
        "",
        'Every request may add "requires": ["capability", ...] (only kernels that declare them run it)',
        'and "kernel": "worker-1" (the same as --kernel). Agents add syscalls with --handlers.',
        "",
        "examples:",
        '  kcp dispatch compute \'{"type": "WRITE", "address": 8192, "data": "hello"}\'  # names the kernel',
        '  kcp dispatch compute --kernel worker-1 \'{"type": "READ", "address": 8192, "size": 5}\'',
        '  kcp dispatch compute \'{"type": "COMPUTE", "data": [1, 2, 3], "op": "mean"}\'',
    ]
    return "\n".join(lines)


def add_dispatch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = "Run one syscall on a kernel of a cluster and print its result."
    parser.epilog = _syscalls_help()
    parser.add_argument("cluster", help="cluster name")
    parser.add_argument("request", help='the request as a JSON object, e.g. {"type": "PING"}')
    parser.add_argument(
        "--kernel",
        help="run on this kernel (e.g. worker-1), or on one incarnation of it, NAME@EPOCH as printed "
        "(worker-1@3: fails if it was restarted since): each kernel has its own memory, so a READ of "
        "what a WRITE stored goes where the WRITE went",
    )
    parser.add_argument(
        "--encoding",
        choices=ENCODINGS,
        help="how READ data is printed: auto (UTF-8 text if printable, else hex; the default), "
        "utf-8, hex or base64 (with --json the default is hex, as the kernel sends it)",
    )


def add_metrics_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("cluster", help="cluster name")


# ------------------------------------------------------------------ kcp cluster
def _line(info: ClusterInfo) -> str:
    pending = len(info.kernels) - info.running
    starting = f", {pending} starting" if pending > 0 and info.running < info.desired else ""
    reason = f": {info.reason}" if info.reason else ""
    running = f"{info.running}/{info.desired} kernels running{starting}"
    return f"cluster {info.name}: {running} ({info.status.value}){reason}"


def _summary(info: ClusterInfo) -> dict[str, Any]:
    return info.model_dump(mode="json", exclude={"kernels"}) | {"kernels": [k.name for k in info.kernels]}


def _settled(info: ClusterInfo) -> bool:
    return info.status is ClusterStatus.RUNNING and info.running == info.desired == len(info.kernels)


async def _await_placement(
    args: argparse.Namespace,
    kcp: KcpClient,
    name: str,
    done: Callable[[ClusterInfo], dict[str, Any]],
    human: Callable[[ClusterInfo], str],
) -> int:
    """Wait until cluster `name` runs its desired kernels, then print `done(info)` (`--json`)
    or `human(info)`; progress goes to stderr as it changes. Fails (exit 7) once the control
    plane has reported a placement shortfall for a reconcile pass or more (a fresh pass may
    still clear one left from before), or at `--timeout` (saying so when no `kcp serve` leads)."""
    timeout = kcp.settings.ready_timeout if args.timeout is None else args.timeout
    began = time.monotonic()
    deadline = began + timeout
    grace = kcp.settings.reconcile_interval + 0.5
    shown, reason_since = "", None
    while True:
        info = await kcp.get_cluster(name)
        if _settled(info):
            print(json.dumps(done(info), indent=2) if args.json else human(info), flush=True)
            return 0
        now = time.monotonic()
        # nothing placed for a while: say whether anything will place it (a starting `kcp
        # serve` takes a moment to lead, so this is a hint, not a failure)
        leaderless = (
            not info.kernels and now - began >= kcp.settings.leader_ttl and not await kcp.state.has_leader()
        )
        line = _line(info) + ("; no `kcp serve` leads on this Redis and prefix (yet?)" if leaderless else "")
        if line != shown and not args.json:
            print(line, file=sys.stderr, flush=True)
            shown = line
        reason_since = (reason_since or now) if info.reason else None
        if reason_since is not None and now - reason_since >= grace:
            why = f"cluster {name}: {info.reason}"
            hint = " (the cluster stays and is placed when capacity appears; `kcp cluster destroy` drops it)"
            return fail(args, why + hint, "NotPlaced", EXIT_NOT_PLACED, cluster=_summary(info))
        if now >= deadline:
            why = f"cluster {name}: {info.running} of {info.desired} kernels running after {timeout:g}s"
            if leaderless:
                why += " and none placed: no `kcp serve` leads on this Redis and prefix"
            else:
                why += ": see `kcp status` (kernels starting or restarting?)"
            return fail(args, why, "NotPlaced", EXIT_NOT_PLACED, cluster=_summary(info))
        await kcp.views.wait_change(min(deadline - now, 0.25))


async def cluster_command(args: argparse.Namespace, kcp: KcpClient) -> int:
    if args.action == "create":
        config = _json_object(args.config, "--config") if args.config is not None else None
        info = await kcp.create_cluster(args.name, args.kernels, config, wait=0)
        if args.no_wait:
            emit(args, _summary(info), lambda d: _line(info))
            return 0
        return await _await_placement(args, kcp, info.name, _summary, _line)
    if args.action == "list":
        clusters = [_summary(i) for i in await kcp.list_clusters()]
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
        return 0
    if args.action == "scale":
        before, after = await kcp.scale_cluster(args.name, args.count, wait=0)
        change = {"cluster": args.name, "previous_count": before, "new_count": after}
        if args.no_wait:
            emit(args, change, lambda d: f"cluster {d['cluster']}: {before} -> {after} kernels (requested)")
            return 0
        return await _await_placement(
            args,
            kcp,
            args.name,
            lambda info: change | {"status": info.status.value, "running": info.running},
            lambda info: f"cluster {info.name}: {before} -> {after} kernels, {info.running} running",
        )
    await kcp.destroy_cluster(args.name)
    emit(
        args,
        {"cluster_name": args.name, "destroyed": True},
        lambda d: f"cluster {d['cluster_name']} destroyed",
    )
    return 0


# ------------------------------------------------------------------ kcp dispatch, kcp metrics
def _json_object(text: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidRequest(f"{what} must be a JSON object (got {type(value).__name__})")
    return value


def read_data(hex_data: str, encoding: str) -> tuple[str, str]:
    """READ's data (hex, as the kernel sends it) in `encoding`; "auto" picks UTF-8 text when
    the bytes are printable, else hex. Returns (data, the encoding used)."""
    try:
        raw = bytes.fromhex(hex_data)
    except ValueError:  # not what the builtin READ sends: leave it as it came
        return hex_data, "as sent"
    if encoding == "auto":
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return hex_data, "hex"
        return (
            (text, "utf-8")
            if text and all(c.isprintable() or c in "\n\t\r" for c in text)
            else (hex_data, "hex")
        )
    if encoding == "base64":
        return base64.b64encode(raw).decode("ascii"), "base64"
    if encoding == "utf-8":
        return raw.decode("utf-8", "backslashreplace"), "utf-8"
    return hex_data, "hex"


async def dispatch_command(args: argparse.Namespace, kcp: KcpClient) -> int:
    request = _json_object(args.request, "request")
    pinned = request.pop("kernel", None)  # the dict API's key; not a syscall argument
    if pinned is not None and args.kernel is not None and pinned != args.kernel:
        raise InvalidRequest(f'--kernel {args.kernel!r} and the request\'s "kernel" {pinned!r} disagree')
    kernel = args.kernel if args.kernel is not None else pinned
    if kernel is not None and not isinstance(kernel, str):
        raise InvalidRequest(f'kernel must be a string such as "worker-1" (got {type(kernel).__name__})')
    res = await kcp.dispatch(args.cluster, request, kernel=kernel)
    data = res.model_dump()
    encoding = args.encoding or ("hex" if args.json else "auto")
    hex_data = data["result"].get("data")
    if str(request.get("type", "")).upper() == "READ" and isinstance(hex_data, str):
        data["result"]["data"], data["result"]["encoding"] = read_data(hex_data, encoding)
    emit(
        args, data, lambda d: f"{d['kernel']}@{d['epoch']} ({ms(d['latency_ms'])}): {json.dumps(d['result'])}"
    )
    return 0


async def metrics_command(args: argparse.Namespace, kcp: KcpClient) -> int:
    m = (await kcp.get_metrics(args.cluster)).to_dict()
    snap = await read_snapshot(kcp.state)  # the kernels' resident memory, for the memory in MiB
    kernels = [k for c in snap.clusters if c.record.name == m["cluster_name"] for k in c.kernels]
    mib = [k.memory_bytes / 2**20 for k in kernels if k.memory_bytes is not None]
    memory_text = f"{m['avg_memory']:.2%} of the host's memory"
    if mib:
        m["avg_memory_mib"] = round(statistics.fmean(mib), 1)
        memory_text = f"{m['avg_memory_mib']} MiB ({memory_text})"
    shown = {
        **m,
        "avg_latency_ms": ms(m["avg_latency_ms"]),
        "avg_cpu": f"{m['avg_cpu']:.1%} of a core",
        "avg_memory": memory_text,
    }
    shown.pop("avg_memory_mib", None)
    emit(args, m, lambda d: "\n".join(f"{k:<18}{v}" for k, v in shown.items()))
    return 0
