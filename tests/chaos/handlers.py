"""Syscalls the failure tests load into their kernels (`--handlers tests.chaos.handlers`).

- SLEEP {"ms", "tag"}: waits `ms` milliseconds (without blocking the kernel) and echoes `tag`,
  so a test can tell which request a result belongs to and keep jobs in flight long enough to
  be caught by a kill.
- BURN {"ms", "tag"}: keeps one core busy for `ms` milliseconds (CPU load), echoes `tag`.
- CRASH {}: SIGKILLs its own kernel process, every time, on every kernel that runs it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

from kernel_agent.syscalls import SyscallContext, SyscallRegistry


async def sleep(ctx: SyscallContext, args: dict[str, Any]) -> dict[str, Any]:
    await asyncio.sleep(min(float(args.get("ms", 10)), 10_000) / 1000)
    return {"tag": args.get("tag"), "kernel": ctx.kernel, "pid": os.getpid()}


def burn(ctx: SyscallContext, args: dict[str, Any]) -> dict[str, Any]:
    end = time.perf_counter() + min(float(args.get("ms", 10)), 10_000) / 1000
    n = 0
    while time.perf_counter() < end:
        n += 1
    return {"tag": args.get("tag"), "loops": n, "kernel": ctx.kernel}


def crash(ctx: SyscallContext, args: dict[str, Any]) -> dict[str, Any]:
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable")


def register(registry: SyscallRegistry) -> None:
    registry.register("SLEEP", sleep, description="wait ms milliseconds, echo tag")
    registry.register("BURN", burn, description="busy one core for ms milliseconds")
    registry.register("CRASH", crash, description="SIGKILL the kernel process")
