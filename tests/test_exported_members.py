"""The public surface (httpx style): `__all__` is exactly what the package exports, spec names included."""

from __future__ import annotations

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
    """Public names bound in the package, submodules (attributes set by importing them) left out."""
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
