"""OrchestrationTools: the spec's dict API over `KcpClient`.

Every method returns a dict; failures come back as ``{"success": False, "error": "...",
"error_type": "..."}`` with a message a person understands, never as an exception.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from controlplane.client.core import KcpClient
from controlplane.errors import InvalidRequest, KcpError, KernelError, KernelGone
from controlplane.protocol.models import OrchestrationConfig
from controlplane.settings import Settings

logger = logging.getLogger(__name__)


def _failure(exc: Exception, **extra: Any) -> dict[str, Any]:
    return {"success": False, "error": str(exc), "error_type": type(exc).__name__, **extra}


class OrchestrationTools:
    """High-level API for managing kernel clusters. Connects lazily on first use.

    Settings come from `KCP_*` environment variables unless given; `aclose()` (or
    ``async with``) releases the connection.
    """

    def __init__(
        self, settings: Settings | None = None, *, orchestration: OrchestrationConfig | None = None
    ) -> None:
        self.settings = settings or Settings()
        self.orchestration = orchestration
        self._client: KcpClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def client(self) -> KcpClient:
        """The underlying typed client (started; recreated if used from a new event loop)."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            self._client = KcpClient(self.settings, orchestration=self.orchestration)
            self._loop = loop
            await self._client.start()
        return self._client

    async def aclose(self) -> None:
        if self._client is not None and self._loop is asyncio.get_running_loop():
            await self._client.aclose()
        self._client = None

    async def __aenter__(self) -> OrchestrationTools:
        await self.client()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _call(self, op: Callable[[KcpClient], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
        """Run `op` on the client; a `KcpError` becomes the failure dict. (The one place failures
        are turned into dicts: `kcp mcp` overrides it to raise them as tool errors instead.)"""
        try:
            return await op(await self.client())
        except KernelError as exc:
            return _failure(exc, kernel=exc.kernel, kernel_error_type=exc.error_type)
        except KernelGone as exc:
            return _failure(exc, kernel=exc.kernel, epoch=exc.epoch)
        except KcpError as exc:
            return _failure(exc)

    # ------------------------------------------------------------ the spec's six methods
    async def create_cluster(
        self, name: str, kernel_count: int = 1, config: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        async def op(c: KcpClient) -> dict[str, Any]:
            info = await c.create_cluster(name, kernel_count, config)
            out = {
                "success": True,
                "cluster_name": info.name,
                "kernel_count": info.desired,
                "status": info.status.value,
                "running": info.running,
            }
            return out | ({"reason": info.reason} if info.reason else {})

        return await self._call(op)

    async def destroy_cluster(self, name: str) -> dict[str, Any]:
        async def op(c: KcpClient) -> dict[str, Any]:
            await c.destroy_cluster(name)
            return {"success": True, "cluster_name": name}

        return await self._call(op)

    async def list_clusters(self) -> dict[str, Any]:
        async def op(c: KcpClient) -> dict[str, Any]:
            clusters = [
                {
                    "name": i.name,
                    "status": i.status.value,
                    "kernel_count": i.desired,
                    "running": i.running,
                    "kernels": [k.name for k in i.kernels],
                    "config": i.config.model_dump(),
                }
                for i in await c.list_clusters()
            ]
            return {"clusters": clusters, "count": len(clusters)}

        return await self._call(op)

    async def dispatch(self, cluster: str, request: dict[str, Any]) -> dict[str, Any]:
        """Run `request` on a kernel of `cluster`. An optional ``"kernel"`` key in the request
        pins it to that kernel, ``"worker-3"``, or to one incarnation of it, ``"worker-3@17"``
        (it is not passed to the syscall). The result names the incarnation that ran it
        (``"epoch"``); a pinned request whose incarnation is gone fails with ``KernelGone``."""

        async def op(c: KcpClient) -> dict[str, Any]:
            if not isinstance(request, dict):
                raise InvalidRequest(f"request must be a dict, got {type(request).__name__}")
            body = dict(request)
            pin = body.pop("kernel", None)
            res = await c.dispatch(cluster, body, kernel=pin)
            return {
                "success": True,
                "kernel": res.kernel,
                "epoch": res.epoch,
                "result": res.result,
                "latency_ms": res.latency_ms,
            }

        return await self._call(op)

    async def get_metrics(self, cluster: str) -> dict[str, Any]:
        async def op(c: KcpClient) -> dict[str, Any]:
            return {"success": True, "metrics": (await c.get_metrics(cluster)).to_dict()}

        return await self._call(op)

    async def scale_cluster(self, cluster: str, target_count: int) -> dict[str, Any]:
        async def op(c: KcpClient) -> dict[str, Any]:
            previous, new = await c.scale_cluster(cluster, target_count)
            return {"success": True, "cluster": cluster, "previous_count": previous, "new_count": new}

        return await self._call(op)
