"""What every `kcp` command prints: tables, `--json`, and one way to report an error."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from controlplane.errors import InvalidRequest, KcpError, RedisUnavailable
from controlplane.settings import Settings
from controlplane.tls import redact_url

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_REDIS = 1, 2, 3


def table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)


def emit(args: argparse.Namespace, data: Any, human: Callable[[Any], str]) -> None:
    print(json.dumps(data, indent=2, default=str) if args.json else human(data))


def report_error(exc: KcpError, settings: Settings) -> int:
    """Tell the user what went wrong, the same way for every command; the exit code for it."""
    if isinstance(exc, RedisUnavailable):
        print(f"kcp: {exc} (is Redis running at {redact_url(settings.redis_url)}?)", file=sys.stderr)
        return EXIT_REDIS
    print(f"kcp: {exc}", file=sys.stderr)
    return EXIT_BAD_INPUT if isinstance(exc, InvalidRequest) else EXIT_FAILED
