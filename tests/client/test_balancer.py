"""Unit tests for the pure load-balancing policy (`controlplane.balancer`)."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controlplane.client.balancer import LATENCY_WEIGHT, LoadBalancer
from controlplane.errors import InvalidRequest
from controlplane.protocol.models import LoadBalancerConfig

pytestmark = pytest.mark.unit

SPEC_CONFIG = LoadBalancerConfig(
    cpu_weight=0.5,
    memory_weight=0.2,
    queue_weight=0.2,
    error_weight=0.1,
    max_latency_ms=1000.0,
    health_threshold=0.8,
)


def spec_balancer() -> LoadBalancer:
    balancer = LoadBalancer(SPEC_CONFIG, rng=random.Random(0), clock=lambda: 1234.5)
    for name in ("kernel-1", "kernel-2", "kernel-3"):
        balancer.register(name)
    balancer.update_load("kernel-1", cpu=0.5, memory=0.3, queue_depth=10)
    balancer.update_load("kernel-2", cpu=0.7, memory=0.5, queue_depth=25)
    balancer.update_load("kernel-3", cpu=0.3, memory=0.2, queue_depth=5)
    return balancer


# ------------------------------------------------------------------ the spec example


def test_spec_example_selects_kernel_3() -> None:
    assert spec_balancer().select_kernel() == "kernel-3"


def test_spec_example_scores() -> None:
    balancer = spec_balancer()
    # 0.5*cpu + 0.2*memory + 0.2*queue_depth/100 (no errors, no latency)
    assert balancer.score("kernel-1") == pytest.approx(0.33)
    assert balancer.score("kernel-2") == pytest.approx(0.50)
    assert balancer.score("kernel-3") == pytest.approx(0.20)


def test_spec_example_summary() -> None:
    summary = spec_balancer().get_summary()
    assert summary == {"kernels": 3, "avg_load": 0.3433, "max_load": 0.5, "min_load": 0.2, "healthy": 3}
    assert summary["min_load"] < summary["avg_load"] < summary["max_load"]


def test_load_report_is_stamped_by_clock() -> None:
    load = spec_balancer().get_load("kernel-1")
    assert load is not None
    assert (load.cpu, load.memory, load.queue_depth, load.updated_at) == (0.5, 0.3, 10, 1234.5)


def test_empty_summary() -> None:
    assert LoadBalancer().get_summary() == {
        "kernels": 0,
        "avg_load": 0.0,
        "max_load": 0.0,
        "min_load": 0.0,
        "healthy": 0,
    }


# ------------------------------------------------------------------ the score


def test_weights_change_the_pick() -> None:
    def pick(config: LoadBalancerConfig) -> str | None:
        balancer = LoadBalancer(config)
        balancer.update_load("cpu-bound", cpu=0.6, memory=0.1)
        balancer.update_load("memory-bound", cpu=0.1, memory=0.6)
        return balancer.select_kernel()

    assert pick(LoadBalancerConfig(cpu_weight=0.9, memory_weight=0.1)) == "memory-bound"
    assert pick(LoadBalancerConfig(cpu_weight=0.1, memory_weight=0.9)) == "cpu-bound"


def test_queue_and_error_terms() -> None:
    balancer = LoadBalancer(LoadBalancerConfig(max_queue_depth=50))
    balancer.update_load("q", queue_depth=25)
    balancer.update_load("deep", queue_depth=10_000)  # capped at max_queue_depth
    balancer.update_load("e", error_rate=0.5)
    assert balancer.score("q") == pytest.approx(0.2 * 0.5)
    assert balancer.score("deep") == pytest.approx(0.2)
    assert balancer.score("e") == pytest.approx(0.1 * 0.5)


def test_latency_term_is_capped_and_only_when_positive() -> None:
    balancer = LoadBalancer()
    balancer.update_load("none", cpu=0.5)
    balancer.update_load("half", cpu=0.5, latency_ms=500)
    balancer.update_load("huge", cpu=0.5, latency_ms=5000)
    assert balancer.score("none") == pytest.approx(0.2)
    assert balancer.score("half") == pytest.approx(0.2 + LATENCY_WEIGHT * 0.5)
    assert balancer.score("huge") == pytest.approx(0.2 + LATENCY_WEIGHT)
    assert balancer.select_kernel() == "none"


def test_score_of_unregistered_kernel_is_none() -> None:
    balancer = LoadBalancer()
    assert balancer.score("ghost") is None
    assert balancer.get_load("ghost") is None
    assert not balancer.is_healthy("ghost")


# ------------------------------------------------------------------ health and selection


def test_health_threshold_excludes_overloaded_kernel() -> None:
    balancer = LoadBalancer(LoadBalancerConfig(health_threshold=0.3))
    balancer.update_load("light", cpu=0.5)  # 0.2
    balancer.update_load("exactly", cpu=0.75)  # 0.3: at the threshold counts as unhealthy
    assert balancer.is_healthy("light")
    assert not balancer.is_healthy("exactly")
    balancer.update_load("light", cpu=1.0, memory=1.0)  # now the worse of the two, and unhealthy
    balancer.update_load("ok", cpu=0.6)  # 0.24
    assert balancer.select_kernel() == "ok"
    assert balancer.get_summary()["healthy"] == 1


def test_high_latency_is_unhealthy_even_with_low_score() -> None:
    balancer = LoadBalancer()
    balancer.update_load("slow", latency_ms=1500)  # score 0.1 only
    balancer.update_load("busy", cpu=0.5, memory=0.5)  # score 0.35, healthy
    assert balancer.score("slow") == pytest.approx(LATENCY_WEIGHT)
    assert not balancer.is_healthy("slow")
    assert balancer.select_kernel() == "busy"


def test_panic_mode_picks_lowest_score_when_none_is_healthy() -> None:
    balancer = LoadBalancer()
    balancer.update_load("bad", cpu=1.0, memory=1.0, queue_depth=100, error_rate=1.0)  # 1.0
    balancer.update_load("less-bad", cpu=1.0, memory=1.0, queue_depth=100)  # 0.9
    balancer.update_load("slow", latency_ms=2000)  # 0.1 but too slow
    assert not any(balancer.is_healthy(name) for name in balancer.kernels)
    assert balancer.select_kernel() == "slow"
    assert balancer.select_kernel(exclude=["slow"]) == "less-bad"


def test_exclude() -> None:
    balancer = spec_balancer()
    assert balancer.select_kernel(exclude=["kernel-3"]) == "kernel-1"
    assert balancer.select_kernel(exclude=["kernel-3", "kernel-1"]) == "kernel-2"
    assert balancer.select_kernel(exclude=balancer.kernels) is None
    assert balancer.select_kernel(exclude=["not-a-kernel"]) == "kernel-3"


def test_no_kernels_selects_none() -> None:
    assert LoadBalancer().select_kernel() is None


def test_register_is_idempotent_and_unregister_forgets() -> None:
    balancer = spec_balancer()
    balancer.register("kernel-3")  # keeps its load report
    assert balancer.get_load("kernel-3") is not None
    assert balancer.kernels == ["kernel-1", "kernel-2", "kernel-3"]
    balancer.unregister("kernel-3")
    balancer.unregister("kernel-3")  # unknown: no error
    balancer.unregister("never-registered")
    assert balancer.kernels == ["kernel-1", "kernel-2"]
    assert balancer.get_load("kernel-3") is None
    assert balancer.select_kernel() == "kernel-1"
    assert balancer.get_summary()["kernels"] == 2


def test_update_load_registers_unknown_kernel() -> None:
    balancer = LoadBalancer()
    balancer.update_load("new", cpu=0.1)
    assert balancer.kernels == ["new"]


def test_ties_are_broken_at_random() -> None:
    balancer = LoadBalancer(rng=random.Random(42))
    balancer.update_load("b", cpu=0.2)
    balancer.update_load("a", cpu=0.2)
    balancer.update_load("c", cpu=0.5)
    picks = Counter(balancer.select_kernel() for _ in range(200))
    assert set(picks) == {"a", "b"}
    assert min(picks.values()) > 50


def test_seeded_rng_makes_picks_reproducible() -> None:
    def picks(seed: int) -> list[str | None]:
        balancer = LoadBalancer(rng=random.Random(seed))
        for name in ("x", "y", "z"):
            balancer.register(name)
        return [balancer.select_kernel() for _ in range(20)]

    assert picks(7) == picks(7)


# ------------------------------------------------------------------ kernels with no report yet


def test_unknown_kernel_gets_average_score_not_idle() -> None:
    balancer = spec_balancer()
    balancer.register("kernel-4")
    assert balancer.get_load("kernel-4") is None
    assert balancer.score("kernel-4") == pytest.approx((0.33 + 0.5 + 0.2) / 3)
    assert balancer.is_healthy("kernel-4")
    assert balancer.select_kernel() == "kernel-3"  # not the fresh kernel
    assert balancer.select_kernel(exclude=["kernel-3"]) == "kernel-1"  # 0.33 < 0.3433
    assert balancer.select_kernel(exclude=["kernel-3", "kernel-1"]) == "kernel-4"  # 0.3433 < 0.5
    summary = balancer.get_summary()
    assert summary["kernels"] == 4
    assert summary["avg_load"] == 0.3433  # unchanged by a kernel scored at the average
    assert summary["healthy"] == 4


def test_unknown_kernels_score_zero_when_nobody_reported() -> None:
    balancer = LoadBalancer(rng=random.Random(1))
    balancer.register("a")
    balancer.register("b")
    assert balancer.score("a") == 0.0
    assert balancer.is_healthy("a")
    assert balancer.select_kernel() in {"a", "b"}
    assert balancer.get_summary() == {
        "kernels": 2,
        "avg_load": 0.0,
        "max_load": 0.0,
        "min_load": 0.0,
        "healthy": 2,
    }


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("cpu", 1.5),
        ("cpu", -0.1),
        ("memory", 2.0),
        ("queue_depth", -1),
        ("latency_ms", -5.0),
        ("error_rate", 1.01),
        ("cpu", float("nan")),
    ],
)
def test_invalid_load_raises_and_leaves_state_unchanged(field: str, value: Any) -> None:
    balancer = spec_balancer()
    before = (balancer.kernels, balancer.get_load("kernel-1"), balancer.get_summary())
    with pytest.raises(InvalidRequest, match=field):
        balancer.update_load("kernel-1", **{field: value})
    with pytest.raises(InvalidRequest, match="'kernel-9'"):
        balancer.update_load("kernel-9", **{field: value})  # not registered either
    assert (balancer.kernels, balancer.get_load("kernel-1"), balancer.get_summary()) == before


def test_invalid_request_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="less than or equal to 1"):
        LoadBalancer().update_load("k", cpu=3.0)


# ------------------------------------------------------------------ property


NAMES = st.sampled_from([f"k{i}" for i in range(6)])
FRACTION = st.floats(min_value=0.0, max_value=1.0)
REPORT = st.tuples(
    NAMES, FRACTION, FRACTION, st.integers(0, 500), st.floats(min_value=0.0, max_value=5000.0), FRACTION
)


@given(
    registered=st.lists(NAMES, max_size=6),
    reports=st.lists(REPORT, max_size=10),
    removed=st.lists(NAMES, max_size=3),
    exclude=st.lists(NAMES, max_size=6),
    seed=st.integers(0, 2**32),
)
def test_select_returns_registered_non_excluded_or_none(
    registered: list[str],
    reports: list[tuple[str, float, float, int, float, float]],
    removed: list[str],
    exclude: list[str],
    seed: int,
) -> None:
    balancer = LoadBalancer(rng=random.Random(seed))
    for name in registered:
        balancer.register(name)
    for name, cpu, memory, depth, latency, errors in reports:
        balancer.update_load(
            name, cpu=cpu, memory=memory, queue_depth=depth, latency_ms=latency, error_rate=errors
        )
    for name in removed:
        balancer.unregister(name)
    picked = balancer.select_kernel(exclude=exclude)
    candidates = set(balancer.kernels) - set(exclude)
    if not candidates:
        assert picked is None
        return
    assert picked in candidates
    scores = {name: balancer.score(name) for name in candidates}
    healthy = {name for name in candidates if balancer.is_healthy(name)}
    pool = healthy or candidates
    assert picked in pool
    assert scores[picked] == pytest.approx(
        min(s for name, s in scores.items() if name in pool and s is not None)
    )
