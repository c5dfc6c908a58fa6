"""What each process loads at start: a kernel (re)start pays for every module it imports."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

#: Loaded by the client, the bus or the exporter; a kernel or an agent needs none of them.
NOT_FOR_DAEMONS = (
    "controlplane.client",
    "controlplane.bus",
    "controlplane.ops",
    "controlplane.service",
    "prometheus_client",
)


def loaded_after(module: str) -> list[str]:
    code = (
        f"import importlib, json, sys; importlib.import_module({module!r}); "
        "print(json.dumps(sorted(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    modules: list[str] = json.loads(out.stdout)
    return modules


@pytest.mark.parametrize("entry", ["kernel_agent.kernel.main", "kernel_agent.agent.main"])
def test_a_daemon_loads_neither_the_client_the_bus_nor_the_exporter(entry: str) -> None:
    modules = loaded_after(entry)
    assert entry in modules
    unwanted = [m for m in modules if m.startswith(NOT_FOR_DAEMONS)]
    assert unwanted == []


def test_the_kernel_does_not_load_the_agent_and_the_agent_not_the_kernel() -> None:
    assert not [m for m in loaded_after("kernel_agent.kernel.main") if m.startswith("kernel_agent.agent")]
    assert not [m for m in loaded_after("kernel_agent.agent.main") if m.startswith("kernel_agent.kernel")]
