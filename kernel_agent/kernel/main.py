"""`python -m kernel_agent.kernel`: one kernel process, started by its agent."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from typing import TYPE_CHECKING

try:  # a faster event loop: about a fifth less CPU per job in the kernel (see docs/performance.md)
    import uvloop
except ImportError:  # pragma: no cover - optional on platforms without a wheel
    uvloop = None  # type: ignore[assignment]

from controlplane.protocol.keys import Keys
from controlplane.redis.connect import connect
from controlplane.settings import Settings
from kernel_agent.contract import EXIT_UNASSIGNED, split_capabilities
from kernel_agent.kernel.worker import KernelProcess
from kernel_agent.syscalls import arq_settings_in, builtin_registry, load_handlers

if TYPE_CHECKING:
    from kernel_agent.syscalls.arq_bridge import ArqFunctions


async def _amain(args: argparse.Namespace) -> int:
    settings = Settings()
    registry = builtin_registry(max_request_bytes=settings.max_request_bytes)
    load_handlers(registry, args.handlers)
    arq: list[ArqFunctions] = []
    arq_paths = [*args.arq_settings, *arq_settings_in(args.handlers)]
    if arq_paths:  # arq (and its worker module) is loaded only by kernels that run it
        from kernel_agent.syscalls.arq_bridge import load_arq_settings

        arq = load_arq_settings(registry, arq_paths)
    redis = connect(settings.redis_url)
    kernel = KernelProcess(
        redis,
        Keys(settings.prefix),
        cluster=args.cluster,
        name=args.name,
        agent=args.agent,
        registry=registry,
        concurrency=args.concurrency,
        capabilities=split_capabilities(args.capabilities),
        arq_keep_ms={
            name: fn.keep_result_ms for functions in arq for name, fn in functions.functions.items()
        },
    )
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, kernel.drain)
    loop.add_signal_handler(signal.SIGINT, kernel.drain)
    try:
        for functions in arq:  # arq's on_startup, once per kernel process, before any job
            await functions.startup(redis)
        try:
            await kernel.run()
        finally:
            for functions in arq:
                await functions.shutdown()
    finally:
        await redis.aclose()
    return 0 if kernel.epoch else EXIT_UNASSIGNED


def main(argv: list[str] | None = None) -> int:
    """Entry point of a kernel process; the agent starts it (settings come from KCP_* variables)."""
    parser = argparse.ArgumentParser(prog="kcp-kernel", description=__doc__)
    parser.add_argument("--cluster", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--agent", required=True)
    parser.add_argument(
        "--capabilities", default="", help="comma-separated: the agent's, declared beside the handlers' own"
    )
    parser.add_argument("--handlers", action="append", default=[], help="module with register(registry)")
    parser.add_argument(
        "--arq-settings", action="append", default=[], help="arq WorkerSettings whose functions to run"
    )
    parser.add_argument("--concurrency", type=int, default=1, help="jobs run at once")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format=f"%(asctime)s kernel[{args.cluster}/{args.name}] %(levelname)s %(message)s",
    )
    return uvloop.run(_amain(args)) if uvloop is not None else asyncio.run(_amain(args))
