"""A small arq worker: the same `WorkerSettings` runs under arq and on kcp kernels.

Under arq (a worker polling Redis)::

    arq examples.arq_worker.WorkerSettings

On kcp (each kernel of the agent runs the functions as syscalls ADD, FLAKY, SLOW, ECHO_AFTER, WHOAMI; the
repository root must be importable, e.g. ``PYTHONPATH=.``)::

    kcp agent --arq-settings examples.arq_worker.WorkerSettings

and from Python, as with arq's `ArqRedis.enqueue_job`::

    async with KcpClient() as kcp:
        job = await kcp.enqueue_job("jobs", "add", 2, 3)
        assert await job.result(timeout=5) == 5

See docs/arq.md. Arguments and results are plain JSON values.
"""

from __future__ import annotations

import asyncio
from typing import Any

from arq.worker import Retry, func


async def startup(ctx: dict[str, Any]) -> None:
    """Once per worker (under kcp: once per kernel process), before any job."""
    ctx["greeting"] = "hello"


async def shutdown(ctx: dict[str, Any]) -> None:
    ctx.pop("greeting", None)


async def add(ctx: dict[str, Any], a: float, b: float) -> float:
    return a + b


async def flaky(ctx: dict[str, Any], label: str) -> dict[str, Any]:
    """Fails its first try with arq's `Retry`; the second try succeeds and says which it was."""
    if ctx["job_try"] == 1:
        raise Retry(defer=0.2)
    return {"label": label, "job_try": ctx["job_try"]}


async def slow(ctx: dict[str, Any], seconds: float) -> str:
    """Sleeps `seconds`: past its 0.5 s timeout it fails with TimeoutError."""
    await asyncio.sleep(seconds)
    return "woke"


async def echo_after(ctx: dict[str, Any], value: Any, seconds: float) -> Any:
    """`value`, after `seconds`: work that takes a while (the default 5 tries if cut off)."""
    await asyncio.sleep(seconds)
    return value


async def whoami(ctx: dict[str, Any], note: str = "") -> dict[str, Any]:
    """What the job's ctx holds: what on_startup put there, and arq's per-job fields."""
    return {"greeting": ctx.get("greeting"), "job_id": ctx["job_id"], "job_try": ctx["job_try"], "note": note}


class WorkerSettings:
    functions = [add, func(flaky, max_tries=3), func(slow, timeout=0.5, max_tries=1), echo_after, whoami]  # noqa: RUF012
    on_startup = startup
    on_shutdown = shutdown
