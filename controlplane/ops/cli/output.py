"""What every `kcp` command prints: tables, `--json`, and one way to report an error."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from controlplane.errors import (
    AuthenticationFailed,
    InvalidRequest,
    KcpError,
    PermissionDenied,
    ReadOnly,
    RedisUnavailable,
    WrongData,
)
from controlplane.settings import Settings
from controlplane.tls import redact_url

#: The exit codes, one per thing the user fixes (listed in the `kcp` docstring and the docs).
EXIT_FAILED, EXIT_BAD_INPUT, EXIT_REDIS, EXIT_AUTH, EXIT_PERMISSION, EXIT_WRONG_DATA = 1, 2, 3, 4, 5, 6


def table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)


def emit(args: argparse.Namespace, data: Any, human: Callable[[Any], str]) -> None:
    print(json.dumps(data, indent=2, default=str) if args.json else human(data))


def report_error(exc: KcpError, settings: Settings) -> int:
    """Tell the user what went wrong, the same way for every command; the exit code for it."""
    url = redact_url(settings.redis_url)
    hint, code = "", EXIT_FAILED
    if isinstance(exc, RedisUnavailable):
        hint, code = f"is Redis running at {url}?", EXIT_REDIS
    elif isinstance(exc, ReadOnly):
        hint, code = "a replica, or a failover under way: point the URL at the primary, or retry", EXIT_REDIS
    elif isinstance(exc, AuthenticationFailed):
        hint = "check the user name and password: KCP_REDIS_USERNAME, KCP_REDIS_PASSWORD or the URL"
        code = EXIT_AUTH
    elif isinstance(exc, PermissionDenied):
        hint, code = (
            "the ACL user lacks this right: `kcp acl` writes the rules each role needs",
            EXIT_PERMISSION,
        )
    elif isinstance(exc, WrongData):
        hint, code = (
            f"a key holds data kcp did not write: does something else use prefix {settings.prefix!r}?",
            EXIT_WRONG_DATA,
        )
    elif isinstance(exc, InvalidRequest):
        code = EXIT_BAD_INPUT
    print(f"kcp: {exc}" + (f" ({hint})" if hint else ""), file=sys.stderr)
    return code
