"""Contract tests of the Lua job lifecycle (`controlplane/redis/lua/*.lua`), through the calls
that production code makes (`controlplane/redis/scripts/`).

Every test runs twice through the same code: against the private redis-server (`integration`)
and against fakeredis with Lua (`unit`), so the fake can stand in for Redis in unit tests only
as long as both agree. Records are built by hand with HSET; times are passed to the scripts
explicitly (`NOW`), so only key TTLs depend on the wall clock.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pytest
from redis.asyncio import Redis as AsyncRedis

from controlplane.protocol import stats
from controlplane.protocol.jobs import decode_job, decode_result, encode_job, encode_result
from controlplane.protocol.keys import Keys
from controlplane.protocol.stats import PINNED
from controlplane.redis.scripts import jobs, kernels
from controlplane.redis.scripts.call import Call
from controlplane.redis.scripts.fenced import FencedWrite

CLUSTER = "c1"
CLIENT = "client-1"
NOW = 1_700_000_000_000  # unix ms handed to the scripts as "now"
JOB_TTL_MS = 60_000
REPLY_TTL_MS = 30_000
KEYS = Keys()


@pytest.fixture(
    params=[
        pytest.param("real", marks=pytest.mark.integration),
        pytest.param("fake", marks=pytest.mark.unit),
    ]
)
def client(request: pytest.FixtureRequest) -> AsyncRedis:
    """The real redis-server client or the fakeredis one (both decode_responses, both empty)."""
    client: AsyncRedis = request.getfixturevalue("redis" if request.param == "real" else "fake_redis")
    return client


@dataclass
class Lua:
    """The production script calls plus hand-built records."""

    r: AsyncRedis

    # ------------------------------------------------------------ records
    async def put_kernel(
        self, kernel: str = "k1", *, state: str = "running", epoch: int = 1, agent: str = "a1"
    ) -> None:
        await self.r.hset(
            KEYS.kernel(CLUSTER, kernel), mapping={"state": state, "epoch": epoch, "agent": agent}
        )

    async def kernel(self, kernel: str = "k1") -> dict[str, str]:
        return await self.r.hgetall(KEYS.kernel(CLUSTER, kernel))

    async def job(self, job_id: str) -> dict[str, str]:
        return await self.r.hgetall(KEYS.job(CLUSTER, job_id))

    async def zset(self, key: str) -> dict[str, float]:
        return dict(await self.r.zrange(key, 0, -1, withscores=True))

    async def snapshot(self) -> dict[str, Any]:
        """Every key with its type and value (TTLs left out: they tick)."""
        out: dict[str, Any] = {}
        for key in sorted(await self.r.keys("*")):
            kind = await self.r.type(key)
            if kind == "hash":
                out[key] = await self.r.hgetall(key)
            elif kind == "zset":
                out[key] = await self.zset(key)
            elif kind == "list":
                out[key] = await self.r.lrange(key, 0, -1)
            else:
                out[key] = (kind, await self.r.get(key))
        return out

    # ------------------------------------------------------------ scripts
    async def call(self, call: Call[Any]) -> Any:
        """Run a production call; the script's own reply, which the call's parser must take."""
        reply = await call.reply(self.r)
        call.parse(reply)
        return reply

    async def enqueue(
        self,
        job_id: str,
        *,
        kernel: str = "k1",
        payload: str = '{"f":"PING"}',
        now: int = NOW,
        deadline_ms: int = NOW + 10_000,
        ttl_ms: int = JOB_TTL_MS,
        strategy: str = "adaptive",
        epoch: int | None = None,
    ) -> Any:
        return await self.call(
            jobs.enqueue(
                KEYS,
                CLUSTER,
                kernel,
                job_id=job_id,
                payload=payload,
                reply_key=KEYS.reply(CLUSTER, CLIENT),
                now_ms=now,
                deadline_ms=deadline_ms,
                ttl_ms=ttl_ms,
                strategy=strategy,
                epoch=epoch,
            )
        )

    async def claim(
        self,
        *,
        kernel: str = "k1",
        epoch: int = 1,
        now: int | str = NOW,
        siblings: list[tuple[str, int]] | None = None,
    ) -> Any:
        """claim.lua: the oldest job queued on `kernel`; with `siblings` ((name, epoch) pairs) it
        may take over a queued job of theirs. `now=""` leaves the time to the Redis clock."""
        return await self.call(jobs.claim(KEYS, CLUSTER, kernel, epoch=epoch, now_ms=now, siblings=siblings))

    async def finish(
        self,
        job_id: str,
        *,
        kernel: str = "k1",
        epoch: int = 1,
        message: str = "result",
        success: bool = True,
        latency_ms: float = 12,
        bell: bool = False,
    ) -> Any:
        return await self.call(
            jobs.finish(
                KEYS,
                CLUSTER,
                kernel,
                job_id=job_id,
                epoch=epoch,
                reply_key=KEYS.reply(CLUSTER, CLIENT),
                message=message,
                success=success,
                latency_ms=latency_ms,
                reply_ttl_ms=REPLY_TTL_MS,
                bell=KEYS.reply_bell(CLIENT) if bell else None,
            )
        )

    async def cancel(self, job_id: str, *, kernel: str = "k1") -> Any:
        return await self.call(jobs.cancel(KEYS, CLUSTER, kernel, job_id=job_id))

    async def kernel_start(self, kernel: str = "k1", *, agent: str = "a1") -> Any:
        return await self.call(
            kernels.kernel_start(
                KEYS,
                CLUSTER,
                kernel,
                agent=agent,
                pid=4242,
                host="host-1",
                now_s=1_700_000_000,
                syscalls=["PING", "READ"],
                capabilities=["gpu"],
            )
        )

    async def kernel_stop(self, kernel: str = "k1", *, epoch: int = 1) -> Any:
        return await self.call(kernels.kernel_stop(KEYS, CLUSTER, kernel, epoch=epoch))

    async def rebind(self, source: str, target: str, ids: list[str], *, declare: bool = True) -> Any:
        """rebind.lua as its callers run it: the jobs' reply fields read first (`declare`), and
        declared."""
        replies = [
            await self.r.hget(key, field) for _, key, field in kernels.reply_fields(KEYS, CLUSTER, ids)
        ]
        call = kernels.rebind(
            KEYS, CLUSTER, target, source=source, job_ids=ids, replies=replies if declare else ()
        )
        return await self.call(call)

    async def leader(self, token: str, ttl_ms: int, term: int = 0) -> Any:
        return await self.call(kernels.leader(KEYS, token=token, ttl_ms=ttl_ms, term=term))


@pytest.fixture
def lua(client: AsyncRedis) -> Lua:
    return Lua(client)


# ---------------------------------------------------------------- enqueue


@pytest.mark.parametrize("state", ["pending", "draining", "stopped", "missing"])
async def test_enqueue_refuses_a_kernel_that_is_not_running(lua: Lua, state: str) -> None:
    if state != "missing":
        await lua.put_kernel(state=state)
    before = await lua.snapshot()
    assert await lua.enqueue("j1") == [0, state]
    assert await lua.snapshot() == before


async def test_enqueue_refuses_a_duplicate_job_id(lua: Lua) -> None:
    await lua.put_kernel()
    assert await lua.enqueue("j1", payload="first") == [1, 1]
    before = await lua.snapshot()
    assert await lua.enqueue("j1", payload="second", now=NOW + 5) == [-1, "duplicate"]
    assert await lua.snapshot() == before
    assert (await lua.job("j1"))["job"] == "first"


async def test_enqueue_writes_the_job_and_routes_it(lua: Lua) -> None:
    await lua.put_kernel(epoch=7)
    assert await lua.enqueue("j1", payload="payload-1", deadline_ms=NOW + 3_000) == [1, 1]
    job = await lua.job("j1")
    assert {k: job[k] for k in ("job", "reply", "kernel", "epoch", "attempt", "deadline_ms")} == {
        "job": "payload-1",
        "reply": KEYS.reply(CLUSTER, CLIENT),
        "kernel": "k1",
        "epoch": "7",
        "attempt": "0",
        "deadline_ms": str(NOW + 3_000),
    }
    assert await lua.zset(KEYS.queue(CLUSTER, "k1")) == {"j1": NOW}
    assert await lua.zset(KEYS.inflight(CLUSTER, "k1")) == {"j1": NOW}
    assert 0 < await lua.r.pttl(KEYS.job(CLUSTER, "j1")) <= JOB_TTL_MS
    # the second reply element counts the kernel's in-flight jobs
    assert await lua.enqueue("j2", now=NOW + 1) == [1, 2]


# ---------------------------------------------------------------- claim


async def test_claim_takes_the_oldest_queued_job_and_counts_its_attempts(lua: Lua) -> None:
    await lua.put_kernel()
    assert await lua.claim() == ["empty"]
    await lua.enqueue("j2", payload="p2", now=NOW + 1)
    await lua.enqueue("j1", payload="p1")
    # the last field counts what still waits: j2
    assert await lua.claim() == ["ok", "p1", KEYS.reply(CLUSTER, CLIENT), 1, "j1", 1]
    assert await lua.zset(KEYS.queue(CLUSTER, "k1")) == {"j2": NOW + 1}
    assert await lua.zset(KEYS.inflight(CLUSTER, "k1")) == {"j1": NOW, "j2": NOW + 1}
    job = await lua.job("j1")
    assert (job["attempt"], job["state"], job["started_ms"]) == ("1", "running", str(NOW))
    await lua.r.zadd(KEYS.queue(CLUSTER, "k1"), {"j1": NOW})  # re-delivered (rebind.lua does this)
    assert (await lua.claim())[3:5] == [2, "j1"], "a re-delivered job counts its attempts"


async def test_claim_keeps_the_wake_token_while_jobs_wait_and_drops_it_after(lua: Lua) -> None:
    """enqueue.lua sets the token idle workers block on; claim.lua sets it again while jobs
    remain queued (so another idle worker wakes too) and deletes it once none does."""
    await lua.put_kernel()
    wake = KEYS.kernel_wake(CLUSTER, "k1")
    await lua.enqueue("j1")
    await lua.enqueue("j2", now=NOW + 1)
    assert await lua.zset(wake) == {"w": 0}
    assert await lua.r.bzpopmin(wake, timeout=1) == (wake, "w", 0)  # an idle worker wakes
    assert (await lua.claim())[4] == "j1"
    assert await lua.zset(wake) == {"w": 0}, "j2 still waits"
    assert (await lua.claim())[4] == "j2"
    assert not await lua.r.exists(wake)
    await lua.r.zadd(wake, {"w": 0})  # a token without a job (the job was cancelled, say)
    assert await lua.claim() == ["empty"]
    assert not await lua.r.exists(wake)


async def test_a_wake_key_of_another_type_is_replaced(lua: Lua) -> None:
    await lua.put_kernel()
    wake = KEYS.kernel_wake(CLUSTER, "k1")
    await lua.r.set(wake, "garbage")
    assert (await lua.enqueue("j1"))[0] == 1, "the job is queued all the same"
    await lua.enqueue("j2", now=NOW + 1)
    assert (await lua.claim())[4] == "j1"
    assert await lua.zset(wake) == {"w": 0}


async def test_claim_on_the_redis_clock(lua: Lua) -> None:
    """Kernels send no time: their claim is written behind a blocking pop and runs later."""
    await lua.put_kernel()
    now = int(time.time() * 1000)
    await lua.enqueue("late", now=now, deadline_ms=now - 1)
    await lua.enqueue("j1", now=now + 1, deadline_ms=now + 60_000)
    assert await lua.claim(now="") == ["expired", "late"]
    assert (await lua.claim(now=""))[4] == "j1"
    assert abs(int((await lua.job("j1"))["started_ms"]) - now) < 5_000


async def test_claim_of_a_job_that_belongs_to_another_kernel_is_fenced(lua: Lua) -> None:
    await lua.put_kernel()
    await lua.put_kernel("k2")
    await lua.enqueue("j1")
    await lua.r.zadd(KEYS.queue(CLUSTER, "k2"), {"j1": NOW})  # a stray id on k2's queue
    job = await lua.job("j1")
    assert await lua.claim(kernel="k2") == ["fenced", "j1"]
    assert await lua.job("j1") == job, "untouched: it is k1's to run"
    assert await lua.zset(KEYS.queue(CLUSTER, "k2")) == {}
    assert (await lua.claim(kernel="k1"))[4] == "j1"


async def test_claim_by_a_stale_incarnation_gives_the_job_back(lua: Lua) -> None:
    """A zombie process of the same kernel name takes a job of its replacement: it goes back."""
    await lua.put_kernel()
    await lua.enqueue("j1")
    before = await lua.snapshot()
    assert await lua.claim(epoch=7) == ["zombie", "j1"]
    assert await lua.snapshot() == before, "the job is queued again, untouched, with its wake token"


async def test_claim_of_a_missing_job_is_gone_and_leaves_inflight(lua: Lua) -> None:
    await lua.put_kernel()
    await lua.r.zadd(KEYS.inflight(CLUSTER, "k1"), {"j1": NOW, "j2": NOW})
    await lua.r.zadd(KEYS.queue(CLUSTER, "k1"), {"j1": NOW})
    assert await lua.claim() == ["gone", "j1"]
    assert await lua.zset(KEYS.inflight(CLUSTER, "k1")) == {"j2": NOW}


async def test_claim_past_the_deadline_expires_and_deletes_the_job(lua: Lua) -> None:
    await lua.put_kernel()
    await lua.enqueue("j1", deadline_ms=NOW + 100)
    await lua.enqueue("j2", now=NOW + 1, deadline_ms=NOW + 100)
    assert (await lua.claim(now=NOW + 100))[:5:4] == ["ok", "j1"]  # the deadline itself is in time
    assert await lua.claim(now=NOW + 101) == ["expired", "j2"]
    assert not await lua.r.exists(KEYS.job(CLUSTER, "j2"))
    assert "j2" not in await lua.zset(KEYS.inflight(CLUSTER, "k1"))


# ---------------------------------------------------------------- claim: taking over a sibling's queued job


async def three_kernels(lua: Lua) -> None:
    for n in (1, 2, 3):
        await lua.put_kernel(f"k{n}", epoch=n)


async def test_an_idle_kernel_takes_the_oldest_queued_job_of_its_siblings(lua: Lua) -> None:
    await three_kernels(lua)
    await lua.enqueue("j1", kernel="k2", payload="p1", now=NOW + 5)
    await lua.enqueue("j2", kernel="k3", payload="p2", now=NOW)
    siblings = [("k2", 2), ("k3", 3)]
    # the last field counts what still waits, here and on the siblings (j1 on k2): look again
    assert await lua.claim(kernel="k1", siblings=siblings) == [
        "ok",
        "p2",
        KEYS.reply(CLUSTER, CLIENT),
        1,
        "j2",
        1,
    ]
    job = await lua.job("j2")
    assert (job["kernel"], job["epoch"], job["stolen_from"], job["state"]) == ("k1", "1", "k3", "running")
    assert await lua.zset(KEYS.queue(CLUSTER, "k3")) == {}
    assert await lua.zset(KEYS.inflight(CLUSTER, "k3")) == {}
    assert await lua.zset(KEYS.inflight(CLUSTER, "k1")) == {"j2": NOW}
    assert (await lua.r.hgetall(KEYS.cluster_stats(CLUSTER)))["steals"] == "1"
    # the job is now the thief's own: its result goes through, the old owner's is fenced
    assert await lua.finish("j2", kernel="k3", epoch=3) == 0
    assert await lua.finish("j2", kernel="k1", epoch=1) == 1
    assert (await lua.claim(kernel="k1", siblings=siblings))[4:] == ["j1", 0]
    assert await lua.claim(kernel="k1", siblings=siblings) == ["empty"]


async def test_a_kernel_takes_its_own_queued_work_before_a_siblings(lua: Lua) -> None:
    await three_kernels(lua)
    await lua.enqueue("old", kernel="k2", now=NOW)
    await lua.enqueue("mine", kernel="k1", now=NOW + 9)
    assert (await lua.claim(kernel="k1", siblings=[("k2", 2)]))[4:] == ["mine", 1]
    assert await lua.zset(KEYS.queue(CLUSTER, "k2")) == {"old": NOW}


async def test_a_claim_counts_its_siblings_queues_only_when_its_own_is_empty(lua: Lua) -> None:
    """The count that tells the caller more work waits is its own queue's while that has any
    (no sibling is read: a busy kernel's claim costs the same whatever the cluster's size)."""
    await three_kernels(lua)
    for n in range(3):
        await lua.enqueue(f"mine{n}", kernel="k1", now=NOW + n)
    await lua.enqueue("theirs", kernel="k2", now=NOW)
    await lua.enqueue("theirs too", kernel="k3", now=NOW)
    siblings = [("k2", 2), ("k3", 3)]
    assert (await lua.claim(kernel="k1", siblings=siblings))[4:] == ["mine0", 2]
    assert (await lua.claim(kernel="k1", siblings=siblings))[4:] == ["mine1", 1]
    assert (await lua.claim(kernel="k1", siblings=siblings))[4:] == ["mine2", 2], "then theirs count"


async def test_pinned_jobs_and_jobs_of_a_replaced_sibling_stay_where_they_are(lua: Lua) -> None:
    await three_kernels(lua)
    await lua.enqueue("pinned", kernel="k2", now=NOW, strategy=PINNED)
    await lua.enqueue("free", kernel="k2", now=NOW + 1)
    await lua.enqueue("other", kernel="k3", now=NOW - 1)
    assert (await lua.job("pinned"))["strategy"] == PINNED
    # k3 was replaced since the thief looked (epoch 3 -> 30): its handlers may differ, hands off
    await lua.put_kernel("k3", epoch=30)
    assert (await lua.claim(kernel="k1", siblings=[("k2", 2), ("k3", 3)]))[4] == "free"
    assert await lua.zset(KEYS.queue(CLUSTER, "k2")) == {"pinned": NOW}
    assert await lua.zset(KEYS.queue(CLUSTER, "k3")) == {"other": NOW - 1}
    assert await lua.claim(kernel="k1", siblings=[("k2", 2), ("k3", 3)]) == ["empty"]


@pytest.mark.parametrize(
    "thief", ["draining", "stale epoch", "ejected", "failure streak"], ids=lambda t: t.replace(" ", "-")
)
async def test_only_a_healthy_current_kernel_takes_work_over(lua: Lua, thief: str) -> None:
    await three_kernels(lua)
    await lua.enqueue("j1", kernel="k2")
    health = KEYS.kernel_health(CLUSTER, "k1")
    epoch = 1
    if thief == "draining":
        await lua.put_kernel("k1", state="draining", epoch=1)
    elif thief == "stale epoch":
        epoch = 0
    elif thief == "ejected":
        await lua.r.hset(health, mapping={"ejected_until": NOW + 1_000, "consecutive": 0})
    else:
        await lua.r.hset(health, mapping={"ejected_until": NOW - 1_000, "consecutive": 2})
    before = await lua.snapshot()
    assert await lua.claim(kernel="k1", epoch=epoch, siblings=[("k2", 2)]) == ["empty"]
    assert await lua.snapshot() == before


async def test_a_stolen_job_cancelled_while_it_runs_leaves_no_trace(lua: Lua) -> None:
    await three_kernels(lua)
    await lua.enqueue("j1", kernel="k2")
    assert (await lua.claim(kernel="k1", siblings=[("k2", 2)]))[4] == "j1"
    assert await lua.cancel("j1", kernel="k2") == 1  # the client cancels where it sent the job
    assert await lua.zset(KEYS.inflight(CLUSTER, "k1")) == {"j1": NOW}
    assert await lua.finish("j1", kernel="k1") == 0  # rejected, and the thief forgets it
    assert await lua.zset(KEYS.inflight(CLUSTER, "k1")) == {}
    assert await lua.r.lrange(KEYS.reply(CLUSTER, CLIENT), 0, -1) == []


# ---------------------------------------------------------------- finish


async def test_finish_delivers_exactly_once_and_counts(lua: Lua) -> None:
    await lua.put_kernel()
    await lua.enqueue("j1", strategy="round_robin")
    await lua.enqueue("j2", now=NOW + 1, strategy=PINNED)
    await lua.claim()
    assert await lua.finish("j1", message="r1", latency_ms=12) == 1
    assert await lua.finish("j1", message="r1-again", latency_ms=12) == 0
    reply = KEYS.reply(CLUSTER, CLIENT)
    assert await lua.r.lrange(reply, 0, -1) == ["r1"]
    assert 0 < await lua.r.pttl(reply) <= REPLY_TTL_MS
    assert not await lua.r.exists(KEYS.job(CLUSTER, "j1"))
    assert await lua.zset(KEYS.inflight(CLUSTER, "k1")) == {"j2": NOW + 1}

    await lua.claim()
    assert await lua.finish("j2", message="r2", success=False, latency_ms=8.5) == 1
    assert await lua.r.lrange(reply, 0, -1) == ["r1", "r2"]
    assert await lua.zset(KEYS.inflight(CLUSTER, "k1")) == {}
    # the kernel's hash only, by strategy; readers sum the strategies into dispatches and errors
    assert not await lua.r.exists(KEYS.cluster_stats(CLUSTER))
    kernel = await lua.r.hgetall(KEYS.kernel_stats(CLUSTER, "k1"))
    assert (kernel["dispatches:round_robin"], kernel.get("errors:round_robin")) == ("1", None)
    assert (kernel["dispatches:pinned"], kernel["errors:pinned"]) == ("1", "1")
    assert float(kernel["latency_ms_sum"]) == pytest.approx(20.5)
    assert "dispatches" not in kernel and "errors" not in kernel
    await lua.r.sadd(KEYS.cluster_kernels(CLUSTER), "k1")
    own, theirs = await read_stats(lua)
    derived = stats.totals(own, theirs.values())
    assert (derived[stats.DISPATCHES], derived[stats.ERRORS]) == (2, 1)
    assert derived[stats.LATENCY_MS_SUM] == pytest.approx(20.5)
    assert stats.derive(theirs["k1"])[stats.DISPATCHES] == 2


async def test_finish_adds_the_reply_to_the_clients_bell_when_given(lua: Lua) -> None:
    """On one Redis the kernel passes the client's bell: the reply goes on it too (score 0, so it
    pops before any ring of a cluster's name), the list keeping its copy; a rejected finish
    leaves the bell alone (test_a_zombie_finish_is_rejected_and_changes_nothing)."""
    await lua.put_kernel()
    await lua.enqueue("j1")
    await lua.claim()
    bell = KEYS.reply_bell(CLIENT)
    await lua.r.zadd(bell, {CLUSTER: NOW})  # a ring from elsewhere, waiting
    assert await lua.finish("j1", message="r1", bell=True) == 1
    assert await lua.r.zrange(bell, 0, -1, withscores=True) == [("r1", 0), (CLUSTER, NOW)]
    assert 0 < await lua.r.pttl(bell) <= REPLY_TTL_MS
    assert await lua.r.lrange(KEYS.reply(CLUSTER, CLIENT), 0, -1) == ["r1"]
    assert await lua.finish("j1", message="r1-again", bell=True) == 0
    assert await lua.r.zcard(bell) == 2


async def test_finish_counts_a_jobs_strategy_and_buckets_in_one_field(lua: Lua) -> None:
    """One HINCRBY per job for its strategy and both histograms; readers split it back."""
    await lua.put_kernel()
    for n, (strategy, latency, queue) in enumerate(
        [("adaptive", 0.7, 0), ("adaptive", 0.7, 0), ("a|b", 30, 2)]
    ):
        await lua.enqueue(f"j{n}", strategy=strategy)
        await lua.claim()
        buckets = (
            stats.bucket_field(stats.LATENCY, latency / 1000),
            stats.bucket_field(stats.QUEUE, queue / 1000),
        )
        call = jobs.finish(
            KEYS,
            CLUSTER,
            "k1",
            job_id=f"j{n}",
            epoch=1,
            reply_key=KEYS.reply(CLUSTER, CLIENT),
            message="r",
            success=n != 2,
            latency_ms=latency,
            reply_ttl_ms=REPLY_TTL_MS,
            queue_ms=queue,
            buckets=buckets,
        )
        assert await lua.call(call) == 1
    raw = await lua.r.hgetall(KEYS.kernel_stats(CLUSTER, "k1"))
    assert raw == {
        "dispatches:adaptive|latency_le_0.001|queue_le_0.0005": "2",
        "dispatches:a_b|latency_le_0.05|queue_le_0.0025": "1",  # a '|' in the strategy cannot split it
        "errors:a_b": "1",
        "latency_ms_sum": raw["latency_ms_sum"],  # HINCRBYFLOAT: float noise (fakeredis)
        "queue_ms_sum": "2",
    }
    assert float(raw["latency_ms_sum"]) == pytest.approx(31.4)
    derived = stats.derive({k: float(v) for k, v in raw.items()})
    assert derived == pytest.approx(
        {
            "dispatches:adaptive": 2,
            "dispatches:a_b": 1,
            "errors:a_b": 1,
            "latency_le_0.001": 2,
            "latency_le_0.05": 1,
            "queue_le_0.0005": 2,
            "queue_le_0.0025": 1,
            "latency_ms_sum": 31.4,
            "queue_ms_sum": 2,
            stats.DISPATCHES: 3,
            stats.ERRORS: 1,
        }
    )
    assert stats.histogram(derived, stats.LATENCY)[-1] == (float("inf"), 3)


async def read_stats(lua: Lua) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """stats_read.lua's hashes as numbers: the cluster's, and its kernels' by name."""
    call = jobs.read_stats(KEYS, CLUSTER)
    read = call.parse(await lua.call(call))

    def numbers(h: Mapping[str, str]) -> dict[str, float]:
        return {k: float(v) for k, v in h.items()}

    return numbers(read.cluster), {name: numbers(h) for name, h in read.kernels.items()}


def remove(kernel: str) -> FencedWrite:
    """The reconciler's removal of `kernel`, as far as its stats go."""
    write = FencedWrite(KEYS, CLUSTER).hfold(KEYS.kernel_stats(CLUSTER, kernel), KEYS.cluster_stats(CLUSTER))
    return write.delete(KEYS.kernel(CLUSTER, kernel)).srem(KEYS.cluster_kernels(CLUSTER), kernel)


async def test_a_removed_kernels_counts_stay_in_its_clusters_totals(lua: Lua) -> None:
    """The reconciler folds a removed kernel's stats into the cluster's hash (fence.lua HFOLD),
    in the same script that deletes the kernel: the cluster's totals never step back."""
    for name in ("k1", "k2"):
        await lua.put_kernel(name)
        await lua.r.sadd(KEYS.cluster_kernels(CLUSTER), name)
    await lua.r.hset(KEYS.cluster_stats(CLUSTER), mapping={"steals": 2, "dispatches:adaptive": 1})
    for n, name in enumerate(("k1", "k1", "k2")):
        await lua.enqueue(f"j{n}", kernel=name, strategy="adaptive")
        await lua.claim(kernel=name)
        assert await lua.finish(f"j{n}", kernel=name, success=n != 1, latency_ms=1.25) == 1
    own, theirs = await read_stats(lua)
    assert set(theirs) == {"k1", "k2"}
    before = stats.totals(own, theirs.values())
    assert (before[stats.DISPATCHES], before[stats.ERRORS], before[stats.STEALS]) == (4, 1, 2)
    assert await lua.call(remove("k1").call(1)) == "ok"
    assert not await lua.r.exists(KEYS.kernel_stats(CLUSTER, "k1"))
    own, theirs = await read_stats(lua)
    assert set(theirs) == {"k2"}
    assert stats.totals(own, theirs.values()) == pytest.approx(before)
    assert (own["dispatches:adaptive"], own["errors:adaptive"], own["steals"]) == (3, 1, 2)
    assert own["latency_ms_sum"] == pytest.approx(2.5)
    # a job still assigned to a kernel removed meanwhile (its result is not fenced yet): its sets
    # are gone and its hash folded, so the cluster's hash counts it
    await lua.enqueue("late", kernel="k2", strategy="adaptive")
    await lua.claim(kernel="k2")
    await lua.r.delete(KEYS.inflight(CLUSTER, "k2"), KEYS.queue(CLUSTER, "k2"))
    assert await lua.call(remove("k2").call(1)) == "ok"
    assert await lua.finish("late", kernel="k2", latency_ms=1) == 1
    assert not await lua.r.exists(KEYS.kernel_stats(CLUSTER, "k2"))
    own, theirs = await read_stats(lua)
    assert theirs == {}
    late = stats.totals(own, theirs.values())
    assert late[stats.DISPATCHES] == before[stats.DISPATCHES] + 1
    await lua.put_kernel("k2")
    await lua.r.sadd(KEYS.cluster_kernels(CLUSTER), "k2")
    before = late
    # garbage in the hash folded is dropped, never fails the removal
    garbage = {"huge": "9" * 30, "inf": "1e400", "text": "x", "steals": "-1"}
    await lua.r.hset(KEYS.kernel_stats(CLUSTER, "k2"), mapping=garbage)
    write = remove("k2")
    assert await lua.call(write.call(1)) == "ok"
    assert not await lua.r.exists(KEYS.kernel_stats(CLUSTER, "k2"), KEYS.kernel(CLUSTER, "k2"))
    own, theirs = await read_stats(lua)
    assert theirs == {}
    after = stats.totals(own, theirs.values())
    assert {k: after[k] for k in before} == pytest.approx({**before, stats.STEALS: 1})
    # folding again (a retried removal) adds nothing
    assert await lua.call(write.call(1)) == "ok"
    own, theirs = await read_stats(lua)
    assert stats.totals(own, theirs.values()) == pytest.approx(after)


@pytest.mark.parametrize(("kernel", "epoch"), [("k1", 1), ("k2", 2)], ids=["old-epoch", "other-kernel"])
async def test_a_zombie_finish_is_rejected_and_changes_nothing(lua: Lua, kernel: str, epoch: int) -> None:
    await lua.put_kernel(epoch=1)
    assert await lua.kernel_start() == [1, "running"]  # the kernel restarts: epoch counter -> 1
    assert await lua.kernel_start() == [2, "running"]  # ... and once more: epoch 2
    await lua.enqueue("j1")  # routed to epoch 2
    assert (await lua.job("j1"))["epoch"] == "2"
    if kernel == "k1":  # the old incarnation (epoch 1) still thinks it owns the job
        assert await lua.claim(epoch=1) == ["zombie", "j1"]
    before = await lua.snapshot()
    assert await lua.finish("j1", kernel=kernel, epoch=epoch, bell=True) == 0
    assert await lua.snapshot() == before


# ---------------------------------------------------------------- cancel


async def test_cancel_removes_a_queued_job(lua: Lua) -> None:
    await lua.put_kernel()
    await lua.enqueue("j1")
    assert await lua.cancel("j1") == 1
    assert not await lua.r.exists(KEYS.job(CLUSTER, "j1"))
    assert await lua.zset(KEYS.queue(CLUSTER, "k1")) == {}
    assert await lua.zset(KEYS.inflight(CLUSTER, "k1")) == {}
    assert await lua.claim() == ["empty"]
    assert await lua.finish("j1") == 0  # a late result is rejected


async def test_cancel_after_finish_returns_0(lua: Lua) -> None:
    await lua.put_kernel()
    await lua.enqueue("j1")
    await lua.claim()
    assert await lua.finish("j1") == 1
    assert await lua.cancel("j1") == 0
    assert await lua.r.lrange(KEYS.reply(CLUSTER, CLIENT), 0, -1) == ["result"]


# ---------------------------------------------------------------- kernel_start


async def test_kernel_start_takes_a_monotonic_epoch_and_runs_a_pending_kernel(lua: Lua) -> None:
    await lua.r.set(KEYS.cluster_epoch(CLUSTER), 41)
    await lua.put_kernel("k1", state="pending", epoch=0)
    await lua.put_kernel("k2", state="pending", epoch=0)
    assert await lua.kernel_start("k1") == [42, "running"]
    assert await lua.kernel_start("k2") == [43, "running"]
    assert await lua.kernel_start("k1") == [44, "running"]
    record = await lua.kernel("k1")
    assert record == {
        "agent": "a1",
        "state": "running",
        "epoch": "44",
        "pid": "4242",
        "host": "host-1",
        "started_at": "1700000000",
        "syscalls": "PING READ",
        "capabilities": "gpu",
        "restarts": "1",  # its second start: the first had a process already
    }
    assert "restarts" not in await lua.kernel("k2")  # started once
    assert await lua.r.get(KEYS.cluster_epoch(CLUSTER)) == "44"


async def test_kernel_start_counts_restarts_of_one_placement_only(lua: Lua) -> None:
    """`restarts` (kcp_kernel_restarts_total) counts every start after the first of a placement;
    a new placement writes a fresh record (pid 0) and counts from 0 again."""
    await lua.put_kernel(state="pending", epoch=0)
    await lua.r.hset(KEYS.kernel(CLUSTER, "k1"), "pid", "0")
    for _ in range(4):
        await lua.kernel_start()
    assert (await lua.kernel())["restarts"] == "3"
    await lua.r.delete(KEYS.kernel(CLUSTER, "k1"))
    await lua.put_kernel(state="pending", epoch=0)
    await lua.r.hset(KEYS.kernel(CLUSTER, "k1"), "pid", "0")
    await lua.kernel_start()
    assert "restarts" not in await lua.kernel()


async def test_kernel_start_keeps_a_draining_kernel_draining(lua: Lua) -> None:
    await lua.put_kernel(state="draining", epoch=3)
    assert await lua.kernel_start() == [1, "draining"]
    assert (await lua.kernel())["state"] == "draining"
    assert (await lua.enqueue("j1"))[0] == 0


@pytest.mark.parametrize(
    ("setup", "reason"),
    [("other-agent", "assigned to a2"), ("missing", "missing"), ("stopped", "stopped")],
)
async def test_kernel_start_refuses(lua: Lua, setup: str, reason: str) -> None:
    if setup == "other-agent":
        await lua.put_kernel(state="pending", agent="a2")
    elif setup == "stopped":
        await lua.put_kernel(state="stopped")
    before = await lua.snapshot()
    assert await lua.kernel_start(agent="a1") == [0, reason]
    assert await lua.snapshot() == before  # no epoch taken, record untouched


# ---------------------------------------------------------------- kernel_stop


async def test_kernel_stop_drains_then_stops(lua: Lua) -> None:
    await lua.put_kernel(epoch=5)
    await lua.enqueue("j1")
    assert await lua.kernel_stop(epoch=5) == 0
    assert (await lua.kernel())["state"] == "draining"
    assert await lua.enqueue("j2") == [0, "draining"]
    assert await lua.kernel_stop(epoch=5) == 0  # still one in flight
    await lua.claim(epoch=5)
    assert await lua.finish("j1", epoch=5) == 1
    assert await lua.kernel_stop(epoch=5) == 1
    assert (await lua.kernel())["state"] == "stopped"
    assert await lua.kernel_stop(epoch=5) == 1
    assert await lua.enqueue("j3") == [0, "stopped"]


async def test_kernel_stop_with_nothing_in_flight_stops_at_once(lua: Lua) -> None:
    await lua.put_kernel(epoch=5)
    assert await lua.kernel_stop(epoch=5) == 1
    assert (await lua.kernel())["state"] == "stopped"


async def test_kernel_stop_is_fenced(lua: Lua) -> None:
    await lua.put_kernel(epoch=5)
    before = await lua.snapshot()
    assert await lua.kernel_stop(epoch=4) == -1
    assert await lua.kernel_stop("k9", epoch=5) == -1  # no record at all
    assert await lua.snapshot() == before


# ---------------------------------------------------------------- rebind


async def orphan(lua: Lua, ids: list[str], *, kernel: str = "k1") -> dict[str, float]:
    """Move `ids` from `kernel`'s queue and inflight to the cluster's orphans (as the reconciler does)."""
    scores = {i: s for i, s in (await lua.zset(KEYS.inflight(CLUSTER, kernel))).items() if i in ids}
    await lua.r.zrem(KEYS.inflight(CLUSTER, kernel), *ids)
    await lua.r.zrem(KEYS.queue(CLUSTER, kernel), *ids)
    await lua.r.zadd(KEYS.cluster_orphans(CLUSTER), scores)
    return scores


async def test_rebind_moves_orphans_to_a_running_kernel(lua: Lua) -> None:
    await lua.put_kernel("k1", epoch=1)
    await lua.put_kernel("k2", epoch=5)
    for n, job_id in enumerate(["j1", "j2", "j3"]):
        await lua.enqueue(job_id, now=NOW + n)
    scores = await orphan(lua, ["j1", "j2", "j3"])
    assert scores == {"j1": NOW, "j2": NOW + 1, "j3": NOW + 2}
    await lua.r.delete(KEYS.job(CLUSTER, "j3"))  # its job key expired meanwhile

    assert await lua.rebind(KEYS.cluster_orphans(CLUSTER), "k2", ["j1", "j2", "j3"]) == [2]

    for job_id in ("j1", "j2"):
        job = await lua.job(job_id)
        assert (job["kernel"], job["epoch"], job["state"]) == ("k2", "5", "queued")
    moved = {"j1": NOW, "j2": NOW + 1}
    assert await lua.zset(KEYS.queue(CLUSTER, "k2")) == moved
    assert await lua.zset(KEYS.inflight(CLUSTER, "k2")) == moved
    assert await lua.zset(KEYS.cluster_orphans(CLUSTER)) == {}  # j3 dropped too
    assert await lua.zset(KEYS.kernel_wake(CLUSTER, "k2")) == {"w": 0}, "k2's idle workers wake"
    # the new owner may run it; the old one is fenced out
    assert (await lua.claim(kernel="k2", epoch=5))[:5:4] == ["ok", "j1"]
    assert await lua.finish("j1", kernel="k1", epoch=1) == 0
    assert await lua.finish("j1", kernel="k2", epoch=5) == 1


@pytest.mark.parametrize("state", ["pending", "draining", "stopped", "missing"])
async def test_rebind_refuses_a_target_that_takes_no_work(lua: Lua, state: str) -> None:
    await lua.put_kernel("k1", epoch=1)
    if state != "missing":
        await lua.put_kernel("k2", state=state, epoch=5)
    await lua.enqueue("j1")
    await orphan(lua, ["j1"])
    before = await lua.snapshot()
    assert await lua.rebind(KEYS.cluster_orphans(CLUSTER), "k2", ["j1"]) == [-1]
    assert await lua.snapshot() == before


@pytest.mark.parametrize("state", ["running", "draining"])
async def test_a_restarted_kernel_rebinds_its_own_inflight(lua: Lua, state: str) -> None:
    await lua.put_kernel(epoch=1)
    await lua.enqueue("j1")
    await lua.enqueue("j2", now=NOW + 1)
    await lua.r.zpopmin(KEYS.queue(CLUSTER, "k1"), 2)  # both were popped by the dead incarnation
    await lua.r.hset(KEYS.kernel(CLUSTER, "k1"), mapping={"state": state, "epoch": 2})
    inflight = KEYS.inflight(CLUSTER, "k1")

    assert await lua.rebind(inflight, "k1", ["j1", "j2"]) == [2]

    assert (await lua.job("j1"))["epoch"] == "2"
    assert (await lua.job("j2"))["epoch"] == "2"
    assert await lua.zset(inflight) == {"j1": NOW, "j2": NOW + 1}  # the source keeps them
    assert await lua.zset(KEYS.queue(CLUSTER, "k1")) == {"j1": NOW, "j2": NOW + 1}
    assert (await lua.claim(epoch=2))[:5:4] == ["ok", "j1"]


async def test_pinned_jobs_never_move_to_another_kernel_or_incarnation(lua: Lua) -> None:
    """Orphans of a dead kernel: the unpinned one moves, the pinned one is answered KernelGone.
    A restarted kernel's own pinned job fails (its memory is gone); after a Redis outage, the
    same incarnation takes its pinned job back."""
    await lua.put_kernel("k1", epoch=1)
    await lua.put_kernel("k2", epoch=5)
    await lua.enqueue("free", now=NOW)
    await lua.enqueue("pin", now=NOW + 1, strategy=PINNED)
    await orphan(lua, ["free", "pin"])

    reply = KEYS.reply(CLUSTER, CLIENT)
    assert await lua.rebind(KEYS.cluster_orphans(CLUSTER), "k2", ["free", "pin"]) == [1, reply], (
        "the list answered is returned: the caller rings its bell"
    )
    assert (await lua.job("free"))["kernel"] == "k2"
    assert await lua.job("pin") == {}, "answered and deleted"
    assert await lua.zset(KEYS.cluster_orphans(CLUSTER)) == {}
    (raw,) = await lua.r.lrange(KEYS.reply(CLUSTER, CLIENT), 0, -1)
    gone = decode_result(raw)
    assert (gone.job_id, gone.success, gone.error_type, gone.kernel, gone.epoch) == (
        "pin",
        False,
        "KernelGone",
        "k1",
        1,
    )
    assert "pinned to kernel k1@1, which is gone" in gone.error

    await lua.r.delete(KEYS.reply(CLUSTER, CLIENT))
    inflight = KEYS.inflight(CLUSTER, "k2")
    await lua.enqueue("same", kernel="k2", now=NOW + 2, strategy=PINNED)
    assert await lua.rebind(inflight, "k2", ["same"]) == [1], "the same incarnation takes it back"
    await lua.r.hset(KEYS.kernel(CLUSTER, "k2"), "epoch", 6)  # restarted: a new process
    assert await lua.rebind(inflight, "k2", ["same", "free"]) == [1, reply]
    assert await lua.zset(inflight) == {"free": NOW}
    (raw,) = await lua.r.lrange(KEYS.reply(CLUSTER, CLIENT), 0, -1)
    replaced = decode_result(raw)
    assert (replaced.job_id, replaced.error_type) == ("same", "KernelGone")
    assert "was replaced by k2@6, which starts with empty memory" in replaced.error


async def test_rebind_pushes_only_to_the_reply_lists_declared(lua: Lua) -> None:
    """A job answered with an error whose reply list the caller did not declare (it read the
    fields before another caller changed them: not in production, where a job's reply field is
    written once) is deleted with no push: the script touches no undeclared key."""
    await lua.put_kernel("k1", epoch=1)
    await lua.put_kernel("k2", epoch=5)
    await lua.enqueue("pin", strategy=PINNED)
    await orphan(lua, ["pin"])
    assert await lua.rebind(KEYS.cluster_orphans(CLUSTER), "k2", ["pin"], declare=False) == [0]
    assert await lua.job("pin") == {}
    assert await lua.r.exists(KEYS.reply(CLUSTER, CLIENT)) == 0


async def test_enqueue_pinned_to_an_incarnation_refuses_another(lua: Lua) -> None:
    await lua.put_kernel("k1", epoch=3)
    before = await lua.snapshot()
    assert await lua.enqueue("j1", epoch=2, strategy=PINNED) == [0, "epoch=3"]
    assert await lua.enqueue("j1", kernel="k9", epoch=2, strategy=PINNED) == [0, "epoch="]
    assert await lua.snapshot() == before
    assert await lua.enqueue("j1", epoch=3, strategy=PINNED) == [1, 1]
    assert (await lua.job("j1"))["epoch"] == "3"


async def test_take_replies_keeps_what_it_took_until_the_next_take(lua: Lua) -> None:
    reply, taken = KEYS.reply(CLUSTER, CLIENT), KEYS.reply_taken(CLUSTER, CLIENT)
    await lua.r.rpush(reply, "r1", "r2", "r3")

    def take() -> Call[list[str]]:
        return jobs.take_replies(KEYS, CLUSTER, CLIENT, count=2, ttl_ms=60_000)

    assert await lua.call(take()) == ["r1", "r2"]
    assert await lua.r.lrange(taken, 0, -1) == ["r1", "r2"], "read again after a lost answer"
    assert 0 < await lua.r.pttl(taken) <= 60_000
    await lua.r.pexpire(reply, 5)  # the list the last take empties becomes the taken list ...
    assert await lua.call(take()) == ["r3"]
    assert await lua.r.lrange(taken, 0, -1) == ["r3"]
    assert 5_000 < await lua.r.pttl(taken) <= 60_000, "... with the taken list's TTL"
    assert await lua.r.exists(reply) == 0
    assert await lua.call(take()) == []
    assert await lua.r.exists(reply, taken) == 0


# ---------------------------------------------------------------- leader


async def test_leader_take_renew_refuse_release(lua: Lua) -> None:
    key = KEYS.leader()
    assert await lua.leader("t1", 10_000) == 1  # taken afresh: term 1
    assert await lua.r.get(key) == "t1"
    assert await lua.leader("t2", 10_000) == 0
    await lua.r.pexpire(key, 1_000)
    assert await lua.leader("t1", 10_000, term=1) == 1  # renewed in its term: the TTL is back up
    assert await lua.r.pttl(key) > 1_000
    assert await lua.leader("t2", 0) == 0  # a non-holder cannot release
    assert await lua.r.get(key) == "t1"
    assert await lua.leader("t1", 0) == 0  # the holder releases
    assert await lua.r.get(key) is None
    assert await lua.leader("t2", 10_000) == 2  # each fresh take is a new, higher term
    assert await lua.r.get(key) == "t2"
    assert await lua.leader("t2", 10_000) == 3  # the holder that lost its term takes a new one
    assert await lua.r.get(KEYS.leader_term()) == "3"


async def test_leader_lease_expires(lua: Lua) -> None:
    assert await lua.leader("t1", 50) == 1
    assert await lua.leader("t2", 10_000) == 0
    give_up = time.monotonic() + 2
    while await lua.r.exists(KEYS.leader()):
        assert time.monotonic() < give_up, "the lease did not expire"
        await asyncio.sleep(0.02)
    assert await lua.leader("t2", 10_000) == 2, "taken afresh after the lapse: the next term"
    assert await lua.leader("t1", 10_000) == 0


# ---------------------------------------------------------------- a full round trip


async def test_round_trip(lua: Lua) -> None:
    await lua.put_kernel(epoch=3)
    request = {"type": "PING", "payload": "hi"}
    queue = KEYS.queue(CLUSTER, "k1")
    raw_job = encode_job(request, job_try=1, enqueue_ms=NOW)
    assert await lua.enqueue("j1", payload=raw_job) == [1, 1]

    wake = KEYS.kernel_wake(CLUSTER, "k1")
    assert await lua.r.bzpopmin(wake, timeout=1) == (wake, "w", 0)
    status, job, reply, attempt, job_id, _queued = await lua.claim(epoch=3)
    assert (status, job_id) == ("ok", "j1")
    assert reply == KEYS.reply(CLUSTER, CLIENT)
    kwargs, enqueue_ms, _try = decode_job(job)
    assert (kwargs, enqueue_ms) == (request, NOW)

    result = encode_result(
        job_id=job_id,
        function=kwargs["type"],
        kernel="k1",
        queue=queue,
        attempt=attempt,
        enqueue_ms=enqueue_ms,
        start_ms=NOW + 5,
        finish_ms=NOW + 9,
        value={"pong": kwargs["payload"]},
    )
    assert await lua.finish(job_id, epoch=3, message=result, latency_ms=9) == 1

    delivered = await lua.r.blpop([reply], timeout=1)
    assert delivered is not None
    outcome = decode_result(delivered[1])
    assert outcome.success
    assert outcome.kernel == "k1"
    assert outcome.value == {"pong": "hi"}
    assert (outcome.job_id, outcome.attempt) == ("j1", 1)
    assert (outcome.enqueue_ms, outcome.start_ms, outcome.finish_ms) == (NOW, NOW + 5, NOW + 9)
    # counters are created by their first increment: no errors, no queue wait so far
    assert await lua.snapshot() == {
        KEYS.kernel(CLUSTER, "k1"): {"state": "running", "epoch": "3", "agent": "a1"},
        KEYS.kernel_stats(CLUSTER, "k1"): {"dispatches:adaptive": "1", "latency_ms_sum": "9"},
    }
