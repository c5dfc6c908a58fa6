"""The siblings a kernel may take queued work from (work stealing, `claim.lua`).

A kernel whose own queue is empty takes over the oldest job queued on a sibling that it can
run: one that takes or holds work and whose every syscall and capability this kernel has
too. The list is re-read in the background, only by a kernel that works (an idle kernel's
periodic claim uses the list it has), and at most every `SIBLINGS_TTL`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

from controlplane.protocol.models import KernelState
from controlplane.redis.state import State
from kernel_agent.syscalls import SyscallRegistry

logger = logging.getLogger(__name__)

#: How long the list of siblings to take work from is trusted; refreshed while working, seconds.
SIBLINGS_TTL = 2.0
#: Siblings whose queues one claim looks at, at most (a random sample of larger clusters).
STEAL_CANDIDATES = 16
#: States of a sibling whose queued jobs may be taken over (a draining one's too: it helps).
_STEALABLE_STATES = frozenset({KernelState.RUNNING, KernelState.DRAINING})


class Siblings:
    """(name, epoch) of the kernels this one may take work from, kept fresh in the background."""

    def __init__(
        self, state: State, *, cluster: str, name: str, registry: SyscallRegistry, wake_key: str
    ) -> None:
        self.state = state
        self.cluster, self.name = cluster, name
        self.registry = registry
        self.wake_key = wake_key
        self._list: list[tuple[str, int]] = []
        self._read_at = float("-inf")
        self._refreshing: asyncio.Task[None] | None = None

    def for_claim(self, *, refresh: bool) -> list[tuple[str, int]] | None:
        """The siblings one claim may look at (at most `STEAL_CANDIDATES`, sampled), or None;
        with `refresh`, a stale list is re-read in the background for the next claim."""
        if refresh:
            self._keep_fresh()
        if not self._list:
            return None
        if len(self._list) > STEAL_CANDIDATES:
            return random.sample(self._list, STEAL_CANDIDATES)
        return self._list

    async def aclose(self) -> None:
        if self._refreshing is not None:
            self._refreshing.cancel()
            await asyncio.gather(self._refreshing, return_exceptions=True)

    def _keep_fresh(self) -> None:
        stale = time.monotonic() - self._read_at > SIBLINGS_TTL
        if stale and (self._refreshing is None or self._refreshing.done()):
            self._read_at = time.monotonic()
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh())

    async def _refresh(self) -> None:
        """Re-read them, with the epoch claim.lua checks (a replaced incarnation may run other
        handlers); none when the cluster's config turns `work_stealing` off."""
        try:
            cluster = await self.state.get_cluster(self.cluster)
            stealing = cluster is not None and cluster.config.work_stealing
            records = await self.state.kernels(self.cluster) if stealing else []
        except Exception as exc:  # stealing is an optimisation: never let it stop the kernel
            logger.warning("kernel %s/%s: could not read its siblings: %s", self.cluster, self.name, exc)
            return
        syscalls, capabilities = set(self.registry.names()), self.registry.capabilities()
        siblings = sorted(  # sorted: the kernel set comes in no particular order
            (k.name, k.epoch)
            for k in records
            if k.name != self.name
            and k.state in _STEALABLE_STATES
            and set(k.syscalls.split()) <= syscalls
            and set(k.capabilities.split()) <= capabilities
        )
        changed, self._list = siblings != self._list, siblings
        if changed:
            # a blocked worker's claim went out with the old list: wake it, so that the claim
            # it writes next carries this one (else it could wait up to IDLE_BLOCK to see it)
            try:
                await self.state.redis.zadd(self.wake_key, {"w": 0})
            except Exception as exc:
                logger.warning("kernel %s/%s: could not wake itself: %s", self.cluster, self.name, exc)
