"""KernelCluster: a handle on one cluster (and the spec's ClusterStatus / ClusterConfig)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from controlplane.client.core import ClusterInfo, DispatchResult, KcpClient, validate_name
from controlplane.protocol.models import ClusterConfig, ClusterMetrics, ClusterStatus

__all__ = ["ClusterConfig", "ClusterStatus", "KernelCluster"]


class KernelCluster:
    """Manages a group of kernels as a unit, through a `KcpClient`."""

    def __init__(self, client: KcpClient, name: str) -> None:
        self.client = client
        self.name = validate_name(name)

    @classmethod
    async def create(
        cls,
        client: KcpClient,
        name: str,
        kernel_count: int = 1,
        config: ClusterConfig | Mapping[str, Any] | None = None,
    ) -> KernelCluster:
        await client.create_cluster(name, kernel_count, config)
        return cls(client, name)

    async def info(self) -> ClusterInfo:
        return await self.client.get_cluster(self.name)

    async def status(self) -> ClusterStatus:
        return (await self.info()).status

    async def kernel_names(self) -> list[str]:
        return [k.name for k in (await self.info()).kernels]

    async def dispatch(self, request: Mapping[str, Any]) -> DispatchResult:
        return await self.client.dispatch(self.name, request)

    async def scale(self, target_count: int) -> tuple[int, int]:
        return await self.client.scale_cluster(self.name, target_count)

    async def metrics(self) -> ClusterMetrics:
        return await self.client.get_metrics(self.name)

    async def destroy(self) -> None:
        await self.client.destroy_cluster(self.name)
