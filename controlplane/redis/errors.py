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

Redis Cluster: redis-py's cluster client raises `RedisClusterException`, which is not a
`RedisError`, for its own refusals; the mapping covers it too. A topology in flux (CLUSTERDOWN,
TRYAGAIN, a slot not covered, redirections exhausted) is `RedisUnavailable`; keys in different
slots (CROSSSLOT, the client's own check, a script touching an undeclared key on another slot), a
MOVED seen by a plain client and a MULTI/EXEC pipeline on the cluster client are the base
`RedisError`, whose message says what to do (a plain URL at a cluster node: use redis+cluster://;
keys across slots or a transaction: a kcp bug, every kcp script runs in one slot).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
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
    (rex.ResponseError, _code("LOADING", "BUSY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN"), RedisUnavailable),
    (rex.DataError, None, WrongData),  # a value redis-py cannot encode
    # Redis Cluster. redis-py's cluster client strips the code from the text of the replies it
    # types (ClusterDownError is "The cluster is down"), so these go by type. A failover or a
    # resharding under way passes: the client re-reads the slot table and the caller retries.
    (rex.ClusterError, None, RedisUnavailable),  # CLUSTERDOWN, MASTERDOWN; "TTL exhausted" redirections
    (rex.TryAgainError, None, RedisUnavailable),  # a multi-key command during a slot's migration
    (rex.SlotNotCoveredError, None, RedisUnavailable),
    (rex.ClusterCrossSlotError, None, RedisError),  # CROSSSLOT: the keys are in different slots
    (rex.AskError, None, RedisUnavailable),  # MOVED/ASK the cluster client did not follow in time
    # the client's view of the slots is incomplete or changing: it re-reads the slot table
    (
        rex.RedisClusterException,
        re.compile(r"cannot be connected|not covered|could not agree|No targets were found"),
        RedisUnavailable,
    ),
    # any other RedisClusterException is the client's own refusal, the base RedisError: keys it sees
    # in different slots (before sending), no MULTI/EXEC, a command without a key to route by
)

#: Why a command failed on Redis Cluster that would succeed on one server, for the base RedisError:
#: (what the text says, the label, what to do).
_CLUSTER_HINTS: tuple[tuple[re.Pattern[str], str, str], ...] = (
    (
        re.compile(r"CROSSSLOT|don't hash to the same slot|must map to the same key slot|non local key"),
        "keys in different Redis Cluster hash slots",
        "every kcp script and command keeps to one slot, so this is a kcp bug: please report it "
        "with the command named here",
    ),
    (
        # alone, inside a script, or in a pipeline's "Command # 2 (SADD ...) of pipeline caused error: "
        re.compile(r"(?:^|: |\(')(?:MOVED|ASK) \d+ "),
        "the server is a Redis Cluster node",
        "point the URL at the cluster with redis+cluster://host:port[,host:port...] (or rediss+cluster://)",
    ),
    (
        re.compile(r"transaction is deprecated in cluster mode|No way to dispatch this command"),
        "a command the Redis Cluster client does not send (MULTI/EXEC, or no key to route by)",
        "kcp sends no transaction and no keyless command to a cluster client, so this is a kcp bug: "
        "please report it",
    ),
    (
        re.compile(r"cluster support disabled"),
        "not a Redis Cluster node",
        "a redis+cluster:// URL needs servers with cluster-enabled yes; use redis:// for a single Redis",
    ),
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
    inner = _underlying(exc)
    if inner is not None:
        annotate(inner, getattr(exc, _ATTRIBUTE, None) or Where())
        return translate(inner)
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
    label, hint = _LABELS[kind], ""
    if kind is RedisError:
        label, hint = next(((lb, f" ({h})") for p, lb, h in _CLUSTER_HINTS if p.search(text)), (label, ""))
    return kind(f"{label}{user}{at}{': ' + what if what else ''}: {text}{hint}")


def _underlying(exc: Exception) -> Exception | None:
    """The error a cluster client's start-up wraps: "Redis Cluster cannot be connected" has the last
    node's failure as its cause (refused, WRONGPASS, ...), and "Cluster mode is not enabled on this
    node" the server's reply to CLUSTER SLOTS as its context (NOPERM, or a server without cluster
    mode). That one says what to fix; the wrapper does not."""
    if not isinstance(exc, rex.RedisClusterException):
        return None
    text = str(exc)
    if text.startswith("Redis Cluster cannot be connected") and isinstance(exc.__cause__, _REDIS_PY_ERRORS):
        return exc.__cause__
    if text.startswith("Cluster mode is not enabled") and isinstance(exc.__context__, rex.RedisError):
        return exc.__context__
    return None


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


#: What `map_redis_errors` translates: redis-py's errors, and its cluster client's own exceptions
#: (RedisClusterException is not a RedisError).
_REDIS_PY_ERRORS = (rex.RedisError, rex.RedisClusterException)


def _mapped(exc: rex.RedisError | rex.RedisClusterException, where: Where | None) -> RedisError:
    if where is not None:
        annotate(exc, where)
    return translate(exc)


class _Mapping:
    """The block of `map_redis_errors` / `amap_redis_errors`: a plain class rather than a
    generator-based context manager, as the dispatch hot path enters one per request."""

    __slots__ = ("where",)

    def __init__(self, where: Where | None) -> None:
        self.where = where

    def __enter__(self) -> None:
        return None

    def __exit__(self, _type: object, exc: BaseException | None, _tb: object) -> None:
        if isinstance(exc, _REDIS_PY_ERRORS):
            raise _mapped(exc, self.where) from exc

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, _type: object, exc: BaseException | None, _tb: object) -> None:
        self.__exit__(_type, exc, _tb)


def map_redis_errors(where: Where | None = None) -> contextlib.AbstractContextManager[None]:
    """Raise redis-py exceptions from inside the block as kcp's (`translate`); `where` says
    what the block talks to, when the client does not."""
    return _Mapping(where)


def amap_redis_errors(where: Where | None = None) -> contextlib.AbstractAsyncContextManager[None]:
    """Async flavour of `map_redis_errors` for `async with` blocks."""
    return _Mapping(where)
