"""Fuzzing the interfaces people call: the dict API (`OrchestrationTools`) and the CLI.

Against the session's real redis-server with no control plane running: every call returns
(a dict, or an exit code), bad input gets ``InvalidRequest`` / exit 2 and writes nothing,
and no key with an unsafe name ever appears.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import budget, json_value, requests, tricky_text

from controlplane import OrchestrationConfig, OrchestrationTools, Settings
from controlplane.client.core import validate_name
from controlplane.ops.cli.main import main as kcp_main
from controlplane.protocol.keys import Keys

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(120 if settings.default.max_examples <= 100 else 1800),
]

#: Every key kcp may write: the prefix, then safe name characters and separators only, with at
#: most one name in braces (the hash tag of a key that belongs to one cluster).
SAFE_KEY = re.compile(r"kcp:[A-Za-z0-9_.:/-]+(\{[A-Za-z0-9_./-]+\}[A-Za-z0-9_.:/-]*)?")
FAILURES = {"InvalidRequest", "ClusterExists", "ClusterNotFound", "NoKernelAvailable"}

counts = st.one_of(
    st.integers(min_value=-5, max_value=300),
    st.sampled_from([True, False, None, 1.5, "3", 10**30, -(10**30)]),
)
configs = st.one_of(
    st.none(),
    st.dictionaries(
        st.sampled_from(
            ["min_kernels", "max_kernels", "auto_scale", "capabilities", "scale_up_threshold", "x"]
        ),
        json_value,
        max_size=4,
    ),
    json_value,
)
names = st.one_of(tricky_text, st.integers(), st.none())


class Api:
    """One OrchestrationTools on one event loop, driven synchronously from hypothesis examples."""

    def __init__(self, redis_url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.tools = OrchestrationTools(
            Settings(redis_url=redis_url, ready_timeout=0),
            orchestration=OrchestrationConfig(timeout_ms=100, retry_count=0),
        )

    def __call__(self, method: str, *args: Any) -> dict[str, Any]:
        result = self.loop.run_until_complete(getattr(self.tools, method)(*args))
        assert isinstance(result, dict), result
        if result.get("success") is False:
            assert result["error_type"] in FAILURES, result
            assert result["error"] and "Traceback" not in result["error"], result
        return result

    def close(self) -> None:
        self.loop.run_until_complete(self.tools.aclose())
        self.loop.close()


@pytest.fixture
def api(redis_url: str) -> Iterator[Api]:
    api = Api(redis_url)
    yield api
    api.close()
    with redis.Redis.from_url(redis_url, decode_responses=True) as r:
        unsafe = [k for k in r.scan_iter(count=1000) if not SAFE_KEY.fullmatch(k)]
    assert unsafe == [], unsafe


def _valid_name(name: object) -> bool:
    try:
        validate_name(name)
    except ValueError:
        return False
    return True


def test_dict_api_create_and_scale(api: Api) -> None:
    @budget(60)
    @given(name=names, count=counts, config=configs, target=counts)
    def run(name: Any, count: Any, config: Any, target: Any) -> None:
        created = api("create_cluster", name, count, config)
        if created.get("success"):
            assert _valid_name(name) and created["cluster_name"] == name and created["kernel_count"] == count
            assert type(count) is int and 0 <= count <= 256
        elif not _valid_name(name) or type(count) is not int:
            assert created["error_type"] == "InvalidRequest", created
        scaled = api("scale_cluster", name, target)
        if scaled.get("success"):
            assert type(target) is int and scaled["new_count"] == target
        elif not _valid_name(name) or (created.get("success") and type(target) is not int):
            assert scaled["error_type"] in ("InvalidRequest", "ClusterNotFound"), scaled
        metrics = api("get_metrics", name)
        assert metrics.get("success") or metrics["error_type"] in ("InvalidRequest", "ClusterNotFound")

    run()
    listed = api("list_clusters")
    assert listed["count"] == len(listed["clusters"]) and all(
        _valid_name(c["name"]) for c in listed["clusters"]
    )


def test_dict_api_dispatch(api: Api) -> None:
    assert api("create_cluster", "fuzz", 1)["success"]  # no control plane: it never gets a kernel

    @budget(80)
    @given(cluster=st.one_of(names, st.just("fuzz"), st.just("absent")), request=requests)
    def run(cluster: Any, request: Any) -> None:
        result = api("dispatch", cluster, request)
        assert result.get("success") is False, "no kernel runs anywhere"
        if not _valid_name(cluster) or not isinstance(request, dict):
            assert result["error_type"] == "InvalidRequest", result

    run()


# ------------------------------------------------------------------ the CLI's exit codes


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        (["cluster", "create", "bad:name"], 2),
        (["cluster", "create", "a*"], 2),
        (["cluster", "create", "ok", "--kernels", "-1"], 2),
        (["cluster", "create", "ok", "--kernels", "100000"], 2),
        (["cluster", "create", "ok", "--config", '{"min_kernels": 5, "max_kernels": 2}'], 2),
        (["cluster", "create", "ok", "--config", '{"nope": 1}'], 2),
        (["cluster", "scale", "x y", "3"], 2),
        (["cluster", "destroy", "{x}"], 2),
        (["dispatch", "c", "not json"], 2),
        (["dispatch", "c", "[1, 2]"], 2),
        (["dispatch", "c", '{"type": "READ", "address": -1, "size": 4}'], 2),
        (["dispatch", "c", '{"type": "READ", "address": 0, "size": 0}'], 2),
        (["dispatch", "c", '{"type": "bad type!"}'], 2),
        (["dispatch", "c", '{"type": "PING\\n"}'], 2),
        (["dispatch", "c\n", '{"type": "PING"}'], 2),
        (["metrics", "no:such"], 2),
        (["dispatch", "absent", '{"type": "PING"}'], 1),
        (["cluster", "list"], 0),
    ],
)
def test_cli_exit_codes(
    argv: list[str],
    code: int,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("KCP_READY_TIMEOUT", "0")
    assert kcp_main(["--redis-url", redis_url, *argv]) == code
    err = capsys.readouterr().err
    assert ("Traceback" not in err) and (code == 0 or err.startswith("kcp: ")), err
    with redis.Redis.from_url(redis_url) as r:
        # bad input changes nothing; a refused dispatch is only counted (kcp_dispatch_rejected_total)
        assert code != 2 or {k.decode() for k in r.scan_iter()} <= {Keys().rejections()}, (
            "bad input changed nothing"
        )
