"""`controlplane/ops/slots.py` and `kcp slots`: the planner (a pure function, no Redis) and, on
the session's 3-master Redis Cluster, the weighing of kcp clusters by their stats counters,
`balance` carried out live under dispatching kcp clients (`kcp serve`, a `kcp agent`, real
kernels), and the CLI's output and exit codes (its single-Redis cases: tests/ops/test_cli.py)."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Iterator
from dataclasses import replace

import pytest
import redis
from conftest import ProcessStack, wait_for
from hypothesis import given
from hypothesis import strategies as st

from controlplane import KcpClient, Settings
from controlplane.errors import EXIT_FAILED
from controlplane.ops.cli.main import main
from controlplane.ops.redis_server import RedisClusterProcess
from controlplane.ops.slots import (
    COMMANDS,
    COUNT,
    Layout,
    MasterLoad,
    SlotLoad,
    balance,
    cluster_client,
    plan,
    spread,
    weigh,
)
from controlplane.protocol import stats
from controlplane.protocol.keys import Keys
from controlplane.protocol.models import ClusterConfig
from controlplane.redis.connect import SyncRedis, connect, connect_sync
from controlplane.redis.slots import CLUSTER_SLOTS, read_table, slot_of
from controlplane.redis.state import State

KEYS = Keys()


def _layout(*masters: list[float], unit: str = COUNT) -> Layout:
    """Masters m0, m1, ... each holding one slot per weight given (slot numbers in order)."""
    slot = iter(range(CLUSTER_SLOTS))
    return Layout(
        tuple(
            MasterLoad(f"id{i}", f"m{i}", tuple(SlotLoad(s := next(slot), (f"k{s}",), w) for w in weights))
            for i, weights in enumerate(masters)
        ),
        unit,
    )


def _counts(layout: Layout) -> list[float]:
    return [m.weight for m in layout.masters]


# ------------------------------------------------------------------ the planner
@pytest.mark.unit
@pytest.mark.timeout(10)
def test_spread_is_the_busiest_over_the_idlest() -> None:
    assert spread([13, 9, 8]) == pytest.approx(1.625)
    assert spread([2, 0, 0]) == math.inf
    assert spread([0, 0]) == 1.0
    assert spread([]) == 1.0


@pytest.mark.unit
@pytest.mark.timeout(10)
def test_thirty_clusters_hashed_13_9_8_need_two_moves_for_1_25_and_three_for_even() -> None:
    layout = _layout([1.0] * 13, [1.0] * 9, [1.0] * 8)
    moves = plan(layout, 1.25)
    assert [(m.source, m.target) for m in moves] == [("m0", "m2"), ("m0", "m1")]
    assert _counts(layout.moved(moves)) == [11, 10, 9]
    assert layout.moved(moves).spread == pytest.approx(11 / 9)
    even = plan(layout, 1.0)
    assert len(even) == 3
    assert _counts(layout.moved(even)) == [10, 10, 10]


@pytest.mark.unit
@pytest.mark.timeout(10)
def test_a_layout_within_the_ratio_moves_nothing() -> None:
    assert plan(_layout([1.0] * 10, [1.0] * 9, [1.0] * 9), 1.25) == []


@pytest.mark.unit
@pytest.mark.timeout(10)
def test_the_move_that_leaves_the_best_spread_wins_not_the_heaviest_slot() -> None:
    # m0 = 10 + 4 + 2 = 16, m1 = 8: moving 4 gives 12/12; moving 10 would give 6/18
    layout = _layout([10.0, 4.0, 2.0], [8.0])
    (move,) = plan(layout, 1.1)
    assert move.weight == 4.0
    assert layout.moved([move]).spread == 1.0


@pytest.mark.unit
@pytest.mark.timeout(10)
def test_a_target_out_of_reach_stops_at_the_best_whole_slot_moves() -> None:
    # one busy kcp cluster outweighs the rest: moving it only swaps which master is busiest
    layout = _layout([30.0, 1.0], [1.0], [1.0])
    moves = plan(layout, 1.25)
    assert len(moves) <= 1
    assert layout.moved(moves).spread <= layout.spread
    # two on one master, two masters empty: 1/1/0 is as good as slots get (a zero stays)
    assert _counts(_layout([1.0, 1.0], [], []).moved(plan(_layout([1.0, 1.0], [], []), 1.25))) == [1, 1, 0]


@pytest.mark.unit
@pytest.mark.timeout(10)
def test_idle_kcp_clusters_never_move_and_a_shared_slot_moves_whole() -> None:
    shared = SlotLoad(7, ("a", "b"), 3.0)
    layout = Layout(
        (
            MasterLoad("id0", "m0", (shared, SlotLoad(8, ("idle",), 0.0), SlotLoad(9, ("x",), 5.0))),
            MasterLoad("id1", "m1", (SlotLoad(10, ("y",), 2.0),)),
        ),
        COMMANDS,
    )
    (move,) = plan(layout, 1.25)
    assert (move.slot, move.clusters, move.source, move.target) == (7, ("a", "b"), "m0", "m1")
    assert layout.shared == [shared]
    after = layout.moved([move])
    assert after.spread == 1.0
    assert after.masters[0].clusters == ["idle", "x"] and after.masters[1].clusters == ["a", "b", "y"]
    # an idle one alone on a master with busy ones elsewhere: moving it changes nothing, so it stays
    assert plan(_layout([0.0], [5.0], [5.0]), 1.25) == []


@pytest.mark.unit
@pytest.mark.timeout(30)
@given(
    st.lists(
        st.lists(st.floats(0, 100, allow_nan=False).map(lambda w: round(w, 1)), max_size=12),
        min_size=1,
        max_size=5,
    ),
    st.floats(1.0, 3.0),
)
def test_every_planned_move_improves_the_spread_and_the_plan_stops_at_the_target(
    masters: list[list[float]], ratio: float
) -> None:
    layout = _layout(*masters)
    moves = plan(layout, ratio)
    slots = sum(len(m) for m in masters)
    assert len(moves) <= slots * len(masters)
    current = layout
    for i, move in enumerate(moves):
        assert current.spread > ratio, "no move once the target is met"
        following = current.moved([move])
        worst = (following.spread, max(_counts(following)))
        assert worst <= (current.spread, max(_counts(current))), f"move {i} made it worse"
        current = following
    assert current.spread == pytest.approx(layout.moved(moves).spread)


# ------------------------------------------------------------------ on the session's Redis Cluster
@pytest.fixture
def restored(redis_cluster: RedisClusterProcess) -> Iterator[RedisClusterProcess]:
    """The session cluster, every slot moved back to its master at teardown."""
    owners = _owners(redis_cluster)
    yield redis_cluster
    by_port = {m.port: m for m in redis_cluster.masters()}
    for slot, _ in sorted(set(_owners(redis_cluster).items()) - set(owners.items())):
        redis_cluster.move_slot(slot, by_port[owners[slot]])


def _owners(cluster: RedisClusterProcess) -> dict[int, int]:
    with connect_sync(cluster.url) as client:
        table = read_table(client)
    return {s: m.port for m in table.masters() for a, b in m.ranges for s in range(a, b + 1)}


def names_on_one_master(cluster: RedisClusterProcess, count: int) -> list[str]:
    """`count` kcp cluster names whose slots are all on the first master, each in its own slot."""
    home = cluster.masters()[0].port
    names, slots = [], set()
    for i in range(10_000):
        name, slot = f"hot{i}", slot_of(KEYS.cluster(f"hot{i}"))
        if slot not in slots and cluster.master_of_slot(slot).port == home:
            names.append(name)
            slots.add(slot)
        if len(names) == count:
            return names
    raise AssertionError("not enough names")


@pytest.fixture
def client(redis_cluster_url: str) -> Iterator[SyncRedis]:
    with cluster_client(Settings(redis_url=redis_cluster_url)) as c:
        yield c


@pytest.mark.integration
@pytest.mark.timeout(30)
def test_weights_are_commands_per_second_from_the_dispatches_or_one_each(client: SyncRedis) -> None:
    names = ["busy", "quiet", "idle"]
    client.sadd(KEYS.clusters(), *names)
    homes = {"m": names}  # one master: its commands are all its kcp clusters' (no base)

    def window(seconds: float) -> None:  # what kernels write as they finish jobs, during the window
        client.hincrby(KEYS.cluster_stats("busy"), stats.DISPATCHES, 300)
        client.hincrby(KEYS.cluster_stats("quiet"), stats.DISPATCHES, 100)

    weights = weigh(client, KEYS, homes, 1.0, sleep=window)
    assert weights.unit == COMMANDS
    assert weights.clusters["busy"] == pytest.approx(3 * weights.clusters["quiet"])
    assert weights.clusters["idle"] == 0.0
    counted = weigh(client, KEYS, homes, 1.0, sleep=lambda s: None)
    assert (counted.clusters, counted.unit, counted.base) == (dict.fromkeys(names, 1.0), COUNT, {})
    assert weigh(client, KEYS, homes, 0.0).clusters == dict.fromkeys(names, 1.0)


@pytest.mark.unit
@pytest.mark.timeout(10)
def test_a_masters_base_stays_put_and_the_plan_balances_around_it() -> None:
    # equal kcp clusters, but m0 also serves the fleet-wide keys: it ends up with fewer of them
    layout = _layout([1.0] * 10, [1.0] * 10, [1.0] * 10)
    based = Layout((replace(layout.masters[0], base=4.0), *layout.masters[1:]), COMMANDS)
    moves = plan(based, 1.1)
    after = based.moved(moves)
    assert after.masters[0].base == 4.0
    assert [len(m.clusters) for m in after.masters] == [8, 11, 11]
    assert after.spread == pytest.approx(12 / 11)


@pytest.mark.system
@pytest.mark.timeout(180)
async def test_balance_moves_kcp_clusters_live_while_clients_dispatch(
    restored: RedisClusterProcess, redis_cluster_url: str
) -> None:
    names = names_on_one_master(restored, 6)
    stack = ProcessStack(redis_cluster_url)
    stack.serve()
    stack.agent("a1", 6)
    answered, failed = 0, []
    try:
        async with KcpClient(Settings(redis_url=redis_cluster_url, ready_timeout=90)) as kcp:
            for name in names:
                await kcp.create_cluster(name, 1, wait=0)

            async def running() -> bool:
                return all(c.running == 1 for c in await kcp.list_clusters())

            await wait_for(running, 90, "a kernel running in every kcp cluster")
            stop = asyncio.Event()

            async def dispatching(offset: int) -> None:
                nonlocal answered
                i = offset
                while not stop.is_set():
                    try:
                        await kcp.dispatch(names[i % len(names)], {"type": "PING"})
                        answered += 1
                    except Exception as exc:  # counted: the assertion below names them
                        failed.append(repr(exc))
                    i += 1

            loops = [asyncio.create_task(dispatching(k)) for k in range(3)]
            try:
                with cluster_client(Settings(redis_url=redis_cluster_url)) as client:
                    result = await asyncio.to_thread(balance, client, KEYS, ratio=1.5, window=1.0)
                    before_stop = answered
                    await asyncio.sleep(0.5)  # dispatching goes on after the moves
            finally:
                stop.set()
                await asyncio.gather(*loops)
            assert result.before.unit == COMMANDS
            assert sorted(len(m.clusters) for m in result.before.masters) == [0, 0, 6]
            assert result.moves and result.reached, result
            assert result.after.spread < result.before.spread
            await asyncio.to_thread(restored.wait_ok)  # every node agrees on the new owners
            for move in result.moves:
                (name,) = move.clusters
                assert restored.master_of_key(KEYS.cluster(name)).url.endswith(f"{move.target}/0")
                assert (await kcp.dispatch(name, {"type": "PING"})).result  # its kernel serves it there
            assert not failed, failed[:3]
            assert answered > before_stop > 0
    finally:
        stack.stop()


# ------------------------------------------------------------------ `kcp slots` on the cluster
def _kcp(capsys: pytest.CaptureFixture[str], url: str, *argv: str) -> tuple[int, str, str]:
    code = main(["--redis-url", url, *argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


async def _create(url: str, names: list[str]) -> None:
    redis = connect(url)
    try:
        for name in names:
            await State(redis, KEYS).create_cluster(name, ClusterConfig(), 1)
    finally:
        await redis.aclose()


@pytest.mark.integration
@pytest.mark.timeout(60)
async def test_kcp_slots_shows_plans_balances_and_moves_one(
    restored: RedisClusterProcess, redis_cluster_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    names = names_on_one_master(restored, 6)
    await _create(redis_cluster_url, names)
    home = f"{restored.masters()[0].host}:{restored.masters()[0].port}"

    code, out, _ = _kcp(capsys, redis_cluster_url, "slots", "--window", "0")
    assert code == 0 and "busiest / idlest master inf" in out and home in out
    code, out, _ = _kcp(capsys, redis_cluster_url, "--json", "slots", "--window", "0")
    shown = json.loads(out)
    assert code == 0 and shown["unit"] == COUNT and shown["spread"] is None
    assert {m["address"]: len(m["kcp_clusters"]) for m in shown["masters"]}[home] == 6

    code, out, _ = _kcp(capsys, redis_cluster_url, "slots", "balance", "--dry-run", "--window", "0")
    assert code == 0 and out.count("would move slot") == 4 and "-> 1.00x" in out
    assert {restored.master_of_key(KEYS.cluster(n)).port for n in names} == {restored.masters()[0].port}

    code, out, _ = _kcp(capsys, redis_cluster_url, "--json", "slots", "balance", "--window", "0")
    done = json.loads(out)
    assert code == 0 and done["reached"] and done["spread_after"] == 1.0 and len(done["moves"]) == 4
    restored.wait_ok()  # every node agrees on the new owners (replicas learn them by gossip)
    for move in done["moves"]:
        (name,) = move["clusters"]
        assert restored.master_of_key(KEYS.cluster(name)).url.endswith(f"{move['to']}/0")
    code, out, _ = _kcp(capsys, redis_cluster_url, "slots", "balance", "--window", "0")
    assert code == 0 and "1.00x, within 1.25x" in out

    code, out, _ = _kcp(capsys, redis_cluster_url, "slots", "move", names[0], "--to", home)
    assert code == 0 and out.startswith(f"moved slot {slot_of(KEYS.cluster(names[0]))} ({names[0]})")
    restored.wait_ok()
    assert restored.master_of_key(KEYS.cluster(names[0])).port == restored.masters()[0].port
    code, out, _ = _kcp(capsys, redis_cluster_url, "slots", "move", names[0], "--to", home)
    assert code == 0 and "already" in out
    code, _, err = _kcp(capsys, redis_cluster_url, "slots", "move", "nosuch", "--to", home)
    assert code == EXIT_FAILED and "cluster 'nosuch' does not exist" in err
    code, out, _ = _kcp(capsys, redis_cluster_url, "--json", "slots", "move", names[0], "--to", "nowhere:1")
    error = json.loads(out)
    assert (code, error["error_type"]) == (EXIT_FAILED, "ReshardError") and "no master named" in error[
        "error"
    ]


@pytest.mark.integration
@pytest.mark.timeout(60)
async def test_kcp_slots_refuses_a_slot_migrating_already_and_shows_it(
    restored: RedisClusterProcess, redis_cluster_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    (name,) = names_on_one_master(restored, 1)
    await _create(redis_cluster_url, [name])
    slot = slot_of(KEYS.cluster(name))
    home, target, third = restored.masters()
    with redis.Redis.from_url(home.url) as src, redis.Redis.from_url(target.url) as dst:
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", restored.node_id(home))
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", restored.node_id(target))
    try:
        code, out, _ = _kcp(capsys, redis_cluster_url, "slots", "--window", "0")
        assert code == 0 and f"slot {slot} is migrating" in out
        code, _, err = _kcp(
            capsys, redis_cluster_url, "slots", "move", name, "--to", f"{third.host}:{third.port}"
        )
        assert code == EXIT_FAILED and f"slot {slot} is already migrating" in err
        assert "redis-cli --cluster fix" in err
    finally:
        restored.move_slot(slot, target)  # the move left open, finished (the fixture moves it back)
