"""Load sampling: cpu and memory of each kernel's own process, latency and error EWMAs."""

from __future__ import annotations

from dataclasses import dataclass

import psutil

#: Weight of the newest heartbeat interval in the latency and error-rate EWMAs.
EWMA_ALPHA = 0.3


class ProcessSampler:
    """cpu (fraction of one core, capped at 1), memory (fraction of the host's RAM) and resident
    memory (bytes) of a pid."""

    def __init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}
        self._total = psutil.virtual_memory().total

    def sample(self, pid: int) -> tuple[float, float, int]:
        try:
            proc = self._procs.get(pid)
            if proc is None:
                proc = self._procs[pid] = psutil.Process(pid)
                proc.cpu_percent(None)  # the first reading is always 0: prime it
            cpu = proc.cpu_percent(None) / 100.0
            rss = proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            self._procs.pop(pid, None)
            return 0.0, 0.0, 0
        return min(cpu, 1.0), min(rss / self._total, 1.0), int(rss)

    def forget(self, pid: int) -> None:
        self._procs.pop(pid, None)


@dataclass(slots=True)
class RateTracker:
    """Turns the kernel's cumulative counters (dispatches, errors, latency sum) into EWMAs."""

    dispatches: float = 0.0
    errors: float = 0.0
    latency_sum: float = 0.0
    latency_ms: float = 0.0
    error_rate: float = 0.0
    primed: bool = False

    def update(self, dispatches: float, errors: float, latency_sum: float) -> None:
        done = dispatches - self.dispatches
        if self.primed and done > 0:
            interval_latency = (latency_sum - self.latency_sum) / done
            interval_errors = min(max((errors - self.errors) / done, 0.0), 1.0)
            self.latency_ms += EWMA_ALPHA * (interval_latency - self.latency_ms)
            self.error_rate += EWMA_ALPHA * (interval_errors - self.error_rate)
        elif not self.primed and dispatches > 0:
            self.latency_ms = latency_sum / dispatches
            self.error_rate = min(errors / dispatches, 1.0)
        self.dispatches, self.errors, self.latency_sum, self.primed = dispatches, errors, latency_sum, True
