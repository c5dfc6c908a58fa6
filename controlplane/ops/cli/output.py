"""What every `kcp` command prints: tables, `--json`, and one way to report an error."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from controlplane.errors import KcpError

# the exit codes (commands import them from here)
from controlplane.ops.explain import EXIT_AUTH as EXIT_AUTH
from controlplane.ops.explain import EXIT_BAD_INPUT as EXIT_BAD_INPUT
from controlplane.ops.explain import EXIT_FAILED as EXIT_FAILED
from controlplane.ops.explain import EXIT_PERMISSION as EXIT_PERMISSION
from controlplane.ops.explain import EXIT_REDIS as EXIT_REDIS
from controlplane.ops.explain import EXIT_WRONG_DATA as EXIT_WRONG_DATA
from controlplane.ops.explain import explain_error
from controlplane.settings import Settings


def table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)


def emit(args: argparse.Namespace, data: Any, human: Callable[[Any], str]) -> None:
    print(json.dumps(data, indent=2, default=str) if args.json else human(data))


def report_error(exc: KcpError, settings: Settings) -> int:
    """Tell the user what went wrong, the same way for every command; the exit code for it."""
    text, code = explain_error(exc, settings)
    print(f"kcp: {text}", file=sys.stderr)
    return code
