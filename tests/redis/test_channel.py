"""`Channel`: pipelined commands on one dedicated connection, against a real redis-server."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import pytest
import redis.exceptions
from conftest import RedisServerFactory

from controlplane.redis.channel import Channel
from controlplane.redis.connect import connect
from controlplane.redis.lua import Script
from controlplane.redis.scripts.call import Call, preloading

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


async def test_concurrent_callers_get_their_own_replies_in_one_connection(redis_url: str) -> None:
    r = connect(redis_url)
    channel = Channel(r)
    try:
        replies = await asyncio.gather(*(channel.execute("ECHO", f"m{i}") for i in range(2000)))
        assert replies == [f"m{i}" for i in range(2000)]
        clients = [c for c in await r.client_list() if c["cmd"] in ("echo", "client|list")]
        assert len([c for c in clients if c["cmd"] == "echo"]) == 1, "one connection carried them all"
    finally:
        await channel.aclose()
        await r.aclose()


async def test_a_lone_call_is_written_at_once_and_a_crowd_in_two_writes(redis_url: str) -> None:
    r = connect(redis_url)
    channel = Channel(r)
    try:
        await channel.execute("PING")  # connected
        link = channel._link
        assert link is not None
        writes: list[bytes] = []
        write = link.transport.write
        link.transport.write = lambda data: (writes.append(data), write(data))[1]  # type: ignore[method-assign]

        first = await channel.send([("ECHO", "alone")])
        assert len(writes) == 1, "written before the loop step ended"
        assert await first[0] == "alone"

        writes.clear()
        replies = await asyncio.gather(*(channel.execute("ECHO", f"m{i}") for i in range(100)))
        assert replies == [f"m{i}" for i in range(100)]
        assert len(writes) == 2, "the first at once, the other 99 together when the step ended"
        assert writes[1].count(b"ECHO") == 99
    finally:
        await channel.aclose()
        await r.aclose()


async def test_error_replies_are_returned_in_place_and_raised_alone(redis_url: str) -> None:
    r = connect(redis_url)
    channel = Channel(r)
    try:
        await channel.execute("SET", "k", "text")
        ok, err, after = await channel.execute_many([("GET", "k"), ("INCR", "k"), ("STRLEN", "k")])
        assert (ok, after) == ("text", 4)
        assert isinstance(err, redis.exceptions.ResponseError)
        with pytest.raises(redis.exceptions.ResponseError):
            await channel.execute("INCR", "k")
        assert await channel.execute("GET", "k") == "text", "the connection is still in step"
    finally:
        await channel.aclose()
        await r.aclose()


async def test_a_script_call_loads_a_script_the_server_forgot(redis_url: str) -> None:
    r = connect(redis_url)
    channel = Channel(r)
    script = Script.of("concat", "return ARGV[1] .. KEYS[1]")
    try:
        assert await Call(script, ["k"], ["a"], str).run(channel) == "ak"
        await r.script_flush()
        assert await Call(script, ["k"], ["b"], str).run(channel) == "bk"
    finally:
        await channel.aclose()
        await r.aclose()


async def test_a_pipelined_script_call_the_server_forgot_is_settled_by_running_it_again(
    redis_url: str,
) -> None:
    """What the kernel does with the reply of a claim or finish it wrote into a pipeline."""
    r = connect(redis_url)
    channel = Channel(r)
    call = Call(Script.of("concat", "return ARGV[1] .. KEYS[1]"), ["k"], ["a"], str)
    try:
        await r.script_flush()
        (reply,) = await channel.execute_many([call.command])
        assert isinstance(reply, redis.exceptions.NoScriptError)
        assert await call.settle(reply, channel) == "ak"
        (reply,) = await channel.execute_many([call.command])
        assert await call.settle(reply, channel) == "ak"
    finally:
        await channel.aclose()
        await r.aclose()


async def test_a_preloading_channel_loads_its_scripts_on_every_connect(redis_url: str) -> None:
    """So a pipelined call never meets NOSCRIPT behind a blocking pop, even after a flush."""
    r = connect(redis_url)
    script = Script.of("echo", "return ARGV[1]")
    channel = preloading(r, script)
    try:
        await r.script_flush()
        assert await channel.execute("PING") == "PONG"
        assert await r.script_exists(script.sha) == [True]
        await r.script_flush()
        await channel.reset("reconnect")
        assert await channel.execute_many([Call(script, [], ["x"], str).command]) == ["x"]
    finally:
        await channel.aclose()
        await r.aclose()


async def test_a_cancelled_caller_does_not_shift_the_replies_of_the_next(redis_url: str) -> None:
    r = connect(redis_url)
    channel = Channel(r)
    try:
        waiting = asyncio.create_task(channel.execute("BLPOP", "nothing", 0.5))
        await asyncio.sleep(0.05)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        # the BLPOP's reply (nil, after 0.5 s) still comes first and is dropped
        assert await channel.execute("ECHO", "next") == "next"
    finally:
        await channel.aclose()
        await r.aclose()


async def test_a_restarted_server_fails_pending_calls_then_the_channel_reconnects(
    redis_server_factory: RedisServerFactory,
) -> None:
    server = redis_server_factory()
    r = connect(server.url)
    channel = Channel(r)
    try:
        assert await channel.execute("PING") == "PONG"
        blocked = asyncio.create_task(channel.execute("BLPOP", "nothing", 30))
        await asyncio.sleep(0.1)
        server.kill()
        with pytest.raises(redis.exceptions.ConnectionError):
            await blocked
        server.restart()
        assert await channel.execute("PING") == "PONG"
    finally:
        await channel.aclose()
        await r.aclose()


async def test_reset_fails_waiters_and_the_next_call_starts_clean(redis_url: str) -> None:
    r = connect(redis_url)
    channel = Channel(r)
    try:
        blocked = asyncio.create_task(channel.execute("BLPOP", "nothing", 30))
        await asyncio.sleep(0.05)
        await channel.reset("test")
        with pytest.raises(redis.exceptions.ConnectionError, match="test"):
            await blocked
        await r.rpush("nothing", "x")
        assert await channel.execute("LPOP", "nothing") == "x", "the old BLPOP did not take it"
    finally:
        await channel.aclose()
        await r.aclose()


async def test_a_peer_that_reads_nothing_makes_senders_wait_instead_of_buffering(
    redis_server_factory: RedisServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("controlplane.redis.channel.WRITE_HIGH_WATER", 64 << 10)
    server = redis_server_factory()
    r = connect(server.url)
    channel = Channel(r)
    blob = "x" * (256 << 10)
    try:
        assert await channel.execute("PING") == "PONG"
        os.kill(server.pid, signal.SIGSTOP)  # reads nothing from now on
        futures: list[asyncio.Future[Any]] = []

        async def writer() -> None:
            for i in range(64):  # 16 MiB: more than the socket buffers take
                futures.extend(await channel.send([("SET", f"k{i}", blob)]))
                await asyncio.sleep(0)  # one send per loop step (sends of one step go out together)

        try:
            writing = asyncio.create_task(writer())
            await asyncio.sleep(1.0)
            link = channel._link
            assert link is not None and link.paused is not None, "the transport's buffer filled up"
            assert not writing.done() and len(futures) < 64, "the sender waits for the peer"
        finally:
            os.kill(server.pid, signal.SIGCONT)
        await writing
        assert [await fut for fut in futures] == ["OK"] * 64
        assert await channel.execute("STRLEN", "k63") == len(blob)
    finally:
        await channel.aclose()
        await r.aclose()
