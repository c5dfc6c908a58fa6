"""InterKernelBus in one process against a real redis-server: fan-out, direct, retries, dead letters,
request/reply, restart resume, stats, bad input. The Lua scripts alone run on fakeredis too."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import fakeredis
import pytest
from redis.asyncio import Redis as AsyncRedis

from controlplane import BusConfig, BusMessage, BusTopic, InterKernelBus, InvalidRequest, ReceivedMessage
from controlplane.bus.codec import encode
from controlplane.bus.publisher import StreamWriter
from controlplane.errors import DispatchTimeout
from controlplane.protocol.keys import Keys
from controlplane.redis.connect import connect_sync

pytestmark = [pytest.mark.timeout(30)]

FAST = BusConfig(claim_idle=0.2, max_deliveries=3, block=1.0, stop_grace=1.0)


async def until(check: Callable[[], bool], seconds: float = 5.0) -> None:
    """Poll `check` (state changed by the bus's own tasks) until it holds."""
    async with asyncio.timeout(seconds):
        while not check():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


@pytest.fixture
async def bus(redis_url: str) -> AsyncIterator[InterKernelBus]:
    async with InterKernelBus(redis_url=redis_url, config=FAST) as b:
        yield b


def collector() -> tuple[list[ReceivedMessage], Callable[[BusMessage], None]]:
    got: list[ReceivedMessage] = []

    def handler(message: BusMessage) -> None:  # a sync handler
        assert isinstance(message, ReceivedMessage)
        got.append(message)

    return got, handler


# ---------------------------------------------------------------- unit: Lua on fakeredis
@pytest.mark.unit
async def test_publish_script_numbers_entries_densely_and_fields_are_flat(
    fake_redis: fakeredis.FakeAsyncRedis,
) -> None:
    keys = Keys()
    writer = StreamWriter(fake_redis, keys, BusConfig())
    stream = keys.bus_topic("events")
    msgs = [BusMessage(from_kernel="k1", topic=BusTopic.EVENTS, payload={"i": i}) for i in range(5)]
    out = await writer.append(stream, "events", [encode(m, 1 << 20) for m in msgs])
    assert [p.seq for p in out] == [1, 2, 3, 4, 5]
    more = await writer.append(stream, "events", [encode(msgs[0], 1 << 20)])
    assert more[0].seq == 6
    entries = await fake_redis.xrange(stream)
    assert [e[0] for e in entries] == [p.id for p in [*out, *more]]
    assert entries[2][1] == {
        "seq": "3",
        "from": "k1",
        "topic": "events",
        "ts": repr(msgs[2].timestamp),
        "payload": '{"i":2}',
    }


@pytest.mark.unit
async def test_overlapping_publishes_reach_the_stream_in_call_order(
    fake_redis: fakeredis.FakeAsyncRedis,
) -> None:
    """The lone first call is slow (a NOSCRIPT retry, say): the batch behind it must wait for it."""
    keys = Keys()
    writer = StreamWriter(fake_redis, keys, BusConfig())
    script, calls = writer._publish, 0

    async def slow_first(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(0.05)
        return await script(*args)

    writer._publish = slow_first  # type: ignore[assignment]
    stream = keys.bus_topic("events")
    msgs = [
        encode(BusMessage(from_kernel="k", topic=BusTopic.EVENTS, payload={"i": i}), 1 << 20)
        for i in range(20)
    ]
    published = await asyncio.gather(*(writer.publish(stream, "events", m) for m in msgs))
    assert [p.seq for p in published] == list(range(1, 21))
    assert calls == 2  # the lone call, then one batch for the other 19
    entries = await fake_redis.xrange(stream)
    assert [json.loads(fields["payload"])["i"] for _, fields in entries] == list(range(20))


@pytest.mark.unit
async def test_direct_append_refuses_an_unregistered_kernel_and_writes_nothing(
    fake_redis: fakeredis.FakeAsyncRedis,
) -> None:
    keys = Keys()
    writer = StreamWriter(fake_redis, keys, BusConfig())
    msg = BusMessage(from_kernel="a", to_kernel="b", topic=BusTopic.DATA, payload={})
    with pytest.raises(InvalidRequest, match="not registered"):
        await writer.append(keys.bus_inbox("b"), "data", [encode(msg, 1 << 20)], target="b")
    assert await fake_redis.exists(keys.bus_inbox("b"), keys.bus_seq(keys.bus_inbox("b"))) == 0


@pytest.mark.unit
async def test_trim_keeps_what_the_slowest_group_needs_and_counts_cap_losses(
    fake_redis: fakeredis.FakeAsyncRedis,
) -> None:
    keys = Keys()
    writer = StreamWriter(fake_redis, keys, BusConfig(keep=10, max_len=300, trim_every=100_000))
    stream = keys.bus_topic("metrics")
    await fake_redis.xgroup_create(stream, "fast", "$", mkstream=True)
    await fake_redis.xgroup_create(stream, "slow", "$", mkstream=True)
    msg = encode(BusMessage(from_kernel="k", topic=BusTopic.METRICS, payload={}), 1 << 20)
    await writer.append(stream, "metrics", [msg] * 250)
    await fake_redis.xreadgroup("fast", "fast", {stream: ">"}, count=250)  # read, not acked: pending
    await fake_redis.xreadgroup("slow", "slow", {stream: ">"}, count=50)
    ids = [e[0] for e in await fake_redis.xrange(stream)]
    await fake_redis.xack(stream, "fast", *ids)
    await fake_redis.xack(stream, "slow", *ids[:40])  # slow: 40 acked, 10 pending, 200 unread
    await writer.trim(stream, "metrics")
    left = [e[0] for e in await fake_redis.xrange(stream)]
    assert ids[40] in left  # slow's oldest pending entry survives
    assert len(left) <= 250
    # the cap: 400 more entries, slow still at seq 50 -> entries past the cap are lost to it, counted
    await writer.append(stream, "metrics", [msg] * 400)
    await writer.trim(stream, "metrics")
    assert await fake_redis.xlen(stream) == 300
    first_seq = int((await fake_redis.xrange(stream, count=1))[0][1]["seq"])
    stats = await fake_redis.hgetall(keys.bus_gaps(stream))
    assert int(stats["gaps:metrics:slow"]) == first_seq - 51  # slow had read up to seq 50
    assert int(stats.get("gaps:metrics:fast", 0)) == first_seq - 251  # fast had read up to seq 250


# ---------------------------------------------------------------- integration: real Redis
@pytest.mark.integration
@pytest.mark.redis_cluster
async def test_fan_out_every_subscriber_gets_every_message_but_not_its_own(bus: InterKernelBus) -> None:
    got = {name: collector() for name in ("k1", "k2", "k3")}
    for name, (_, handler) in got.items():
        bus.register(name, handler)
        bus.subscribe(name, BusTopic.EVENTS, handler)
    published = await asyncio.gather(
        *(
            bus.publish(BusMessage(from_kernel="k1", topic=BusTopic.EVENTS, payload={"i": i}))
            for i in range(50)
        )
    )
    assert sorted(p.seq for p in published) == list(range(1, 51))
    await until(lambda: len(got["k2"][0]) == 50 and len(got["k3"][0]) == 50)
    for name in ("k2", "k3"):
        assert [m.payload["i"] for m in got[name][0]] == list(range(50))  # in order
        assert [m.seq for m in got[name][0]] == list(range(1, 51))
    await asyncio.sleep(0.1)
    assert got["k1"][0] == []  # the publisher does not receive its own topic messages
    stats = bus.get_stats()
    assert stats["registered_kernels"] == 3
    assert stats["subscriptions"] == {"events": 3, "metrics": 0, "control": 0, "data": 0}
    assert stats["pending"]["events"] == 0


@pytest.mark.integration
@pytest.mark.redis_cluster
async def test_direct_messages_and_request_reply(bus: InterKernelBus) -> None:
    got_a, handler_a = collector()

    async def server(message: BusMessage) -> dict[str, Any] | None:
        assert isinstance(message, ReceivedMessage)
        if message.is_request:
            return {"sum": sum(message.payload["data"])}
        return None

    bus.register("a", handler_a)
    bus.register("b", server)
    await bus.send_direct(from_kernel="b", to_kernel="a", payload={"hello": 1})
    await until(lambda: len(got_a) == 1)
    assert got_a[0].payload == {"hello": 1} and got_a[0].from_kernel == "b" and got_a[0].to_kernel == "a"
    reply = await bus.request("a", "b", {"data": [1, 2, 3]}, timeout=5)
    assert reply.payload == {"sum": 6} and reply.correlation_id
    replies = await asyncio.gather(*(bus.request("a", "b", {"data": [i, i]}) for i in range(20)))
    assert [r.payload["sum"] for r in replies] == [2 * i for i in range(20)]
    assert len(got_a) == 1  # replies go to the waiting request, not to the handler
    with pytest.raises(InvalidRequest, match="not registered"):
        await bus.send_direct(from_kernel="a", to_kernel="nobody", payload={})


@pytest.mark.integration
@pytest.mark.redis_cluster
async def test_request_times_out_when_nobody_answers(bus: InterKernelBus) -> None:
    bus.register("a", lambda m: None)
    bus.register("mute", lambda m: None)  # returns None: no reply
    with pytest.raises(DispatchTimeout, match="mute"):
        await bus.request("a", "mute", {}, timeout=0.3)


@pytest.mark.integration
@pytest.mark.redis_cluster
async def test_failing_handler_is_retried_then_dead_lettered_with_reason(
    bus: InterKernelBus, redis: AsyncRedis
) -> None:
    attempts: dict[int, int] = {}

    async def flaky(message: BusMessage) -> None:
        i = message.payload["i"]
        attempts[i] = attempts.get(i, 0) + 1
        if i == 0:
            raise RuntimeError("poison")
        if i == 1 and attempts[i] < 2:
            raise ValueError("transient")

    bus.subscribe("k", BusTopic.CONTROL, flaky)
    for i in range(3):
        await bus.publish(BusMessage(from_kernel="x", topic=BusTopic.CONTROL, payload={"i": i}))
    await until(lambda: bus.get_stats()["dead_letters"]["control"] == 1)
    assert attempts == {0: FAST.max_deliveries, 1: 2, 2: 1}
    [(_, dead)] = await redis.xrange(Keys().bus_dead())
    assert dead["reason"] == "RuntimeError: poison"
    assert dead["deliveries"] == str(FAST.max_deliveries + 1) and json.loads(dead["payload"]) == {"i": 0}
    assert dead["group"] == "k" and dead["topic"] == "control"
    assert bus.get_stats()["pending"]["control"] == 0


@pytest.mark.integration
@pytest.mark.redis_cluster
async def test_malformed_entry_goes_to_dead_letters_and_the_loop_goes_on(
    bus: InterKernelBus, redis: AsyncRedis
) -> None:
    got, handler = collector()
    bus.subscribe("k", BusTopic.DATA, handler)
    await redis.xadd(Keys().bus_topic("data"), {"garbage": "1"})
    await bus.publish(BusMessage(from_kernel="x", topic=BusTopic.DATA, payload={"ok": True}))
    await until(lambda: len(got) == 1)
    [(_, dead)] = await redis.xrange(Keys().bus_dead())
    assert "malformed" in dead["reason"]


@pytest.mark.integration
@pytest.mark.redis_cluster
async def test_a_restarted_subscriber_gets_what_was_published_while_it_was_down(redis_url: str) -> None:
    got, handler = collector()
    async with InterKernelBus(redis_url=redis_url, config=FAST) as first:
        first.register("k", handler)
        first.subscribe("k", BusTopic.METRICS, handler)
        await first.publish(BusMessage(from_kernel="x", topic=BusTopic.METRICS, payload={"i": 0}))
        await until(lambda: len(got) == 1)
    async with InterKernelBus(redis_url=redis_url, config=FAST) as publisher:
        await publisher.publish_many(
            [BusMessage(from_kernel="x", topic=BusTopic.METRICS, payload={"i": i}) for i in range(1, 6)]
        )
        await publisher.send_direct("x", "k", {"direct": True})
        stats = publisher.get_stats()
        assert stats["registered_kernels"] == 0 and stats["offline_kernels"] == ["k"]
    async with InterKernelBus(redis_url=redis_url, config=FAST) as second:
        second.register("k", handler)
        second.subscribe("k", BusTopic.METRICS, handler)
        await until(lambda: len(got) == 7)
    assert sorted(m.payload.get("i", -1) for m in got) == [-1, 0, 1, 2, 3, 4, 5]


@pytest.mark.integration
@pytest.mark.redis_cluster
async def test_unsubscribe_and_unregister(bus: InterKernelBus) -> None:
    got, handler = collector()
    bus.register("k", handler)
    bus.subscribe("k", BusTopic.EVENTS, handler)
    bus.unsubscribe("k", BusTopic.EVENTS)
    await bus.publish(BusMessage(from_kernel="x", topic=BusTopic.EVENTS, payload={}))
    await asyncio.sleep(0.2)
    assert got == []
    assert bus.get_stats()["subscriptions"]["events"] == 0
    bus.unregister("k")
    assert bus.get_stats()["registered_kernels"] == 0
    with pytest.raises(InvalidRequest):
        await bus.send_direct("x", "k", {})


@pytest.mark.integration
@pytest.mark.redis_cluster
async def test_bad_input_is_refused_with_a_clear_error_and_changes_nothing(
    bus: InterKernelBus, redis_url: str
) -> None:
    with pytest.raises(InvalidRequest, match="kernel name"):
        bus.register("bad name!", lambda m: None)
    with pytest.raises(InvalidRequest, match="callable"):
        bus.register("k", "not a handler")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="topic"):
        bus.subscribe("k", "nope", lambda m: None)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="JSON"):
        await bus.publish(BusMessage(from_kernel="k", topic=BusTopic.DATA, payload={"x": object()}))
    with pytest.raises(InvalidRequest, match="JSON"):  # a lone surrogate cannot be UTF-8
        await bus.publish(BusMessage(from_kernel="k", topic=BusTopic.DATA, payload={"x": "\udc80"}))
    with pytest.raises(InvalidRequest, match="BusMessage"):
        await bus.publish({"topic": "data"})  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="limit"):
        await bus.publish(BusMessage(from_kernel="k", topic=BusTopic.DATA, payload={"x": "y" * (2 << 20)}))
    with pytest.raises(InvalidRequest):
        await bus.send_direct("k", "k2", "not a dict")  # type: ignore[arg-type]
    with connect_sync(redis_url) as client:
        assert client.keys("*") == []


@pytest.mark.integration
@pytest.mark.redis_cluster
async def test_spec_stats_shape(bus: InterKernelBus) -> None:
    async def kernel1_handler(message: BusMessage) -> None: ...

    bus.register("kernel-1", kernel1_handler)
    bus.register("kernel-2", kernel1_handler)
    bus.subscribe("kernel-1", BusTopic.METRICS, kernel1_handler)
    bus.subscribe("kernel-2", BusTopic.METRICS, kernel1_handler)
    stats = bus.get_stats()
    assert {k: stats[k] for k in ("registered_kernels", "subscriptions")} == {
        "registered_kernels": 2,
        "subscriptions": {"events": 0, "metrics": 2, "control": 0, "data": 0},
    }


@pytest.mark.integration
@pytest.mark.redis_cluster
async def test_payloads_round_trip_exactly(bus: InterKernelBus) -> None:
    got, handler = collector()
    bus.subscribe("k", BusTopic.DATA, handler)
    payloads = [
        {"text": 'é "quoted"\n\\ \u2603', "n": [1, 2.5, None, True], "nested": {"a": {"b": []}}},
        {},
        {"big": "x" * 100_000},
    ]
    await bus.publish_many([BusMessage(from_kernel="x", topic=BusTopic.DATA, payload=p) for p in payloads])
    await until(lambda: len(got) == 3)
    assert [m.payload for m in got] == payloads


@pytest.mark.integration
@pytest.mark.redis_cluster
async def test_entries_of_a_dead_consumer_of_another_name_are_reclaimed(
    bus: InterKernelBus, redis: AsyncRedis
) -> None:
    stream = Keys().bus_topic("events")
    await redis.xgroup_create(stream, "k", "$", mkstream=True)
    for i in range(3):
        await redis.xadd(
            stream, {"seq": str(i + 1), "from": "x", "topic": "events", "ts": "1.0", "payload": "{}"}
        )
    await redis.xreadgroup("k", "crashed-consumer", {stream: ">"})  # read, never acknowledged
    got, handler = collector()
    bus.subscribe("k", BusTopic.EVENTS, handler)
    await until(lambda: len(got) == 3)
    assert [m.deliveries for m in got] == [2, 2, 2]
    assert bus.get_stats()["local"]["reclaimed"] == 3
    assert (await redis.xpending(stream, "k"))["pending"] == 0


@pytest.mark.integration
@pytest.mark.redis_cluster
async def test_hard_cap_drops_what_a_dead_subscriber_did_not_read_and_counts_it(redis_url: str) -> None:
    config = BusConfig(keep=10, max_len=50, trim_every=10, claim_idle=0.2, block=1.0)
    got, handler = collector()
    async with InterKernelBus(redis_url=redis_url, config=config) as sub:
        sub.subscribe("slow", BusTopic.METRICS, handler)
        await sub.publish(BusMessage(from_kernel="x", topic=BusTopic.METRICS, payload={"i": 0}))
        await until(lambda: len(got) == 1)
    async with InterKernelBus(redis_url=redis_url, config=config) as publisher:  # "slow" is down
        await publisher.publish_many(
            [BusMessage(from_kernel="x", topic=BusTopic.METRICS, payload={"i": i}) for i in range(1, 201)]
        )
        stats = publisher.get_stats()
        assert stats["stream_length"]["metrics"] <= 50
        lost = stats["gaps"]["metrics"]
        assert lost >= 150
    async with InterKernelBus(redis_url=redis_url, config=config) as sub:
        sub.subscribe("slow", BusTopic.METRICS, handler)
        await until(lambda: len(got) == 1 + 200 - lost)
        assert [m.payload["i"] for m in got[1:]] == list(range(1 + lost, 201))  # the newest, in order
        assert sub.get_stats()["local"]["gaps"] == lost  # the subscriber noticed the hole too
