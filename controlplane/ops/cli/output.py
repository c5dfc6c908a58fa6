"""What every `kcp` command prints: tables, `--json`, and one way to report an error."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

from controlplane.errors import KcpError
from controlplane.ops.explain import explain_error


def _seconds(text: str, *, zero: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (value >= 0 if zero else value > 0) or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected seconds {'>= 0' if zero else '> 0'}, got {text!r}")
    return value


def positive_seconds(text: str) -> float:
    """argparse type: a number of seconds above 0."""
    return _seconds(text, zero=False)


def non_negative_seconds(text: str) -> float:
    """argparse type: a number of seconds, 0 or more."""
    return _seconds(text, zero=True)


def _count(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: a count, 0 or more."""
    return _count(text, 0)


def positive_int(text: str) -> int:
    """argparse type: a count, 1 or more."""
    return _count(text, 1)


def port(text: str) -> int:
    """argparse type: a TCP port, 0-65535 (0: any free one)."""
    value = _count(text, 0)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port 0-65535, got {text!r}")
    return value


def table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)


def emit(args: argparse.Namespace, data: Any, human: Callable[[Any], str]) -> None:
    print(json.dumps(data, indent=2, default=str) if args.json else human(data), flush=True)


def ms(value: float) -> str:
    """A duration in milliseconds as a person reads it: fractions below 10 ms (0.53 ms, 4.2 ms)."""
    if value < 1:
        return f"{value:.2f} ms"
    return f"{value:.1f} ms" if value < 10 else f"{value:.0f} ms"


def memory(fraction: float, rss_bytes: int | None) -> str:
    """A kernel's memory: MiB and the share of its host's RAM, or the share alone when its load
    record has no `memory_bytes` (an older agent's)."""
    share = f"{fraction:.2%}"
    return f"{rss_bytes / 2**20:.1f} MiB ({share})" if rss_bytes is not None else share


def fail(args: argparse.Namespace, message: str, error_type: str, code: int, **extra: Any) -> int:
    """Report a failure: one line on stderr, or with `--json` one object on stdout (`error`,
    `error_type`, `exit_code` and `extra`); returns the exit code."""
    if getattr(args, "json", False):
        print(
            json.dumps({"error": message, "error_type": error_type, "exit_code": code, **extra}), flush=True
        )
    else:
        print(f"kcp: {message}", file=sys.stderr, flush=True)
    return code


def report_error(exc: KcpError, args: argparse.Namespace) -> int:
    """Tell the user what went wrong, the same way for every command; the exit code for it."""
    text, code = explain_error(exc, args.settings)
    return fail(args, text, type(exc).__name__, code)
