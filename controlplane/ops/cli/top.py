"""`kcp status` (one-shot tables) and `kcp top` (a live view), both rendered from one `Snapshot`.

`kcp top` redraws in place with plain ANSI escapes (cursor home, clear to end) when stdout is
a terminal, and prints frames one after another otherwise. Rates and p99 latencies are
computed between two frames from the counters and histogram buckets in Redis; events are
what changed between frames (kernels placed, lost, restarted elsewhere, status changes,
failover counters). A repeated event is one line with a count, so a burst of routine events
(work stealing, retries) cannot scroll an agent's death off the pane. An agent or kernel lost to
a lapsed lease stays listed (LAPSED, lost) until the leader's retention passes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import signal
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TextIO

from controlplane.client.core import ClusterInfo, KcpClient
from controlplane.ops.cli.output import table
from controlplane.protocol import stats
from controlplane.protocol.models import KernelState
from controlplane.redis.snapshot import ClusterView, KernelView, Snapshot, read_snapshot

#: Event counters of the cluster stats hash that `kcp top` reports when they grow.
_EVENT_WORDS = {
    stats.KERNELS_LOST: "kernel(s) lost with their agent",
    stats.JOBS_REQUEUED: "job(s) of lost kernels requeued",
    stats.RETRIES: "dispatch retry(ies)",
    stats.FAILOVERS: "failover(s) to another kernel",
    stats.EJECTIONS: "kernel ejection(s)",
    stats.STEALS: "job(s) taken over by an idle kernel",
    stats.SCALE_UP: "scale-up request(s)",
    stats.SCALE_DOWN: "scale-down request(s)",
}
CLEAR = "\x1b[H\x1b[J"  # cursor home, clear to the end of the screen


def _pct(x: float, digits: int = 0) -> str:
    return f"{x:.{digits}%}"


def cluster_info(view: ClusterView) -> ClusterInfo:
    return ClusterInfo.of(view.record, [k.record for k in view.kernels])


def _agentstable(snap: Snapshot) -> str:
    if not snap.agents and not snap.lapsed_agents:
        return "no agents"
    used: dict[str, int] = {}
    for _, k in snap.kernels():
        if k.record.state is not KernelState.STOPPED:
            used[k.record.agent] = used.get(k.record.agent, 0) + 1
    rows = [
        (
            a.record.name,
            a.record.host,
            "up" if a.alive else "DOWN",
            f"{used.get(a.record.name, 0)}/{a.record.slots}",
            a.record.capabilities or "-",
        )
        for a in snap.agents
    ]
    for gone in snap.lapsed_agents:  # forgotten by the leader after its lease lapsed
        ago = max(snap.taken_at - gone.record.last_seen, 0.0)
        rows.append((gone.name, gone.record.host, f"LAPSED {ago:.0f}s ago", f"0/{gone.record.slots}", "-"))
    return table(rows, ("AGENT", "HOST", "LEASE", "KERNELS", "CAPABILITIES"))


# ------------------------------------------------------------------ kcp status
def render_status(snap: Snapshot) -> str:
    out = _agentstable(snap) + "\n\n"
    out += (
        table(
            [
                (c.record.name, c.record.status.value, f"{c.running}/{c.record.desired}", c.record.reason)
                for c in snap.clusters
            ],
            ("CLUSTER", "STATUS", "KERNELS", "REASON"),
        )
        if snap.clusters
        else "no clusters"
    )
    rows = []
    for c, k in snap.kernels():
        load = k.load
        rows.append(
            (
                c.record.name,
                k.record.name,
                k.record.agent,
                k.record.state.value,
                k.record.pid or "-",
                _pct(load.cpu) if load else "-",
                _pct(load.memory, 2) if load else "-",
                load.queue_depth if load else "-",
                f"{load.latency_ms:.1f}" if load else "-",
            )
        )
    if rows:
        out += "\n\n" + table(
            rows, ("CLUSTER", "KERNEL", "AGENT", "STATE", "PID", "CPU", "MEM", "QUEUE", "LAT_MS")
        )
    return out


async def status_command(args: argparse.Namespace, kcp: KcpClient) -> int:
    """`kcp status`: agents, clusters and kernels, once."""
    snap = await read_snapshot(kcp.state)
    if args.json:
        data = {
            "agents": [{**a.record.model_dump(), "alive": a.alive} for a in snap.agents],
            "clusters": [cluster_info(c).model_dump(mode="json") for c in snap.clusters],
        }
        print(json.dumps(data, indent=2, default=str))
    else:
        print(render_status(snap))
    return 0


# ------------------------------------------------------------------ kcp top
@dataclass(slots=True)
class Event:
    """One line of the EVENTS pane: an event and its repeats since it first happened."""

    what: str  # the event, e.g. "agent a1 lease EXPIRED" or "cluster c: {n} retries"
    first: str  # clock time of the first occurrence
    last: str = ""  # of the latest
    times: int = 1  # occurrences
    amount: int = 0  # for counted events: the counts summed

    def render(self) -> str:
        line = f"{self.last or self.first}  {self.what.replace('{n}', str(self.amount))}"
        return line + (f"  (x{self.times} since {self.first})" if self.times > 1 else "")


class Events:
    """The last `size` distinct events; a repeat updates its line (and moves it to the bottom)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._lines: OrderedDict[str, Event] = OrderedDict()

    def add(self, at: str, what: str, amount: int = 0) -> None:
        event = self._lines.pop(what, None)
        if event is None:
            event = Event(what, at, amount=amount)
        else:
            event.last, event.times, event.amount = at, event.times + 1, event.amount + amount
        self._lines[what] = event
        while len(self._lines) > self.size:
            self._lines.popitem(last=False)

    def lines(self) -> list[str]:
        return [e.render() for e in self._lines.values()]


class TopView:
    """Frames of `kcp top`: keeps the previous snapshot for rates, p99s and events."""

    def __init__(self, max_events: int = 8) -> None:
        self.previous: Snapshot | None = None
        self.events = Events(max_events)

    def frame(self, snap: Snapshot, *, source: str = "") -> str:
        prev = self.previous
        if prev is not None:
            self._diff(prev, snap)
        self.previous = snap
        span = snap.taken_at - prev.taken_at if prev else 0.0
        clock = time.strftime("%H:%M:%S", time.localtime(snap.taken_at))
        parts = [f"kcp top  {clock}  {source}".rstrip(), _agentstable(snap)]
        parts.append(self._clusters(snap, prev, span) if snap.clusters else "no clusters")
        kernels = self._kernels(snap, prev)
        if kernels:
            parts.append(kernels)
        events = self.events.lines()
        parts.append("EVENTS\n" + ("\n".join(events) if events else "(none yet)"))
        return "\n\n".join(parts)

    def _clusters(self, snap: Snapshot, prev: Snapshot | None, span: float) -> str:
        before = {c.record.name: c for c in prev.clusters} if prev else {}
        rows = []
        for c in snap.clusters:
            old = before.get(c.record.name)
            d = c.stats.get(stats.DISPATCHES, 0.0)
            e = c.stats.get(stats.ERRORS, 0.0)
            if old is not None and span > 0:
                d0, e0 = old.stats.get(stats.DISPATCHES, 0.0), old.stats.get(stats.ERRORS, 0.0)
                rate, errs = f"{max(d - d0, 0) / span:.1f}", f"{max(e - e0, 0) / span:.1f}"
            else:
                rate, errs = "-", "-"
            p99 = _p99(c.stats, old.stats if old else None)
            up = sum(k.up for k in c.kernels)
            rows.append(
                (
                    c.record.name,
                    c.record.status.value,
                    f"{up}/{c.record.desired}",
                    int(d),
                    int(e),
                    rate,
                    errs,
                    p99,
                    c.orphans,
                )
            )
        return table(
            rows,
            ("CLUSTER", "STATUS", "UP", "DISPATCHES", "ERRORS", "DISP/S", "ERR/S", "P99_MS", "ORPHANS"),
        )

    def _kernels(self, snap: Snapshot, prev: Snapshot | None) -> str:
        before = {(c.record.name, k.record.name): k for c, k in prev.kernels()} if prev else {}
        rows: list[tuple[object, ...]] = []
        for c, k in snap.kernels():
            old = before.get((c.record.name, k.record.name))
            if old is not None and old.record.epoch != k.record.epoch:
                old = None  # a new incarnation: its counters started again
            load = k.load
            rows.append(
                (
                    f"{c.record.name}/{k.record.name}",
                    k.record.host or "-",
                    k.record.agent,
                    k.record.state.value
                    if k.up or k.record.state is KernelState.PENDING
                    else f"{k.record.state.value}?",
                    _pct(load.cpu) if load else "-",
                    _pct(load.memory, 2) if load else "-",
                    k.queued,
                    k.inflight,
                    _p99(k.stats, old.stats if old else None),
                )
            )
        for c in snap.clusters:  # removed after a lapsed lease, not placed again under that name yet
            for gone in c.lapsed:
                ref = f"{c.record.name}/{gone.name}"
                rows.append(
                    (ref, gone.record.host or "-", gone.record.agent, "lost", "-", "-", "-", "-", "-")
                )
        if not rows:
            return ""
        return table(rows, ("KERNEL", "HOST", "AGENT", "STATE", "CPU", "MEM", "QUEUE", "INFLIGHT", "P99_MS"))

    def _diff(self, prev: Snapshot, snap: Snapshot) -> None:
        at = time.strftime("%H:%M:%S", time.localtime(snap.taken_at))
        out: list[str] = []
        counted: list[tuple[str, int]] = []

        def agents(s: Snapshot) -> dict[str, bool]:
            return {a.record.name: a.alive for a in s.agents} | {g.name: False for g in s.lapsed_agents}

        old_agents = agents(prev)
        for name, alive in agents(snap).items():
            was = old_agents.pop(name, None)
            if was is None:
                out.append(f"agent {name} registered")
            elif was != alive:
                out.append(f"agent {name} lease {'renewed' if alive else 'EXPIRED'}")
        out += [f"agent {name} gone" for name in old_agents]
        old_clusters = {c.record.name: c for c in prev.clusters}
        for c in snap.clusters:
            old = old_clusters.pop(c.record.name, None)
            if old is None:
                out.append(f"cluster {c.record.name} created ({c.record.status.value})")
                continue
            if old.record.status is not c.record.status:
                out.append(f"cluster {c.record.name}: {old.record.status.value} -> {c.record.status.value}")
            for f, words in _EVENT_WORDS.items():
                grew = c.stats.get(f, 0.0) - old.stats.get(f, 0.0)
                if grew > 0:
                    counted.append((f"cluster {c.record.name}: {{n}} {words}", int(grew)))
            out += _kernel_events(c.record.name, old.kernels, c.kernels)
        out += [f"cluster {name} destroyed" for name in old_clusters]
        for line in out:
            self.events.add(at, line)
        for what, amount in counted:
            self.events.add(at, what, amount)


def _kernel_events(cluster: str, old: list[KernelView], new: list[KernelView]) -> list[str]:
    out = []
    before = {k.record.name: k for k in old}
    for k in new:
        o = before.pop(k.record.name, None)
        ref = f"{cluster}/{k.record.name}"
        if o is None:
            out.append(f"kernel {ref} placed on {k.record.agent}")
        elif o.record.agent != k.record.agent:
            out.append(f"kernel {ref} moved {o.record.agent} -> {k.record.agent}")
        elif o.record.state is not k.record.state:
            out.append(f"kernel {ref}: {o.record.state.value} -> {k.record.state.value}")
        elif o.record.epoch != k.record.epoch and k.record.epoch:
            out.append(f"kernel {ref} restarted (epoch {k.record.epoch})")
    out += [f"kernel {cluster}/{name} removed" for name in before]
    return out


def _p99(new: dict[str, float], old: dict[str, float] | None) -> str:
    """p99 latency, ms, of the jobs finished since `old` (or ever, without it); "-" if none."""
    buckets = stats.histogram(new, stats.LATENCY)
    if old is not None:
        buckets = stats.diff(buckets, stats.histogram(old, stats.LATENCY))
    q = stats.quantile(0.99, buckets)
    return "-" if q is None else f"{q * 1000:.1f}"


async def run_top(
    kcp: KcpClient,
    *,
    interval: float,
    iterations: int,
    out: TextIO,
    stop: asyncio.Event | None = None,
    source: str = "",
) -> int:
    """Draw `iterations` frames (0: until `stop` is set), `interval` seconds apart; returns
    the number of frames drawn."""
    view, live, n = TopView(), out.isatty(), 0
    stop = stop or asyncio.Event()
    while not stop.is_set():
        frame = view.frame(await read_snapshot(kcp.state), source=source)
        if live:
            width, height = shutil.get_terminal_size()
            lines = [line[:width] for line in frame.splitlines()][: max(height - 1, 1)]
            out.write(CLEAR + "\n".join(lines) + "\n")
        else:
            out.write(frame + "\n\n")
        out.flush()
        n += 1
        if iterations and n >= iterations:
            break
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
    return n


async def top_command(args: argparse.Namespace, kcp: KcpClient) -> int:
    """`kcp top`: a live view of agents, clusters, kernels and recent events; Ctrl-C quits."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    source = f"prefix {args.settings.prefix}  every {args.interval:g}s  (Ctrl-C quits)"
    iterations = 1 if args.once else args.iterations
    await run_top(
        kcp, interval=args.interval, iterations=iterations, out=sys.stdout, stop=stop, source=source
    )
    return 0


def add_top_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between frames (default 1)")
    parser.add_argument("--iterations", type=int, default=0, help="frames to draw, then exit (0: forever)")
    parser.add_argument("--once", action="store_true", help="draw one frame and exit")
