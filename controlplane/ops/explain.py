"""What to tell a person about a `KcpError`: the message, what to fix, and the exit code.

Every interface says it the same way: the CLI (`cli.output.report_error`) and the MCP tools.
"""

from __future__ import annotations

from controlplane.errors import (
    AuthenticationFailed,
    KcpError,
    PermissionDenied,
    ReadOnly,
    RedisUnavailable,
    WrongData,
    exit_code,
)
from controlplane.settings import Settings
from controlplane.tls import redact_url


def hint(exc: KcpError, settings: Settings) -> str:
    """What to fix, when the message does not say it ("" then)."""
    if isinstance(exc, RedisUnavailable):
        return f"is Redis running at {redact_url(settings.redis_url)}?"
    if isinstance(exc, ReadOnly):
        return "a replica, or a failover under way: point the URL at the primary, or retry"
    if isinstance(exc, AuthenticationFailed):
        return "check the user name and password: KCP_REDIS_USERNAME, KCP_REDIS_PASSWORD or the URL"
    if isinstance(exc, PermissionDenied):
        return "the ACL user lacks this right: `kcp acl` writes the rules each role needs"
    if isinstance(exc, WrongData):
        return f"a key holds data kcp did not write: does something else use prefix {settings.prefix!r}?"
    return ""


def explain_error(exc: KcpError, settings: Settings) -> tuple[str, int]:
    """What went wrong and, where it helps, what to do about it; and the exit code for it."""
    fix = hint(exc, settings)
    return f"{exc}" + (f" ({fix})" if fix else ""), exit_code(exc)
