"""promtool, the Prometheus checker, for the tests that validate an exposition or rules."""

from __future__ import annotations

import shutil
import subprocess

import pytest


def promtool_check(text: str) -> str:
    """`promtool check metrics` output for `text`; asserts it exits 0."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package `prometheus`; .ci/run installs it)")
    res = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=20
    )
    assert res.returncode == 0, res.stdout + res.stderr
    return (res.stdout + res.stderr).strip()
