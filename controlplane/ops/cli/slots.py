"""`kcp slots [balance|move]`: the kcp clusters on each master of a Redis Cluster, spread evenly.

    kcp slots                               per master: kcp clusters, slots, weight (a 5 s sample)
    kcp slots --window 0                    weighed by count, at once
    kcp slots balance --dry-run             the moves that would bring the masters within 1.25x
    kcp slots balance --ratio 1.2           ... made, live: dispatching goes on
    kcp slots move web --to 10.0.0.3:7002   the slot of kcp cluster `web` to that master (or node id)

A kcp cluster weighs the commands/s its dispatches over `--window` cost its master, or 1 when
none was dispatched in it; a master's base is its fleet-wide keys' commands/s, which no move
changes (`controlplane/ops/slots.py`). On a single Redis or Sentinel there are no slots: exit 2. A move
kcp refuses or that stops part-way (a master down, the slot migrating already) exits 1 and says
how the slot was left; the moves made before it stay.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from typing import Any

from controlplane.ops.cli.output import emit, non_negative_seconds, table
from controlplane.ops.slots import (
    COMMANDS,
    RATIO,
    WINDOW_S,
    Balance,
    Layout,
    Move,
    balance,
    cluster_client,
    move_cluster,
    read_layout,
)
from controlplane.protocol.keys import Keys

#: Names shown per master in the table; the rest are counted.
SHOWN_NAMES = 4


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a ratio such as 1.25, got {text!r}") from None
    if not value >= 1 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a ratio >= 1 (busiest master / idlest), got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    parser.description = (
        "Without an ACTION: the kcp clusters on each master of the Redis Cluster, their slots and "
        "weight (dispatches/s over --window, or count)."
    )
    window_help = f"seconds of dispatches to weigh each kcp cluster by (default {WINDOW_S:g}; 0: by count)"
    parser.add_argument("--window", type=non_negative_seconds, default=WINDOW_S, help=window_help)
    sub = parser.add_subparsers(dest="action", metavar="ACTION")  # none: show the layout
    add = functools.partial(sub.add_parser, parents=[common])
    spread = add(
        "balance",
        help="move kcp clusters' slots live until the busiest master is within --ratio of the idlest",
        description="Weigh the kcp clusters, plan the slot moves that bring the busiest master's weight "
        "within --ratio of the idlest's (greedy: few moves), and make them live.",
    )
    spread.add_argument(
        "--ratio", type=_ratio, default=RATIO, help=f"target busiest / idlest master (default {RATIO})"
    )
    spread.add_argument("--dry-run", action="store_true", help="print the plan, move nothing")
    # SUPPRESS: without it, the default here would override `kcp slots --window N balance`
    spread.add_argument("--window", type=non_negative_seconds, default=argparse.SUPPRESS, help=window_help)
    move = add("move", help="move one kcp cluster's slot (and any kcp cluster sharing it) to a master")
    move.add_argument("cluster", help="kcp cluster name")
    move.add_argument(
        "--to", required=True, help="the master: host:port or node id (a unique prefix will do)"
    )


def _ratio_text(value: float) -> str:
    return f"{value:.2f}x" if math.isfinite(value) else "inf (a master holds none)"


def _weight(value: float, unit: str) -> str:
    return f"{value:.0f}" if unit == COMMANDS else f"{value:g}"


def _layout_text(layout: Layout) -> str:
    count = sum(len(m.clusters) for m in layout.masters)
    by = (
        "commands/s (from their dispatches/s; BASE: the master's fleet-wide keys, which stay)"
        if layout.unit == COMMANDS
        else "count (no dispatches in the window)"
    )
    rows = []
    for m in layout.masters:
        names = m.clusters
        more = f" +{len(names) - SHOWN_NAMES}" if len(names) > SHOWN_NAMES else ""
        shown = ", ".join(names[:SHOWN_NAMES]) + more
        weight, base = _weight(m.weight, layout.unit), _weight(m.base, layout.unit)
        rows.append((m.address, m.node_id[:8], len(names), len(m.slots), weight, base, shown))
    lines = [
        f"{count} kcp clusters on {len(layout.masters)} masters, weighed by {by}: "
        f"busiest / idlest master {_ratio_text(layout.spread)}",
        table(rows, ("MASTER", "NODE", "KCP CLUSTERS", "SLOTS", "WEIGHT", "BASE", "NAMES")),
    ]
    lines += [
        f"slot {s.slot} holds {len(s.clusters)} kcp clusters (they move together): {', '.join(s.clusters)}"
        for s in layout.shared
    ]
    lines += [f"slot {slot} is migrating: {'; '.join(said)}" for slot, said in layout.migrating.items()]
    return "\n".join(lines)


def _move_json(move: Move) -> dict[str, Any]:
    return {
        "slot": move.slot,
        "clusters": list(move.clusters),
        "weight": move.weight,
        "from": move.source,
        "to": move.target,
    }


def _move_line(move: Move, unit: str, verb: str) -> str:
    weight = f"; {_weight(move.weight, unit)} {unit}" if unit == COMMANDS else ""
    return f"{verb} slot {move.slot} ({', '.join(move.clusters)}{weight}) {move.source} -> {move.target}"


def _balance_json(result: Balance) -> dict[str, Any]:
    before, after = result.before.to_json(), result.after.to_json()
    return {
        "dry_run": result.dry_run,
        "ratio": result.ratio,
        "moves": [_move_json(m) for m in result.moves],
        "spread_before": before["spread"],
        "spread_after": after["spread"],
        "reached": result.reached,
        "seconds": round(result.seconds, 3),
        "before": before,
        "after": after,
    }


def _balance_text(result: Balance) -> str:
    before, after = result.before, result.after
    lines = [_move_line(m, before.unit, "would move") for m in result.moves] if result.dry_run else []
    if not result.moves:
        fits = "within" if result.reached else "not within"
        why = "" if result.reached else ": no slot move improves it (whole slots move, not parts)"
        spread = _ratio_text(before.spread)
        lines.append(f"busiest / idlest master by {before.unit} {spread}, {fits} {result.ratio:g}x{why}")
        return "\n".join(lines)
    moved = f"{len(result.moves)} slot(s) {'to move' if result.dry_run else 'moved'}"
    took = "" if result.dry_run else f" in {result.seconds:.2f}s"
    short = "" if result.reached else " (as close as moving whole slots gets)"
    lines.append(
        f"busiest / idlest master by {before.unit} {_ratio_text(before.spread)} -> "
        f"{_ratio_text(after.spread)}{short}, target {result.ratio:g}x: {moved}{took}"
    )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """`kcp slots ...`; its errors (NotRedisCluster: exit 2, ReshardError: 1, Redis errors) reach
    `kcp`'s one report."""
    keys = Keys(args.settings.prefix)
    with cluster_client(args.settings) as client:
        if args.action == "move":
            done = move_cluster(client, keys, args.cluster, args.to)
            data = {
                "cluster": args.cluster,
                "to": args.to,
                "move": None if done is None else _move_json(done),
            }
            emit(
                args,
                data,
                lambda d: (
                    f"kcp cluster {args.cluster} is on {args.to} already"
                    if done is None
                    else _move_line(done, "", "moved")
                ),
            )
            return 0
        if not args.json and args.window > 0:
            print(f"weighing the kcp clusters over {args.window:g}s ...", file=sys.stderr, flush=True)
        if args.action is None:
            layout = read_layout(client, keys, window=args.window)
            emit(args, layout.to_json(), lambda _: _layout_text(layout))
            return 0

        def told(move: Move, unit: str) -> None:
            if not args.json and not args.dry_run:
                print(_move_line(move, unit, "moved"), flush=True)

        result = balance(
            client, keys, ratio=args.ratio, window=args.window, dry_run=args.dry_run, on_move=told
        )
    emit(args, _balance_json(result), lambda _: _balance_text(result))
    return 0
