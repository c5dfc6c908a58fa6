"""`kcp agent`, `kcp-agent` and `python -m kernel_agent`: run the agent daemon on this host."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys

import pydantic

from controlplane.errors import InvalidRequest, KcpError, exit_code
from controlplane.redis.connect import connect, wait_for_redis
from controlplane.settings import Settings, explain_settings_error
from kernel_agent.agent.daemon import Agent, AgentConfig
from kernel_agent.contract import split_capabilities

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser, *, common: bool = True) -> None:
    """The agent's flags; `common=False` leaves out those `kcp` already has (--redis-url, ...)."""
    if common:
        parser.add_argument(
            "--redis-url", help="Redis URL (default: $KCP_REDIS_URL or redis://127.0.0.1:6379/0)"
        )
        parser.add_argument("--prefix", help="key prefix (default: $KCP_PREFIX or kcp:)")
        parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--name", help="agent name (default: the host name)")
    parser.add_argument("--slots", type=int, default=4, help="kernels this agent may host (default 4)")
    parser.add_argument(
        "--capabilities",
        default="",
        help="comma-separated, e.g. gpu,infer: declared by the agent and every kernel it hosts",
    )
    parser.add_argument("--labels", default="{}", help='JSON object, e.g. {"zone": "a"}')
    parser.add_argument(
        "--handlers",
        action="append",
        default=[],
        help="module with register(registry) adding user syscalls (repeatable)",
    )
    parser.add_argument(
        "--arq-settings",
        action="append",
        default=[],
        metavar="PATH",
        help="arq WorkerSettings (e.g. mypkg.worker.WorkerSettings) the kernels run (repeatable)",
    )
    parser.add_argument("--concurrency", type=int, default=1, help="jobs each kernel runs at once")
    parser.add_argument(
        "--no-fork-server",
        dest="fork_server",
        action="store_false",
        help="exec each kernel (python -m kernel_agent.kernel) instead of forking it from a fork server",
    )


def run(args: argparse.Namespace) -> int:
    """Build settings and config from parsed flags and run until SIGTERM/SIGINT.

    Raises `InvalidRequest` for a bad flag or setting, `AuthenticationFailed` or
    `PermissionDenied` when Redis refuses the agent at start-up: `kcp` reports them."""
    overrides = {k: v for k, v in (("redis_url", args.redis_url), ("prefix", args.prefix)) if v}
    try:
        settings = Settings(**overrides)
        config = AgentConfig(
            slots=args.slots,
            capabilities=split_capabilities(args.capabilities),
            labels=json.loads(args.labels),
            handlers=args.handlers,
            arq_settings=args.arq_settings,
            concurrency=args.concurrency,
            fork_server=args.fork_server,
            **({"name": args.name} if args.name else {}),
        )
    except (pydantic.ValidationError, ValueError) as exc:
        text = explain_settings_error(exc) if isinstance(exc, pydantic.ValidationError) else str(exc)
        raise InvalidRequest(f"invalid agent configuration: {text}") from None
    logging.basicConfig(level=args.log_level, format="%(asctime)s agent %(levelname)s %(message)s")
    return asyncio.run(_run(settings, config))


async def _run(settings: Settings, config: AgentConfig) -> int:
    redis = connect(settings.redis_url)
    try:
        agent = Agent(redis, settings, config)
    except (ImportError, ValueError) as exc:  # --handlers: a module not found, or without register()
        await redis.aclose()
        raise InvalidRequest(f"invalid agent configuration: {exc}") from None
    stop = asyncio.Event()

    def on_signal() -> None:
        stop.set()
        agent.request_stop()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        if await wait_for_redis(redis, log=logger, what=f"agent {config.name}", stop=stop):
            await agent.run()
    finally:
        await redis.aclose()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kcp-agent", description="Run a kcp kernel agent on this host.")
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except KcpError as exc:
        print(f"kcp-agent: {exc}", file=sys.stderr)
        return exit_code(exc)
