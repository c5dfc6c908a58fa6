"""arq functions as syscalls (`kernel_agent/syscalls/arq_bridge.py`) and the arq request shape
(`controlplane/protocol/arq.py`): what arq's worker does per job, without Redis."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from typing import Any

import pytest
from arq.worker import func

from controlplane.errors import InvalidRequest
from controlplane.protocol import arq as arq_protocol
from controlplane.protocol.jobs import encode_job, encode_result
from kernel_agent.agent.main import main as agent_main
from kernel_agent.syscalls import (
    Deferral,
    JobInfo,
    SyscallContext,
    SyscallError,
    arq_settings_in,
    builtin_registry,
    load_handlers,
)
from kernel_agent.syscalls.arq_bridge import ArqFunctions, load_arq_settings

pytestmark = [pytest.mark.unit, pytest.mark.timeout(20)]

SETTINGS = "examples.arq_worker.WorkerSettings"


@pytest.fixture
def registry() -> Iterator[Any]:
    reg = builtin_registry()
    ArqFunctions.load(SETTINGS).register(reg)
    yield reg


def ctx(job_try: int = 1) -> SyscallContext:
    return SyscallContext(kernel="k1", cluster="c1", job=JobInfo("j1", job_try, 1_700_000_000_000))


def call(name: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
    return arq_protocol.arq_request(name, args, kwargs)


async def test_functions_become_syscalls_with_the_default_capability(registry: Any) -> None:
    assert {"ADD", "FLAKY", "SLOW", "ECHO_AFTER", "WHOAMI"} <= set(registry.names())
    assert "arq" in registry.capabilities()
    assert await registry.execute(ctx(), call("add", 2, 3)) == {"result": 5}


async def test_retry_defers_with_the_next_try_until_max_tries(registry: Any) -> None:
    with pytest.raises(Deferral) as deferral:
        await registry.execute(ctx(1), call("flaky", "x"))
    assert (deferral.value.defer_ms, deferral.value.job_try, deferral.value.error_type) == (200, 2, "Retry")
    assert await registry.execute(ctx(2), call("flaky", "x")) == {"result": {"label": "x", "job_try": 2}}
    with pytest.raises(SyscallError, match="max 3 retries exceeded") as failed:  # func(max_tries=3)
        await registry.execute(ctx(4), call("flaky", "x"))
    assert failed.value.error_type == "JobExecutionFailed"


async def test_timeout_and_exceptions_fail_named_by_their_class(registry: Any) -> None:
    with pytest.raises(SyscallError) as timed_out:
        await registry.execute(ctx(), call("slow", 1.0))  # func(timeout=0.5)
    assert timed_out.value.error_type == "TimeoutError"
    with pytest.raises(SyscallError) as wrong:
        await registry.execute(ctx(), call("add", 1))  # a missing argument: the coroutine's TypeError
    assert wrong.value.error_type == "TypeError"
    with pytest.raises(SyscallError) as shape:
        await registry.execute(ctx(), {"type": "ADD", "args": 1})
    assert shape.value.error_type == "InvalidArguments"


async def test_startup_fills_the_ctx_each_job_sees() -> None:
    functions = ArqFunctions.load(SETTINGS)
    reg = builtin_registry()
    functions.register(reg)
    await functions.startup(redis="the-kernel-redis")
    got = await reg.execute(ctx(), call("whoami", note="n"))
    assert got == {"result": {"greeting": "hello", "job_id": "j1", "job_try": 1, "note": "n"}}
    assert functions.ctx["redis"] == "the-kernel-redis"
    await functions.shutdown()
    assert "greeting" not in functions.ctx


@pytest.fixture
def settings_module() -> Iterator[types.ModuleType]:
    module = types.ModuleType("kcp_test_arq_settings")
    sys.modules[module.__name__] = module
    yield module
    del sys.modules[module.__name__]


async def _noop(ctx: dict[str, Any]) -> None:
    return None


def _sync(ctx: dict[str, Any]) -> None:
    return None


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"functions": []}, "no functions"),
        ({"functions": [func(_noop, name="noop")], "cron_jobs": [object()]}, "cron_jobs are not run by kcp"),
        ({"functions": [_sync]}, "is not a coroutine function"),
        ({"functions": [func(_noop, name="has space")]}, "cannot be a kcp syscall"),
        ({"functions": [func(_noop, name="a"), func(_noop, name="A")]}, "two functions are named A"),
        (
            {"functions": [func(_noop, name="noop", max_tries=0)]},
            "max_tries must be an integer of at least 1",
        ),
        ({"functions": [func(_noop, name="noop")], "job_timeout": -1}, "job_timeout must be a non-negative"),
    ],
)
def test_bad_settings_are_refused_with_what_to_fix(
    settings_module: types.ModuleType, settings: dict[str, Any], message: str
) -> None:
    settings_module.Settings = settings  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match=message):
        ArqFunctions.load(f"{settings_module.__name__}.Settings")


def test_bad_paths_are_refused() -> None:
    with pytest.raises(ImportError, match="cannot import 'no_such_module'"):
        ArqFunctions.load("no_such_module.WorkerSettings")
    with pytest.raises(ValueError, match="has no 'Nope'"):
        ArqFunctions.load("examples.arq_worker.Nope")
    with pytest.raises(ValueError, match="dotted path"):
        ArqFunctions.load("WorkerSettings")


def test_the_agent_refuses_bad_arq_settings_without_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert agent_main(["--redis-url", "redis://127.0.0.1:1/0", "--arq-settings", "no_such_module.X"]) == 2
    err = capsys.readouterr().err
    assert "invalid --arq-settings: cannot import 'no_such_module'" in err and "Traceback" not in err


def test_arq_requests_refuse_what_json_cannot_carry() -> None:
    assert call("add", 1, b=2) == {"type": "ADD", "args": [1], "kwargs": {"b": 2}}
    with pytest.raises(InvalidRequest, match=r"ADD|add: argument 0 is not JSON-serialisable \(bytes"):
        call("add", b"raw")
    with pytest.raises(InvalidRequest, match="argument 'x' is not JSON-serialisable"):
        call("add", x=float("nan"))
    with pytest.raises(InvalidRequest, match="type must be 1 to 32 characters"):
        call("not a name")


def test_job_def_and_result_are_arqs_own_shapes() -> None:
    request = arq_protocol.arq_request("add", [1, 2], {}, score=1_700_000_000_500)
    raw = encode_job(request, job_try=2, enqueue_ms=1_700_000_000_000)
    info = arq_protocol.job_def(raw, "j1", 1_700_000_000_500)
    assert (info.function, info.args, info.kwargs, info.job_try, info.job_id) == ("ADD", (1, 2), {}, 2, "j1")
    assert round(info.enqueue_time.timestamp() * 1000) == 1_700_000_000_000
    ok = encode_result(
        job_id="j1",
        function="ADD",
        kernel="k1",
        queue="q",
        attempt=2,
        enqueue_ms=1,
        start_ms=2,
        finish_ms=3,
        value={"result": 3},
    )
    result = arq_protocol.job_result(ok)
    assert (result.success, result.result, result.job_try, result.function) == (True, 3, 2, "ADD")
    failed = encode_result(
        job_id="j1",
        function="ADD",
        kernel="k1",
        queue="q",
        attempt=1,
        enqueue_ms=1,
        start_ms=2,
        finish_ms=3,
        value=None,
        error="boom",
        error_type="ValueError",
    )
    assert arq_protocol.job_result(failed).result == {"error": "boom", "error_type": "ValueError"}


def test_a_handler_module_may_name_arq_settings(settings_module: types.ModuleType) -> None:
    settings_module.arq_settings = {"functions": [func(_noop, name="noop")]}  # type: ignore[attr-defined]
    reg = builtin_registry()
    load_handlers(reg, [settings_module.__name__])  # no register(registry) needed
    paths = arq_settings_in([settings_module.__name__, "examples.infer_handlers"])
    assert paths == [f"{settings_module.__name__}:arq_settings"]
    load_arq_settings(reg, paths)
    assert "NOOP" in reg.names()
    del settings_module.arq_settings  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="has no register\\(registry\\) function nor arq_settings"):
        load_handlers(reg, [settings_module.__name__])


def test_a_function_may_declare_its_own_capabilities(settings_module: types.ModuleType) -> None:
    async def infer(ctx: dict[str, Any]) -> int:
        return 1

    infer.kcp_capabilities = ["gpu"]  # type: ignore[attr-defined]
    settings_module.Settings = {
        "functions": [func(infer, name="infer"), func(_noop, name="noop")],
        "kcp_capabilities": "jobs",
    }  # type: ignore[attr-defined]
    reg = builtin_registry()
    ArqFunctions.load(f"{settings_module.__name__}.Settings").register(reg)
    declared = {d["name"]: d["capabilities"] for d in reg.describe()}
    assert (declared["INFER"], declared["NOOP"]) == (["gpu"], ["jobs"])
