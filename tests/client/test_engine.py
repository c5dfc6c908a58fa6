"""OrchestrationEngine: eligibility, the routing strategies, retries, failover and the concurrency bound.

Pure in-memory: kernels are `KernelRecord`s, the engine's `ClusterTarget` is a fake.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pytest

from controlplane.client.engine import KernelBusy, OrchestrationEngine, Trace
from controlplane.client.estimates import ESTIMATE_DECAY_S, KernelStats, RetryBudget
from controlplane.client.routing import Attempt, Placed, Plan, kernel_gone
from controlplane.errors import DispatchTimeout, InvalidRequest, KernelError, KernelGone, NoKernelAvailable
from controlplane.protocol.jobs import Outcome
from controlplane.protocol.models import (
    KernelLoad,
    KernelState,
    LoadBalancerConfig,
    OrchestrationConfig,
    RoutingStrategy,
)
from controlplane.protocol.records import KernelRecord
from controlplane.protocol.requests import SyscallRequest, parse_request

pytestmark = pytest.mark.unit

PING = parse_request({"type": "ping"})


def kernel(
    n: int,
    *,
    state: KernelState = KernelState.RUNNING,
    syscalls: str = "PING READ WRITE",
    capabilities: str = "",
) -> KernelRecord:
    return KernelRecord(
        cluster="c1",
        name=f"kernel-{n}",
        agent="agent-1",
        state=state,
        epoch=n,
        syscalls=syscalls,
        capabilities=capabilities,
    )


def kernels(count: int) -> list[KernelRecord]:
    return [kernel(n) for n in range(1, count + 1)]


def outcome(name: str, *, error_type: str = "", error: str = "") -> Outcome:
    return Outcome(
        job_id="j",
        kernel=name,
        success=not error_type,
        value=None if error_type else {"from": name},
        error=error,
        error_type=error_type,
        attempt=1,
        enqueue_ms=1_000,
        start_ms=1_002,
        finish_ms=1_010,
    )


def engine(**config: Any) -> OrchestrationEngine:
    config.setdefault("strategy", RoutingStrategy.ROUND_ROBIN)
    return OrchestrationEngine(OrchestrationConfig(**config), rng=random.Random(7))


Reaction = Callable[[KernelRecord], Outcome]


def attempt(record: KernelRecord, react: Reaction) -> Attempt:
    """The attempt of a plan whose first candidate `record` took the job, as `react` went: a
    `DispatchTimeout` it raises ends the wait, a `KernelBusy` means nothing was enqueued."""
    try:
        return Attempt(Placed(record.name, 1), react(record))
    except DispatchTimeout as exc:
        return Attempt(Placed(record.name, 1), None, exc)


class FakeCluster:
    """`candidates` returns fixed kernels and loads; `submit` records the plan's first kernel
    and runs a reaction.

    `reactions` are consumed one per submit; when they run out every submit succeeds."""

    def __init__(
        self,
        records: Sequence[KernelRecord],
        *reactions: Reaction,
        loads: dict[str, KernelLoad] | None = None,
    ) -> None:
        self.records = list(records)
        self.loads = loads or {}
        self.reactions = list(reactions)
        self.calls: list[str] = []

    async def candidates(self, time_left: float) -> tuple[list[KernelRecord], dict[str, KernelLoad]]:
        assert time_left > 0
        return self.records, self.loads

    async def submit(self, plan: Plan, time_left: float) -> Attempt:
        assert time_left > 0
        self.calls.append(plan.first.name)
        react = self.reactions.pop(0) if self.reactions else succeed
        return attempt(plan.first, react)

    async def run(
        self, eng: OrchestrationEngine, request: SyscallRequest = PING, *, kernel: str | None = None
    ) -> Outcome:
        return await eng.execute(self, request, kernel=kernel)


class Submitting:
    """A target with `cluster`'s candidates and a test's own `submit`."""

    def __init__(self, cluster: FakeCluster, submit: Callable[[Plan, float], Awaitable[Attempt]]) -> None:
        self.candidates, self.submit = cluster.candidates, submit


def succeed(record: KernelRecord) -> Outcome:
    return outcome(record.name)


def time_out(record: KernelRecord) -> Outcome:
    raise DispatchTimeout(f"no result from {record.name}")


def busy(record: KernelRecord) -> Outcome:
    raise KernelBusy(record.name)


def fail(record: KernelRecord) -> Outcome:
    return outcome(record.name, error_type="HandlerError", error="boom")


# ---------------------------------------------------------------- eligible


def test_eligible_keeps_only_running_kernels() -> None:
    records = [
        kernel(1),
        kernel(2, state=KernelState.PENDING),
        kernel(3, state=KernelState.DRAINING),
        kernel(4, state=KernelState.STOPPED),
        kernel(5),
    ]
    assert [k.name for k in engine().eligible(records, PING)] == ["kernel-1", "kernel-5"]


def test_eligible_with_no_running_kernel_is_empty() -> None:
    assert engine().eligible([kernel(1, state=KernelState.PENDING)], PING) == []


def test_unknown_syscall_is_an_invalid_request_listing_the_known_ones() -> None:
    records = [kernel(1), kernel(2, syscalls="PING COMPUTE")]
    with pytest.raises(InvalidRequest, match="INFER") as info:
        engine().eligible(records, parse_request({"type": "infer"}))
    assert "COMPUTE, PING, READ, WRITE" in str(info.value)


def test_missing_capability_is_no_kernel_available() -> None:
    records = [kernel(1, capabilities="cpu"), kernel(2, capabilities="cpu fp64")]
    with pytest.raises(NoKernelAvailable, match="gpu"):
        engine().eligible(records, parse_request({"type": "PING", "requires": ["gpu"]}))


def test_capabilities_must_all_match() -> None:
    records = [
        kernel(1, capabilities="gpu"),
        kernel(2, capabilities="cpu fp64 gpu"),
        kernel(3, capabilities="fp64"),
    ]
    request = parse_request({"type": "PING", "requires": ["gpu", "fp64"]})
    assert [k.name for k in engine().eligible(records, request)] == ["kernel-2"]


# ---------------------------------------------------------------- select


def picks(
    eng: OrchestrationEngine,
    pool: Sequence[KernelRecord],
    times: int,
    *,
    loads: dict[str, KernelLoad] | None = None,
    exclude: frozenset[str] = frozenset(),
) -> list[str]:
    """The names of `times` consecutive `select` picks (each must find a kernel)."""
    names = []
    for _ in range(times):
        picked = eng.select(pool, loads or {}, set(exclude))
        assert picked is not None
        names.append(picked.first.name)
    return names


@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_round_robin_rotates_evenly(count: int) -> None:
    pool = kernels(count)
    names = picks(engine(), pool, 3 * count)
    assert Counter(names) == {k.name: 3 for k in pool}
    if count > 1:  # a rotation: never the same kernel twice in a row
        assert all(a != b for a, b in itertools.pairwise(names))


def test_round_robin_skips_excluded_kernels() -> None:
    eng, pool = engine(), kernels(3)
    assert Counter(picks(eng, pool, 6, exclude=frozenset({"kernel-2"}))) == {"kernel-1": 3, "kernel-3": 3}
    assert eng.select(pool, {}, {k.name for k in pool}) is None


def test_random_covers_every_kernel() -> None:
    pool = kernels(4)
    assert set(picks(engine(strategy=RoutingStrategy.RANDOM), pool, 200)) == {k.name for k in pool}


def test_random_is_reproducible_with_a_seeded_rng() -> None:
    pool = kernels(4)
    first = picks(engine(strategy=RoutingStrategy.RANDOM), pool, 20)
    assert picks(engine(strategy=RoutingStrategy.RANDOM), pool, 20) == first
    assert len(set(first)) > 1


def test_primary_fallback_picks_the_primary_then_the_next() -> None:
    pool = kernels(3)
    eng = engine(strategy=RoutingStrategy.PRIMARY_FALLBACK)  # default primary: the first kernel
    assert picks(eng, pool, 5) == ["kernel-1"] * 5
    assert picks(eng, pool, 1, exclude=frozenset({"kernel-1"})) == ["kernel-2"]

    eng = engine(strategy=RoutingStrategy.PRIMARY_FALLBACK, primary="kernel-3")
    assert picks(eng, pool, 5) == ["kernel-3"] * 5
    assert picks(eng, pool, 1, exclude=frozenset({"kernel-3"}))[0] in {"kernel-1", "kernel-2"}


def loads_of(**cpu: float) -> dict[str, KernelLoad]:
    """`kernel_1=0.6` -> a load report for kernel-1 with cpu and memory at 0.6."""
    names = {key: key.replace("_", "-") for key in cpu}
    return {names[k]: KernelLoad(name=names[k], cpu=v, memory=v) for k, v in cpu.items()}


def test_least_loaded_picks_the_lowest_load() -> None:
    pool = kernels(3)
    loads = loads_of(kernel_1=0.6, kernel_2=0.1, kernel_3=0.4)
    eng = engine(strategy=RoutingStrategy.LEAST_LOADED)
    assert set(picks(eng, pool, 20, loads=loads)) == {"kernel-2"}
    assert picks(eng, pool, 1, loads=loads, exclude=frozenset({"kernel-2"})) == ["kernel-3"]


def test_least_loaded_breaks_ties_at_random() -> None:
    pool = kernels(3)
    loads = loads_of(kernel_1=0.2, kernel_2=0.2, kernel_3=0.7)
    eng = engine(strategy=RoutingStrategy.LEAST_LOADED)
    assert set(picks(eng, pool, 60, loads=loads)) == {"kernel-1", "kernel-2"}


def test_least_loaded_uses_the_configured_weights_and_skips_kernels_above_the_threshold() -> None:
    pool = kernels(3)
    loads = {
        "kernel-1": KernelLoad(name="kernel-1", cpu=0.9),  # busy cpu, nothing queued
        "kernel-2": KernelLoad(name="kernel-2", queue_depth=60),  # idle cpu, a long queue
        "kernel-3": KernelLoad(name="kernel-3", cpu=0.5, queue_depth=70),
    }
    by_cpu = engine(strategy=RoutingStrategy.LEAST_LOADED)  # the spec's weights: cpu counts most
    assert set(picks(by_cpu, pool, 10, loads=loads)) == {"kernel-2"}
    by_queue = LoadBalancerConfig(cpu_weight=0.1, memory_weight=0, queue_weight=1.0, health_threshold=2)
    queue_first = engine(strategy=RoutingStrategy.LEAST_LOADED, load_balancer=by_queue)
    assert set(picks(queue_first, pool, 10, loads=loads)) == {"kernel-1"}
    # a threshold of 0.5 on queue-weighted scores: kernel-2 (0.6) and kernel-3 (0.75) are unhealthy
    strict = engine(
        strategy=RoutingStrategy.LEAST_LOADED,
        load_balancer=by_queue.model_copy(update={"health_threshold": 0.5}),
    )
    plan = strict.select(pool, loads, {"kernel-1"})
    assert plan is not None and plan.first.name == "kernel-2" and plan.all_unhealthy  # said so
    plan = strict.select(pool, loads, set())
    assert plan is not None and plan.first.name == "kernel-1" and not plan.all_unhealthy
    assert strict.balancer("c1").get_summary()["healthy"] == 1


def test_capability_based_prefers_the_closest_match_while_it_is_healthy() -> None:
    plain = [kernel(n, capabilities="sim") for n in (1, 2)]
    gpu = kernel(3, capabilities="gpu sim")
    pool = [*plain, gpu]
    eng = engine(strategy=RoutingStrategy.CAPABILITY_BASED)
    idle = {k.name: KernelLoad(name=k.name) for k in pool}
    # a request needing only sim leaves the scarce gpu kernel alone, even when it is idlest
    busier = {
        **idle,
        "kernel-1": KernelLoad(name="kernel-1", cpu=0.5),
        "kernel-2": KernelLoad(name="kernel-2", cpu=0.4),
    }
    names = [eng.select(pool, busier, set(), frozenset({"sim"})) for _ in range(20)]
    assert {p.first.name for p in names if p is not None} == {"kernel-2"}  # then the least loaded
    gpu_plan = eng.select(pool, idle, set(), frozenset({"gpu", "sim"}))
    assert gpu_plan is not None and gpu_plan.first.name == "kernel-3"
    # the close matches above the health threshold: the next closest takes it, and is healthy
    hot = {**idle, **{k.name: KernelLoad(name=k.name, cpu=1.0, memory=1.0, queue_depth=100) for k in plain}}
    plan = eng.select(pool, hot, set(), frozenset({"sim"}))
    assert plan is not None and plan.first.name == "kernel-3" and not plan.all_unhealthy
    everyone_hot = {k.name: KernelLoad(name=k.name, cpu=1.0, memory=1.0, queue_depth=100) for k in pool}
    plan = eng.select(pool, everyone_hot, set(), frozenset({"sim"}))
    assert plan is not None and plan.first.name in {"kernel-1", "kernel-2"} and plan.all_unhealthy


async def test_the_trace_counts_every_attempt_retries_and_failovers_included() -> None:
    eng = engine(strategy=RoutingStrategy.ROUND_ROBIN, retry_count=3)
    cluster = FakeCluster(kernels(3), time_out, busy, time_out)
    trace = Trace()
    await eng.execute(cluster, PING, trace=trace)
    # two timeouts and the success; the refusal in between is no attempt
    assert len(trace.attempts) == 3 and eng.metrics.retries == 2
    assert eng.metrics.failovers == len(set(trace.attempts)) - 1


# ---------------------------------------------------------------- execute


async def test_execute_success_records_metrics() -> None:
    eng, cluster = engine(), FakeCluster(kernels(2))
    first = await cluster.run(eng)
    second = await cluster.run(eng)
    assert first.success and second.success
    assert sorted(cluster.calls) == ["kernel-1", "kernel-2"]
    m = eng.metrics
    assert (m.total_dispatches, m.successful, m.failed, m.retries, m.failovers) == (2, 2, 0, 0, 0)
    assert m.total_latency_ms == 20  # finish_ms - enqueue_ms, twice
    assert m.avg_latency_ms == 10
    assert m.dispatches_by_kernel == {"kernel-1": 1, "kernel-2": 1}


async def test_a_timeout_fails_over_to_another_kernel() -> None:
    eng, cluster = engine(), FakeCluster(kernels(3), time_out)
    result = await cluster.run(eng)
    assert result.success
    assert len(cluster.calls) == 2
    assert cluster.calls[0] != cluster.calls[1]
    assert result.kernel == cluster.calls[1]
    m = eng.metrics
    assert (m.timeouts, m.retries, m.failovers, m.successful, m.failed) == (1, 1, 1, 1, 0)


@pytest.mark.parametrize("retry_count", [0, 1, 2])
async def test_timeouts_give_up_after_retry_count_plus_one_attempts(retry_count: int) -> None:
    eng = engine(retry_count=retry_count)
    cluster = FakeCluster(kernels(3), *[time_out] * 10)
    with pytest.raises(DispatchTimeout):
        await cluster.run(eng)
    assert len(cluster.calls) == retry_count + 1
    assert len(set(cluster.calls)) == retry_count + 1  # every attempt on a kernel not tried yet
    m = eng.metrics
    assert (m.timeouts, m.retries, m.failovers, m.failed) == (retry_count + 1, retry_count, retry_count, 1)


async def test_a_busy_kernel_is_re_picked_without_consuming_an_attempt() -> None:
    eng = engine(retry_count=0)
    cluster = FakeCluster(kernels(3), busy, busy)
    result = await cluster.run(eng)
    assert result.success
    assert len(cluster.calls) == 3
    assert len(set(cluster.calls)) == 3
    assert result.kernel == cluster.calls[-1]
    assert (eng.metrics.retries, eng.metrics.failed) == (0, 0)


async def test_retries_and_failovers_count_the_kernel_redis_chose() -> None:
    """A route's own name is only its first candidate; enqueue.lua may pick another one."""
    eng = engine(strategy=RoutingStrategy.ADAPTIVE, timeout_ms=100, retry_count=1)
    ran: list[str] = []

    async def submit(plan: Plan, time_left: float) -> Attempt:
        assert plan.routed
        others = [k.name for k in plan.candidates if k.name != plan.first.name]
        chosen = others[0] if others else plan.first.name  # Redis disagrees with the local order
        ran.append(chosen)
        if len(ran) == 1:
            return Attempt(Placed(chosen, 1), None, DispatchTimeout("no result"))
        return Attempt(Placed(chosen, 1), outcome(chosen))

    result = await eng.execute(Submitting(FakeCluster(kernels(2)), submit), PING)
    assert ran[0] != ran[1] and result.kernel == ran[1]  # the retry avoided where attempt 1 ran
    assert (eng.metrics.retries, eng.metrics.failovers) == (1, 1)


async def test_a_refusal_during_a_retry_is_not_counted_as_another_retry() -> None:
    eng = engine(retry_count=1)
    cluster = FakeCluster(kernels(3), time_out, busy)
    assert (await cluster.run(eng)).success
    assert len(cluster.calls) == 3  # timed out, refused, answered
    assert (eng.metrics.timeouts, eng.metrics.retries, eng.metrics.failovers) == (1, 1, 1)


async def test_a_kernel_error_is_not_retried_under_round_robin() -> None:
    eng, cluster = engine(), FakeCluster(kernels(3), fail)
    with pytest.raises(KernelError, match="boom") as info:
        await cluster.run(eng)
    assert info.value.error_type == "HandlerError"
    assert info.value.kernel == cluster.calls[0]
    assert len(cluster.calls) == 1
    assert (eng.metrics.failed, eng.metrics.retries) == (1, 0)


async def test_a_kernel_error_is_retried_on_the_next_kernel_under_primary_fallback() -> None:
    eng = engine(strategy=RoutingStrategy.PRIMARY_FALLBACK)
    cluster = FakeCluster(kernels(3), fail)
    result = await cluster.run(eng)
    assert result.success
    assert cluster.calls == ["kernel-1", "kernel-2"]
    assert (eng.metrics.retries, eng.metrics.failovers) == (1, 1)


@pytest.mark.parametrize("error_type", ["InvalidArguments", "UnknownSyscall"])
async def test_a_bad_request_is_not_retried_even_under_primary_fallback(error_type: str) -> None:
    eng = engine(strategy=RoutingStrategy.PRIMARY_FALLBACK)
    cluster = FakeCluster(kernels(3), lambda k: outcome(k.name, error_type=error_type, error="bad"))
    with pytest.raises(KernelError):
        await cluster.run(eng)
    assert cluster.calls == ["kernel-1"]


async def test_kernel_pins_the_request() -> None:
    eng, cluster = engine(), FakeCluster(kernels(3))
    for _ in range(5):
        assert (await cluster.run(eng, kernel="kernel-2")).kernel == "kernel-2"
    assert cluster.calls == ["kernel-2"] * 5


@pytest.mark.parametrize("pinned", ["kernel-2", "kernel-9"], ids=["draining", "unknown"])
async def test_a_pinned_kernel_that_is_not_running_is_no_kernel_available(pinned: str) -> None:
    eng = engine()
    cluster = FakeCluster([kernel(1), kernel(2, state=KernelState.DRAINING), kernel(3)])
    with pytest.raises(NoKernelAvailable, match=pinned):
        await cluster.run(eng, kernel=pinned)
    assert cluster.calls == []
    assert eng.metrics.failed == 1


async def test_no_running_kernel_is_no_kernel_available() -> None:
    cluster = FakeCluster([kernel(1, state=KernelState.PENDING)])
    with pytest.raises(NoKernelAvailable):
        await cluster.run(engine())
    assert cluster.calls == []


async def test_max_concurrent_bounds_the_submits_in_flight() -> None:
    eng = engine(max_concurrent=2)
    cluster = FakeCluster(kernels(3))
    gate = asyncio.Event()
    running = peak = 0

    async def gated_submit(plan: Plan, time_left: float) -> Attempt:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            await gate.wait()
        finally:
            running -= 1
        return attempt(plan.first, succeed)

    tasks = [asyncio.create_task(eng.execute(Submitting(cluster, gated_submit), PING)) for _ in range(6)]
    for _ in range(20):  # let every task get as far as it can
        await asyncio.sleep(0)
    assert (running, peak) == (2, 2)
    gate.set()
    results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=5)
    assert all(r.success for r in results)
    assert peak == 2
    assert eng.metrics.successful == 6


@pytest.mark.parametrize(
    "request_body",
    [{"type": "INFER"}, {"type": "PING", "requires": ["gpu"]}],
    ids=["unknown-syscall", "missing-capability"],
)
async def test_every_dispatch_ends_as_successful_or_failed(request_body: dict[str, Any]) -> None:
    eng, cluster = engine(), FakeCluster(kernels(2))
    await cluster.run(eng)
    with pytest.raises((InvalidRequest, NoKernelAvailable)):
        await cluster.run(eng, parse_request(request_body))
    m = eng.metrics
    assert m.total_dispatches == m.successful + m.failed == 2


async def test_a_pinned_kernel_is_retried_on_itself() -> None:
    eng = engine(retry_count=2)
    cluster = FakeCluster(kernels(3), time_out, time_out)
    assert (await cluster.run(eng, kernel="kernel-3")).kernel == "kernel-3"
    assert cluster.calls == ["kernel-3"] * 3
    assert (eng.metrics.retries, eng.metrics.failovers) == (2, 0)


async def spread_of_concurrent_dispatches(
    eng: OrchestrationEngine, cluster: FakeCluster, count: int
) -> Counter[str]:
    """Start `count` executes whose submits all block, and count where they went."""
    gate = asyncio.Event()
    placed: Counter[str] = Counter()

    async def gated_submit(plan: Plan, time_left: float) -> Attempt:
        placed[plan.first.name] += 1
        await gate.wait()
        return attempt(plan.first, succeed)

    tasks = [asyncio.create_task(eng.execute(Submitting(cluster, gated_submit), PING)) for _ in range(count)]
    for _ in range(3 * count):
        await asyncio.sleep(0)
    gate.set()
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=5)
    return placed


async def test_least_loaded_counts_its_own_inflight_work() -> None:
    eng = engine(strategy=RoutingStrategy.LEAST_LOADED)
    cluster = FakeCluster(kernels(2), loads=loads_of(kernel_1=0.3, kernel_2=0.3))
    assert await spread_of_concurrent_dispatches(eng, cluster, 20) == {"kernel-1": 10, "kernel-2": 10}


async def test_least_loaded_counts_its_own_inflight_work_without_load_reports() -> None:
    eng = engine(strategy=RoutingStrategy.LEAST_LOADED)
    cluster = FakeCluster(kernels(2))
    assert await spread_of_concurrent_dispatches(eng, cluster, 20) == {"kernel-1": 10, "kernel-2": 10}


# ---------------------------------------------------------------- routes decided in Redis


def test_round_robin_hands_redis_the_whole_rotation() -> None:
    pool = kernels(4)
    route = engine().select(pool, {}, set())
    assert route is not None and route.mode == "rr"
    names = [k.name for k in route.candidates]
    offset = route.tie  # the list is the canonical order rotated by `tie`
    assert names == [k.name for k in pool[offset:] + pool[:offset]]


def test_primary_fallback_lists_the_primary_then_the_rest_in_order() -> None:
    route = engine(strategy=RoutingStrategy.PRIMARY_FALLBACK, primary="kernel-3").select(
        kernels(4), {}, set()
    )
    assert route is not None and route.mode == "first"
    assert [k.name for k in route.candidates] == ["kernel-3", "kernel-1", "kernel-2", "kernel-4"]


def test_outlier_detection_is_on_for_adaptive_only_unless_configured() -> None:
    assert engine(strategy=RoutingStrategy.ADAPTIVE).outlier_detection
    assert not engine().outlier_detection
    rr = engine(outlier_detection=True).select(kernels(3), {}, set())
    assert rr is not None and rr.routed and rr.outlier is not None and rr.cluster_size == 3
    random_pick = engine(strategy=RoutingStrategy.RANDOM, outlier_detection=True).select(
        kernels(3), {}, set()
    )
    assert random_pick is not None and random_pick.routed and random_pick.outlier is not None


async def test_adaptive_compares_distinct_candidates_with_what_it_learned() -> None:
    eng = engine(strategy=RoutingStrategy.ADAPTIVE, adaptive_choices=3)
    cluster = FakeCluster(kernels(5))
    for _ in range(40):
        await cluster.run(eng)  # every outcome: 8 ms of service (start 1002, finish 1010)
    route = eng.select(kernels(5), {}, set())
    assert route is not None and route.mode == "p2c"
    assert len({k.name for k in route.candidates}) == 3
    assert all(s == pytest.approx(8.0) for s in route.service_ms)
    assert route.error_rate == (0.0, 0.0, 0.0)
    assert route.load_expiry_ms == 12_000 and route.outlier is not None


async def test_adaptive_spreads_concurrent_work_without_redis() -> None:
    eng = engine(strategy=RoutingStrategy.ADAPTIVE)
    placed = await spread_of_concurrent_dispatches(eng, FakeCluster(kernels(4)), 40)
    assert placed == {f"kernel-{n}": 10 for n in range(1, 5)}


def test_adaptive_relaxes_a_pessimistic_estimate_of_a_kernel_it_no_longer_sees() -> None:
    eng = engine(strategy=RoutingStrategy.ADAPTIVE, adaptive_choices=2)
    pool = kernels(2)
    slow, fast = (eng.estimates.stats.setdefault(("c1", k.name), KernelStats()) for k in pool)
    for _ in range(30):  # enough replies that the estimates stand on their own
        slow.observe(True, 400.0)
        fast.observe(True, 50.0)
    # each rests on 19 replies (the EWMA's memory) against 10 of the peers' median, 225
    shrunk = [(19 * 400 + 10 * 225) / 29, (19 * 50 + 10 * 225) / 29]
    assert eng.estimates.service(pool, pool) == [pytest.approx(v, rel=1e-3) for v in shrunk]
    slow.at -= 3 * ESTIMATE_DECAY_S  # unobserved for a while: most of the way back to the median
    relaxed = eng.estimates.service(pool, pool)[0]
    assert relaxed == pytest.approx(225 + (shrunk[0] - 225) * math.exp(-3), rel=1e-3)


def test_a_first_reply_weighs_little_against_the_peers_and_a_running_mean_follows() -> None:
    eng = engine(strategy=RoutingStrategy.ADAPTIVE)
    pool = kernels(3)
    stats = [eng.estimates.stats.setdefault(("c1", k.name), KernelStats()) for k in pool]
    for _ in range(19):
        stats[0].observe(True, 50.0)
        stats[1].observe(True, 50.0)
    stats[2].observe(True, 300.0)  # one unlucky first reply of a new kernel
    # rel: the estimate decays towards the peers' with the wall time since the observations
    assert eng.estimates.service(pool, pool)[2] == pytest.approx((300 + 10 * 50) / 11, rel=1e-3)
    stats[2].observe(True, 20.0)  # the first replies are averaged, not an EWMA that remembers 300
    assert stats[2].service_ms == pytest.approx(160.0)


def test_an_ejected_kernel_is_skipped_until_readmitted_and_panic_routes_to_all() -> None:
    now = 1_700_000_000.0
    eng = OrchestrationEngine(
        OrchestrationConfig(strategy=RoutingStrategy.ADAPTIVE), rng=random.Random(1), clock=lambda: now
    )
    pool = kernels(4)
    eng.estimates.ejected[("c1", "kernel-2")] = int(now * 1000) + 5000
    for _ in range(20):
        route = eng.select(pool, {}, set())
        assert route is not None and "kernel-2" not in {k.name for k in route.candidates}
    for n in (1, 3):  # three of four out: fewer than half admitted, so nobody is skipped
        eng.estimates.ejected[("c1", f"kernel-{n}")] = int(now * 1000) + 5000
    route = eng.select(pool, {}, set())
    assert route is not None and len(route.candidates) == 4
    now += 6  # every ejection over
    eng.estimates.ejected.pop(("c1", "kernel-1"))
    eng.estimates.ejected.pop(("c1", "kernel-3"))
    route = eng.select(pool, {}, set())
    assert route is not None and len(route.candidates) == 4


async def test_a_kernel_failing_far_more_than_its_peers_is_a_rate_outlier() -> None:
    eng = engine(strategy=RoutingStrategy.ADAPTIVE)
    flaky = kernel(1)
    healthy = [kernel(2), kernel(3)]
    for _ in range(12):
        eng.estimates.observe("c1", "kernel-1", outcome("kernel-1", error_type="HandlerError", error="boom"))
        for k in healthy:
            eng.estimates.observe("c1", k.name, outcome(k.name))
    route = eng.select([flaky, *healthy], {}, set())
    assert route is not None and route.rate_outliers == frozenset({"kernel-1"})


def test_bad_requests_are_not_held_against_a_kernel() -> None:
    eng = engine(strategy=RoutingStrategy.ADAPTIVE)
    bad = outcome("kernel-1", error_type="InvalidArguments", error="bad")
    for _ in range(20):
        eng.estimates.observe("c1", "kernel-1", bad)
    assert eng.estimates.stats[("c1", "kernel-1")].error_rate == 0.0


async def test_ejections_reported_by_redis_are_learned() -> None:
    eng = engine(strategy=RoutingStrategy.ADAPTIVE)

    async def submit(plan: Plan, time_left: float) -> Attempt:
        assert plan.routed
        placed = Placed(plan.first.name, 1, ejected={"kernel-3": 2**42})  # enqueue.lua saw kernel-3 ejected
        return Attempt(placed, outcome(plan.first.name))

    await eng.execute(Submitting(FakeCluster(kernels(4)), submit), PING)
    for _ in range(20):
        route = eng.select(kernels(4), {}, set())
        assert route is not None and "kernel-3" not in {k.name for k in route.candidates}


# ---------------------------------------------------------------- retry budget


async def test_an_empty_retry_budget_stops_retries() -> None:
    eng = engine(retry_count=3, retry_budget=0.0, min_retries_per_s=0.0)
    eng.budget.tokens = 0.0
    cluster = FakeCluster(kernels(3), *[time_out] * 10)
    with pytest.raises(DispatchTimeout):
        await cluster.run(eng)
    assert len(cluster.calls) == 1
    assert eng.metrics.retries == 0


def test_the_retry_budget_refills_from_requests_and_time() -> None:
    now = 0.0
    budget = RetryBudget(0.5, 1.0, clock=lambda: now)
    budget.tokens = 0.0
    assert not budget.withdraw()
    budget.deposit()
    budget.deposit()  # two requests: one retry's worth
    assert budget.withdraw()
    assert not budget.withdraw()
    now += 2.0  # the floor: one per second
    assert budget.withdraw() and budget.withdraw() and not budget.withdraw()


# ---------------------------------------------------------------- capabilities


def test_a_capability_miss_says_what_the_kernels_declare() -> None:
    records = [kernel(1, capabilities="infer"), kernel(2, capabilities="infer sim")]
    with pytest.raises(NoKernelAvailable, match=r"\['gpu'\].*declare: infer, sim"):
        engine(strategy=RoutingStrategy.CAPABILITY_BASED).eligible(
            records, parse_request({"type": "PING", "requires": ["gpu"]})
        )


# ------------------------------------------------------------ pinned to an incarnation
async def test_a_request_pinned_to_an_incarnation_goes_there_in_a_plain_enqueue() -> None:
    plans: list[Plan] = []
    cluster = FakeCluster(kernels(3))

    async def submit(plan: Plan, time_left: float) -> Attempt:
        plans.append(plan)
        return attempt(plan.first, time_out if len(plans) == 1 else succeed)

    eng = engine(strategy=RoutingStrategy.ADAPTIVE, retry_count=2)
    result = await eng.execute(Submitting(cluster, submit), PING, kernel="kernel-2", epoch=2)
    assert result.kernel == "kernel-2"
    # the retry after a timeout goes to the same incarnation; enqueue.lua checks its epoch
    assert [(p.first.name, p.epoch, len(p.candidates), p.routed) for p in plans] == [
        ("kernel-2", 2, 1, False)
    ] * 2


@pytest.mark.parametrize(
    ("records", "why"),
    [
        ([kernel(1)], "is gone: the cluster has no kernel kernel-2"),
        ([kernel(1), kernel(5)], "was replaced by"),
    ],
)
async def test_a_pinned_incarnation_that_is_gone_or_replaced_is_kernel_gone(
    records: list[KernelRecord], why: str
) -> None:
    if len(records) == 2:  # kernel-2 now runs as epoch 5
        records[1] = records[1].model_copy(update={"name": "kernel-2"})
    cluster = FakeCluster(records)
    with pytest.raises(KernelGone, match=why) as gone:
        await engine().execute(cluster, PING, kernel="kernel-2", epoch=2)
    assert (gone.value.kernel, gone.value.epoch) == ("kernel-2", 2)
    assert cluster.calls == [], "nothing was enqueued"


@pytest.mark.parametrize(
    ("current", "says"),
    [
        (None, "kernel-2@2 is gone: the cluster has no kernel kernel-2"),
        (5, "kernel-2@2 was replaced by kernel-2@5, which starts with empty memory"),
        (1, "kernel kernel-2 has no incarnation 2: it runs as kernel-2@1"),  # never ran
    ],
)
def test_kernel_gone_says_what_became_of_the_incarnation(current: int | None, says: str) -> None:
    gone = kernel_gone("kernel-2", 2, current)
    assert says in str(gone) and (gone.kernel, gone.epoch) == ("kernel-2", 2)


async def test_kernel_gone_from_the_kernel_side_is_not_retried() -> None:
    gone = outcome(
        "kernel-1", error_type="KernelGone", error="job j is pinned to kernel kernel-1@1, which is gone"
    )
    cluster = FakeCluster(kernels(2), lambda record: gone)
    with pytest.raises(KernelGone, match="which is gone"):
        await engine(strategy=RoutingStrategy.PRIMARY_FALLBACK, retry_count=3).execute(
            cluster, PING, kernel="kernel-1"
        )
    assert cluster.calls == ["kernel-1"]
