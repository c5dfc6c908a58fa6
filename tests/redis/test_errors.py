"""redis-py's exceptions mapped once to kcp's: the table (no server), then the messages a real
redis-server 7 with ACL users produces through `connect()` and the `Channel`."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from importlib import resources

import pytest
import redis
import redis.exceptions as rex
from conftest import RedisServerFactory

from controlplane.errors import (
    AuthenticationFailed,
    PermissionDenied,
    ReadOnly,
    RedisError,
    RedisUnavailable,
    WrongData,
)
from controlplane.ops.redis_server import RedisServerProcess
from controlplane.redis.channel import Channel
from controlplane.redis.connect import connect
from controlplane.redis.errors import Where, amap_redis_errors, annotate, map_redis_errors, translate

CLAIM = resources.files("controlplane.redis").joinpath("lua", "claim.lua").read_text(encoding="utf-8")
CLAIM_SHA = hashlib.sha1(CLAIM.encode()).hexdigest()
SCRIPT_SUFFIX = f" script: {CLAIM_SHA}, on @user_script:1."


# ------------------------------------------------------------------ the table (no server)
R6 = "Error running script (call to f_x): @user_script:1: "  # Redis 6 prefixes a script's errors
AUTH_TEXT = "invalid username-password pair or user is disabled."
KEY_TEXT = "this user has no permissions to access one of the keys used as arguments"
SCRIPT_CMD_TEXT = "The user executing the script can't run this command or subcommand"
WRONGTYPE_TEXT = "WRONGTYPE Operation against a key holding the wrong kind of value"


@pytest.mark.unit
@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (rex.AuthenticationError(AUTH_TEXT), AuthenticationFailed),  # WRONGPASS
        (rex.AuthenticationError("Authentication required."), AuthenticationFailed),  # NOAUTH
        (
            rex.AuthenticationWrongNumberOfArgsError("wrong number of arguments for 'auth'"),
            AuthenticationFailed,
        ),
        (rex.ResponseError("NOAUTH Authentication required."), AuthenticationFailed),
        (rex.ResponseError(f"WRONGPASS {AUTH_TEXT}"), AuthenticationFailed),
        (rex.NoPermissionError("this user has no permissions to run the 'del' command"), PermissionDenied),
        (rex.NoPermissionError(KEY_TEXT), PermissionDenied),
        # NOPERM inside a script: Redis 7.0, Redis 6, and the NOPERM code of Redis >= 7.2
        (rex.ResponseError(SCRIPT_CMD_TEXT + SCRIPT_SUFFIX), PermissionDenied),
        (rex.ResponseError(f"{R6}@user_script: 1: {SCRIPT_CMD_TEXT}"), PermissionDenied),
        (
            rex.ResponseError("NOPERM User u has no permissions to run the 'del' command" + SCRIPT_SUFFIX),
            PermissionDenied,
        ),
        (rex.ResponseError(f"{R6}NOPERM No permissions to access a key"), PermissionDenied),
        (rex.ReadOnlyError("You can't write against a read only replica."), ReadOnly),
        (
            rex.ResponseError("READONLY You can't write against a read only replica." + SCRIPT_SUFFIX),
            ReadOnly,
        ),
        (rex.ResponseError(WRONGTYPE_TEXT), WrongData),
        (rex.ResponseError(WRONGTYPE_TEXT + SCRIPT_SUFFIX), WrongData),
        (rex.ResponseError(R6 + WRONGTYPE_TEXT), WrongData),
        (rex.DataError("Invalid input of type: 'NoneType'."), WrongData),
        (rex.BusyLoadingError("Redis is loading the dataset in memory"), RedisUnavailable),
        (rex.ConnectionError("Error 111 connecting to 127.0.0.1:1."), RedisUnavailable),
        (rex.TimeoutError("Timeout reading from socket"), RedisUnavailable),
        (rex.InvalidResponse("Protocol error"), RedisUnavailable),
        (rex.ResponseError("MASTERDOWN Link with MASTER is down"), RedisUnavailable),
        (rex.ResponseError("BUSY Redis is busy running a script."), RedisUnavailable),
        # a plain error reply: a script's own error, a syntax error: the base type, not transient
        (rex.ResponseError("BOOM custom"), RedisError),
        (rex.ResponseError("unknown command 'FOO'"), RedisError),
        (rex.ResponseError("NOTNUM the field holds no number" + SCRIPT_SUFFIX), RedisError),
    ],
)
def test_each_redis_py_error_maps_to_the_most_specific_kcp_type(
    exc: Exception, kind: type[RedisError]
) -> None:
    mapped = translate(exc)
    assert type(mapped) is kind, (exc, mapped)
    assert str(exc) in str(mapped)
    assert mapped.transient == (kind in (RedisUnavailable, ReadOnly))


@pytest.mark.unit
def test_both_context_managers_map_and_chain() -> None:
    original = rex.ReadOnlyError("You can't write against a read only replica.")
    with pytest.raises(ReadOnly) as caught, map_redis_errors():
        raise original
    assert caught.value.__cause__ is original

    async def run() -> None:
        async with amap_redis_errors(Where(url="redis://h:1/0", user="u")):
            raise rex.AuthenticationError("invalid username-password pair or user is disabled.")

    with pytest.raises(
        AuthenticationFailed, match=r"^authentication failed for user u at redis://h:1/0: invalid"
    ):
        asyncio.run(run())


@pytest.mark.unit
def test_the_message_names_the_command_its_keys_and_the_script() -> None:
    where = Where(url="redis://u:***@h:1/0", user="u")
    key = rex.NoPermissionError("this user has no permissions to access one of the keys used as arguments")
    annotate(key, where, ("HSET", "kcp:agent:a2", "slots", "9"))
    assert str(translate(key)) == (
        "permission denied for user u at redis://u:***@h:1/0: HSET on key kcp:agent:a2: "
        "this user has no permissions to access one of the keys used as arguments"
    )
    pop = rex.NoPermissionError("this user has no permissions to access one of the keys used as arguments")
    annotate(pop, where, ("BLMPOP", 5, 1, "kcp:reply:c1", "LEFT", "COUNT", 100))  # the client's reply pop
    assert ": BLMPOP on key kcp:reply:c1: " in str(translate(pop))
    script = rex.NoPermissionError("this user has no permissions to access one of the keys used as arguments")
    annotate(script, where, ("EVALSHA", CLAIM_SHA, 2, "k1", "k2", "arg"))
    assert ": script claim (EVALSHA) on keys k1, k2: " in str(translate(script))
    # EVAL of the same source is the same script
    inline = rex.ResponseError(
        "The user executing the script can't run this command or subcommand" + SCRIPT_SUFFIX
    )
    annotate(inline, where, ("EVAL", CLAIM, 1, "k1"))
    assert ": script claim (EVAL) on key k1: " in str(translate(inline))
    # an error that only knows the SHA from the server's text (e.g. in a pipeline)
    assert "script claim" in str(translate(rex.ResponseError("WRONGTYPE Operation" + SCRIPT_SUFFIX)))
    # a denied command is named with its subcommand, never with its arguments (a password)
    acl = rex.NoPermissionError("this user has no permissions to run the 'acl|setuser' command")
    annotate(acl, where, ("ACL", "SETUSER", "bob", ">s3cret"))
    assert "ACL SETUSER: " in str(translate(acl)) and "s3cret" not in str(translate(acl))
    auth = rex.ResponseError("WRONGPASS invalid username-password pair")
    annotate(auth, where, ("AUTH", "u", "s3cret"))
    assert "s3cret" not in str(translate(auth))


@pytest.mark.unit
def test_the_innermost_annotation_keeps_its_command() -> None:
    exc = rex.NoPermissionError("this user has no permissions to access one of the keys used as arguments")
    annotate(exc, Where(user="u"), ("GET", "k"))
    annotate(exc, Where(url="redis://h:1/0", user="other"))
    assert str(translate(exc)).startswith("permission denied for user u at redis://h:1/0: GET on key k: ")


# ------------------------------------------------------------------ a real redis-server with ACL users
@pytest.fixture
def acl_user(redis_server_factory: RedisServerFactory) -> Iterator[RedisServerProcess]:
    """A private server with user `app` (password `pw`): keys `app:*`, a few commands, EVALSHA."""
    server = redis_server_factory()
    with redis.Redis.from_url(server.url) as admin:
        admin.execute_command(
            "ACL",
            "SETUSER",
            "app",
            "on",
            ">pw",
            "~app:*",
            "+ping",
            "+get",
            "+set",
            "+hset",
            "+evalsha",
            "+eval",
        )
    yield server


def _url(server: RedisServerProcess, password: str = "pw") -> str:
    return f"redis://app:{password}@{server.host}:{server.port}/0"


@pytest.mark.integration
@pytest.mark.timeout(30)
async def test_a_wrong_password_names_the_user_and_the_redacted_url(acl_user: RedisServerProcess) -> None:
    client = connect(_url(acl_user, "wrong"))
    expected = f"authentication failed for user app at redis://app:***@{acl_user.host}:{acl_user.port}/0: "
    try:
        with pytest.raises(AuthenticationFailed) as caught:
            async with amap_redis_errors():
                await client.ping()
        assert str(caught.value).startswith(expected) and "wrong" not in str(caught.value)
        channel = Channel(client)  # the channel's own connection says the same
        with pytest.raises(AuthenticationFailed) as caught:
            async with amap_redis_errors():
                await channel.execute("PING")
        assert str(caught.value).startswith(expected)
    finally:
        await client.aclose()


@pytest.mark.integration
@pytest.mark.timeout(30)
async def test_an_acl_denial_names_the_command_and_the_key(acl_user: RedisServerProcess) -> None:
    client = connect(_url(acl_user))
    channel = Channel(client)
    where = f"permission denied for user app at redis://app:***@{acl_user.host}:{acl_user.port}/0: "
    try:
        await client.set("app:own", "1")  # its own keys: fine
        cases = [
            (lambda: client.hset("other:key", "f", "v"), "HSET on key other:key: "),
            (lambda: client.delete("app:own"), "DEL: "),  # a command it may not run
            (
                lambda: client.evalsha(CLAIM_SHA, 2, "other:a", "app:b"),
                "script claim (EVALSHA) on keys other:a, app:b: ",
            ),
            (lambda: client.eval(CLAIM, 1, "other:a"), "script claim (EVAL) on key other:a: "),
            (
                lambda: client.eval("return redis.call('DEL', KEYS[1])", 1, "app:own"),
                "(EVAL) on key app:own: ",
            ),
            (lambda: channel.execute("GET", "other:key"), "GET on key other:key: "),
        ]
        for call, what in cases:
            with pytest.raises(PermissionDenied) as caught:
                async with amap_redis_errors():
                    await call()
            assert str(caught.value).startswith(where) and what in str(caught.value), str(caught.value)
        # a pipeline: redis-py's own text names the command and its key
        with pytest.raises(PermissionDenied, match=r"Command # 2 \(GET other:key\)"):
            async with amap_redis_errors(), client.pipeline(transaction=False) as pipe:
                pipe.get("app:own").get("other:key")
                await pipe.execute()
        with pytest.raises(WrongData, match="HSET on key app:own: WRONGTYPE"):
            async with amap_redis_errors():
                await client.hset("app:own", "f", "v")
    finally:
        await channel.aclose()
        await client.aclose()
