"""arq compatibility: examples/arq_worker.py's WorkerSettings under arq's own Worker and under kcp
(agents started with --arq-settings) give the same results for the same calls."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from arq.connections import RedisSettings, create_pool
from arq.worker import Worker, get_kwargs
from conftest import ProcessStack, wait_for
from redis.asyncio import Redis as AsyncRedis

from controlplane import InvalidRequest, KcpClient, KernelError, Settings
from controlplane.protocol.arq import JobStatus, job_result
from controlplane.protocol.keys import Keys
from controlplane.redis.state import State
from examples.arq_worker import WorkerSettings

pytestmark = [pytest.mark.system, pytest.mark.timeout(120)]

KEYS = Keys()
SETTINGS = "examples.arq_worker.WorkerSettings"
DEFER_S = 0.4


def _json_default(obj: object) -> object:
    """arq stores a failed job's exception as its result: carried here as its name (no pickle)."""
    if isinstance(obj, BaseException):
        return {"error_type": type(obj).__name__, "error": str(obj)}
    raise TypeError(f"{type(obj).__name__} is not JSON")


def arq_serializer(obj: object) -> bytes:
    return json.dumps(obj, default=_json_default).encode()


CALLS: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [
    ("add", (2, 3), {}),
    ("flaky", ("x",), {}),
    ("slow", (2.0,), {}),
    ("whoami", (), {"note": "n"}),
]


def normal(name: str, ok: bool, value: Any) -> tuple[str, Any]:
    if not ok:
        return ("error", value["error_type"])
    if name == "whoami":  # ids differ between the runs; the rest must not
        return ("ok", {**value, "job_id": bool(value["job_id"])})
    return ("ok", value)


async def run_under_arq(redis_url: str) -> tuple[list[tuple[str, Any]], float]:
    pool = await create_pool(
        RedisSettings.from_dsn(redis_url), job_serializer=arq_serializer, job_deserializer=json.loads
    )
    try:
        jobs = [await pool.enqueue_job(name, *args, **kwargs) for name, args, kwargs in CALLS]
        t0 = time.time()
        jobs.append(await pool.enqueue_job("add", 1, 1, _defer_by=DEFER_S))
        worker = Worker(
            **{**get_kwargs(WorkerSettings), "burst": True, "poll_delay": 0.01, "handle_signals": False},
            redis_pool=pool,
            job_serializer=arq_serializer,
            job_deserializer=json.loads,
        )
        await worker.main()
        results = []
        for (name, _, _), job in zip([*CALLS, ("add", (), {})], jobs, strict=True):
            assert job is not None
            info = await job.result_info()
            assert info is not None
            results.append(normal(name, info.success, info.result))
        deferred_start = info.start_time.timestamp() - t0
        return results, deferred_start
    finally:
        await pool.aclose()


async def run_under_kcp(redis_url: str) -> tuple[list[tuple[str, Any]], float]:
    async with KcpClient(Settings(redis_url=redis_url)) as kcp:
        await kcp.create_cluster("jobs", kernel_count=2, config={"capabilities": ["arq"]}, wait=30)
        jobs = [await kcp.enqueue_job("jobs", name, *args, **kwargs) for name, args, kwargs in CALLS]
        t0 = time.time()
        jobs.append(await kcp.enqueue_job("jobs", "add", 1, 1, _defer_by=DEFER_S))
        results = []
        for (name, _, _), job in zip([*CALLS, ("add", (), {})], jobs, strict=True):
            assert job is not None
            try:
                results.append(normal(name, True, await job.result(timeout=20)))
            except KernelError as exc:
                results.append(normal(name, False, {"error_type": exc.error_type}))
        info = await jobs[-1].result_info()
        assert info is not None
        return results, info.start_time.timestamp() - t0


# single Redis only (no redis_cluster marker): arq 0.28's own RedisSettings/ArqRedis take redis://,
# rediss://, unix:// or Sentinel, not a Redis Cluster ("invalid DSN scheme"), and its queue's
# MULTI/EXEC spans untagged keys. The kcp side of the comparison runs on the cluster below.
async def test_same_worker_settings_same_results_under_arq_and_kcp(
    redis_url: str, stack: ProcessStack
) -> None:
    arq_results, arq_deferred = await run_under_arq(redis_url)
    stack.serve()
    stack.agent("arq-a", 2, "--arq-settings", SETTINGS)
    kcp_results, kcp_deferred = await run_under_kcp(redis_url)
    assert arq_results == kcp_results
    assert arq_results == [
        ("ok", 5),
        ("ok", {"label": "x", "job_try": 2}),  # Retry once, then the second try
        ("error", "TimeoutError"),  # past func(timeout=0.5)
        ("ok", {"greeting": "hello", "job_id": True, "job_try": 1, "note": "n"}),
        ("ok", 2),  # the deferred job
    ]
    # a deferred job starts at its time, not before (and, on kcp, within the mover's resolution)
    assert arq_deferred >= DEFER_S - 0.01
    assert DEFER_S - 0.01 <= kcp_deferred < DEFER_S + 1.0


@pytest.mark.redis_cluster
async def test_bad_input_is_refused_and_nothing_is_queued(
    redis_url: str, redis: AsyncRedis, stack: ProcessStack
) -> None:
    stack.serve()
    stack.agent("arq-b", 1, "--arq-settings", SETTINGS)
    async with KcpClient(Settings(redis_url=redis_url)) as kcp:
        await kcp.create_cluster("jobs", kernel_count=1, wait=30)
        before = sorted(await redis.keys("kcp:job:*"))
        with pytest.raises(InvalidRequest, match="unknown syscall 'NOPE'"):
            await kcp.enqueue_job("jobs", "nope", 1)
        with pytest.raises(InvalidRequest, match="argument 1 is not JSON-serialisable"):
            await kcp.enqueue_job("jobs", "add", 1, object())
        with pytest.raises(InvalidRequest, match="argument 'b' is not JSON-serialisable"):
            await kcp.enqueue_job("jobs", "add", 1, b={1, 2})
        with pytest.raises(InvalidRequest, match="_defer_by must not be negative"):
            await kcp.enqueue_job("jobs", "add", 1, 2, _defer_by=-1)
        with pytest.raises(InvalidRequest, match="_expires must not be negative"):
            await kcp.enqueue_job("jobs", "add", 1, 2, _expires=-5)
        with pytest.raises(InvalidRequest, match="_job_id must be 1-128 characters"):
            await kcp.enqueue_job("jobs", "add", 1, 2, _job_id="a:result")
        assert sorted(await redis.keys("kcp:job:*")) == before
        assert await redis.zcard(KEYS.cluster_deferred("jobs")) == 0
        # a duplicate _job_id returns None, as arq does; the first job is untouched
        first = await kcp.enqueue_job("jobs", "add", 1, 2, _job_id="same", _defer_by=30)
        assert first is not None and await first.status() is JobStatus.deferred
        assert await kcp.enqueue_job("jobs", "add", 5, 5, _job_id="same") is None
        assert await first.abort() is True
        assert await first.status() is JobStatus.complete  # its result: JobAborted
        with pytest.raises(KernelError) as failed:
            await first.result(timeout=1)
        assert failed.value.error_type == "JobAborted"
        done = await kcp.enqueue_job("jobs", "add", 1, 2, _job_id="done")
        assert done is not None and await done.result(timeout=10) == 3
        assert await kcp.enqueue_job("jobs", "add", 1, 2, _job_id="done") is None  # result kept
        await asyncio.sleep(0)


CLIENT = str(Path(__file__).with_name("arq_client.py"))
ROOT = str(Path(__file__).resolve().parents[2])


@pytest.mark.redis_cluster
async def test_arq_jobs_survive_a_killed_agent_and_report_their_status(
    redis_url: str, redis: AsyncRedis, stack: ProcessStack
) -> None:
    stack.serve()
    doomed = stack.agent("arq-doomed", 1, "--arq-settings", SETTINGS)
    stack.agent("arq-spare", 3, "--arq-settings", SETTINGS)

    async def agents_up() -> bool:
        return await redis.scard(KEYS.agents()) >= 2

    await wait_for(agents_up, 30, "both agents")
    async with KcpClient(Settings(redis_url=redis_url)) as kcp:
        info = await kcp.create_cluster("jobs", kernel_count=2, wait=30)
        assert sorted(k.agent for k in info.kernels) == ["arq-doomed", "arq-spare"]
        clients = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                CLIENT,
                redis_url,
                "jobs",
                tag,
                "8",
                "0.25",
                stdout=asyncio.subprocess.PIPE,
                env={**os.environ, "PYTHONPATH": ROOT},
            )
            for tag in ("a", "b")
        ]
        inflight = [KEYS.inflight("jobs", k.name) for k in info.kernels]

        async def clients_enqueued() -> bool:
            return sum([await redis.zcard(key) for key in inflight]) >= 10

        await wait_for(clients_enqueued, 30, "the clients' jobs")
        # behind the clients' jobs: seen queued, then running, then done
        watched = await kcp.enqueue_job("jobs", "echo_after", "watched", 0.3)
        assert watched is not None
        parked = await kcp.enqueue_job("jobs", "echo_after", "never", 0.0, _defer_by=60)
        assert parked is not None and await parked.status() is JobStatus.deferred
        seen: list[JobStatus] = []
        killed = False
        deadline = time.monotonic() + 60
        while (not seen or seen[-1] is not JobStatus.complete) and time.monotonic() < deadline:
            status = await watched.status()
            if not seen or seen[-1] is not status:
                seen.append(status)
            stats = await State(redis, KEYS).cluster_stats("jobs")
            if not killed and int(stats.get("dispatches", 0)) >= 3:  # mid-run: jobs queued and running
                doomed.kill()  # SIGKILL: its kernel dies with it (PDEATHSIG)
                killed = True
                assert await parked.abort() is True  # a deferred job, stopped before its time
            await asyncio.sleep(0.02)
        assert killed
        assert seen == [JobStatus.queued, JobStatus.in_progress, JobStatus.complete]
        assert await watched.result(timeout=1) == "watched"
        outputs = [json.loads((await asyncio.wait_for(c.communicate(), 90))[0]) for c in clients]
        assert all(c.returncode == 0 for c in clients)
        for tag, out in zip(("a", "b"), outputs, strict=True):
            assert out == {f"{tag}-{i}": f"{tag}-{i}" for i in range(8)}  # each once, from its caller's view
        done = [await kcp.job("jobs", job_id).result_info() for out in outputs for job_id in out]
        # the job the SIGKILL cut off ran again, elsewhere, as its next try
        assert max(d.job_try for d in done if d is not None) >= 2
        with pytest.raises(KernelError) as aborted:
            await parked.result(timeout=1)
        assert aborted.value.error_type == "JobAborted"
        assert await redis.zcard(KEYS.cluster_deferred("jobs")) == 0
        assert [k async for k in redis.scan_iter(match="kcp:job:{jobs}:*") if not k.endswith(":result")] == []


@pytest.mark.redis_cluster
async def test_the_leader_runs_deferred_jobs_whose_client_is_gone(
    redis_url: str, redis: AsyncRedis, stack: ProcessStack
) -> None:
    stack.serve()
    stack.agent("arq-a", 1, "--arq-settings", SETTINGS)
    async with KcpClient(Settings(redis_url=redis_url)) as kcp:
        await kcp.create_cluster("later", kernel_count=1, wait=30)
        job = await kcp.enqueue_job("later", "add", 20, 22, _defer_by=1.0)
        assert job is not None
        job_id = job.job_id
    # the client that deferred it is closed, and no client looks at the cluster (a client
    # that did would route it too): only `kcp serve` can route it now
    assert await redis.zscore(KEYS.cluster_deferred("later"), job_id) is not None

    async def result_kept() -> bool:
        return bool(await redis.exists(KEYS.job_result("later", job_id)))

    await wait_for(result_kept, 15, "the deferred job's result")
    raw = await redis.get(KEYS.job_result("later", job_id))
    assert raw is not None and job_result(raw).result == 42
    assert not await redis.zcard(KEYS.cluster_deferred("later"))
