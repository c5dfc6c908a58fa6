"""The service loop records how long each leader pass took (read by bench/fleet.py)."""

from __future__ import annotations

import asyncio

import pytest

from controlplane import Settings
from controlplane.protocol.keys import Keys
from controlplane.redis.connect import connect
from controlplane.service.app import PASSES_KEPT, ControlPlane


@pytest.mark.integration
@pytest.mark.timeout(20)
@pytest.mark.redis_cluster
async def test_the_leader_records_each_pass_duration(redis_url: str) -> None:
    redis = connect(redis_url)
    try:
        control = ControlPlane(redis, Settings(redis_url=redis_url, reconcile_interval=0.05))
        assert control.passes.maxlen == PASSES_KEPT
        async with control:
            for _ in range(200):
                if len(control.passes) >= 3:
                    break
                await asyncio.sleep(0.05)
        assert len(control.passes) >= 3, "a leader passes every reconcile_interval"
        assert all(0 < seconds < 5 for seconds in control.passes)
        assert len(control.pass_cpu) == len(control.passes)
        assert all(0 <= cpu < 5 for cpu in control.pass_cpu)
        standby = ControlPlane(redis, Settings(redis_url=redis_url))
        await redis.set(Keys().leader(), "someone-else", px=5_000)
        async with standby:
            await asyncio.sleep(0.3)
        assert not standby.passes, "a standby does not reconcile, so it records no pass"
    finally:
        await redis.aclose()
