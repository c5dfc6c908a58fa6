"""The execution side of syscalls: kernel memory, a file table, the handler registry, the builtins.

A kernel owns one `KernelMemory` (bytes plus an in-memory file table) and one
`SyscallRegistry`. `SyscallRegistry.execute` parses a request with
`controlplane.requests`, runs the matching handler and returns its result dict, or
raises `SyscallError` whose `error_type` says what went wrong.

User syscalls live in modules with a ``register(registry)`` function, loaded with
`load_handlers` (see ``examples/infer_handlers.py``).
"""

from __future__ import annotations

import bisect
import heapq
import importlib
import inspect
import json
import logging
import math
import statistics
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

from pydantic import ValidationError

from controlplane.errors import InvalidRequest
from controlplane.protocol.requests import (
    BUILTIN_SYSCALLS,
    DEFAULT_MAX_BYTES,
    decode_data,
    explain,
    normalise_syscall_name,
    parse_args,
    parse_request,
    validate_capabilities,
)

logger = logging.getLogger(__name__)

#: the lowest valid address; 0 (NULL) is never valid
BASE_ADDRESS = 0x1000
ALIGNMENT = 16
DEFAULT_MEMORY_BYTES = 1 << 20
DEFAULT_MAX_FDS = 1024
#: 0, 1 and 2 are stdin, stdout and stderr
FIRST_FD = 3


class ErrorType(StrEnum):
    """Values of `SyscallError.error_type` (plain strings on the wire)."""

    INVALID_ARGUMENTS = "InvalidArguments"
    SEGMENTATION_FAULT = "SegmentationFault"
    UNKNOWN_SYSCALL = "UnknownSyscall"
    OUT_OF_MEMORY = "OutOfMemory"
    BAD_FILE_DESCRIPTOR = "BadFileDescriptor"
    TOO_MANY_OPEN_FILES = "TooManyOpenFiles"
    HANDLER_ERROR = "HandlerError"


class SyscallError(Exception):
    """A syscall failed; `error_type` is one of `ErrorType` (or a handler's own string)."""

    def __init__(self, message: str, *, error_type: str = ErrorType.HANDLER_ERROR) -> None:
        super().__init__(message)
        self.error_type = str(error_type)


# ------------------------------------------------------------------ files


@dataclass(frozen=True, slots=True)
class OpenFile:
    path: str
    mode: str


class FileTable:
    """In-memory files (path -> bytearray) and the descriptors open on them.

    OPEN creates a missing file in every mode; mode ``"w"`` truncates. Descriptors start
    at 3 and, as in POSIX, the lowest free one is reused.
    """

    def __init__(self, max_fds: int = DEFAULT_MAX_FDS) -> None:
        if max_fds < 1:
            raise ValueError(f"max_fds must be at least 1 (got {max_fds})")
        self.max_fds = max_fds
        self.files: dict[str, bytearray] = {}
        self._open: dict[int, OpenFile] = {}
        self._reusable: list[int] = []  # a heap of closed descriptors
        self._next = FIRST_FD

    def __len__(self) -> int:
        return len(self._open)

    def open(self, path: str, mode: str = "r") -> int:
        """Open `path` and return a new descriptor."""
        if len(self._open) >= self.max_fds:
            raise SyscallError(
                f"OPEN: too many open files (limit {self.max_fds})", error_type=ErrorType.TOO_MANY_OPEN_FILES
            )
        if mode == "w" or path not in self.files:
            self.files[path] = bytearray()
        if self._reusable:
            fd = heapq.heappop(self._reusable)
        else:
            fd, self._next = self._next, self._next + 1
        self._open[fd] = OpenFile(path, mode)
        return fd

    def close(self, fd: int) -> OpenFile:
        """Close `fd` and return what was open on it; BadFileDescriptor if it is not open."""
        entry = self._open.pop(fd, None)
        if entry is None:
            raise SyscallError(f"CLOSE: fd {fd} is not open", error_type=ErrorType.BAD_FILE_DESCRIPTOR)
        heapq.heappush(self._reusable, fd)
        return entry


# ------------------------------------------------------------------ memory


def _aligned(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


class KernelMemory:
    """`size` bytes addressed from `BASE_ADDRESS`, a first-fit allocator and a `FileTable`.

    READ and WRITE may touch any in-range address, allocated or not. Blocks are 16-byte
    aligned; freed blocks coalesce with free neighbours.
    """

    def __init__(self, size: int = DEFAULT_MEMORY_BYTES, *, max_fds: int = DEFAULT_MAX_FDS) -> None:
        if size < ALIGNMENT or size % ALIGNMENT:
            raise ValueError(f"memory size must be a positive multiple of {ALIGNMENT} (got {size})")
        self.size = size
        self._bytes = bytearray(size)
        self._free: list[tuple[int, int]] = [(BASE_ADDRESS, size)]  # sorted (start, length)
        self._allocated: dict[int, int] = {}  # address -> size asked for
        self.files = FileTable(max_fds)

    @property
    def end(self) -> int:
        """One past the last valid address."""
        return BASE_ADDRESS + self.size

    @property
    def free_bytes(self) -> int:
        return sum(length for _, length in self._free)

    @property
    def allocations(self) -> dict[int, int]:
        """A copy of address -> size for every live block."""
        return dict(self._allocated)

    def _offset(self, op: str, address: int, size: int) -> int:
        if address < BASE_ADDRESS or address + size > self.end:
            raise SyscallError(
                f"{op}: {size} bytes at {address:#x} fall outside memory {BASE_ADDRESS:#x}..{self.end:#x}",
                error_type=ErrorType.SEGMENTATION_FAULT,
            )
        return address - BASE_ADDRESS

    def read(self, address: int, size: int) -> bytes:
        """`size` bytes starting at `address`."""
        offset = self._offset("READ", address, size)
        return bytes(self._bytes[offset : offset + size])

    def write(self, address: int, data: bytes) -> int:
        """Copy `data` to `address`; returns the number of bytes written."""
        offset = self._offset("WRITE", address, len(data))
        self._bytes[offset : offset + len(data)] = data
        return len(data)

    def alloc(self, n: int) -> int:
        """Reserve `n` zeroed bytes (first fit) and return their address."""
        if n < 1:
            raise SyscallError(
                f"ALLOC: size must be positive (got {n})", error_type=ErrorType.INVALID_ARGUMENTS
            )
        need = _aligned(n)
        for i, (start, length) in enumerate(self._free):
            if length >= need:
                if length == need:
                    del self._free[i]
                else:
                    self._free[i] = (start + need, length - need)
                self._allocated[start] = n
                offset = start - BASE_ADDRESS
                self._bytes[offset : offset + need] = bytes(need)
                return start
        raise SyscallError(
            f"ALLOC: no free block of {n} bytes ({self.free_bytes} bytes free in total)",
            error_type=ErrorType.OUT_OF_MEMORY,
        )

    def free(self, address: int) -> int:
        """Release the block at `address`; returns its size."""
        n = self._allocated.pop(address, None)
        if n is None:
            raise SyscallError(
                f"FREE: {address:#x} is not the address of an allocated block (double free?)",
                error_type=ErrorType.SEGMENTATION_FAULT,
            )
        start, length = address, _aligned(n)
        i = bisect.bisect(self._free, (start, length))
        if i < len(self._free) and self._free[i][0] == start + length:
            length += self._free.pop(i)[1]
        if i > 0 and sum(self._free[i - 1]) == start:
            i -= 1
            prev_start, prev_length = self._free.pop(i)
            start, length = prev_start, prev_length + length
        self._free.insert(i, (start, length))
        return n


# ------------------------------------------------------------------ the registry


@dataclass(slots=True)
class SyscallContext:
    """What a handler may use: the kernel's memory and its identity."""

    memory: KernelMemory = field(default_factory=KernelMemory)
    kernel: str = ""
    cluster: str = ""


Handler = Callable[[SyscallContext, dict[str, Any]], Awaitable[dict[str, Any]] | dict[str, Any]]
H = TypeVar("H", bound=Handler)


@dataclass(frozen=True, slots=True)
class _Entry:
    handler: Handler
    capabilities: frozenset[str]
    description: str


class SyscallRegistry:
    """Syscall name -> handler. Builtin names keep their argument models even if re-registered."""

    def __init__(self, *, max_request_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_request_bytes = max_request_bytes
        self._entries: dict[str, _Entry] = {}

    def register(
        self, name: str, handler: Handler, *, capabilities: Iterable[str] = (), description: str = ""
    ) -> None:
        """Add a syscall. `name` is upper-cased; a bad or duplicate name raises ValueError."""
        key = normalise_syscall_name(name)
        if key in self._entries:
            raise ValueError(f"syscall {key} is already registered")
        if not callable(handler):
            raise TypeError(f"handler for {key} is not callable (got {type(handler).__name__})")
        self._entries[key] = _Entry(handler, validate_capabilities(capabilities), description)

    def syscall(
        self, name: str, *, capabilities: Iterable[str] = (), description: str = ""
    ) -> Callable[[H], H]:
        """Decorator form of `register`."""

        def decorate(handler: H) -> H:
            self.register(name, handler, capabilities=capabilities, description=description)
            return handler

        return decorate

    def names(self) -> list[str]:
        """Registered syscall names, sorted."""
        return sorted(self._entries)

    def capabilities(self) -> frozenset[str]:
        """Every capability some registered syscall declares."""
        return frozenset().union(*(entry.capabilities for entry in self._entries.values()))

    def describe(self) -> list[dict[str, Any]]:
        """One JSON-able dict per syscall: name, capabilities, description, builtin."""
        return [
            {
                "name": name,
                "capabilities": sorted(entry.capabilities),
                "description": entry.description,
                "builtin": name in BUILTIN_SYSCALLS,
            }
            for name, entry in sorted(self._entries.items())
        ]

    async def execute(self, ctx: SyscallContext, request: Mapping[str, Any]) -> dict[str, Any]:
        """Parse `request`, run its handler and return the result; SyscallError on any failure."""
        try:
            req = parse_request(request, max_bytes=self.max_request_bytes)
            entry = self._entries.get(req.type)
            if entry is None:
                known = ", ".join(self.names()) or "none"
                raise SyscallError(
                    f"unknown syscall {req.type!r}; this kernel knows: {known}",
                    error_type=ErrorType.UNKNOWN_SYSCALL,
                )
            model = parse_args(req)
        except InvalidRequest as exc:
            raise SyscallError(str(exc), error_type=ErrorType.INVALID_ARGUMENTS) from exc
        args = model.model_dump() if model is not None else req.arguments
        return await _run(req.type, entry.handler, ctx, args)


async def _run(name: str, handler: Handler, ctx: SyscallContext, args: dict[str, Any]) -> dict[str, Any]:
    try:
        result = handler(ctx, args)
        if inspect.isawaitable(result):
            result = await result
    except SyscallError:
        raise
    except InvalidRequest as exc:
        raise SyscallError(str(exc), error_type=ErrorType.INVALID_ARGUMENTS) from exc
    except ValidationError as exc:
        raise SyscallError(explain(name, exc), error_type=ErrorType.INVALID_ARGUMENTS) from exc
    except Exception as exc:
        logger.warning("syscall %s: handler raised", name, exc_info=True)
        raise SyscallError(f"{name}: handler raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(result, dict):
        raise SyscallError(f"{name}: handler returned {type(result).__name__}, not a dict")
    try:
        json.dumps(result, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise SyscallError(f"{name}: handler result is not JSON-serialisable: {exc}") from exc
    return result


# ------------------------------------------------------------------ builtins

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


def load_handlers(registry: SyscallRegistry, module_paths: Sequence[str]) -> None:
    """Import each dotted module path and call its ``register(registry)``."""
    for path in module_paths:
        if not path or path.startswith("."):
            raise ValueError(f"handler module must be an absolute dotted path (got {path!r})")
        try:
            module = importlib.import_module(path)
        except ImportError as exc:
            raise ImportError(f"cannot import handler module {path!r}: {exc}", name=path) from exc
        register = getattr(module, "register", None)
        if not callable(register):
            raise ValueError(f"handler module {path!r} has no register(registry) function")
        register(registry)
