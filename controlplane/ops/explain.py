"""What to tell a person about a `KcpError`, and the `kcp` exit code for it.

Every interface says it the same way: the CLI (`cli.output.report_error`) and the MCP tools.
"""

from __future__ import annotations

from controlplane.errors import (
    AuthenticationFailed,
    InvalidRequest,
    KcpError,
    PermissionDenied,
    ReadOnly,
    RedisUnavailable,
    WrongData,
)
from controlplane.settings import Settings
from controlplane.tls import redact_url

#: The exit codes, one per thing the user fixes (listed in the `kcp` docstring and the docs).
EXIT_FAILED, EXIT_BAD_INPUT, EXIT_REDIS, EXIT_AUTH, EXIT_PERMISSION, EXIT_WRONG_DATA = 1, 2, 3, 4, 5, 6


def explain_error(exc: KcpError, settings: Settings) -> tuple[str, int]:
    """What went wrong and, where it helps, what to do about it; and the exit code for it."""
    url = redact_url(settings.redis_url)
    hint, code = "", EXIT_FAILED
    if isinstance(exc, RedisUnavailable):
        hint, code = f"is Redis running at {url}?", EXIT_REDIS
    elif isinstance(exc, ReadOnly):
        hint, code = "a replica, or a failover under way: point the URL at the primary, or retry", EXIT_REDIS
    elif isinstance(exc, AuthenticationFailed):
        hint = "check the user name and password: KCP_REDIS_USERNAME, KCP_REDIS_PASSWORD or the URL"
        code = EXIT_AUTH
    elif isinstance(exc, PermissionDenied):
        hint, code = (
            "the ACL user lacks this right: `kcp acl` writes the rules each role needs",
            EXIT_PERMISSION,
        )
    elif isinstance(exc, WrongData):
        hint, code = (
            f"a key holds data kcp did not write: does something else use prefix {settings.prefix!r}?",
            EXIT_WRONG_DATA,
        )
    elif isinstance(exc, InvalidRequest):
        code = EXIT_BAD_INPUT
    return f"{exc}" + (f" ({hint})" if hint else ""), code
