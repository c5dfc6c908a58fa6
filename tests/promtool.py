"""promtool, the Prometheus checker, for the tests that validate an exposition or rules."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def promtool_run(*args: str, stdin: str | None = None, cwd: Path | None = None) -> str:
    """`promtool ARGS` output; asserts it exits 0 (skips the test where promtool is absent)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package `prometheus`; .ci/run installs it)")
    res = subprocess.run([promtool, *args], input=stdin, capture_output=True, text=True, timeout=60, cwd=cwd)
    assert res.returncode == 0, res.stdout + res.stderr
    return (res.stdout + res.stderr).strip()


def promtool_check(text: str) -> str:
    """`promtool check metrics` output for `text`; asserts it exits 0."""
    return promtool_run("check", "metrics", stdin=text)
