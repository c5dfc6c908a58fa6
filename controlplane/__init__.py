"""kcp: a Redis-backed control plane for clusters of compute kernels.

The spec's public names (`OrchestrationTools`, `KernelCluster`, `OrchestrationEngine`,
`LoadBalancer`, the enums and config/data classes) plus the typed client `KcpClient`.

Each name is imported when first used (PEP 562), so importing one submodule, say the kernel
process's `kernel_agent.kernel`, loads nothing of the client, the bus or the exporter.
"""

import importlib
import typing

if typing.TYPE_CHECKING:  # names for type checkers; at run time `__getattr__` imports them
    from controlplane.bus import BusConfig as BusConfig
    from controlplane.bus import InterKernelBus as InterKernelBus
    from controlplane.bus import ReceivedMessage as ReceivedMessage
    from controlplane.client.arq import Job as Job
    from controlplane.client.balancer import LoadBalancer as LoadBalancer
    from controlplane.client.cluster import KernelCluster as KernelCluster
    from controlplane.client.core import ClusterInfo as ClusterInfo
    from controlplane.client.core import DispatchResult as DispatchResult
    from controlplane.client.core import KcpClient as KcpClient
    from controlplane.client.engine import OrchestrationEngine as OrchestrationEngine
    from controlplane.client.metrics import ClusterMetricsCollector as ClusterMetricsCollector
    from controlplane.client.tools import OrchestrationTools as OrchestrationTools
    from controlplane.errors import AuthenticationFailed as AuthenticationFailed
    from controlplane.errors import ClusterExists as ClusterExists
    from controlplane.errors import ClusterNotFound as ClusterNotFound
    from controlplane.errors import DispatchError as DispatchError
    from controlplane.errors import DispatchTimeout as DispatchTimeout
    from controlplane.errors import InvalidRequest as InvalidRequest
    from controlplane.errors import KcpError as KcpError
    from controlplane.errors import KernelError as KernelError
    from controlplane.errors import KernelGone as KernelGone
    from controlplane.errors import NoKernelAvailable as NoKernelAvailable
    from controlplane.errors import PermissionDenied as PermissionDenied
    from controlplane.errors import ReadOnly as ReadOnly
    from controlplane.errors import RedisError as RedisError
    from controlplane.errors import RedisUnavailable as RedisUnavailable
    from controlplane.errors import WrongData as WrongData
    from controlplane.lifecycle import LifecycleError as LifecycleError
    from controlplane.protocol.arq import JobStatus as JobStatus
    from controlplane.protocol.models import BusMessage as BusMessage
    from controlplane.protocol.models import BusTopic as BusTopic
    from controlplane.protocol.models import ClusterConfig as ClusterConfig
    from controlplane.protocol.models import ClusterMetrics as ClusterMetrics
    from controlplane.protocol.models import ClusterStatus as ClusterStatus
    from controlplane.protocol.models import KernelLoad as KernelLoad
    from controlplane.protocol.models import KernelMetricsSnapshot as KernelMetricsSnapshot
    from controlplane.protocol.models import LoadBalancerConfig as LoadBalancerConfig
    from controlplane.protocol.models import OrchestrationConfig as OrchestrationConfig
    from controlplane.protocol.models import OrchestrationMetrics as OrchestrationMetrics
    from controlplane.protocol.models import OutlierConfig as OutlierConfig
    from controlplane.protocol.models import RoutingStrategy as RoutingStrategy
    from controlplane.protocol.requests import SyscallRequest as SyscallRequest
    from controlplane.settings import Settings as Settings

#: Each public name and the module that defines it.
_EXPORTS: dict[str, str] = {
    "AuthenticationFailed": "controlplane.errors",
    "BusConfig": "controlplane.bus",
    "BusMessage": "controlplane.protocol.models",
    "BusTopic": "controlplane.protocol.models",
    "ClusterConfig": "controlplane.protocol.models",
    "ClusterExists": "controlplane.errors",
    "ClusterInfo": "controlplane.client.core",
    "ClusterMetrics": "controlplane.protocol.models",
    "ClusterMetricsCollector": "controlplane.client.metrics",
    "ClusterNotFound": "controlplane.errors",
    "ClusterStatus": "controlplane.protocol.models",
    "DispatchError": "controlplane.errors",
    "DispatchResult": "controlplane.client.core",
    "DispatchTimeout": "controlplane.errors",
    "InterKernelBus": "controlplane.bus",
    "InvalidRequest": "controlplane.errors",
    "Job": "controlplane.client.arq",
    "JobStatus": "controlplane.protocol.arq",
    "KcpClient": "controlplane.client.core",
    "KcpError": "controlplane.errors",
    "KernelCluster": "controlplane.client.cluster",
    "KernelError": "controlplane.errors",
    "KernelGone": "controlplane.errors",
    "KernelLoad": "controlplane.protocol.models",
    "KernelMetricsSnapshot": "controlplane.protocol.models",
    "LifecycleError": "controlplane.lifecycle",
    "LoadBalancer": "controlplane.client.balancer",
    "LoadBalancerConfig": "controlplane.protocol.models",
    "NoKernelAvailable": "controlplane.errors",
    "OrchestrationConfig": "controlplane.protocol.models",
    "OrchestrationEngine": "controlplane.client.engine",
    "OrchestrationMetrics": "controlplane.protocol.models",
    "OrchestrationTools": "controlplane.client.tools",
    "OutlierConfig": "controlplane.protocol.models",
    "PermissionDenied": "controlplane.errors",
    "ReadOnly": "controlplane.errors",
    "ReceivedMessage": "controlplane.bus",
    "RedisError": "controlplane.errors",
    "RedisUnavailable": "controlplane.errors",
    "RoutingStrategy": "controlplane.protocol.models",
    "Settings": "controlplane.settings",
    "SyscallRequest": "controlplane.protocol.requests",
    "WrongData": "controlplane.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> typing.Any:
    try:
        module = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'controlplane' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
