"""Load sampling: cpu and memory of each kernel's own process, and when to write them.

The rest of a kernel's load record (queue, in flight, latency and error rate) is the kernel
process's own report (`kernel_agent/kernel/load_report.py`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import psutil

#: A change of cpu (fraction of one core) that is written within a heartbeat.
CPU_STEP = 0.05
#: A relative change of memory that is written within a heartbeat.
MEMORY_STEP = 0.05


class ProcessSampler:
    """cpu (fraction of one core, capped at 1), memory (fraction of the host's RAM) and resident
    memory (bytes) of a pid."""

    def __init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}
        self._gone: set[int] = set()  # pids found gone: not looked up again until forgotten
        self._total = psutil.virtual_memory().total

    def sample(self, pid: int) -> tuple[float, float, int]:
        if pid in self._gone:
            return 0.0, 0.0, 0
        try:
            proc = self._procs.get(pid)
            if proc is None:
                proc = self._procs[pid] = psutil.Process(pid)
                proc.cpu_percent(None)  # the first reading is always 0: prime it
            cpu = proc.cpu_percent(None) / 100.0
            rss = proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            self._procs.pop(pid, None)
            self._gone.add(pid)
            return 0.0, 0.0, 0
        return min(cpu, 1.0), min(rss / self._total, 1.0), int(rss)

    def forget(self, pid: int) -> None:
        """The process was reaped: its pid may be reused."""
        self._procs.pop(pid, None)
        self._gone.discard(pid)


@dataclass(slots=True)
class LoadGate:
    """When the agent rewrites a kernel's cpu and memory: on a change past `CPU_STEP` (fraction
    of a core) or `MEMORY_STEP` (relative), at most once per heartbeat (the caller's turn), and
    at least every `refresh` seconds, so readers see the record fresh (`updated_at`)."""

    cpu: float = -1.0
    memory: float = -1.0
    at: float = -math.inf  # monotonic time of the last write
    ttl_at: float = -math.inf  # ... and of the last one that renewed the record's TTL

    def due(self, cpu: float, memory: float, now: float, refresh: float) -> bool:
        if now - self.at >= refresh:
            return True
        if abs(cpu - self.cpu) >= CPU_STEP:
            return True
        return abs(memory - self.memory) > MEMORY_STEP * max(self.memory, 1e-9)

    def renew_ttl(self, now: float, refresh: float) -> bool:
        """Whether this write renews the TTL (3 x `refresh`) too: every other refresh is enough,
        and leaves the record a whole `refresh` of slack when a write is late."""
        return now - self.ttl_at >= 1.5 * refresh

    def written(self, cpu: float, memory: float, now: float, *, ttl: bool) -> None:
        self.cpu, self.memory, self.at = cpu, memory, now
        if ttl:
            self.ttl_at = now
