"""The exception tree. Callers catch these, never redis-py's types (`controlplane.redis.errors` maps them).

KcpError
├── InvalidRequest          bad input: a name, a config, a request (also a ValueError)
├── ClusterNotFound
├── ClusterExists
├── DispatchError           a dispatch did not produce a result
│   ├── NoKernelAvailable   no running kernel could take the request in time
│   ├── DispatchTimeout     a kernel took the request but no result came in time
│   └── KernelError         the kernel ran the request and it failed (bad args, handler raised)
└── RedisUnavailable        Redis could not be reached or answered with an error
"""

from __future__ import annotations


class KcpError(Exception):
    """Base of every error kcp raises on purpose."""


class InvalidRequest(KcpError, ValueError):
    """The input was rejected before anything changed."""


class ClusterNotFound(KcpError):
    def __init__(self, name: str) -> None:
        super().__init__(f"cluster {name!r} does not exist")
        self.name = name


class ClusterExists(KcpError):
    def __init__(self, name: str) -> None:
        super().__init__(f"cluster {name!r} already exists")
        self.name = name


class DispatchError(KcpError):
    """A dispatch ended without a result."""


class NoKernelAvailable(DispatchError):
    pass


class DispatchTimeout(DispatchError):
    pass


class KernelError(DispatchError):
    """The kernel executed the request and reported a failure."""

    def __init__(self, message: str, *, kernel: str, error_type: str = "KernelError") -> None:
        super().__init__(message)
        self.kernel = kernel
        self.error_type = error_type


class RedisUnavailable(KcpError):
    """Redis could not be reached, timed out, or refused a command."""
