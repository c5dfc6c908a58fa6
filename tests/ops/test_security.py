"""No code from data: no pickle anywhere, and corrupt or forged job hashes cannot stop a kernel."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path

import pytest
from conftest import ProcessStack
from redis.asyncio import Redis as AsyncRedis

from controlplane import KcpClient, Settings
from controlplane.protocol.keys import Keys
from controlplane.redis.scripts import jobs

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(
    p for d in ("controlplane", "kernel_agent", "examples", "bench") for p in (ROOT / d).rglob("*.py")
)
KEYS = Keys()
NOW = 1_800_000_000_000

#: Modules that turn bytes into code or arbitrary objects.
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "jsonpickle"}
#: arq's (de)serializers default to pickle: every call must pass a JSON one.
ARQ_CODECS = {
    "serialize_job": "serializer",
    "serialize_result": "serializer",
    "deserialize_job": "deserializer",
    "deserialize_job_raw": "deserializer",
    "deserialize_result": "deserializer",
}


@pytest.mark.unit
def test_no_pickle_and_no_eval_anywhere() -> None:
    problems = []
    for path in SOURCES:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Import):
                problems += [
                    f"{where} imports {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES
                ]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
                problems.append(f"{where} imports from {node.module}")
            elif isinstance(node, ast.Call):
                name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
                if isinstance(node.func, ast.Name) and name in ("eval", "exec"):
                    problems.append(f"{where} calls {name}()")
                if name in ARQ_CODECS and ARQ_CODECS[name] not in {k.arg for k in node.keywords}:
                    problems.append(f"{where} calls arq's {name} without a JSON {ARQ_CODECS[name]}")
                if name == "load" and getattr(getattr(node.func, "value", None), "id", "") == "yaml":
                    problems.append(f"{where} calls yaml.load")
    assert len(SOURCES) > 20
    assert problems == [], problems


# ------------------------------------------------------------------ claim.lua against corrupt jobs


async def _put_job(redis: AsyncRedis, job_id: str, **fields: str) -> None:
    base = {
        "kernel": "k1",
        "epoch": "5",
        "job": "{}",
        "reply": KEYS.reply("c", "client-1"),
        "deadline_ms": str(NOW + 1000),
    }
    base.update(fields)
    await redis.hset(KEYS.job("c", job_id), mapping={k: v for k, v in base.items() if v != "<missing>"})
    await redis.zadd(KEYS.inflight("c", "k1"), {job_id: NOW})
    await redis.zadd(KEYS.queue("c", "k1"), {job_id: NOW})


async def _claim(redis: AsyncRedis, epoch: str = "5") -> list[str]:
    """claim.lua for kernel k1: it takes the oldest job on k1's queue."""
    result: list[str] = await jobs.claim(KEYS, "c", "k1", epoch=epoch, now_ms=NOW).reply(redis)
    return result


@pytest.mark.integration
@pytest.mark.parametrize(
    ("fields", "outcome"),
    [
        ({"epoch": "garbage"}, "gone"),
        ({"epoch": ""}, "gone"),
        ({"attempt": "many"}, "gone"),
        ({"job": "<missing>"}, "gone"),
        ({"reply": "<missing>"}, "gone"),
        ({"kernel": "<missing>"}, "gone"),
        ({"deadline_ms": "soon"}, "expired"),
        ({"deadline_ms": "<missing>"}, "expired"),
    ],
)
async def test_a_corrupt_job_is_dropped_not_run(
    redis: AsyncRedis, fields: dict[str, str], outcome: str
) -> None:
    await redis.hset(KEYS.kernel("c", "k1"), mapping={"epoch": "5", "state": "running"})
    await _put_job(redis, "j1", **fields)
    assert (await _claim(redis))[0] == outcome
    assert not await redis.exists(KEYS.job("c", "j1"))
    assert await redis.zcard(KEYS.inflight("c", "k1")) == 0


@pytest.mark.integration
async def test_a_forged_epoch_cannot_make_the_current_kernel_exit(redis: AsyncRedis) -> None:
    """Anyone who may write jobs can write any epoch; only the kernel's own record decides whether
    a newer incarnation exists."""
    await redis.hset(KEYS.kernel("c", "k1"), mapping={"epoch": "5", "state": "running"})
    await _put_job(redis, "forged", epoch="999")
    status = await _claim(redis)
    assert status[0] == "ok", status  # run by the current incarnation (the record says it is current)
    assert await redis.hget(KEYS.job("c", "forged"), "epoch") == "5"
    # a real zombie (an older incarnation, whose record moved on) still steps aside
    await _put_job(redis, "j2", epoch="5")
    assert (await _claim(redis, epoch="4"))[0] == "zombie"
    assert await redis.zscore(KEYS.queue("c", "k1"), "j2") == NOW, "the job went back for the current one"


# ------------------------------------------------------------------ an agent facing a key of the wrong type


@pytest.mark.system
@pytest.mark.timeout(60)
async def test_agent_survives_a_wrong_type_assignment_key(stack: ProcessStack, redis: AsyncRedis) -> None:
    """WRONGTYPE on the agent's assignment: the agent logs it and retries; fixed, it converges."""
    await redis.set(KEYS.agent_kernels("wt"), "not a hash")
    agent = stack.agent("wt", 1)
    stack.serve()
    for _ in range(100):
        if await redis.exists(KEYS.agent_lease("wt")):
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.5)  # several ticks against the wrong type
    assert agent.poll() is None, "the agent is still running"
    await redis.delete(KEYS.agent_kernels("wt"))
    async with KcpClient(Settings(redis_url=stack.redis_url)) as kcp:
        info = await kcp.create_cluster("wt", 1, wait=30)
        assert info.running == 1
        assert (await kcp.dispatch("wt", {"type": "PING"})).kernel == "worker-0"
