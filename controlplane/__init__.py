"""kcp: a Redis-backed control plane for clusters of compute kernels.

The spec's public names (`OrchestrationTools`, `KernelCluster`, `OrchestrationEngine`,
`LoadBalancer`, the enums and config/data classes) plus the typed client `KcpClient`.
"""

from .balancer import LoadBalancer
from .bus import BusConfig, InterKernelBus, ReceivedMessage
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
from .metrics import ClusterMetricsCollector
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
    OutlierConfig,
    RoutingStrategy,
)
from .requests import SyscallRequest
from .settings import Settings
from .tools import OrchestrationTools

__all__ = [
    "BusConfig",
    "BusMessage",
    "BusTopic",
    "ClusterConfig",
    "ClusterExists",
    "ClusterInfo",
    "ClusterMetrics",
    "ClusterMetricsCollector",
    "ClusterNotFound",
    "ClusterStatus",
    "DispatchError",
    "DispatchResult",
    "DispatchTimeout",
    "InterKernelBus",
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
    "OutlierConfig",
    "ReceivedMessage",
    "RedisUnavailable",
    "RoutingStrategy",
    "Settings",
    "SyscallRequest",
]
