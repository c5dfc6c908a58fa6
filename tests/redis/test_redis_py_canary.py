"""The redis-py behaviour kcp relies on beyond its documented API, pinned so an upgrade fails here.

`controlplane/redis/channel.py` takes a connection's transport over from redis-py and parses
replies itself; `controlplane/redis/connect.py` chooses RESP2 because the bus reads stream replies
in their RESP2 shapes (redis-py 8 defaults to RESP3). If one of these tests fails after an
upgrade, fix the channel or the factory first: the rest of kcp depends on them.
"""

from __future__ import annotations

import asyncio
import inspect

import pytest
import redis
import redis.exceptions
from redis._parsers.base import BaseParser
from redis.asyncio.connection import AbstractConnection
from redis.commands.core import AsyncScript

from controlplane.redis.channel import Channel
from controlplane.redis.connect import RESP, connect, connect_sync


@pytest.mark.unit
@pytest.mark.parametrize(
    ("reply", "error"),
    [
        ("NOSCRIPT No matching script. Please use EVAL.", redis.exceptions.NoScriptError),
        ("WRONGTYPE Operation against a key holding the wrong kind of value", redis.exceptions.ResponseError),
        ("NOPERM this user has no permissions to run the 'set' command", redis.exceptions.NoPermissionError),
        ("READONLY You can't write against a read only replica.", redis.exceptions.ReadOnlyError),
        ("LOADING Redis is loading the dataset in memory", redis.exceptions.BusyLoadingError),
    ],
)
def test_the_reply_error_parser_the_channel_hands_to_hiredis(reply: str, error: type[Exception]) -> None:
    exc = BaseParser.parse_error(reply)
    assert isinstance(exc, error)
    assert reply.partition(" ")[2] in str(exc) or reply in str(exc)


@pytest.mark.unit
def test_the_connection_methods_the_channel_calls() -> None:
    for name in ("connect", "send_packed_command", "read_response", "disconnect"):
        assert callable(getattr(AbstractConnection, name, None)), name
    assert "nowait" in inspect.signature(AbstractConnection.disconnect).parameters
    r = connect("redis://127.0.0.1:1/0")
    pool = r.connection_pool
    assert isinstance(pool.connection_kwargs, dict)
    assert issubclass(pool.connection_class, AbstractConnection)
    script = r.register_script("return 1")
    assert isinstance(script, AsyncScript)
    assert isinstance(script.sha, str) and len(script.sha) == 40
    assert script.script == "return 1"


@pytest.mark.unit
def test_every_client_the_factory_makes_asks_for_resp2() -> None:
    assert RESP == 2
    assert connect("redis://127.0.0.1:1/0").connection_pool.connection_kwargs["protocol"] == 2
    with connect_sync("redis://127.0.0.1:1/0") as client:
        assert client.connection_pool.connection_kwargs["protocol"] == 2


@pytest.mark.integration
@pytest.mark.timeout(30)
async def test_a_connected_connection_exposes_its_stream_writer_and_encoder(redis_url: str) -> None:
    r = connect(redis_url)
    pool = r.connection_pool
    conn = pool.connection_class(**pool.connection_kwargs)
    try:
        await conn.connect()  # type: ignore[no-untyped-call]
        assert isinstance(conn._writer, asyncio.StreamWriter)
        assert isinstance(conn._writer.transport, asyncio.WriteTransport)
        assert hasattr(conn, "_reader")
        encoder = conn.encoder
        assert (encoder.encoding, encoder.encoding_errors, encoder.decode_responses) == (
            "utf-8",
            "strict",
            True,
        )
    finally:
        await conn.disconnect(nowait=True)
        await r.aclose()


@pytest.mark.integration
@pytest.mark.timeout(30)
async def test_the_server_sees_resp2_on_every_kind_of_connection(redis_url: str) -> None:
    r = connect(redis_url)
    channel = Channel(r)
    try:
        assert "resp=2" in (await r.execute_command("CLIENT", "INFO"))
        assert "resp=2" in (await channel.execute("CLIENT", "INFO"))
        with connect_sync(redis_url) as client:
            assert "resp=2" in client.execute_command("CLIENT", "INFO")
        # a stream read in its RESP2 shape: [[stream, [[id, [field, value, ...]]]]]
        await r.xadd("canary", {"f": "v"}, id="1-1")
        reply = await channel.execute("XREAD", "COUNT", "1", "STREAMS", "canary", "0")
        assert reply == [["canary", [["1-1", ["f", "v"]]]]]
    finally:
        await channel.aclose()
        await r.delete("canary")
        await r.aclose()
