"""The cluster metrics collector's script (run on a synchronous client)."""

from __future__ import annotations

from typing import Any

from controlplane.protocol.keys import Keys
from controlplane.redis.lua import Script
from controlplane.redis.scripts.call import Call

METRIC_INCREMENT = Script.load("metric_increment")


def metric_increment(
    keys: Keys, cluster: str, *, field: str, kernel: str, metric: str, amount: str, now_s: str
) -> Call[str]:
    """metric_increment.lua: add `amount` to `kernel`'s `metric` (stored under `field`); the new
    value. Raises the error reply NOTNUM (a `ResponseError`) when the metric holds a
    non-numeric value."""
    klist = [keys.collector_values(cluster), keys.collector_kernels(cluster), keys.collector_types(cluster)]
    return Call(METRIC_INCREMENT, klist, [field, amount, kernel, metric, now_s], _value)


def _value(reply: Any) -> str:
    return str(reply)
