"""kernel_agent.syscalls: memory, files, the registry, the builtins and handler loading."""

from __future__ import annotations

import asyncio
import base64
import itertools
import math
import statistics
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from kernel_agent.syscalls import (
    BASE_ADDRESS,
    ErrorType,
    KernelMemory,
    SyscallContext,
    SyscallError,
    SyscallRegistry,
    builtin_registry,
    compute,
    load_handlers,
)

pytestmark = pytest.mark.unit

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def ctx() -> SyscallContext:
    return SyscallContext(memory=KernelMemory(), kernel="worker-1", cluster="demo")


@pytest.fixture
def registry() -> SyscallRegistry:
    return builtin_registry()


async def fails(registry: SyscallRegistry, ctx: SyscallContext, request: Any, error_type: str) -> str:
    """Run `request`, expect a SyscallError of `error_type`, return its message."""
    with pytest.raises(SyscallError) as info:
        await registry.execute(ctx, request)
    assert info.value.error_type == error_type, str(info.value)
    return str(info.value)


# ------------------------------------------------------------------ the builtin registry


def test_builtin_registry_is_fresh_each_time() -> None:
    first, second = builtin_registry(), builtin_registry()
    assert first.names() == ["ALLOC", "CLOSE", "COMPUTE", "FREE", "OPEN", "PING", "READ", "WRITE"]
    first.register("EXTRA", lambda ctx, args: {})
    assert "EXTRA" not in second.names()
    assert first.capabilities() == frozenset()
    described = second.describe()
    assert [d["name"] for d in described] == second.names()
    assert all(d["builtin"] and d["description"] and d["capabilities"] == [] for d in described)


async def test_spec_read_without_alloc(registry: SyscallRegistry, ctx: SyscallContext) -> None:
    result = await registry.execute(ctx, {"type": "READ", "address": 0x1000, "size": 256})
    assert result == {"address": 0x1000, "size": 256, "data": "00" * 256}


@pytest.mark.parametrize(
    ("data", "encoding", "expected"),
    [
        ("hello, kernel", None, b"hello, kernel"),
        ("naïve ☃", None, "naïve ☃".encode()),
        ("deadBEEF", "hex", b"\xde\xad\xbe\xef"),
        (base64.b64encode(b"\x00\x01binary\xff").decode(), "base64", b"\x00\x01binary\xff"),
        ([1, 2, 3, 255], None, b"\x01\x02\x03\xff"),
    ],
)
async def test_write_then_read(
    registry: SyscallRegistry, ctx: SyscallContext, data: Any, encoding: str | None, expected: bytes
) -> None:
    request: dict[str, Any] = {"type": "WRITE", "address": 0x2000, "data": data}
    if encoding:
        request["encoding"] = encoding
    assert await registry.execute(ctx, request) == {"address": 0x2000, "written": len(expected)}
    read = await registry.execute(ctx, {"type": "READ", "address": 0x2000, "size": len(expected)})
    assert read["data"] == expected.hex()
    assert bytes.fromhex(read["data"]) == expected


async def test_alloc_and_free(registry: SyscallRegistry, ctx: SyscallContext) -> None:
    first = await registry.execute(ctx, {"type": "ALLOC", "size": 100})
    second = await registry.execute(ctx, {"type": "alloc", "size": 1})
    assert first == {"address": BASE_ADDRESS, "size": 100}
    assert second["address"] == BASE_ADDRESS + 112  # 100 rounded up to 16
    assert await registry.execute(ctx, {"type": "FREE", "address": BASE_ADDRESS}) == {
        "address": BASE_ADDRESS,
        "freed": 100,
    }
    message = await fails(registry, ctx, {"type": "FREE", "address": BASE_ADDRESS}, "SegmentationFault")
    assert "0x1000 is not the address of an allocated block" in message
    await fails(registry, ctx, {"type": "FREE", "address": 0}, "SegmentationFault")
    await fails(registry, ctx, {"type": "FREE", "address": second["address"] + 16}, "SegmentationFault")


async def test_alloc_out_of_memory(registry: SyscallRegistry) -> None:
    small = SyscallContext(memory=KernelMemory(4096))
    await registry.execute(small, {"type": "ALLOC", "size": 4000})
    message = await fails(registry, small, {"type": "ALLOC", "size": 200}, "OutOfMemory")
    assert "no free block of 200 bytes (96 bytes free in total)" in message
    whole = SyscallContext()
    assert (await registry.execute(whole, {"type": "ALLOC", "size": 1 << 20}))["address"] == BASE_ADDRESS
    await fails(registry, whole, {"type": "ALLOC", "size": 1}, "OutOfMemory")


async def test_open_and_close(registry: SyscallRegistry, ctx: SyscallContext) -> None:
    opened = await registry.execute(ctx, {"type": "OPEN", "path": "/data/in.txt"})
    assert opened == {"fd": 3, "path": "/data/in.txt", "mode": "r"}
    second = await registry.execute(ctx, {"type": "OPEN", "path": "/data/out.txt", "mode": "w"})
    assert second["fd"] == 4
    assert await registry.execute(ctx, {"type": "CLOSE", "fd": 3}) == {"fd": 3, "closed": True}
    assert (await registry.execute(ctx, {"type": "OPEN", "path": "/x", "mode": "a"}))[
        "fd"
    ] == 3  # lowest free
    message = await fails(registry, ctx, {"type": "CLOSE", "fd": 99}, "BadFileDescriptor")
    assert "fd 99 is not open" in message
    await fails(registry, ctx, {"type": "CLOSE", "fd": 0}, "BadFileDescriptor")
    assert set(ctx.memory.files.files) == {"/data/in.txt", "/data/out.txt", "/x"}


async def test_open_file_limit(registry: SyscallRegistry) -> None:
    limited = SyscallContext(memory=KernelMemory(max_fds=3))
    fds = [(await registry.execute(limited, {"type": "OPEN", "path": f"/f{i}"}))["fd"] for i in range(3)]
    assert fds == [3, 4, 5]
    message = await fails(registry, limited, {"type": "OPEN", "path": "/f4"}, "TooManyOpenFiles")
    assert "limit 3" in message
    await registry.execute(limited, {"type": "CLOSE", "fd": 4})
    assert (await registry.execute(limited, {"type": "OPEN", "path": "/f4"}))["fd"] == 4
    assert len(limited.memory.files) == 3


def test_open_w_truncates() -> None:
    files = KernelMemory().files
    fd = files.open("/log", "a")
    files.files["/log"].extend(b"old")
    files.close(fd)
    files.open("/log", "r")
    assert files.files["/log"] == b"old"
    files.open("/log", "w")
    assert files.files["/log"] == b""


async def test_ping(registry: SyscallRegistry, ctx: SyscallContext) -> None:
    assert await registry.execute(ctx, {"type": "PING"}) == {
        "pong": True,
        "payload": None,
        "kernel": "worker-1",
    }
    result = await registry.execute(ctx, {"type": "ping", "payload": {"n": [1, 2]}})
    assert result["payload"] == {"n": [1, 2]}


DATA = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]


@pytest.mark.parametrize(
    ("op", "expected"),
    [
        ("sum", 31.0),
        ("mean", 3.875),
        ("min", 1.0),
        ("max", 9.0),
        ("sort", sorted(DATA)),
        ("prod", 6480.0),
        ("variance", statistics.pvariance(DATA)),
        ("stdev", statistics.pstdev(DATA)),
    ],
)
async def test_compute_ops(registry: SyscallRegistry, ctx: SyscallContext, op: str, expected: Any) -> None:
    result = await registry.execute(ctx, {"type": "COMPUTE", "data": DATA, "op": op})
    assert result == {"op": op, "result": pytest.approx(expected)}


async def test_compute_stats_and_dot(registry: SyscallRegistry, ctx: SyscallContext) -> None:
    stats = await registry.execute(ctx, {"type": "COMPUTE", "data": [1, 2, 3, 4]})
    assert stats == {"count": 4, "sum": 10.0, "mean": 2.5, "min": 1.0, "max": 4.0}
    dot = await registry.execute(ctx, {"type": "COMPUTE", "data": [1, 2, 3], "op": "dot", "other": [4, 5, 6]})
    assert dot == {"op": "dot", "result": 32.0}
    assert compute("variance", [7.0]) == {"op": "variance", "result": 0.0}


async def test_compute_rejects_non_finite_and_overflow(
    registry: SyscallRegistry, ctx: SyscallContext
) -> None:
    message = await fails(registry, ctx, {"type": "COMPUTE", "data": [1, math.nan]}, "InvalidArguments")
    assert message == "COMPUTE: data[1] must be a finite number (got nan)"
    await fails(registry, ctx, {"type": "COMPUTE", "data": [math.inf]}, "InvalidArguments")
    overflow = await fails(
        registry, ctx, {"type": "COMPUTE", "data": [1e308, 1e308], "op": "prod"}, "HandlerError"
    )
    assert "not JSON-serialisable" in overflow
    await fails(registry, ctx, {"type": "COMPUTE", "data": [1e308, 1e308], "op": "sum"}, "HandlerError")


# ------------------------------------------------------------------ failures


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        ({"type": "READ", "address": 0x1000, "size": 0}, "READ: size must be between 1 and 65536 (got 0)"),
        ({"type": "WRITE", "address": 0x1000, "data": [300]}, "WRITE: data[0] must be a byte value 0..255"),
        ({"type": "ALLOC", "size": -5}, "ALLOC: size must be between 1 and 1048576 (got -5)"),
        ({"type": "FREE", "address": "0x1000"}, "FREE: address must be an integer (got str)"),
        ({"type": "OPEN", "path": "bad\x00path"}, "OPEN: path must not contain NUL or control characters"),
        ({"type": "CLOSE"}, "CLOSE: fd is required"),
        ({"type": "PING", "payload": "x" * 10_000}, "PING: payload must be at most 4096 bytes of JSON"),
        ({"type": "COMPUTE", "data": [1], "op": "mode"}, "COMPUTE: op must be one of"),
        ({"type": "not valid!"}, "request: type must be 1 to 32 characters"),
        (["READ"], "request must be a JSON object (got list)"),
    ],
)
async def test_bad_arguments(
    registry: SyscallRegistry, ctx: SyscallContext, request_: Any, expected: str
) -> None:
    assert expected in await fails(registry, ctx, request_, "InvalidArguments")


async def test_request_size_limit(ctx: SyscallContext) -> None:
    registry = builtin_registry(max_request_bytes=1500)
    message = await fails(registry, ctx, {"type": "PING", "payload": "y" * 2000}, "InvalidArguments")
    assert message == "request is 2028 bytes of JSON; the limit is 1500"
    assert (await registry.execute(ctx, {"type": "PING", "payload": "y" * 1000}))["pong"] is True


@pytest.mark.parametrize(
    "request_",
    [
        {"type": "READ", "address": 0, "size": 1},
        {"type": "READ", "address": BASE_ADDRESS - 1, "size": 1},
        {"type": "READ", "address": BASE_ADDRESS + (1 << 20) - 1, "size": 2},
        {"type": "WRITE", "address": BASE_ADDRESS + (1 << 20), "data": "x"},
        {"type": "WRITE", "address": 10**30, "data": [1]},
    ],
)
async def test_out_of_range_is_a_segfault(
    registry: SyscallRegistry, ctx: SyscallContext, request_: Any
) -> None:
    assert "fall outside memory 0x1000..0x101000" in await fails(registry, ctx, request_, "SegmentationFault")


async def test_last_byte_is_in_range(registry: SyscallRegistry, ctx: SyscallContext) -> None:
    last = BASE_ADDRESS + (1 << 20) - 1
    await registry.execute(ctx, {"type": "WRITE", "address": last, "data": [7]})
    assert (await registry.execute(ctx, {"type": "READ", "address": last, "size": 1}))["data"] == "07"


async def test_unknown_syscall_lists_known_ones(registry: SyscallRegistry, ctx: SyscallContext) -> None:
    message = await fails(registry, ctx, {"type": "infer", "inputs": [1]}, "UnknownSyscall")
    assert "unknown syscall 'INFER'" in message
    assert "ALLOC, CLOSE, COMPUTE, FREE, OPEN, PING, READ, WRITE" in message
    assert "none" in await fails(SyscallRegistry(), ctx, {"type": "PING"}, "UnknownSyscall")


# ------------------------------------------------------------------ user handlers


async def test_sync_and_async_user_handlers(registry: SyscallRegistry, ctx: SyscallContext) -> None:
    def echo(c: SyscallContext, args: dict[str, Any]) -> dict[str, Any]:
        return {"echo": args, "cluster": c.cluster}

    @registry.syscall("later", capabilities=["slow"], description="async")
    async def later(c: SyscallContext, args: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(0)
        return {"n": args["n"] + 1}

    registry.register("ECHO", echo, capabilities=["echo", "slow"])
    assert await registry.execute(ctx, {"type": "echo", "requires": ["echo"], "a": [1]}) == {
        "echo": {"a": [1]},
        "cluster": "demo",
    }
    assert await registry.execute(ctx, {"type": "LATER", "n": 1}) == {"n": 2}
    assert later.__name__ == "later"  # the decorator returns the function unchanged
    assert registry.capabilities() == frozenset({"echo", "slow"})
    described = {d["name"]: d for d in registry.describe()}
    assert described["LATER"] == {
        "name": "LATER",
        "capabilities": ["slow"],
        "description": "async",
        "builtin": False,
    }


def test_register_validation(registry: SyscallRegistry) -> None:
    with pytest.raises(ValueError, match="already registered"):
        registry.register("read", lambda c, a: {})
    with pytest.raises(ValueError, match="type must be 1 to 32 characters"):
        registry.register("my-call", lambda c, a: {})
    with pytest.raises(ValueError, match="capabilities"):
        registry.register("MINE", lambda c, a: {}, capabilities=["GPU"])
    with pytest.raises(TypeError, match="not callable"):
        registry.register("MINE", "nope")  # type: ignore[arg-type]
    assert "MINE" not in registry.names()


class Shape(BaseModel):
    width: int


async def test_handler_failures_become_syscall_errors(registry: SyscallRegistry, ctx: SyscallContext) -> None:
    def boom(c: SyscallContext, args: dict[str, Any]) -> dict[str, Any]:
        raise KeyError("missing thing")

    async def aboom(c: SyscallContext, args: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("async failure")

    def not_a_dict(c: SyscallContext, args: dict[str, Any]) -> Any:
        return [1, 2]

    def unserialisable(c: SyscallContext, args: dict[str, Any]) -> dict[str, Any]:
        return {"raw": b"bytes"}

    def typed(c: SyscallContext, args: dict[str, Any]) -> dict[str, Any]:
        return Shape.model_validate(args).model_dump()

    def deliberate(c: SyscallContext, args: dict[str, Any]) -> dict[str, Any]:
        raise SyscallError("quota exhausted", error_type="QuotaExceeded")

    for name, handler in [
        ("BOOM", boom),
        ("ABOOM", aboom),
        ("LIST", not_a_dict),
        ("RAW", unserialisable),
        ("TYPED", typed),
        ("QUOTA", deliberate),
    ]:
        registry.register(name, handler)
    assert await fails(registry, ctx, {"type": "BOOM"}, "HandlerError") == (
        "BOOM: handler raised KeyError: 'missing thing'"
    )
    assert "RuntimeError: async failure" in await fails(registry, ctx, {"type": "ABOOM"}, "HandlerError")
    assert "handler returned list, not a dict" in await fails(registry, ctx, {"type": "LIST"}, "HandlerError")
    assert "not JSON-serialisable" in await fails(registry, ctx, {"type": "RAW"}, "HandlerError")
    message = await fails(registry, ctx, {"type": "TYPED", "width": "wide"}, "InvalidArguments")
    assert message == "TYPED: width must be an integer (got str)"
    assert await fails(registry, ctx, {"type": "QUOTA"}, "QuotaExceeded") == "quota exhausted"


async def test_cancellation_is_not_swallowed(registry: SyscallRegistry, ctx: SyscallContext) -> None:
    async def cancelled(c: SyscallContext, args: dict[str, Any]) -> dict[str, Any]:
        raise asyncio.CancelledError

    registry.register("CANCEL", cancelled)
    with pytest.raises(asyncio.CancelledError):
        await registry.execute(ctx, {"type": "CANCEL"})


def test_error_types_are_strings() -> None:
    assert SyscallError("x", error_type=ErrorType.OUT_OF_MEMORY).error_type == "OutOfMemory"
    assert SyscallError("x").error_type == "HandlerError"


# ------------------------------------------------------------------ loading handler modules


async def test_load_example_infer_handlers(
    registry: SyscallRegistry, ctx: SyscallContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    load_handlers(registry, ["examples.infer_handlers"])
    assert "INFER" in registry.names()
    assert registry.capabilities() == frozenset({"infer"})
    request = {"type": "INFER", "requires": ["infer"], "inputs": [0.5, 1.0, 2.0], "seed": 7, "outputs": 2}
    first = await registry.execute(ctx, request)
    assert first == await registry.execute(ctx, request)  # deterministic
    assert len(first["outputs"]) == 2 and first["kernel"] == "worker-1"
    other_seed = await registry.execute(ctx, {**request, "seed": 8})
    assert other_seed["outputs"] != first["outputs"]
    message = await fails(registry, ctx, {"type": "INFER", "inputs": []}, "InvalidArguments")
    assert message.startswith("INFER: inputs")
    with pytest.raises(ValueError, match="already registered"):
        load_handlers(registry, ["examples.infer_handlers"])


def test_load_handlers_errors(registry: SyscallRegistry) -> None:
    with pytest.raises(ImportError, match=r"cannot import handler module 'no_such_pkg\.handlers'"):
        load_handlers(registry, ["no_such_pkg.handlers"])
    with pytest.raises(ValueError, match=r"'json' has no register\(registry\) function"):
        load_handlers(registry, ["json"])
    with pytest.raises(ValueError, match="absolute dotted path"):
        load_handlers(registry, [".relative"])
    load_handlers(registry, [])


# ------------------------------------------------------------------ memory


def test_memory_size_must_be_aligned() -> None:
    for size in (0, 8, 100):
        with pytest.raises(ValueError, match="multiple of 16"):
            KernelMemory(size)


def test_alloc_is_aligned_and_zeroed() -> None:
    memory = KernelMemory(1024)
    address = memory.alloc(5)
    memory.write(address, b"dirty")
    memory.free(address)
    again = memory.alloc(5)
    assert again == address and again % 16 == 0
    assert memory.read(again, 5) == bytes(5)
    with pytest.raises(SyscallError) as info:
        memory.alloc(0)
    assert info.value.error_type == "InvalidArguments"


def test_free_coalesces_neighbours() -> None:
    memory = KernelMemory(16 * 4)
    a, b, c, d = (memory.alloc(16) for _ in range(4))
    assert [a, b, c, d] == [BASE_ADDRESS + 16 * i for i in range(4)]
    memory.free(a)
    memory.free(c)
    with pytest.raises(SyscallError):
        memory.alloc(32)  # 32 bytes free, but in two holes
    memory.free(b)  # joins a and c
    assert memory.alloc(48) == a
    memory.free(d)
    memory.free(a)
    assert memory.free_bytes == 64 and memory.alloc(64) == a


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 200)), max_size=60))
def test_allocator_invariants(ops: list[tuple[bool, int]]) -> None:
    memory = KernelMemory(2048)
    for is_alloc, n in ops:
        live = sorted(memory.allocations)
        if is_alloc or not live:
            try:
                memory.alloc(n)
            except SyscallError as exc:
                assert exc.error_type == "OutOfMemory"
        else:
            memory.free(live[n % len(live)])
        blocks = sorted((addr, -(-size // 16) * 16) for addr, size in memory.allocations.items())
        assert all(addr % 16 == 0 for addr, _ in blocks)
        assert all(a + la <= b for (a, la), (b, _) in itertools.pairwise(blocks))
        assert memory.free_bytes + sum(length for _, length in blocks) == 2048
    for address in list(memory.allocations):
        memory.free(address)
    assert memory.alloc(2048) == BASE_ADDRESS  # everything coalesced back into one block


MEMORY = 4096


@st.composite
def write_requests(draw: st.DrawFn) -> tuple[int, bytes, dict[str, Any]]:
    data = draw(st.binary(min_size=1, max_size=512))
    address = draw(st.integers(BASE_ADDRESS, BASE_ADDRESS + MEMORY - len(data)))
    form = draw(st.sampled_from(["list", "hex", "base64", "utf-8"]))
    if form == "utf-8":
        text = draw(st.text(min_size=1, max_size=64).filter(lambda t: len(t.encode()) <= MEMORY))
        data = text.encode()
        address = min(address, BASE_ADDRESS + MEMORY - len(data))
        fields: dict[str, Any] = {"data": text}
    elif form == "list":
        fields = {"data": list(data)}
    elif form == "hex":
        fields = {"data": data.hex(), "encoding": "hex"}
    else:
        fields = {"data": base64.b64encode(data).decode(), "encoding": "base64"}
    return address, data, {"type": "WRITE", "address": address, **fields}


@settings(max_examples=200, deadline=None)
@given(st.lists(write_requests(), min_size=1, max_size=3))
def test_write_then_read_returns_written_bytes(writes: list[tuple[int, bytes, dict[str, Any]]]) -> None:
    registry = builtin_registry()
    ctx = SyscallContext(memory=KernelMemory(MEMORY))

    async def scenario() -> None:
        for address, data, request in writes:
            assert await registry.execute(ctx, request) == {"address": address, "written": len(data)}
            read = await registry.execute(ctx, {"type": "READ", "address": address, "size": len(data)})
            assert bytes.fromhex(read["data"]) == data

    asyncio.run(scenario())
