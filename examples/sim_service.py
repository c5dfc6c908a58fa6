"""A simulated service for routing benchmarks and tests: ``SIM`` sleeps for its service time.

Load it into the kernels an agent starts (the repository root must be importable)::

    KCP_SIM_PROFILE=/tmp/profile.json kcp agent --handlers examples.sim_service

A request ``{"type": "SIM", "requires": ["sim"], "ms": 40.0}`` takes ``ms`` milliseconds of
*sleep* on a kernel of normal speed, so many kernels share two cores without distorting the
result. How each kernel behaves comes from the JSON file named by ``KCP_SIM_PROFILE`` (re-read
when it changes), keyed by kernel name; absent kernels are normal::

    {
        "worker-3": {"speed": 0.5},  # takes ms / 0.5
        "worker-5": {"fail": 0.5},  # half the requests fail at once
        "worker-6": {"stuck_ms": 2000, "stuck_from": 1.7e9, "stuck_until": 1.7e9 + 30},
    }

A failure is a ``HandlerError`` after ``fail_ms`` (default 1 ms); during the ``stuck`` window
(unix seconds) every request takes ``stuck_ms``.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from kernel_agent.syscalls import SyscallContext, SyscallError, SyscallRegistry

#: Environment variable naming the profile file.
PROFILE_ENV = "KCP_SIM_PROFILE"
#: How often the profile file's mtime is checked, seconds.
RECHECK_S = 0.05


class SimArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    ms: float = Field(ge=0, le=600_000)


class KernelProfile(BaseModel):
    """How one kernel misbehaves."""

    model_config = ConfigDict(extra="forbid")

    speed: float = Field(1.0, gt=0, le=1000)
    fail: float = Field(0.0, ge=0, le=1)
    fail_ms: float = Field(1.0, ge=0)
    stuck_ms: float = Field(0.0, ge=0)
    stuck_from: float = 0.0
    stuck_until: float = 0.0


class _Profiles:
    """The profile file, re-read when its mtime changes (a bad file keeps the last good one)."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.mtime = -1.0
        self.checked = 0.0
        self.kernels: dict[str, KernelProfile] = {}

    def get(self, kernel: str) -> KernelProfile:
        now = time.monotonic()
        if self.path and now - self.checked >= RECHECK_S:
            self.checked = now
            try:
                mtime = os.stat(self.path).st_mtime
                if mtime != self.mtime:
                    with open(self.path, encoding="utf-8") as f:
                        raw = json.load(f)
                    self.kernels = {str(k): KernelProfile.model_validate(v) for k, v in raw.items()}
                    self.mtime = mtime
            except (OSError, ValueError):
                pass
        return self.kernels.get(kernel) or KernelProfile()


_profiles = _Profiles(os.environ.get(PROFILE_ENV))
_rng = random.Random()


async def sim(ctx: SyscallContext, args: dict[str, Any]) -> dict[str, Any]:
    """Sleep for the request's service time as this kernel's profile says."""
    req = SimArgs.model_validate(args)
    p = _profiles.get(ctx.kernel)
    if p.fail and _rng.random() < p.fail:
        await asyncio.sleep(p.fail_ms / 1000)
        raise SyscallError(f"simulated fault on {ctx.kernel}")
    now = time.time()
    ms = p.stuck_ms if p.stuck_ms and p.stuck_from <= now < p.stuck_until else req.ms / p.speed
    await asyncio.sleep(ms / 1000)
    return {"kernel": ctx.kernel, "ms": ms}


def register(registry: SyscallRegistry) -> None:
    """Add SIM (capability ``sim``) to `registry`."""
    registry.register("SIM", sim, capabilities=["sim"], description="sleep for a simulated service time")
