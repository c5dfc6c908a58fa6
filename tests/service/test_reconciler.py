"""The reason a cluster gives when its kernels cannot all be placed (what `kcp cluster create` prints)."""

from __future__ import annotations

from collections import Counter

import pytest

from controlplane.protocol.records import AgentRecord
from controlplane.service.detector import Fleet
from controlplane.service.reconciler import shortfall

pytestmark = pytest.mark.unit


def fleet(
    *agents: tuple[str, int, str], used: dict[str, int] | None = None, dead: tuple[str, ...] = ()
) -> Fleet:
    records = {name: AgentRecord(name=name, slots=slots, capabilities=caps) for name, slots, caps in agents}
    return Fleet(agents=records, alive=frozenset(records) - set(dead), assigned=Counter(used or {}))


@pytest.mark.parametrize(
    ("fleet_", "required", "reason"),
    [
        (
            fleet(("a1", 3, ""), ("a2", 3, ""), used={"a1": 3, "a2": 3}),
            set(),
            "6 of 12 placed: no agent has a free slot; free slots: 0 on 2 agents",
        ),
        (fleet(("a1", 4, "infer")), {"gpu"}, "6 of 12 placed: no agent offers capability gpu"),
        (
            fleet(("a1", 4, "gpu"), ("a2", 4, "infer")),
            {"gpu", "infer"},
            "6 of 12 placed: no agent offers capabilities gpu, infer together",
        ),
        (
            fleet(("a1", 2, "gpu"), ("a2", 4, ""), used={"a1": 2}),
            {"gpu"},
            "6 of 12 placed: no agent with capabilities gpu has a free slot; free slots: 0 on 1 agent",
        ),
        (
            fleet(("a1", 4, ""), dead=("a1",)),
            set(),
            "6 of 12 placed: no live agent (start one with `kcp agent`)",
        ),
        (fleet(), set(), "6 of 12 placed: no live agent (start one with `kcp agent`)"),
    ],
)
def test_the_reason_says_how_many_are_placed_and_why(fleet_: Fleet, required: set[str], reason: str) -> None:
    assert shortfall(12, 6, required, fleet_) == reason
