"""The exception tree. Callers catch these, never redis-py's types (`controlplane.redis.errors` maps them).

KcpError
├── InvalidRequest          bad input: a name, a config, a request (also a ValueError)
│   └── NotRedisCluster     `kcp slots` on a single Redis or Sentinel: no slots to spread
├── ClusterNotFound
├── ClusterExists
├── DispatchError           a dispatch did not produce a result
│   ├── NoKernelAvailable   no running kernel could take the request in time
│   ├── DispatchTimeout     a kernel took the request but no result came in time
│   ├── KernelGone          a request pinned to a kernel incarnation that died or was replaced
│   └── KernelError         the kernel ran the request and it failed (bad args, handler raised)
├── ReshardError            a Redis Cluster slot was not moved: a master down, the slot migrating already
└── RedisError              Redis did not carry out a command
    ├── RedisUnavailable    not reachable, timed out, connection lost, still loading its data
    ├── ReadOnly            the server is a replica (a failover is under way): retry
    ├── AuthenticationFailed  wrong user name or password: fix the URL or the settings
    ├── PermissionDenied    the ACL user may not run this command or touch this key
    └── WrongData           a key holds another type or a value kcp cannot use (WRONGTYPE, ...)

`RedisUnavailable` and `ReadOnly` pass (`transient = True`); the others need a person.
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


class NotRedisCluster(InvalidRequest):
    """A Redis Cluster operation (`kcp slots`) on a URL that is not a `redis+cluster://` one:
    one server (or Sentinel's master) holds every key, so there is nothing to spread."""


class ReshardError(KcpError):
    """A slot move kcp refused to start (a master down, the slot already migrating) or that
    failed part-way (the message says in which state it left the slot and how to settle it)."""


class DispatchError(KcpError):
    """A dispatch ended without a result."""


class NoKernelAvailable(DispatchError):
    pass


class DispatchTimeout(DispatchError):
    pass


class KernelGone(DispatchError):
    """A request pinned to one kernel (`kernel="worker-3"` or `"worker-3@17"`) cannot run on the
    incarnation it was pinned to: that process died, or the name now belongs to a new process
    (`epoch` is the incarnation that is gone). Its memory did not survive; nothing ran elsewhere."""

    error_type = "KernelGone"

    def __init__(self, message: str, *, kernel: str, epoch: int | None = None) -> None:
        super().__init__(message)
        self.kernel = kernel
        self.epoch = epoch


class KernelError(DispatchError):
    """The kernel executed the request and reported a failure."""

    def __init__(self, message: str, *, kernel: str, error_type: str = "KernelError") -> None:
        super().__init__(message)
        self.kernel = kernel
        self.error_type = error_type


class RedisError(KcpError):
    """Redis did not carry out a command; the subclass says why."""

    #: True when the same command may succeed later without anyone changing anything.
    transient: bool = False


class RedisUnavailable(RedisError):
    """Redis could not be reached, timed out, lost the connection or is loading its data."""

    transient = True


class ReadOnly(RedisError):
    """The server answered READONLY: it is a replica, typically during a failover."""

    transient = True


class AuthenticationFailed(RedisError):
    """Redis refused the user name or password (WRONGPASS, NOAUTH)."""


class PermissionDenied(RedisError):
    """The ACL user may not run a command or touch a key (NOPERM)."""


class WrongData(RedisError):
    """A key holds another type, or a value kcp cannot use (WRONGTYPE, a script's data error)."""


#: The exit status of every kcp command, one per thing the user fixes (`kcp --help`, README):
#: 1 the operation failed, 2 bad input, 3 Redis unavailable or read-only, 4 authentication failed,
#: 5 permission denied, 6 wrong data in Redis, 7 a cluster's kernels were not all placed in time.
EXIT_FAILED, EXIT_BAD_INPUT, EXIT_REDIS, EXIT_AUTH, EXIT_PERMISSION, EXIT_WRONG_DATA, EXIT_NOT_PLACED = range(
    1, 8
)

_EXIT_CODES: tuple[tuple[type[KcpError], int], ...] = (
    (RedisUnavailable, EXIT_REDIS),
    (ReadOnly, EXIT_REDIS),
    (AuthenticationFailed, EXIT_AUTH),
    (PermissionDenied, EXIT_PERMISSION),
    (WrongData, EXIT_WRONG_DATA),
    (InvalidRequest, EXIT_BAD_INPUT),
)


def exit_code(exc: KcpError) -> int:
    """The exit status a kcp command ends with when it fails with `exc`."""
    return next((code for kind, code in _EXIT_CODES if isinstance(exc, kind)), EXIT_FAILED)
