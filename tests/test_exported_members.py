"""The public surface (httpx style): `__all__` is exactly what the package exports, spec names included."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

import controlplane

pytestmark = pytest.mark.unit

SPEC_NAMES = {
    "OrchestrationTools",
    "KernelCluster",
    "OrchestrationEngine",
    "LoadBalancer",
    "ClusterStatus",
    "RoutingStrategy",
    "BusTopic",
    "BusMessage",
    "KernelLoad",
    "LoadBalancerConfig",
    "ClusterConfig",
    "OrchestrationConfig",
    "OrchestrationMetrics",
    "ClusterMetrics",
    "KernelMetricsSnapshot",
    "InterKernelBus",
    "ClusterMetricsCollector",
}


def public_members() -> list[str]:
    """Public names bound in the package once every export is loaded, submodules left out."""
    for name in controlplane.__all__:
        getattr(controlplane, name)
    return sorted(
        name
        for name, value in vars(controlplane).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    )


def test_all_is_exactly_the_sorted_public_members() -> None:
    assert controlplane.__all__ == public_members()


def test_all_names_resolve() -> None:
    for name in controlplane.__all__:
        assert getattr(controlplane, name) is not None


def test_all_has_the_spec_names() -> None:
    assert sorted(SPEC_NAMES - set(controlplane.__all__)) == []


def test_importing_the_package_loads_none_of_its_parts() -> None:
    """The spec's names load when first used: `import controlplane` alone imports no submodule."""
    code = "import sys, controlplane; print(sorted(m for m in sys.modules if m.startswith('controlplane')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.split() == ["['controlplane']"]


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        controlplane.Nope  # noqa: B018
