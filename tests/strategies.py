"""Hypothesis strategies and budgets shared by the fuzz suites (protocol, client API, live Redis)."""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from controlplane.protocol.models import NAME_PATTERN


def budget(examples: int) -> settings:
    """`examples` in `make test`; the profile's (larger) budget under `make fuzz`."""
    fuzzing = settings.default.max_examples > 100
    return settings(
        max_examples=settings.default.max_examples if fuzzing else examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


tricky_text = st.one_of(
    st.text(max_size=80),
    st.sampled_from(["a*", "a:b", "{x}", "a b", "a\n", "\x00", "é", "worker-0\n", "-x", "x" * 65, "a/b", ""]),
    st.from_regex(NAME_PATTERN, fullmatch=True),
)
json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=10), inner, max_size=6),
    max_leaves=30,
)
syscall_type = st.one_of(
    st.sampled_from(["READ", "write", "ALLOC", "FREE", "OPEN", "CLOSE", "PING", "COMPUTE", "INFER", "nope!"]),
    st.text(max_size=40),
    st.integers(),
    st.none(),
)
field_names = st.sampled_from(
    ["address", "size", "data", "encoding", "path", "mode", "fd", "payload", "op", "other", "requires", "x"]
)
requests = st.one_of(
    st.fixed_dictionaries({"type": syscall_type}, optional={"requires": json_value}).flatmap(
        lambda base: st.dictionaries(field_names, json_value, max_size=5).map(lambda extra: {**extra, **base})
    ),
    st.dictionaries(st.text(max_size=10), json_value, max_size=5),
    json_value,
)
