"""Contract tests of the routed enqueue (`lua/enqueue.lua` with candidates) and `lua/outlier.lua`.

Like tests/test_scripts.py, every test runs against the private redis-server (`integration`)
and against fakeredis (`unit`). Times are passed explicitly (`NOW`).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from redis.asyncio import Redis as AsyncRedis

from controlplane.client.routing import KernelBusy, Placed, Plan, enqueue, max_ejected, report
from controlplane.protocol.keys import Keys
from controlplane.protocol.models import OutlierConfig
from controlplane.protocol.records import KernelRecord
from controlplane.redis.scripts import jobs

CLUSTER = "c1"
NOW = 1_700_000_000_000
KEYS = Keys()
OUTLIER = OutlierConfig(consecutive_failures=3, base_ejection_ms=1000, max_ejection_ms=8000, slow_start_ms=0)


@pytest.fixture(
    params=[
        pytest.param("real", marks=pytest.mark.integration),
        pytest.param("fake", marks=pytest.mark.unit),
    ]
)
def r(request: pytest.FixtureRequest) -> AsyncRedis:
    client: AsyncRedis = request.getfixturevalue("redis" if request.param == "real" else "fake_redis")
    return client


def record(n: int) -> KernelRecord:
    return KernelRecord(cluster=CLUSTER, name=f"k{n}", agent=f"a{n}", state="running", epoch=n)


async def put_kernels(r: AsyncRedis, *states: str) -> list[KernelRecord]:
    for n, state in enumerate(states, 1):
        await r.hset(KEYS.kernel(CLUSTER, f"k{n}"), mapping={"state": state, "epoch": n, "agent": f"a{n}"})
    return [record(n) for n in range(1, len(states) + 1)]


async def busy(r: AsyncRedis, n: int, jobs: int, *, oldest: int = NOW) -> None:
    """Put `jobs` jobs in flight on kernel n, the oldest enqueued at `oldest`."""
    for j in range(jobs):
        await r.zadd(KEYS.inflight(CLUSTER, f"k{n}"), {f"x{n}-{j}": oldest + j})


async def report_load(r: AsyncRedis, n: int, *, age_ms: int = 0, **fields: float) -> None:
    updated = (NOW - age_ms) / 1000
    await r.hset(KEYS.load(f"a{n}", CLUSTER, f"k{n}"), mapping={**fields, "updated_at": f"{updated:.3f}"})


async def route_once(r: AsyncRedis, route: Plan, job_id: str = "j1", now: int = NOW) -> str:
    return (await place_once(r, route, job_id, now)).kernel


async def place_once(r: AsyncRedis, route: Plan, job_id: str = "j1", now: int = NOW) -> Placed:
    result = await enqueue_once(r, route, job_id, now)
    job = await r.hgetall(KEYS.job(CLUSTER, job_id))
    assert job["kernel"] == result.kernel
    assert job["epoch"] == result.kernel[1:]  # the chosen kernel's fencing epoch
    assert await r.zscore(KEYS.queue(CLUSTER, result.kernel), job_id) == now
    return result


async def enqueue_once(
    r: AsyncRedis, route: Plan, job_id: str, now: int, deadline_ms: int = 10_000
) -> Placed:
    return await enqueue(
        r,
        KEYS,
        route,
        job_id=job_id,
        payload="{}",
        reply_key="reply",
        now_ms=now,
        deadline_ms=now + deadline_ms,
        ttl_ms=60_000,
        strategy="adaptive",
    )


def p2c(*kernels: KernelRecord, service: list[float] | None = None, **fields: Any) -> Plan:
    return Plan(CLUSTER, kernels, "p2c", service_ms=tuple(service or [10.0] * len(kernels)), **fields)


# ---------------------------------------------------------------- p2c


async def test_p2c_takes_the_kernel_with_fewer_jobs_in_flight_of_any_client(r: AsyncRedis) -> None:
    k1, k2 = await put_kernels(r, "running", "running")
    await busy(r, 1, 3)
    assert await route_once(r, p2c(k1, k2)) == "k2"
    assert await r.zcard(KEYS.inflight(CLUSTER, "k2")) == 1


async def test_p2c_weighs_in_flight_work_by_service_time(r: AsyncRedis) -> None:
    k1, k2 = await put_kernels(r, "running", "running")
    await busy(r, 1, 2)  # 3 x 10 ms beats 1 x 40 ms
    assert await route_once(r, p2c(k1, k2, service=[10, 40])) == "k1"
    await busy(r, 1, 5)  # now 8 x 10 ms loses to 40 ms
    assert await route_once(r, p2c(k1, k2, service=[10, 40]), "j2") == "k2"


async def test_p2c_avoids_a_kernel_whose_oldest_job_is_stuck(r: AsyncRedis) -> None:
    k1, k2 = await put_kernels(r, "running", "running")
    await busy(r, 1, 1, oldest=NOW - 2000)  # one job, in flight for 2 s on a 10 ms kernel
    await busy(r, 2, 3)
    assert await route_once(r, p2c(k1, k2)) == "k2"


async def test_p2c_breaks_near_ties_by_the_callers_draw(r: AsyncRedis) -> None:
    k1, k2, k3, k4 = await put_kernels(r, "running", "running", "running", "running")
    # 10, 11 and 12 ms are within half a mean service time (0.5 x 15.75) of each other; 30 is not
    plan = {"service": [10.0, 11.0, 12.0, 30.0]}
    picks = []
    for u in (0.0, 0.5, 0.99):
        picks.append(await route_once(r, p2c(k1, k2, k3, k4, tie=u, **plan), f"j{u}"))
        await r.delete(*(KEYS.inflight(CLUSTER, k.name) for k in (k1, k2, k3)))
    assert picks == ["k1", "k2", "k3"]
    await busy(r, 1, 1)  # one job more is not a near-tie: 2 x 10 against 11
    assert await route_once(r, p2c(k1, k2, tie=0.0, service=[10.0, 11.0]), "j4") == "k2"
    # nor is a busy kernel that looks faster: 2 x 7 is within the margin of 13, but queues are exact
    await r.delete(KEYS.inflight(CLUSTER, "k2"))
    assert await route_once(r, p2c(k1, k2, tie=0.0, service=[7.0, 13.0]), "j5") == "k2"


async def test_p2c_explores_a_kernel_it_has_not_measured_among_near_ties(r: AsyncRedis) -> None:
    k1, k2, k3 = await put_kernels(r, "running", "running", "running")
    # no estimate: optimistic (the fastest known), and first among the near-ties
    plan = p2c(k1, k2, k3, tie=0.0, service=[10.0, 12.0, 0.0])
    assert await route_once(r, plan) == "k3"
    assert await route_once(r, plan, "j2") == "k1"  # not past a queue: 2 x 10 is no near-tie of 10


async def test_p2c_a_new_kernel_takes_work_when_idle_and_warms_up_under_load(r: AsyncRedis) -> None:
    k1, k2 = await put_kernels(r, "running", "running")
    # the starts come with the caller's view of the records (kernel_start.lua moves the version)
    k1 = k1.model_copy(update={"started_at": (NOW - 500) / 1000})  # ramp 0.1
    k2 = k2.model_copy(update={"started_at": (NOW - 60_000) / 1000})
    warming = p2c(k1, k2, tie=0.0, slow_start_ms=5000)
    assert await route_once(r, warming) == "k1"  # idle: a tie with the idle peer, taken at once
    await busy(r, 2, 4)  # k1 holds j1, which counts 10 times: (10 + 1) x 10 > (4 + 1) x 10
    assert await route_once(r, warming, "j2") == "k2"
    later = NOW + 4500  # 5 s after its start: warm, its one job counts once; k2 holds 5
    assert await route_once(r, warming, "j3", now=later) == "k1"


async def test_p2c_uses_fresh_load_reports_and_treats_stale_ones_as_unknown(r: AsyncRedis) -> None:
    k1, k2 = await put_kernels(r, "running", "running")
    no_prior = [0.0, 0.0]
    await report_load(r, 1, latency_ms=400, inflight=1)  # 200 ms a job
    await report_load(r, 2, latency_ms=40, inflight=1)  # 20 ms a job
    assert await route_once(r, p2c(k1, k2, service=no_prior, load_expiry_ms=3000)) == "k2"
    # k2's report goes stale: unknown is the average of the known (200 ms), not idle; k2 now
    # holds j1, so 2 x 200 loses to 1 x 200
    await report_load(r, 2, age_ms=10_000, latency_ms=40, inflight=1)
    assert await route_once(r, p2c(k1, k2, service=no_prior, load_expiry_ms=3000), "j2") == "k1"


async def test_p2c_ignores_the_latency_of_a_kernel_idle_at_report_time(r: AsyncRedis) -> None:
    k1, k2 = await put_kernels(r, "running", "running")
    await report_load(r, 1, latency_ms=5000, inflight=0)  # history: it may have been avoided since
    await report_load(r, 2, latency_ms=40, inflight=1)
    await busy(r, 2, 1)
    assert await route_once(r, p2c(k1, k2, service=[0.0, 0.0])) == "k1"


async def test_p2c_compensates_reported_latency_for_the_queue_behind_it(r: AsyncRedis) -> None:
    k1, k2 = await put_kernels(r, "running", "running")
    await report_load(r, 1, latency_ms=100, inflight=9)  # 10 ms per job, it was queueing
    await report_load(r, 2, latency_ms=50, inflight=1)
    assert await route_once(r, p2c(k1, k2, service=[0.0, 0.0])) == "k1"


async def test_p2c_penalises_reported_and_observed_failures(r: AsyncRedis) -> None:
    k1, k2 = await put_kernels(r, "running", "running")
    await busy(r, 2, 1)  # k2: 2 x 10 ms; k1: 10 ms / (1 - 0.5)^2 = 40 ms
    await report_load(r, 1, error_rate=0.5)
    assert await route_once(r, p2c(k1, k2)) == "k2"
    await r.delete(KEYS.load("a1", CLUSTER, "k1"))
    await r.delete(KEYS.inflight(CLUSTER, "k2"))
    await busy(r, 2, 1)
    assert await route_once(r, p2c(k1, k2, error_rate=(0.5, 0.0)), "j2") == "k2"


async def test_p2c_skips_an_ejected_kernel_and_says_so(r: AsyncRedis) -> None:
    k1, k2 = await put_kernels(r, "running", "running")
    await r.zadd(KEYS.cluster_ejected(CLUSTER), {"k1": NOW + 5000})  # as outlier.lua ejects
    await busy(r, 2, 4)
    placed = await place_once(r, p2c(k1, k2))
    assert placed.kernel == "k2"
    assert placed.ejected == {"k1": NOW + 5000}


async def test_p2c_skips_a_kernel_that_takes_no_work(r: AsyncRedis) -> None:
    k1, k2 = await put_kernels(r, "draining", "running")
    await busy(r, 2, 4)
    assert await route_once(r, p2c(k1, k2)) == "k2"


async def test_no_candidate_taking_work_is_kernel_busy_and_writes_nothing(r: AsyncRedis) -> None:
    k1, k2 = await put_kernels(r, "draining", "stopped")
    for mode in ("p2c", "rr", "first"):
        route = Plan(CLUSTER, (k1, k2), mode)
        with pytest.raises(KernelBusy, match="k1=draining k2=stopped"):
            await enqueue_once(r, route, "j1", NOW, deadline_ms=0)
    assert not await r.exists(KEYS.job(CLUSTER, "j1"), KEYS.queue(CLUSTER, "k1"), KEYS.cluster_rr(CLUSTER))


# ---------------------------------------------------------------- rr and first


async def test_round_robin_rotates_one_shared_counter_whatever_each_client_passes(r: AsyncRedis) -> None:
    pool = await put_kernels(r, "running", "running", "running", "running")
    picks = []
    for i in range(12):
        offset = (i * 7) % 4  # each "client" rotates its list differently
        ordered = pool[offset:] + pool[:offset]
        route = Plan(CLUSTER, tuple(ordered), "rr", tie=offset)
        picks.append(await route_once(r, route, f"j{i}"))
    assert picks == ["k1", "k2", "k3", "k4"] * 3


async def test_round_robin_skips_a_kernel_that_takes_no_work(r: AsyncRedis) -> None:
    pool = await put_kernels(r, "running", "draining", "running")
    picks = [await route_once(r, Plan(CLUSTER, tuple(pool), "rr"), f"j{i}") for i in range(6)]
    assert Counter(picks) == {"k1": 3, "k3": 3}


async def test_first_mode_takes_the_first_running_candidate(r: AsyncRedis) -> None:
    k1, k2, k3 = await put_kernels(r, "stopped", "running", "running")
    assert await route_once(r, Plan(CLUSTER, (k1, k2, k3), "first")) == "k2"


async def test_routed_enqueue_refuses_a_duplicate_job_id(r: AsyncRedis) -> None:
    k1, k2 = await put_kernels(r, "running", "running")
    await route_once(r, p2c(k1, k2))
    with pytest.raises(KernelBusy, match="duplicate"):
        await route_once(r, p2c(k1, k2))


# ---------------------------------------------------------------- outlier ejection


def one(kernel: str, *, size: int = 8, **fields: Any) -> Plan:
    """The plan of one candidate `kernel`, its outcomes reported to the outlier detector."""
    return Plan(CLUSTER, (record(int(kernel[1:])),), outlier=OUTLIER, cluster_size=size, **fields)


async def fail(r: AsyncRedis, kernel: str, now: int, *, size: int = 8, event_ok: bool = False) -> Placed:
    """Report a failure (or a success) of an attempt placed on `kernel`; what `report` learned."""
    route = one(kernel, size=size)
    return await report(r, KEYS, route, Placed(kernel, 1), ok=event_ok, now_ms=now)


async def test_consecutive_failures_eject_with_a_growing_back_off(r: AsyncRedis) -> None:
    await put_kernels(r, "running")
    for i in range(2):
        assert (await fail(r, "k1", NOW + i)).ejected == {}
    assert (await fail(r, "k1", NOW + 2)).ejected == {"k1": NOW + 2 + 1000}
    assert (await fail(r, "k1", NOW + 500)).ejected == {"k1": NOW + 1002}  # late failures don't count
    t = NOW + 1100  # readmitted; three more failures: twice as long
    for i in range(3):
        route = await fail(r, "k1", t + i)
    assert route.ejected == {"k1": t + 2 + 2000}
    assert await r.zscore(KEYS.cluster_ejected(CLUSTER), "k1") == t + 2 + 2000


async def test_a_success_ends_the_failure_streak(r: AsyncRedis) -> None:
    await put_kernels(r, "running")
    await fail(r, "k1", NOW)
    await fail(r, "k1", NOW + 1)
    await report(r, KEYS, one("k1"), Placed("k1", 1, consecutive=2), ok=True, now_ms=NOW + 2)
    assert (await fail(r, "k1", NOW + 3)).ejected == {}
    assert await r.hget(KEYS.kernel_health(CLUSTER, "k1"), "consecutive") == "1"


async def test_a_failure_rate_outlier_is_ejected_at_once(r: AsyncRedis) -> None:
    route = one("k1", rate_outliers=frozenset({"k1"}))
    placed = await report(r, KEYS, route, Placed("k1", 1), ok=False, now_ms=NOW)
    assert placed.ejected == {"k1": NOW + 1000}


async def test_at_most_the_configured_share_is_ejected(r: AsyncRedis) -> None:
    assert [max_ejected(n, 0.34) for n in (1, 2, 3, 8, 9)] == [0, 1, 1, 2, 3]
    ejected = []
    for k in ("k1", "k2", "k3"):
        for i in range(3):
            route = await fail(r, k, NOW + i, size=8)
        ejected += list(route.ejected)
    assert ejected == ["k1", "k2"]  # 8 kernels x 0.34: two at most; k3 stays (panic threshold)
    assert await r.zcard(KEYS.cluster_ejected(CLUSTER)) == 2


# ---------------------------------------------------------------- cost (issue 19)

JOB = {
    "job_id": "x",
    "payload": "{}",
    "reply_key": "r",
    "now_ms": NOW,
    "deadline_ms": NOW,
    "ttl_ms": 1,
    "strategy": "s",
}


async def commands_run(r: AsyncRedis) -> int:
    """Commands the server has run, Lua's inner calls included, INFO not."""
    stats = await r.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["rr", "first", "p2c"])
async def test_a_routed_enqueue_costs_the_same_whatever_the_cluster_size(
    redis: AsyncRedis, mode: str
) -> None:
    """Round robin and primary-with-fallback name every kernel of the cluster, adaptive a sample of
    the same size: the commands enqueue.lua runs do not grow with the number of candidates."""
    kernels = await put_kernels(redis, *["running"] * 64)
    await enqueue_once(redis, Plan(CLUSTER, tuple(kernels[20:23]), mode), "warm-up", NOW)  # loads the script
    costs, keys = [], []
    for size in (3, 64):
        before = await commands_run(redis)
        pool = tuple(kernels[:size]) if mode != "p2c" else tuple(kernels[size - 3 : size])  # none busy
        await enqueue_once(redis, Plan(CLUSTER, pool, mode, service_ms=(10.0,) * 3), f"j{size}", NOW)
        costs.append(await commands_run(redis) - before)
        call = jobs.enqueue(
            KEYS,
            CLUSTER,
            "k1",
            **JOB,
            routing=jobs.Routing(mode, 0, 0, 0, 0, kernels=[(k.name, k.agent) for k in pool]),
        )
        keys.append(int(call.command[2]))  # EVALSHA sha numkeys ...
    assert costs[0] == costs[1], costs
    assert keys[0] == keys[1], keys  # candidates are named in ARGV, their keys built by the script
