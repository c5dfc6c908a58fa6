"""The eight builtin syscalls (READ, WRITE, ALLOC, FREE, OPEN, CLOSE, PING, COMPUTE)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping
from typing import Any

from controlplane.protocol.requests import (
    DEFAULT_MAX_BYTES,
    decode_data,
)
from kernel_agent.syscalls.registry import Handler, SyscallContext, SyscallRegistry

_REDUCERS: Mapping[str, Callable[[list[float]], object]] = {
    "sum": math.fsum,
    "mean": statistics.fmean,
    "min": min,
    "max": max,
    "sort": sorted,
    "prod": math.prod,
    "variance": statistics.pvariance,  # population variance: defined for a single item
    "stdev": statistics.pstdev,
}


def compute(op: str, data: list[float], other: list[float] | None = None) -> dict[str, Any]:
    """COMPUTE's arithmetic. ``stats`` gives count/sum/mean/min/max; the rest ``{"op", "result"}``."""
    if op == "stats":
        n, total = len(data), math.fsum(data)
        return {"count": n, "sum": total, "mean": total / n, "min": min(data), "max": max(data)}
    if op == "dot":
        result: object = math.fsum(x * y for x, y in zip(data, other or [], strict=True))
    else:
        result = _REDUCERS[op](data)
    return {"op": op, "result": result}


def _read(ctx: SyscallContext, args: dict[str, Any]) -> dict[str, Any]:
    data = ctx.memory.read(args["address"], args["size"])
    return {"address": args["address"], "size": len(data), "data": data.hex()}


def _write(ctx: SyscallContext, args: dict[str, Any]) -> dict[str, Any]:
    written = ctx.memory.write(args["address"], decode_data(args["data"], args["encoding"]))
    return {"address": args["address"], "written": written}


def _alloc(ctx: SyscallContext, args: dict[str, Any]) -> dict[str, Any]:
    return {"address": ctx.memory.alloc(args["size"]), "size": args["size"]}


def _free(ctx: SyscallContext, args: dict[str, Any]) -> dict[str, Any]:
    return {"address": args["address"], "freed": ctx.memory.free(args["address"])}


def _open(ctx: SyscallContext, args: dict[str, Any]) -> dict[str, Any]:
    fd = ctx.memory.files.open(args["path"], args["mode"])
    return {"fd": fd, "path": args["path"], "mode": args["mode"]}


def _close(ctx: SyscallContext, args: dict[str, Any]) -> dict[str, Any]:
    ctx.memory.files.close(args["fd"])
    return {"fd": args["fd"], "closed": True}


def _ping(ctx: SyscallContext, args: dict[str, Any]) -> dict[str, Any]:
    return {"pong": True, "payload": args["payload"], "kernel": ctx.kernel}


def _compute(ctx: SyscallContext, args: dict[str, Any]) -> dict[str, Any]:
    return compute(args["op"], args["data"], args["other"])


_BUILTINS: tuple[tuple[str, Handler, str], ...] = (
    ("READ", _read, "read size bytes at address; data comes back as hex"),
    ("WRITE", _write, "write data (utf-8, hex or base64 string, or byte list) at address"),
    ("ALLOC", _alloc, "reserve size bytes; returns a 16-byte aligned address"),
    ("FREE", _free, "release a block returned by ALLOC"),
    ("OPEN", _open, "open an in-memory file; returns a descriptor"),
    ("CLOSE", _close, "close a descriptor returned by OPEN"),
    ("PING", _ping, "liveness check; echoes payload"),
    ("COMPUTE", _compute, "arithmetic over a list of numbers (stats, sum, mean, ..., dot)"),
)


def builtin_registry(*, max_request_bytes: int = DEFAULT_MAX_BYTES) -> SyscallRegistry:
    """A new registry holding the eight builtin syscalls."""
    registry = SyscallRegistry(max_request_bytes=max_request_bytes)
    for name, handler, description in _BUILTINS:
        registry.register(name, handler, description=description)
    return registry
