"""Every routing strategy against real Redis and real kernels (`kcp serve` + an agent).

Kernels run `examples/sim_service.py`, whose per-kernel behaviour (speed, failures, stuck
windows) comes from a profile file the test writes. One cluster of 3 kernels per test.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from controlplane import KcpClient, OrchestrationConfig, OrchestrationEngine, RoutingStrategy, Settings
from controlplane.errors import DispatchTimeout, KernelError, NoKernelAvailable
from controlplane.protocol.keys import Keys
from controlplane.protocol.models import LoadBalancerConfig, OutlierConfig
from controlplane.protocol.records import LoadRecord
from kernel_agent.kernel.siblings import SIBLINGS_TTL
from kernel_agent.kernel.worker import IDLE_BLOCK
from tests.conftest import ProcessStack

#: the work-stealing tests (the last two, 27 s) run on single Redis only, for `make test`'s budget:
#: claim.lua runs in the cluster's slot like every other script (tests/redis/test_scripts_on_cluster.py)
pytestmark = [pytest.mark.system, pytest.mark.timeout(60)]

SIM = {"type": "SIM", "requires": ["sim"], "ms": 1.0}
KERNELS = ["worker-0", "worker-1", "worker-2"]


def profile(path: Path, **kernels: dict[str, Any]) -> None:
    """Write the sim profile (`worker_1={"fail": 1}` -> worker-1 always fails)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({k.replace("_", "-"): v for k, v in kernels.items()}))
    tmp.replace(path)


async def start(stack: ProcessStack, tmp_path: Path) -> tuple[KcpClient, Path]:
    path = tmp_path / "profile.json"
    profile(path)
    stack.serve()
    stack.agent("a1", 3, "--handlers", "examples.sim_service", env={"KCP_SIM_PROFILE": str(path)})
    kcp = KcpClient(Settings(redis_url=stack.redis_url))
    info = await kcp.create_cluster("r", 3, wait=30)
    assert info.running == 3
    return kcp, path


def engine(strategy: RoutingStrategy, **config: Any) -> OrchestrationEngine:
    return OrchestrationEngine(OrchestrationConfig(strategy=strategy, **config))


async def kernels_of(
    kcp: KcpClient, eng: OrchestrationEngine, n: int, request: dict[str, Any] = SIM
) -> list[str]:
    return [(await kcp.dispatch("r", request, engine=eng)).kernel for _ in range(n)]


@pytest.mark.redis_cluster
async def test_every_strategy_routes_and_a_capability_miss_is_clear(
    stack: ProcessStack, tmp_path: Path
) -> None:
    kcp, _ = await start(stack, tmp_path)
    async with kcp, KcpClient(Settings(redis_url=stack.redis_url)) as other:
        # round robin: one rotation shared by two clients, whatever their own counters say
        a, b = engine(RoutingStrategy.ROUND_ROBIN), engine(RoutingStrategy.ROUND_ROBIN)
        picks = []
        for _ in range(6):
            picks.append((await kcp.dispatch("r", SIM, engine=a)).kernel)
            picks.append((await other.dispatch("r", SIM, engine=b)).kernel)
        if a.metrics.retries + b.metrics.retries == 0:  # a stalled attempt retried elsewhere shifts it
            assert Counter(picks) == {k: 4 for k in KERNELS}
            assert all(picks[i] != picks[i + 1] for i in range(len(picks) - 1))
        assert set(picks) == set(KERNELS)

        assert set(await kernels_of(kcp, engine(RoutingStrategy.RANDOM), 30)) == set(KERNELS)
        assert len(set(await kernels_of(kcp, engine(RoutingStrategy.LEAST_LOADED), 12))) >= 1
        primary = engine(RoutingStrategy.PRIMARY_FALLBACK, primary="worker-2")
        assert set(await kernels_of(kcp, primary, 5)) == {"worker-2"}

        # adaptive: concurrent work spreads over every kernel (in-flight counts live in Redis).
        # Fresh engines have no estimates of their own, and a load report made while its kernel
        # was busy counts as one (a kernel reported 15x slower than its peers rightly gets no work
        # while their queues are short), so the step waits for the reports made once work stopped
        loads = await idle_reports(kcp)
        slow = {**SIM, "ms": 150.0}
        adaptive = [engine(RoutingStrategy.ADAPTIVE), engine(RoutingStrategy.ADAPTIVE)]
        results = await asyncio.gather(
            *(
                c.dispatch("r", slow, engine=e)
                for _ in range(3)
                for c, e in zip((kcp, other), adaptive, strict=True)
            )
        )
        spread = Counter(r.kernel for r in results)
        assert set(spread) == set(KERNELS) and max(spread.values()) <= 3, (spread, loads)

        capability = engine(RoutingStrategy.CAPABILITY_BASED)
        assert set(await kernels_of(kcp, capability, 6)) <= set(KERNELS)
        with pytest.raises(NoKernelAvailable, match=r"\['gpu', 'sim'\].*declare: sim"):
            await kcp.dispatch("r", {**SIM, "requires": ["sim", "gpu"]}, engine=capability)


async def idle_reports(kcp: KcpClient) -> dict[str, LoadRecord]:
    """The load records of cluster `r` once each says no job is in flight (the kernel's report after
    its last job comes within a report interval, 0.5 s), for 5 s at most."""
    for _ in range(50):
        records = await kcp.state.load_records(await kcp.state.kernels("r"))
        if len(records) == len(KERNELS) and not any(r.inflight for r in records.values()):
            return records
        await asyncio.sleep(0.1)
    raise AssertionError(f"load records still report work in flight: {records}")


async def fail_until_reported(kcp: KcpClient, names: list[str], rate: float = 0.2) -> None:
    """Send pinned requests to `names` (whose profile fails them) until their load reports carry
    an error rate above `rate` (the agent's EWMA moves 0.3 of the way per heartbeat interval,
    by that interval's share of failures), for 10 s at most."""
    for _ in range(100):
        loads = await kcp.state.loads(await kcp.state.kernels("r"))
        pending = [n for n in names if n not in loads or loads[n].error_rate <= rate]
        if not pending:
            await asyncio.sleep(0.6)  # past the client's load cache (0.5 s)
            return
        for name in pending:
            with pytest.raises(KernelError):
                await kcp.dispatch("r", SIM, kernel=name)
        await asyncio.sleep(0.1)
    raise AssertionError(f"no failing load reports of {names}")


@pytest.mark.redis_cluster
async def test_adaptive_spreads_sequential_work_and_a_new_kernel_serves_at_once(
    stack: ProcessStack, tmp_path: Path
) -> None:
    """Nothing queued: equal kernels share the work (near-ties go to a random draw); a kernel
    that turns running after a scale-up is measured on the first dispatches that see it."""
    path = tmp_path / "profile.json"
    profile(path)
    stack.serve()
    stack.agent("a1", 4, "--handlers", "examples.sim_service", env={"KCP_SIM_PROFILE": str(path)})
    async with KcpClient(Settings(redis_url=stack.redis_url)) as kcp:
        assert (await kcp.create_cluster("r", 3, wait=30)).running == 3
        adaptive = engine(RoutingStrategy.ADAPTIVE)
        request = {**SIM, "ms": 5.0}
        spread = Counter(await kernels_of(kcp, adaptive, 60, request))
        assert set(spread) == set(KERNELS) and min(spread.values()) >= 8, spread  # ~20 each
        await kcp.scale_cluster("r", 4, wait=30)  # returns once worker-3 runs
        ran = await kernels_of(kcp, adaptive, 20, request)
        assert "worker-3" in ran[:5], ran


@pytest.mark.redis_cluster
async def test_least_loaded_uses_the_configured_weights_and_health_threshold(
    stack: ProcessStack, tmp_path: Path
) -> None:
    kcp, path = await start(stack, tmp_path)
    async with kcp:
        profile(path, worker_0={"fail": 1.0})
        await asyncio.sleep(0.2)
        await fail_until_reported(kcp, ["worker-0"])
        errors_only = LoadBalancerConfig(cpu_weight=0, memory_weight=0, queue_weight=0, error_weight=1)
        ll = engine(RoutingStrategy.LEAST_LOADED, load_balancer=errors_only)
        results = [await kcp.dispatch("r", SIM, engine=ll) for _ in range(12)]
        assert {r.kernel for r in results} <= {"worker-1", "worker-2"}
        assert not any(r.all_unhealthy for r in results)
        # a threshold every kernel exceeds: the least loaded serves anyway, and the result says so
        strict = errors_only.model_copy(update={"memory_weight": 0.3, "health_threshold": 1e-9})
        result = await kcp.dispatch(
            "r", SIM, engine=engine(RoutingStrategy.LEAST_LOADED, load_balancer=strict)
        )
        assert result.all_unhealthy and result.kernel in ("worker-1", "worker-2")


@pytest.mark.redis_cluster
async def test_capability_based_keeps_scarce_kernels_free_until_the_others_are_unhealthy(
    stack: ProcessStack, tmp_path: Path
) -> None:
    path = tmp_path / "profile.json"
    profile(path)
    stack.serve()
    env = {"KCP_SIM_PROFILE": str(path)}
    stack.agent("plain", 2, "--handlers", "examples.sim_service", env=env)
    # a kernel's capabilities are its handlers': this agent's kernel declares `infer sim`
    infer_handlers = ("--handlers", "examples.sim_service", "--handlers", "examples.infer_handlers")
    stack.agent("infer", 1, *infer_handlers, env=env)
    async with KcpClient(Settings(redis_url=stack.redis_url)) as kcp:
        info = await kcp.create_cluster("r", 3, wait=30)
        assert info.running == 3
        scarce = next(k.name for k in info.kernels if k.agent == "infer")
        plain = [k.name for k in info.kernels if k.agent == "plain"]
        cb = engine(RoutingStrategy.CAPABILITY_BASED)
        assert set(await kernels_of(kcp, cb, 12)) <= set(plain)  # `sim` is all it needs: not `infer`
        assert set(await kernels_of(kcp, cb, 3, {**SIM, "requires": ["sim", "infer"]})) == {scarce}
        # the close matches turn unhealthy (failing, on error-weighted scores): the infer kernel serves
        profile(path, **{k.replace("-", "_"): {"fail": 1.0} for k in plain})
        await asyncio.sleep(0.2)
        await fail_until_reported(kcp, plain)
        errors_only = LoadBalancerConfig(
            cpu_weight=0, memory_weight=0, queue_weight=0, error_weight=1, health_threshold=0.2
        )
        cb = engine(RoutingStrategy.CAPABILITY_BASED, load_balancer=errors_only)
        results = [await kcp.dispatch("r", SIM, engine=cb) for _ in range(3)]
        assert {r.kernel for r in results} == {scarce} and not any(r.all_unhealthy for r in results)


@pytest.mark.redis_cluster
async def test_primary_failure_falls_back_and_retries_run_out(stack: ProcessStack, tmp_path: Path) -> None:
    kcp, path = await start(stack, tmp_path)
    async with kcp:
        profile(path, worker_0={"fail": 1.0})
        await asyncio.sleep(0.2)  # the handlers re-read the profile every 50 ms
        pf = engine(RoutingStrategy.PRIMARY_FALLBACK, retry_count=2)
        result = await kcp.dispatch("r", SIM, engine=pf)
        assert result.kernel == "worker-1"  # the primary failed; the next one by index answered
        assert (pf.metrics.retries, pf.metrics.failovers) == (1, 1)
        assert result.attempts == 2  # the failed one counts

        # the primary hangs (a timeout); its job ends soon after, so the stack's drain is quick
        profile(path, worker_0={"stuck_ms": 1500, "stuck_until": 2e9})
        await asyncio.sleep(0.2)
        pf = engine(RoutingStrategy.PRIMARY_FALLBACK, timeout_ms=500, retry_count=2)
        result = await kcp.dispatch("r", SIM, engine=pf)
        assert (result.kernel, result.attempts) == ("worker-1", 2)  # the timed-out one counts
        assert pf.metrics.timeouts == 1

        everyone = {"fail": 1.0}
        profile(path, worker_0=everyone, worker_1=everyone, worker_2=everyone)
        await asyncio.sleep(0.2)
        pf = engine(RoutingStrategy.PRIMARY_FALLBACK, retry_count=2)
        with pytest.raises(KernelError, match="simulated fault"):
            await kcp.dispatch("r", SIM, engine=pf)
        assert (pf.metrics.retries, pf.metrics.failed) == (2, 1)

        stuck = {"stuck_ms": 1500, "stuck_until": 2e9}  # 5 times the attempt's timeout
        profile(path, worker_0=stuck, worker_1=stuck, worker_2=stuck)
        await asyncio.sleep(0.2)
        rr = engine(RoutingStrategy.ROUND_ROBIN, timeout_ms=300, retry_count=2)
        with pytest.raises(DispatchTimeout):
            await kcp.dispatch("r", SIM, engine=rr)
        assert (rr.metrics.timeouts, rr.metrics.failovers) == (3, 2)  # three kernels, one attempt each


@pytest.mark.redis_cluster
async def test_a_failing_kernel_is_avoided_and_ejected_for_every_client(
    stack: ProcessStack, tmp_path: Path
) -> None:
    kcp, path = await start(stack, tmp_path)
    async with kcp, KcpClient(Settings(redis_url=stack.redis_url)) as other:
        profile(path, worker_1={"fail": 1.0})
        await asyncio.sleep(0.2)
        # adaptive steers away from the failures it sees (and the error rate the kernel reports)
        adaptive = engine(RoutingStrategy.ADAPTIVE, timeout_ms=20_000)
        errors = 0
        for _ in range(30):
            try:
                await kcp.dispatch("r", SIM, engine=adaptive)
            except KernelError as exc:
                assert exc.kernel == "worker-1"
                errors += 1
        assert errors <= 6, errors

        # round robin keeps sending; with outlier detection, five failures in a row eject it
        outlier = OutlierConfig(base_ejection_ms=20_000)
        rr = engine(RoutingStrategy.ROUND_ROBIN, outlier_detection=True, outlier=outlier, timeout_ms=20_000)
        rr_errors = 0
        for _ in range(30):
            try:
                await kcp.dispatch("r", SIM, engine=rr)
            except KernelError:
                rr_errors += 1
        health = await kcp.redis.hgetall(Keys().kernel_health("r", "worker-1"))
        # (the adaptive client's failures count too: the streak is shared)
        assert int(health["ejections"]) >= 1 and rr_errors <= 5
        assert await kcp.redis.zscore(Keys().cluster_ejected("r"), "worker-1")

        # another client that never saw a failure stays away too: enqueue.lua skips it
        fresh = engine(RoutingStrategy.ADAPTIVE, timeout_ms=20_000)
        assert "worker-1" not in set(await kernels_of(other, fresh, 20))


async def test_idle_kernels_take_over_work_queued_behind_a_stuck_one(
    stack: ProcessStack, tmp_path: Path
) -> None:
    """Work stealing: jobs waiting on a stuck kernel run on its siblings once they have finished
    their own work; a job pinned to the stuck kernel waits for it; with the cluster's
    `work_stealing` off nothing moves."""
    kcp, path = await start(stack, tmp_path)
    async with kcp:
        # a kernel that came up before its siblings saw them pending; its list is re-read once a
        # claim after a job returned the cluster's version, moved by its siblings' starts
        await asyncio.sleep(SIBLINGS_TTL)
        for k in KERNELS:
            await kcp.dispatch("r", SIM, kernel=k)
        await asyncio.sleep(0.3)
        profile(path, worker_0={"stuck_ms": 1000, "stuck_until": 2e9})
        await asyncio.sleep(0.2)
        primary = engine(RoutingStrategy.PRIMARY_FALLBACK, primary="worker-0", timeout_ms=20_000)
        queued = [asyncio.create_task(kcp.dispatch("r", SIM, engine=primary)) for _ in range(5)]
        await asyncio.sleep(0.2)  # all five on worker-0: one runs for 1 s, four wait in its queue
        pinned = asyncio.create_task(kcp.dispatch("r", SIM, kernel="worker-0"))
        await asyncio.sleep(0.2)
        for k in ("worker-1", "worker-2"):  # the siblings finish a job, then look for more
            await kcp.dispatch("r", SIM, kernel=k)
        ran = Counter(r.kernel for r in await asyncio.gather(*queued))
        assert ran["worker-0"] == 1 and ran["worker-1"] + ran["worker-2"] == 4, ran
        assert (await pinned).kernel == "worker-0"
        stats = await kcp.redis.hgetall(Keys().cluster_stats("r"))
        assert int(stats["steals"]) == 4

        config = json.loads(await kcp.redis.hget(Keys().cluster("r"), "config"))
        await kcp.redis.hset(Keys().cluster("r"), "config", json.dumps({**config, "work_stealing": False}))
        await kcp.redis.incr(Keys().cluster_version("r"))  # as every write of the cluster record does
        await asyncio.sleep(SIBLINGS_TTL + 0.2)  # a working kernel's next claim asks for the version
        for _ in range(2):  # one claim returns it, the kernel re-reads the records before its next
            for k in KERNELS:
                await kcp.dispatch("r", SIM, kernel=k)
            await asyncio.sleep(0.3)
        profile(path, worker_0={"stuck_ms": 300, "stuck_until": 2e9})
        await asyncio.sleep(0.2)
        queued = [asyncio.create_task(kcp.dispatch("r", SIM, engine=primary)) for _ in range(3)]
        await asyncio.sleep(0.1)
        for k in ("worker-1", "worker-2"):
            await kcp.dispatch("r", SIM, kernel=k)
        assert {r.kernel for r in await asyncio.gather(*queued)} == {"worker-0"}
        assert int((await kcp.redis.hgetall(Keys().cluster_stats("r")))["steals"]) == 4


async def test_an_idle_kernel_takes_over_a_queued_job_at_the_end_of_its_idle_pop(
    stack: ProcessStack, tmp_path: Path
) -> None:
    """No job finishes anywhere, yet the job queued behind a stuck kernel moves: an idle
    worker's claim runs when its blocking pop times out (`IDLE_BLOCK`) and takes it over."""
    kcp, path = await start(stack, tmp_path)
    async with kcp:
        await asyncio.sleep(SIBLINGS_TTL)
        for _ in range(2):  # every kernel has claimed since its sibling list was renewed
            for k in KERNELS:
                await kcp.dispatch("r", SIM, kernel=k)
            await asyncio.sleep(0.3)
        profile(path, worker_0={"stuck_ms": 3000 + 1000 * IDLE_BLOCK, "stuck_until": 2e9})
        await asyncio.sleep(0.2)
        primary = engine(RoutingStrategy.PRIMARY_FALLBACK, primary="worker-0", timeout_ms=30_000)
        stuck = asyncio.create_task(kcp.dispatch("r", SIM, engine=primary))
        await asyncio.sleep(0.2)
        loop = asyncio.get_running_loop()
        queued_at = loop.time()
        moved = await kcp.dispatch("r", SIM, engine=primary)  # queued behind the stuck one
        waited = loop.time() - queued_at
        assert moved.kernel in ("worker-1", "worker-2")
        assert waited < IDLE_BLOCK + 2.0, waited  # not the stuck job's 3 s + IDLE_BLOCK
        assert int((await kcp.redis.hgetall(Keys().cluster_stats("r")))["steals"]) == 1
        assert (await stuck).kernel == "worker-0"
