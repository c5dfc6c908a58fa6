"""The bus across processes: subscribers are separate OS processes (this file is also their program).

Fan-out to 3 subscriber processes and direct delivery; a subscriber SIGKILLed mid-stream and
restarted handles every message at least once; a poison message lands in the dead-letter stream
after N tries; Redis SIGKILLed and restarted (AOF) mid-stream, publishing resumes, nothing
acknowledged is lost.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from controlplane import BusConfig, BusMessage, BusTopic, InterKernelBus, RedisUnavailable
from controlplane.redis.connect import connect_sync

pytestmark = [pytest.mark.system, pytest.mark.timeout(60)]

ROOT = Path(__file__).resolve().parents[2]


class Subscriber:
    """`python tests/test_bus_system.py URL KERNEL TOPIC OUT [SLOW]`: records each handled message in OUT."""

    def __init__(self, url: str, kernel: str, topic: str, out: Path, slow: float = 0.0) -> None:
        self.args = [sys.executable, __file__, url, kernel, topic, str(out), str(slow)]
        self.out = out
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        ready = Path(f"{self.out}.ready")
        ready.unlink(missing_ok=True)
        self.proc = subprocess.Popen(self.args, env={**os.environ, "PYTHONPATH": str(ROOT)})
        deadline = time.monotonic() + 20
        while not ready.exists():
            assert self.proc.poll() is None, f"subscriber exited with {self.proc.returncode}"
            assert time.monotonic() < deadline, "subscriber not ready in 20 s"
            time.sleep(0.02)

    def records(self) -> list[dict[str, object]]:
        if not self.out.exists():
            return []
        lines = self.out.read_text().splitlines()
        return [json.loads(line) for line in lines if line.endswith("}")]  # a SIGKILL may cut the last line

    def handled(self, kind: str = "topic") -> list[int]:
        return [int(r["i"]) for r in self.records() if r["kind"] == kind]  # type: ignore[call-overload]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def subscribers(tmp_path: Path) -> Iterator[Callable[..., Subscriber]]:
    started: list[Subscriber] = []

    def start(url: str, kernel: str, topic: str = "events", slow: float = 0.0) -> Subscriber:
        sub = Subscriber(url, kernel, topic, tmp_path / f"{kernel}.jsonl", slow)
        started.append(sub)
        return sub

    yield start
    for sub in started:
        sub.stop()


def wait_for(check: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def messages(topic: BusTopic, start: int, stop: int, **extra: object) -> list[BusMessage]:
    return [
        BusMessage(from_kernel="publisher", topic=topic, payload={"i": i, **extra})
        for i in range(start, stop)
    ]


@pytest.mark.redis_cluster
async def test_fan_out_to_three_subscriber_processes_and_direct_delivery(
    redis_url: str, subscribers: Callable[..., Subscriber]
) -> None:
    subs = [subscribers(redis_url, f"k{n}") for n in range(3)]
    async with InterKernelBus(redis_url=redis_url) as bus:
        await bus.publish_many(messages(BusTopic.EVENTS, 0, 500))
        for i in range(5):
            await bus.send_direct(from_kernel="publisher", to_kernel="k1", payload={"i": i})
        stats = bus.get_stats()
        assert stats["registered_kernels"] == 3 and stats["offline_kernels"] == []
        assert stats["subscriptions"]["events"] == 3
    for sub in subs:
        wait_for(lambda sub=sub: len(sub.handled()) >= 500, what="fan-out")  # type: ignore[misc]
        assert sub.handled() == list(range(500))  # each exactly once here, in order
    wait_for(lambda: len(subs[1].handled("direct")) == 5, what="direct messages")
    assert subs[1].handled("direct") == list(range(5))
    assert subs[0].handled("direct") == subs[2].handled("direct") == []


@pytest.mark.redis_cluster
async def test_sigkilled_subscriber_restarts_and_handles_every_message(
    redis_url: str, subscribers: Callable[..., Subscriber]
) -> None:
    total = 3000
    sub = subscribers(redis_url, "victim", "data", slow=0.0005)
    async with InterKernelBus(redis_url=redis_url) as bus:
        for start in range(0, total, 500):
            await bus.publish_many(messages(BusTopic.DATA, start, start + 500))
        wait_for(lambda: len(sub.handled()) >= 300, what="some progress")
        assert sub.proc is not None
        sub.proc.kill()  # SIGKILL, mid-stream: some entries read but not acknowledged
        sub.proc.wait()
        before = len(set(sub.handled()))
        assert before < total, "the kill came too late to test anything"
        sub.start()
        wait_for(lambda: set(sub.handled()) == set(range(total)), what="every message handled")
        wait_for(lambda: bus.get_stats()["pending"]["data"] == 0, what="all acknowledged")
    handled = sub.handled()
    print(
        f"{len(handled)} handler runs for {total} messages: {len(handled) - total} redeliveries after SIGKILL"
    )


@pytest.mark.redis_cluster
async def test_poison_message_is_dead_lettered_after_n_tries(
    redis_url: str, subscribers: Callable[..., Subscriber]
) -> None:
    sub = subscribers(redis_url, "k", "control")
    async with InterKernelBus(redis_url=redis_url) as bus:
        await bus.publish_many(messages(BusTopic.CONTROL, 0, 10))
        await bus.publish(
            BusMessage(from_kernel="publisher", topic=BusTopic.CONTROL, payload={"poison": True})
        )
        await bus.publish_many(messages(BusTopic.CONTROL, 10, 20))
        wait_for(lambda: bus.get_stats()["dead_letters"]["control"] == 1, what="dead letter")
        assert sorted(sub.handled()) == list(range(20))
        assert bus.get_stats()["pending"]["control"] == 0
    with connect_sync(redis_url) as client:
        [(_, dead)] = client.xrange("kcp:bus:dead")
    assert dead["reason"] == "RuntimeError: poison message"
    assert int(dead["deliveries"]) == SUBSCRIBER_CONFIG.max_deliveries + 1
    assert [r for r in sub.records() if r["kind"] == "poison"] == [{"kind": "poison"}] * 3


async def test_redis_restart_with_aof_mid_stream(
    redis_server_factory: Callable[..., object], subscribers: Callable[..., Subscriber]
) -> None:
    server = redis_server_factory(appendonly=True)
    url: str = server.url  # type: ignore[attr-defined]
    sub = subscribers(url, "k", "metrics")
    acknowledged: list[int] = []
    failures = 0
    async with InterKernelBus(redis_url=url) as bus:
        for start in range(0, 2000, 50):
            if start == 1000:
                server.kill()  # type: ignore[attr-defined]
                restart = asyncio.create_task(asyncio.to_thread(server.restart))  # type: ignore[attr-defined]
            while True:  # publishing resumes once Redis is back
                try:
                    await bus.publish_many(messages(BusTopic.METRICS, start, start + 50))
                except RedisUnavailable:
                    failures += 1
                    await asyncio.sleep(0.05)
                    continue
                acknowledged.extend(range(start, start + 50))
                break
        await restart
        wait_for(lambda: set(acknowledged) <= set(sub.handled()), what="every acknowledged message handled")
    assert failures > 0, "the publisher never saw Redis down"
    assert sub.proc is not None and sub.proc.poll() is None, "the subscriber survived the Redis restart"
    print(f"{failures} publishes failed while Redis was down; all {len(acknowledged)} acknowledged delivered")


# ---------------------------------------------------------------- the subscriber program
@pytest.mark.redis_cluster
async def test_a_sigkilled_process_s_kernels_leave_the_stats_and_come_back_to_their_messages(
    redis_url: str, subscribers: Callable[..., Subscriber]
) -> None:
    kernels = ["w0", "w1", "w2"]
    sub = subscribers(redis_url, ",".join(kernels), "data")
    async with InterKernelBus(redis_url=redis_url) as bus:
        stats = bus.get_stats()
        assert stats["kernels"] == kernels and stats["subscriptions"]["data"] == 3
        assert sub.proc is not None
        sub.proc.kill()  # SIGKILL: no goodbye, the leases just stop being renewed
        sub.proc.wait()
        killed = time.monotonic()
        wait_for(
            lambda: bus.get_stats()["registered_kernels"] == 0,
            timeout=SUBSCRIBER_CONFIG.lease_ttl + 2,
            what="the killed process's kernels to leave the stats",
        )
        gone_after = time.monotonic() - killed
        stats = bus.get_stats()
        assert stats["subscriptions"]["data"] == 0 and stats["offline_kernels"] == kernels
        await bus.publish_many(messages(BusTopic.DATA, 0, 5))  # while they are down
        await bus.send_direct("publisher", "w1", {"i": 99})
        lease = SUBSCRIBER_CONFIG.lease_ttl
        print(f"kernels gone from get_stats() {gone_after:.2f}s after SIGKILL (lease {lease}s)")
        sub.start()  # the same names again

        def got(kernel: str) -> list[int]:
            return sorted(
                int(str(r["i"])) for r in sub.records() if r.get("kernel") == kernel and r["kind"] == "topic"
            )

        for kernel in kernels:
            wait_for(lambda k=kernel: got(k) == [0, 1, 2, 3, 4], what=f"{kernel}'s messages of its downtime")  # type: ignore[misc]
        wait_for(lambda: sub.handled("direct") == [99], what="the direct message")
        assert bus.get_stats()["kernels"] == kernels


SUBSCRIBER_CONFIG = BusConfig(claim_idle=0.3, max_deliveries=3, block=1.0, lease_ttl=2.0)


async def _subscriber(url: str, kernels: str, topic: str, out_path: str, slow: float) -> None:
    """Registers and subscribes each of the comma-separated `kernels`."""
    out = open(out_path, "a")  # noqa: SIM115, ASYNC230 (test helper: one line per handled message)

    def record(**fields: object) -> None:
        out.write(json.dumps(fields) + "\n")
        out.flush()

    def handlers(kernel: str) -> tuple[Callable[[BusMessage], Awaitable[None]], Callable[[BusMessage], None]]:
        async def on_topic(message: BusMessage) -> None:
            if message.payload.get("poison"):
                record(kind="poison")
                raise RuntimeError("poison message")
            if slow:
                await asyncio.sleep(slow)
            record(kind="topic", i=message.payload["i"], kernel=kernel)

        def on_direct(message: BusMessage) -> None:  # a sync handler
            record(kind="direct", i=message.payload["i"], kernel=kernel)

        return on_topic, on_direct

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with InterKernelBus(redis_url=url, config=SUBSCRIBER_CONFIG) as bus:
        for kernel in kernels.split(","):
            on_topic, on_direct = handlers(kernel)
            bus.register(kernel, on_direct)
            bus.subscribe(kernel, BusTopic(topic), on_topic)
        Path(f"{out_path}.ready").touch()  # noqa: ASYNC240
        await stop.wait()


if __name__ == "__main__":
    url_, kernel_, topic_, out_, slow_ = sys.argv[1:6]
    asyncio.run(_subscriber(url_, kernel_, topic_, out_, float(slow_)))
