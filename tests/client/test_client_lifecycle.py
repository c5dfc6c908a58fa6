"""`KcpClient`'s lifecycle against a real redis-server: one `async with`, then closed for good."""

from __future__ import annotations

import pytest

from controlplane.client.core import KcpClient
from controlplane.lifecycle import LifecycleError, Phase
from controlplane.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60), pytest.mark.redis_cluster]


async def test_an_open_client_is_not_opened_twice_and_a_closed_one_not_reopened(redis_url: str) -> None:
    kcp = KcpClient(Settings(redis_url=redis_url))
    async with kcp:
        assert kcp.phase is Phase.RUNNING
        with pytest.raises(LifecycleError, match="already started"):
            await kcp.__aenter__()
        assert await kcp.list_clusters() == []
    assert kcp.phase is Phase.STOPPED
    with pytest.raises(LifecycleError, match="closed"):
        async with kcp:
            pass
    with pytest.raises(LifecycleError, match="closed"):
        await kcp.list_clusters()


async def test_a_client_started_by_its_first_dispatch_closes_once(redis_url: str) -> None:
    kcp = KcpClient(Settings(redis_url=redis_url))
    await kcp.start()
    await kcp.start()  # the lazy start `dispatch` does is idempotent while open
    assert kcp.phase is Phase.RUNNING
    await kcp.aclose()
    await kcp.aclose()
    assert kcp.phase is Phase.STOPPED
