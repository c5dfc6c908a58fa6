"""kcp: a Redis-backed control plane for clusters of compute kernels.

The spec's public names (`OrchestrationTools`, `KernelCluster`, `OrchestrationEngine`,
`LoadBalancer`, the enums and config/data classes) plus the typed client `KcpClient`.
"""

from .balancer import LoadBalancer
from .client import ClusterInfo, DispatchResult, KcpClient
from .cluster import KernelCluster
from .engine import OrchestrationEngine
from .errors import (
    ClusterExists,
    ClusterNotFound,
    DispatchError,
    DispatchTimeout,
    InvalidRequest,
    KcpError,
    KernelError,
    NoKernelAvailable,
    RedisUnavailable,
)
from .models import (
    BusMessage,
    BusTopic,
    ClusterConfig,
    ClusterMetrics,
    ClusterStatus,
    KernelLoad,
    KernelMetricsSnapshot,
    LoadBalancerConfig,
    OrchestrationConfig,
    OrchestrationMetrics,
    RoutingStrategy,
)
from .requests import SyscallRequest
from .settings import Settings
from .tools import OrchestrationTools

__all__ = [
    "BusMessage",
    "BusTopic",
    "ClusterConfig",
    "ClusterExists",
    "ClusterInfo",
    "ClusterMetrics",
    "ClusterNotFound",
    "ClusterStatus",
    "DispatchError",
    "DispatchResult",
    "DispatchTimeout",
    "InvalidRequest",
    "KcpClient",
    "KcpError",
    "KernelCluster",
    "KernelError",
    "KernelLoad",
    "KernelMetricsSnapshot",
    "LoadBalancer",
    "LoadBalancerConfig",
    "NoKernelAvailable",
    "OrchestrationConfig",
    "OrchestrationEngine",
    "OrchestrationMetrics",
    "OrchestrationTools",
    "RedisUnavailable",
    "RoutingStrategy",
    "Settings",
    "SyscallRequest",
]
