"""The reply listener after an outage learns each waiting job's fate from Redis: a reply whose
take was lost with the connection is delivered from the taken list, a job still queued is
waited for, and a job gone without a result ends its attempt at once (it never ran)."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis as AsyncRedis

from controlplane.client.dispatch import Dispatcher, _Vanished
from controlplane.errors import RedisUnavailable
from controlplane.protocol.jobs import Outcome, encode_result
from controlplane.protocol.keys import Keys
from controlplane.redis.connect import connect

pytestmark = [pytest.mark.integration, pytest.mark.timeout(20)]

KEYS = Keys()


def result(job_id: str) -> str:
    return encode_result(
        job_id=job_id,
        function="PING",
        kernel="worker-0",
        queue="q",
        attempt=1,
        enqueue_ms=1,
        start_ms=2,
        finish_ms=3,
        value={"job": job_id},
        epoch=4,
    )


async def test_after_an_outage_the_listener_reads_each_jobs_fate(redis: AsyncRedis, redis_url: str) -> None:
    client = connect(redis_url)
    dispatcher = Dispatcher(client, KEYS)
    loop = asyncio.get_running_loop()
    futures: dict[str, asyncio.Future[Outcome]] = {}
    for job_id in ("taken", "listed", "queued", "vanished"):
        futures[job_id] = dispatcher._waiting[job_id] = loop.create_future()
        dispatcher._queued[job_id] = "c"
    # `taken` finished and its reply was moved to the taken list by a take whose answer the
    # crash lost; `listed` finished and its reply waits; `queued` still waits for a kernel;
    # `vanished` is gone (its enqueue was lost with a failover) and no reply will come
    await redis.rpush(KEYS.reply_taken(dispatcher.client_id), result("taken"))
    await redis.rpush(KEYS.reply(dispatcher.client_id), result("listed"))
    await redis.hset(KEYS.job("c", "queued"), mapping={"state": "queued"})
    await dispatcher._lost(RedisUnavailable("connection lost"))
    dispatcher._listen_for_replies()
    try:
        done, _ = await asyncio.wait(
            [futures[j] for j in ("taken", "listed", "vanished")],
            timeout=5,
            return_when=asyncio.ALL_COMPLETED,
        )
        assert len(done) == 3
        assert futures["taken"].result().value == {"job": "taken"}
        assert futures["taken"].result().epoch == 4
        assert futures["listed"].result().value == {"job": "listed"}
        assert isinstance(futures["vanished"].exception(), _Vanished)
        assert not futures["queued"].done(), "a job still in Redis is waited for"
        # every reply taken is dropped at the next take: nothing is left behind
        await redis.rpush(KEYS.reply(dispatcher.client_id), result("queued"))
        assert (await asyncio.wait_for(futures["queued"], 5)).value == {"job": "queued"}
        for _ in range(50):
            if not await redis.exists(KEYS.reply(dispatcher.client_id)):
                break
            await asyncio.sleep(0.02)
        assert await redis.llen(KEYS.reply(dispatcher.client_id)) == 0
    finally:
        await dispatcher.stop()
        await client.aclose()
    assert await redis.exists(KEYS.reply_taken(dispatcher.client_id), KEYS.reply(dispatcher.client_id)) == 0
