"""redis-py's exceptions, translated once into kcp's (`controlplane.errors`).

`translate` is the one mapping (httpx's `map_httpcore_exceptions` is the model): a table from
redis-py's exception types, and for a bare `ResponseError` the error code in its text, to kcp's
types, most specific first. `map_redis_errors` / `amap_redis_errors` apply it to a block.

redis-py's text rarely says what to fix ("invalid username-password pair", "no permissions to
access one of the keys"), so the layers that know more attach it to the exception in flight
(`annotate`): the client made by `controlplane.redis.connect` adds the URL, the user and the
command with its arguments; the `Channel` does the same for its commands. The message then
names the user, the URL (password redacted), the command, its keys, and for EVALSHA the
script by its file name in `lua/`.

A plain `ResponseError` (a syntax error, an unknown command, an error a script raised on
purpose) becomes the base `RedisError`: kcp cannot tell which of its subtypes it is, it is not
transient, and every catch site that means "any Redis failure" catches the base.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import redis.exceptions as rex

from controlplane.errors import (
    AuthenticationFailed,
    PermissionDenied,
    ReadOnly,
    RedisError,
    RedisUnavailable,
    WrongData,
)
from controlplane.redis.lua import Script, names_by_sha
from controlplane.tls import redact_url, url_username


def _code(*codes: str) -> re.Pattern[str]:
    """An error code at the start of the text, or after a script's prefix (Redis 6 sends
    "ERR Error running script (call to f_<sha>): @user_script:1: WRONGTYPE ...")."""
    return re.compile(rf"^(?:Error running script .*?: )?-?(?:{'|'.join(codes)})\b")


#: (redis-py type, what its text must match or None, kcp type): the first match wins, so a
#: subclass comes before its base (AuthenticationError and BusyLoadingError are ConnectionErrors).
_RULES: tuple[tuple[type[Exception], re.Pattern[str] | None, type[RedisError]], ...] = (
    (rex.AuthenticationWrongNumberOfArgsError, None, AuthenticationFailed),  # a user name, Redis < 6
    (rex.AuthenticationError, None, AuthenticationFailed),  # WRONGPASS, NOAUTH, invalid password
    (rex.AuthorizationError, None, PermissionDenied),
    (rex.NoPermissionError, None, PermissionDenied),  # NOPERM, also from a script on Redis >= 7.2
    (rex.ReadOnlyError, None, ReadOnly),
    (rex.BusyLoadingError, None, RedisUnavailable),  # LOADING: a restarted server reads its data
    (rex.ConnectionError, None, RedisUnavailable),
    (rex.TimeoutError, None, RedisUnavailable),
    (rex.InvalidResponse, None, RedisUnavailable),  # garbage on the wire: the connection is dropped
    # error replies redis-py leaves as a bare ResponseError (inside a script, in a pipeline)
    (rex.ResponseError, _code("NOAUTH", "WRONGPASS"), AuthenticationFailed),
    (rex.ResponseError, _code("NOPERM"), PermissionDenied),
    (rex.ResponseError, re.compile(r"The user executing the script can't"), PermissionDenied),  # 6, 7.0
    (rex.ResponseError, _code("READONLY"), ReadOnly),
    (rex.ResponseError, _code("WRONGTYPE"), WrongData),
    (rex.ResponseError, _code("LOADING", "BUSY", "MASTERDOWN", "TRYAGAIN"), RedisUnavailable),
    (rex.DataError, None, WrongData),  # a value redis-py cannot encode
)

_LABELS: dict[type[RedisError], str] = {
    ReadOnly: "read-only replica",
    PermissionDenied: "permission denied",
    WrongData: "wrong data",
    RedisError: "Redis error",
}

_SCRIPT_COMMANDS = frozenset({"EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO", "FCALL", "FCALL_RO"})
#: Commands whose every argument is a key; the blocking pops end with a timeout.
_ALL_KEYS = frozenset({"DEL", "UNLINK", "EXISTS", "MGET", "TOUCH", "WATCH", "SINTER", "SUNION", "SDIFF"})
_BLOCKING_POPS = frozenset({"BLPOP", "BRPOP", "BZPOPMIN", "BZPOPMAX"})
#: Commands whose keys follow a count: (position of the count, e.g. BLMPOP timeout numkeys key ...).
_COUNTED_KEYS = {"LMPOP": 1, "ZMPOP": 1, "BLMPOP": 2, "BZMPOP": 2, "SINTERCARD": 1, "ZUNION": 1, "ZINTER": 1}
#: Commands named with their subcommand, as ACL rules name them (`+config|get`).
_CONTAINERS = frozenset(
    {"ACL", "CLIENT", "CONFIG", "FUNCTION", "MEMORY", "OBJECT", "SCRIPT", "XGROUP", "XINFO"}
)
#: Commands whose arguments are never shown: they carry passwords (or are not keys).
_UNSHOWN = frozenset({"AUTH", "HELLO", "MIGRATE", "PING", "ECHO", "MULTI", "EXEC"})
_ATTRIBUTE = "kcp_where"


@dataclass(frozen=True, slots=True)
class Where:
    """What was running when Redis failed: the URL (password redacted), the ACL user, the command."""

    url: str | None = None
    user: str | None = None
    command: tuple[str, ...] = ()


def where_of(client: Any) -> Where:
    """The URL and user of a redis-py client (sync or asyncio): what `connect` was given, or
    a URL rebuilt from the pool's connection arguments (which hold no password)."""
    known: Where | None = getattr(client, _ATTRIBUTE, None)
    if known is not None and known.url is not None:
        return known
    kwargs: dict[str, Any] = client.connection_pool.connection_kwargs
    url = None
    if "path" in kwargs:
        url = f"unix://{kwargs['path']}"
    elif "host" in kwargs:
        scheme = "rediss" if "ssl" in client.connection_pool.connection_class.__name__.lower() else "redis"
        url = f"{scheme}://{kwargs['host']}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"
    return Where(url=url, user=kwargs.get("username") or "default")


def where_from_url(url: str) -> Where:
    return Where(url=redact_url(url), user=url_username(url) or "default")


def annotate(exc: BaseException, where: Where, command: Sequence[object] = ()) -> None:
    """Attach `where` (and `command`) to `exc` unless something closer to the failure did already:
    the innermost layer knows the command, an outer one may only know the URL."""
    known: Where | None = getattr(exc, _ATTRIBUTE, None)
    if command:
        args = [_text(a) for a in command]
        if args[0].upper() in ("EVAL", "EVAL_RO") and len(command) > 1:  # the script by its SHA1
            args[1] = Script.of("", _text_whole(command[1])).sha
        where = replace(where, command=tuple(args))
    if known is not None:
        where = Where(known.url or where.url, known.user or where.user, known.command or where.command)
    setattr(exc, _ATTRIBUTE, where)


def translate(exc: Exception) -> RedisError:
    """The kcp exception for a redis-py one: the most specific type, a message saying what to fix."""
    kind: type[RedisError] = RedisError
    text = str(exc)
    for source, pattern, target in _RULES:
        if isinstance(exc, source) and (pattern is None or pattern.search(text)):
            kind = target
            break
    where: Where = getattr(exc, _ATTRIBUTE, None) or Where()
    if kind is AuthenticationFailed:
        at = f" at {where.url}" if where.url else ""
        return AuthenticationFailed(f"authentication failed for user {where.user or 'default'}{at}: {text}")
    if kind is RedisUnavailable:
        return RedisUnavailable(f"Redis unavailable: {text}")
    what = _what(where.command, text)
    user = f" for user {where.user}" if kind is PermissionDenied and where.user else ""
    at = f" at {where.url}" if where.url else ""
    return kind(f"{_LABELS[kind]}{user}{at}{': ' + what if what else ''}: {text}")


def _what(command: tuple[str, ...], text: str) -> str:
    """The command, its keys and, for a script, its name, as far as they are known."""
    sha = re.search(r"\bscript: ([0-9a-f]{40})", text)
    if not command:
        return f"script {_script_name(sha.group(1))}" if sha else ""
    name = command[0].upper()
    if name in _SCRIPT_COMMANDS and len(command) > 2 and command[2].isdigit():
        keys = command[3 : 3 + int(command[2])]
        script = _script_name(command[1]) if name.startswith("EVAL") else command[1]  # FCALL: a function
        return f"script {script} ({name}){_keys(keys)}"
    if name in _CONTAINERS:
        return f"{name} {command[1].upper()}" if len(command) > 1 else name
    if name in _UNSHOWN or "run this command" in text or "to run the" in text:
        return name
    if "channel" in text:
        return f"{name} on channel {command[1]}" if len(command) > 1 else name
    if name in _ALL_KEYS:
        keys = command[1:]
    elif name in _BLOCKING_POPS:
        keys = command[1:-1]
    elif (
        name in _COUNTED_KEYS
        and len(command) > _COUNTED_KEYS[name]
        and command[_COUNTED_KEYS[name]].isdigit()
    ):
        at = _COUNTED_KEYS[name]
        keys = command[at + 1 : at + 1 + int(command[at])]
    else:
        keys = command[1:2]
    return f"{name}{_keys(keys)}"


def _keys(keys: Sequence[str]) -> str:
    if not keys:
        return ""
    return f" on key {keys[0]}" if len(keys) == 1 else f" on keys {', '.join(keys)}"


def _text_whole(arg: object) -> str:
    return (
        bytes(arg).decode("utf-8", "replace") if isinstance(arg, bytes | bytearray | memoryview) else str(arg)
    )


def _text(arg: object) -> str:
    text = _text_whole(arg)
    return text if len(text) <= 120 else text[:117] + "..."


def _script_name(sha: str) -> str:
    return names_by_sha().get(sha, sha[:12])


def redis_said(exc: RedisError, text: str) -> bool:
    """Whether Redis's own error reply (kept as the cause of the kcp error) contains `text`,
    e.g. NOGROUP: for the few replies a loop answers by itself rather than by retrying."""
    return text.lower() in f"{exc.__cause__ or ''} {exc}".lower()


def error_reply(reply: object) -> bool:
    """Whether a reply handed back as a value (`Channel.execute_many`, a pipeline run with
    `raise_on_error=False`) is the server's error answer (an ACL denial, a key of
    another type, ...) rather than a value or a failed link."""
    return isinstance(reply, rex.ResponseError)


def _mapped(exc: rex.RedisError, where: Where | None) -> RedisError:
    if where is not None:
        annotate(exc, where)
    return translate(exc)


@contextlib.contextmanager
def map_redis_errors(where: Where | None = None) -> Iterator[None]:
    """Raise redis-py exceptions from inside the block as kcp's (`translate`); `where` says
    what the block talks to, when the client does not."""
    try:
        yield
    except rex.RedisError as exc:
        raise _mapped(exc, where) from exc


@contextlib.asynccontextmanager
async def amap_redis_errors(where: Where | None = None) -> AsyncIterator[None]:
    """Async flavour of `map_redis_errors` for `async with` blocks."""
    try:
        yield
    except rex.RedisError as exc:
        raise _mapped(exc, where) from exc
