"""Autoscaling: change a cluster's desired kernel count from its measured load.

Runs inside the leader's reconcile pass for clusters whose config has `auto_scale`. The load
of a kernel is its agent's latest load record: `max(cpu, queue_depth / SATURATED_QUEUE)`,
capped at 1, so both CPU-bound and queue-bound work count. The cluster's load is the mean
over its running kernels that have a fresh record.

- Above `scale_up_threshold`, sustained for `autoscale_sustain` seconds: grow to the size that
  would bring the load back under the threshold (at least +1), at most `max_kernels`.
- Below `scale_down_threshold`, sustained likewise: shrink by one kernel, at least `min_kernels`.
- Between the thresholds nothing happens (hysteresis), and after each step the cluster is left
  alone for `autoscale_cooldown` seconds, and it grows again only once every desired kernel
  runs (no flapping; a step that cannot land for lack of slots can still be taken back).

The decision state lives in the cluster record (`autoscale_dir`, `autoscale_since`,
`autoscale_at`, `load`), so a new leader carries on where the last one stopped. Each step is
written in one leader-fenced write (fence.lua) that also sets the status to `scaling`.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from controlplane.protocol import stats
from controlplane.protocol.keys import Keys
from controlplane.protocol.models import ClusterStatus, KernelLoad, KernelState
from controlplane.protocol.records import ClusterRecord, KernelRecord
from controlplane.redis.state import State
from controlplane.service.leader import LeaderLease
from controlplane.settings import Settings

logger = logging.getLogger(__name__)

#: Jobs waiting in one kernel's queue that count as fully loaded.
SATURATED_QUEUE = 4


@dataclass(frozen=True, slots=True)
class Trend:
    """Where the load has been, as kept in the cluster record."""

    direction: str = ""  # "up", "down" or "" (between the thresholds)
    since: float = 0.0  # unix seconds the direction began
    last_step: float = 0.0  # unix seconds of the last scaling step


def kernel_load(load: KernelLoad) -> float:
    return min(max(load.cpu, load.queue_depth / SATURATED_QUEUE), 1.0)


def cluster_load(running: list[KernelRecord], loads: dict[str, KernelLoad]) -> float | None:
    """Mean load of the running kernels that reported one; None when none did."""
    values = [kernel_load(loads[k.name]) for k in running if k.name in loads]
    return sum(values) / len(values) if values else None


def decide(
    cluster: ClusterRecord,
    running: int,
    load: float,
    trend: Trend,
    now: float,
    *,
    sustain: float,
    cooldown: float,
    ceiling: int,
) -> tuple[int, Trend]:
    """The new desired count and trend. Pure: the policy, tested without Redis."""
    cfg = cluster.config
    low, high = cfg.min_kernels, min(cfg.max_kernels, ceiling)
    if not low <= cluster.desired <= high:  # out of bounds (e.g. set before auto_scale): clamp now
        return min(max(cluster.desired, low), high), Trend(last_step=now)
    direction = "up" if load > cfg.scale_up_threshold else "down" if load < cfg.scale_down_threshold else ""
    if direction != trend.direction:
        return cluster.desired, Trend(direction, now, trend.last_step)
    if (
        not direction
        or now - trend.since < sustain
        or now - trend.last_step < cooldown
        or (direction == "up" and running < cluster.desired)  # the last step up has not landed yet
    ):
        return cluster.desired, trend
    if direction == "up":
        wanted = math.ceil(running * load / cfg.scale_up_threshold)
        target = min(max(wanted, cluster.desired + 1), high)
    else:
        target = max(cluster.desired - 1, low)
    if target == cluster.desired:
        return cluster.desired, trend
    return target, Trend(direction, now, now)


class Autoscaler:
    def __init__(self, state: State, lease: LeaderLease, settings: Settings) -> None:
        self.state = state
        self.redis = state.redis
        self.keys: Keys = state.keys
        self.lease = lease
        self.settings = settings

    async def evaluate(self, cluster: ClusterRecord, kernels: list[KernelRecord]) -> ClusterRecord:
        """Apply one autoscaling decision; returns the (possibly resized) cluster record."""
        if not cluster.config.auto_scale:
            return cluster
        running = [k for k in kernels if k.state is KernelState.RUNNING]
        load = cluster_load(running, await self.state.loads(running))
        key = self.keys.cluster(cluster.name)
        raw = await self.redis.hmget(key, list(ClusterRecord.AUTOSCALE_TREND))
        trend = Trend(raw[0] or "", float(raw[1] or 0), float(raw[2] or 0))
        now = time.time()
        if load is None:
            if cluster.config.min_kernels <= cluster.desired <= cluster.config.max_kernels:
                return cluster
            load = 0.0  # nothing measured yet, but the count is out of bounds: clamp it
        desired, new = decide(
            cluster,
            len(running),
            load,
            trend,
            now,
            sustain=self.settings.autoscale_sustain,
            cooldown=self.settings.autoscale_cooldown,
            ceiling=self.settings.max_kernels_per_cluster,
        )
        fields = ClusterRecord.fields(load=f"{load:.3f}")
        if new != trend:
            fields |= ClusterRecord.fields(
                autoscale_dir=new.direction,
                autoscale_since=f"{new.since:.3f}",
                autoscale_at=f"{new.last_step:.3f}",
            )
        if desired != cluster.desired:
            fields |= ClusterRecord.fields(desired=desired, status=ClusterStatus.SCALING)
        if len(fields) == 1:  # only the measured load changed: for operators, no decision to fence
            await self.redis.hset(key, mapping=fields)
            return cluster
        await self.lease.commit(self.lease.write(cluster.name).hset(key, fields))
        if desired != cluster.desired:  # fleet-wide counter: after the fenced decision
            step = stats.AUTOSCALE_UP if desired > cluster.desired else stats.AUTOSCALE_DOWN
            await self.redis.hincrby(self.keys.reliability(), step, 1)
        if desired == cluster.desired:
            return cluster
        logger.info(
            "autoscaling %s: %d -> %d kernels (load %.2f, thresholds %.2f/%.2f)",
            cluster.name,
            cluster.desired,
            desired,
            load,
            cluster.config.scale_down_threshold,
            cluster.config.scale_up_threshold,
        )
        return cluster.model_copy(update={"desired": desired, "status": ClusterStatus.SCALING})
