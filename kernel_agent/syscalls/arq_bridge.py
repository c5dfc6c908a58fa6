"""arq task functions as kernel syscalls: an arq `WorkerSettings` run by kcp kernels.

`ArqFunctions.load("mypkg.worker.WorkerSettings")` reads the settings the way arq's `Worker`
does (a class or a dict: `functions`, `on_startup`, `on_shutdown`, `ctx`, `job_timeout`,
`keep_result`, `max_tries`, `retry_jobs`), and `register` adds each function (a coroutine, or
`arq.worker.func(...)` with `name`, `timeout`, `keep_result`, `max_tries`) as the syscall of its
name, upper-cased. The kernel process runs `startup` once (arq's `on_startup(ctx)`, `ctx["redis"]`
being the kernel's Redis client) and `shutdown` when it stops; each job gets arq's per-job `ctx`
(`job_id`, `job_try`, `enqueue_time`, `score`) on top.

Per job, as arq's worker does: a try past `max_tries` fails with ``JobExecutionFailed`` without
running; the function runs under `timeout` (``TimeoutError`` on expiry, not retried); `Retry`
raised by the function defers the job (`Deferral`: the kernel puts it back in the cluster's
deferred set) with its try counted up; any other exception is a failure named by its class.
Arguments and results are JSON (`controlplane.protocol.arq`).
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from arq.worker import Function, Retry

from controlplane.errors import InvalidRequest
from controlplane.protocol import arq as arq_protocol
from controlplane.protocol.requests import normalise_syscall_name
from kernel_agent.syscalls.memory import Deferral, ErrorType, SyscallError
from kernel_agent.syscalls.registry import SyscallContext, SyscallRegistry

logger = logging.getLogger(__name__)

#: The capability arq functions declare unless their settings name others (`kcp_capabilities`),
#: or the coroutine itself does (a `kcp_capabilities` attribute on it).
DEFAULT_CAPABILITY = "arq"
#: arq's default `job_timeout`, seconds.
JOB_TIMEOUT_S = 300.0

Hook = Callable[[dict[str, Any]], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class ArqFunction:
    """One arq function as a syscall, with the options arq's worker would give it."""

    syscall: str
    name: str  # arq's name for it
    coroutine: Callable[..., Awaitable[Any]]
    timeout_s: float | None
    keep_result_ms: int
    max_tries: int
    capabilities: tuple[str, ...]


def _seconds(value: object, what: str) -> float | None:
    if value is None:
        return None
    seconds = value.total_seconds() if hasattr(value, "total_seconds") else value
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0:
        raise ValueError(f"{what} must be a non-negative number of seconds (got {value!r})")
    return float(seconds)


def _names(value: object) -> tuple[str, ...]:
    """Capability names: one string or an iterable of them."""
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, Iterable):
        raise ValueError(f"kcp_capabilities must be a name or a list of names (got {value!r})")
    return tuple(str(v) for v in value)


class ArqFunctions:
    """The functions, hooks and context of one arq `WorkerSettings`."""

    def __init__(self, settings: object, *, where: str = "arq settings") -> None:
        get = settings.get if isinstance(settings, Mapping) else lambda k, d=None: getattr(settings, k, d)
        self.where = where
        if get("cron_jobs"):
            raise ValueError(f"{where}: cron_jobs are not run by kcp (see docs/arq.md); remove them")
        job_timeout = _seconds(get("job_timeout", JOB_TIMEOUT_S), f"{where}: job_timeout")
        keep = _seconds(get("keep_result", arq_protocol.KEEP_RESULT_S), f"{where}: keep_result")
        max_tries = get("max_tries", arq_protocol.MAX_TRIES)
        self.retry_jobs = bool(get("retry_jobs", True))
        self.capabilities = _names(get("kcp_capabilities", (DEFAULT_CAPABILITY,)))
        self.on_startup: Hook | None = get("on_startup")
        self.on_shutdown: Hook | None = get("on_shutdown")
        self.ctx: dict[str, Any] = dict(get("ctx") or {})
        functions = list(get("functions") or ())
        if not functions:
            raise ValueError(f"{where}: no functions")
        self.functions: dict[str, ArqFunction] = {}
        for item in functions:
            fn = item if isinstance(item, Function) else None
            coroutine = fn.coroutine if fn else item
            if not inspect.iscoroutinefunction(coroutine):
                raise ValueError(
                    f"{where}: {coroutine!r} is not a coroutine function (arq runs `async def`s)"
                )
            name = fn.name if fn else coroutine.__qualname__
            try:
                syscall = normalise_syscall_name(name)
            except InvalidRequest as exc:
                raise ValueError(f"{where}: function name {name!r} cannot be a kcp syscall: {exc}") from None
            if syscall in self.functions:
                raise ValueError(f"{where}: two functions are named {syscall} (kcp upper-cases names)")
            timeout = fn.timeout_s if fn and fn.timeout_s is not None else job_timeout
            fn_keep = fn.keep_result_s if fn and fn.keep_result_s is not None else keep
            if fn and fn.keep_result_forever:
                raise ValueError(f"{where}: {name}: keep_result_forever is not supported; set keep_result")
            tries = fn.max_tries if fn and fn.max_tries is not None else max_tries
            if isinstance(tries, bool) or not isinstance(tries, int) or tries < 1:
                raise ValueError(
                    f"{where}: {name}: max_tries must be an integer of at least 1 (got {tries!r})"
                )
            capabilities = _names(getattr(coroutine, "kcp_capabilities", self.capabilities))
            self.functions[syscall] = ArqFunction(
                syscall, name, coroutine, timeout, round((fn_keep or 0) * 1000), tries, capabilities
            )

    @classmethod
    def load(cls, path: str) -> ArqFunctions:
        """The settings object at `path`: ``package.module.WorkerSettings`` (or ``module:name``)."""
        module_path, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
        if not module_path or not attr or path.startswith("."):
            raise ValueError(
                f"arq settings must be a dotted path such as mypkg.worker.WorkerSettings (got {path!r})"
            )
        try:
            module = importlib.import_module(module_path)
        except ImportError as exc:
            raise ImportError(f"cannot import {module_path!r} for arq settings {path!r}: {exc}") from exc
        settings = getattr(module, attr, None)
        if settings is None:
            raise ValueError(f"module {module_path!r} has no {attr!r} (arq settings {path!r})")
        return cls(settings, where=path)

    def register(self, registry: SyscallRegistry) -> None:
        for fn in self.functions.values():
            registry.register(
                fn.syscall,
                self._handler(fn),
                capabilities=fn.capabilities,
                description=f"arq function {fn.name}",
            )

    def keep_result_ms(self, syscall: str) -> int | None:
        """How long the result of `syscall` is kept, ms; None when it is not an arq function."""
        fn = self.functions.get(syscall)
        return None if fn is None else fn.keep_result_ms

    async def startup(self, redis: object) -> None:
        """arq's `on_startup(ctx)`, once per kernel process; `ctx["redis"]` is `redis`."""
        self.ctx["redis"] = redis
        if self.on_startup is not None:
            await self.on_startup(self.ctx)

    async def shutdown(self) -> None:
        if self.on_shutdown is not None:
            await self.on_shutdown(self.ctx)

    def _handler(
        self, fn: ArqFunction
    ) -> Callable[[SyscallContext, dict[str, Any]], Awaitable[dict[str, Any]]]:
        async def run(ctx: SyscallContext, arguments: dict[str, Any]) -> dict[str, Any]:
            return await self._run(fn, ctx, arguments)

        return run

    async def _run(self, fn: ArqFunction, ctx: SyscallContext, arguments: dict[str, Any]) -> dict[str, Any]:
        args, kwargs, score = arq_protocol.arq_arguments(arguments)
        job = ctx.job
        job_id, job_try, enqueue_ms = (job.id, job.job_try, job.enqueue_ms) if job else ("", 1, 0)
        if job_try > fn.max_tries:
            raise SyscallError(f"max {fn.max_tries} retries exceeded", error_type="JobExecutionFailed")
        job_ctx = {
            **self.ctx,
            "job_id": job_id,
            "job_try": job_try,
            "enqueue_time": datetime.fromtimestamp(enqueue_ms / 1000, tz=UTC),
            "score": score if score is not None else enqueue_ms,
        }
        try:
            async with asyncio.timeout(fn.timeout_s):
                result = await fn.coroutine(job_ctx, *args, **kwargs)
        except Retry as exc:
            if not self.retry_jobs:
                raise SyscallError(str(exc), error_type=arq_protocol.RETRY) from None
            raise Deferral(str(exc), defer_ms=exc.defer_score or 0, job_try=job_try + 1) from None
        except TimeoutError:
            raise SyscallError(
                f"{fn.name} ran past its timeout of {fn.timeout_s}s", error_type="TimeoutError"
            ) from None
        except (SyscallError, InvalidRequest):
            raise
        except Exception as exc:
            logger.info("arq function %s raised %s: %s", fn.name, type(exc).__name__, exc)
            raise SyscallError(str(exc), error_type=type(exc).__name__) from None
        try:
            json.dumps(result, allow_nan=False)
        except (TypeError, ValueError, RecursionError) as exc:
            raise SyscallError(
                f"{fn.name} returned a result JSON cannot carry ({type(result).__name__}: {exc})",
                error_type=ErrorType.HANDLER_ERROR,
            ) from None
        return {"result": result}


def load_arq_settings(registry: SyscallRegistry, paths: Iterable[str]) -> list[ArqFunctions]:
    """Load each arq settings path and register its functions in `registry`."""
    loaded = [ArqFunctions.load(path) for path in paths]
    for functions in loaded:
        functions.register(registry)
    return loaded
