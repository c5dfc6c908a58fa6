"""The handler registry: syscall name -> handler, the context handlers get, loading handler modules."""

from __future__ import annotations

import importlib
import inspect
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import ValidationError

from controlplane.errors import InvalidRequest
from controlplane.protocol.requests import (
    BUILTIN_SYSCALLS,
    DEFAULT_MAX_BYTES,
    explain,
    normalise_syscall_name,
    parse_args,
    parse_request,
    validate_capabilities,
)
from kernel_agent.syscalls.memory import ErrorType, KernelMemory, SyscallError

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class JobInfo:
    """The job a handler runs for (arq's per-job ``ctx``)."""

    id: str
    #: 1 for the first run; one more for each `Retry` and each run a dead kernel cut off
    job_try: int
    enqueue_ms: int


@dataclass(slots=True)
class SyscallContext:
    """What a handler may use: the kernel's memory and its identity, and the job being run."""

    memory: KernelMemory = field(default_factory=KernelMemory)
    kernel: str = ""
    cluster: str = ""
    job: JobInfo | None = None


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


#: made once: `json.dumps` with arguments other than its defaults builds an encoder per call
_STRICT_JSON = json.JSONEncoder(allow_nan=False)


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
        _STRICT_JSON.encode(result)
    except (TypeError, ValueError, RecursionError) as exc:
        raise SyscallError(f"{name}: handler result is not JSON-serialisable: {exc}") from exc
    return result


def declared_capabilities(registry: SyscallRegistry, agent: Iterable[str] = ()) -> frozenset[str]:
    """What a kernel of `registry` declares: its agent's capabilities (`kcp agent --capabilities`,
    checked as `validate_capabilities` does) plus every capability a registered syscall declares.
    The kernel record carries them (`kernel_start.lua`), routing's `requires` and work stealing's
    sibling check compare against them, and the agent record carries the same union."""
    return validate_capabilities(agent) | registry.capabilities()


#: A handler module may name an arq settings object under this name: its functions are
#: registered as with ``--arq-settings module:arq_settings`` (`arq_bridge`).
ARQ_SETTINGS = "arq_settings"


def _import(path: str) -> Any:
    if not path or path.startswith("."):
        raise ValueError(f"handler module must be an absolute dotted path (got {path!r})")
    try:
        return importlib.import_module(path)
    except ImportError as exc:
        raise ImportError(f"cannot import handler module {path!r}: {exc}", name=path) from exc


def load_handlers(registry: SyscallRegistry, module_paths: Sequence[str]) -> None:
    """Import each dotted module path and call its ``register(registry)`` (a module that only
    names arq settings, `ARQ_SETTINGS`, needs none: see `arq_settings_in`)."""
    for path in module_paths:
        module = _import(path)
        register = getattr(module, "register", None)
        if callable(register):
            register(registry)
        elif not hasattr(module, ARQ_SETTINGS):
            raise ValueError(f"handler module {path!r} has no register(registry) function nor {ARQ_SETTINGS}")


def arq_settings_in(module_paths: Sequence[str]) -> list[str]:
    """``module:arq_settings`` of each handler module that names arq settings."""
    return [f"{path}:{ARQ_SETTINGS}" for path in module_paths if hasattr(_import(path), ARQ_SETTINGS)]
