"""The siblings a kernel may take queued work from (work stealing, `claim.lua`).

A kernel whose own queue is empty takes over the oldest job queued on a sibling that it can
run: one that takes or holds work and whose every syscall and capability this kernel has
too. The list is re-read only when the cluster's version (`Keys.cluster_version`, moved by every
write that changes a kernel's state or epoch, or the kernel set) is not the one it was read at.
The version rides on a claim: a kernel that works asks for it in a claim at most every
`SIBLINGS_TTL` (an idle kernel's periodic claim uses the list it has and asks nothing), and the
worker re-reads the records on its own connection before its next step. So a busy cluster of N
kernels re-reads nothing while its kernels stay as they are, instead of N records per kernel
every `SIBLINGS_TTL`.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

from controlplane.errors import RedisError, RedisUnavailable, WrongData
from controlplane.protocol.keys import Keys
from controlplane.protocol.models import KernelState
from controlplane.protocol.records import ClusterRecord, KernelRecord
from controlplane.redis.channel import Channel
from controlplane.redis.errors import amap_redis_errors
from kernel_agent.syscalls import SyscallRegistry

logger = logging.getLogger(__name__)

#: How often a working kernel asks (in a claim) whether the cluster's version moved, seconds.
SIBLINGS_TTL = 2.0
#: Siblings whose queues one claim looks at, at most (a random sample of the list), so a claim
#: costs the same whatever the cluster's size.
STEAL_CANDIDATES = 4
#: Siblings a kernel keeps in its list, at most: a random sample of larger clusters, drawn at
#: each re-read, so re-reading costs the same whatever the cluster's size too.
SIBLINGS_KEPT = 16
#: States of a sibling whose queued jobs may be taken over (a draining one's too: it helps).
_STEALABLE_STATES = frozenset({KernelState.RUNNING, KernelState.DRAINING})


class Siblings:
    """(name, epoch) of the kernels this one may take work from, and the version they were read at."""

    def __init__(
        self,
        keys: Keys,
        *,
        cluster: str,
        name: str,
        registry: SyscallRegistry,
        capabilities: frozenset[str],
        wake_key: str,
    ) -> None:
        """`capabilities`: what this kernel declares (`declared_capabilities`: its agent's and
        its syscalls'), as its record does."""
        self.keys = keys
        self.cluster, self.name = cluster, name
        self.registry = registry
        self.capabilities = capabilities
        self.wake_key = wake_key
        self._list: list[tuple[str, int]] = []
        self._version: str | None = None  # the cluster's version the list was read at (None: never read)
        self._seen: str | None = None  # the latest version a claim returned
        self._asked_at = float("-inf")
        self._refreshing = False

    def for_claim(self) -> list[tuple[str, int]]:
        """The siblings one claim may look at (at most `STEAL_CANDIDATES`, sampled; maybe none)."""
        if len(self._list) > STEAL_CANDIDATES:
            return random.sample(self._list, STEAL_CANDIDATES)
        return self._list

    def ask_version(self, *, after_job: bool) -> bool:
        """Whether the claim about to be written should return the cluster's version: after a
        job, at most every `SIBLINGS_TTL` (an idle kernel asks nothing)."""
        now = time.monotonic()
        if not after_job or now - self._asked_at < SIBLINGS_TTL:
            return False
        self._asked_at = now
        return True

    def seen(self, version: str | None) -> None:
        """A claim returned the cluster's `version` (None: it was not asked for)."""
        if version is not None:
            self._seen = version

    @property
    def stale(self) -> bool:
        """Whether the version a claim returned is not the one the list was read at."""
        return self._seen is not None and self._seen != self._version and not self._refreshing

    async def refresh(self, channel: Channel) -> None:
        """Re-read them on `channel` (the worker's own, between two of its steps), with the epoch
        claim.lua checks (a replaced incarnation may run other handlers); none when the
        cluster's config turns `work_stealing` off. A failure keeps the old list (stealing is an
        optimisation) and is tried again at the next version check; a lost connection is the
        worker's to handle, as for its other steps."""
        self._refreshing = True
        try:
            async with amap_redis_errors():
                siblings, version = await self._read(channel)
        except RedisUnavailable:
            raise
        except (RedisError, ValueError) as exc:  # a key of the wrong type, ...
            logger.warning("kernel %s/%s: could not read its siblings: %s", self.cluster, self.name, exc)
            self._seen = None
            return
        finally:
            self._refreshing = False
        changed, self._list, self._version = siblings != self._list, siblings, version
        if changed:
            # a blocked worker's claim went out with the old list: wake it, so that the claim
            # it writes next carries this one (else it could wait up to IDLE_BLOCK to see it)
            try:
                await channel.execute("ZADD", self.wake_key, 0, "w")
            except WrongData as exc:  # a wake key of another type: claim.lua replaces it
                logger.warning("kernel %s/%s: could not wake its workers: %s", self.cluster, self.name, exc)

    async def _read(self, channel: Channel) -> tuple[list[tuple[str, int]], str]:
        k = self.keys
        version, cluster_fields, names = await channel.execute_many(
            [
                ("GET", k.cluster_version(self.cluster)),
                ("HGETALL", k.cluster(self.cluster)),
                # ourselves and SIBLINGS_KEPT others at most (all of a smaller cluster)
                ("SRANDMEMBER", k.cluster_kernels(self.cluster), SIBLINGS_KEPT + 1),
            ]
        )
        for reply in (version, cluster_fields, names):
            if isinstance(reply, Exception):
                raise reply
        cluster = ClusterRecord.from_fields(_pairs(cluster_fields), k.cluster(self.cluster))
        if cluster is None or not cluster.config.work_stealing:
            return [], str(version or "")
        others = sorted(str(n) for n in names if n != self.name)[:SIBLINGS_KEPT]
        rows = (
            await channel.execute_many([("HGETALL", k.kernel(self.cluster, n)) for n in others])
            if others
            else []
        )
        syscalls, capabilities = set(self.registry.names()), self.capabilities
        siblings = []
        for n, fields in zip(others, rows, strict=True):
            if isinstance(fields, Exception):  # a key of the wrong type: not a sibling
                continue
            record = KernelRecord.from_fields(_pairs(fields), k.kernel(self.cluster, n))
            if (
                record is not None
                and record.state in _STEALABLE_STATES
                and set(record.syscalls.split()) <= syscalls
                and set(record.capabilities.split()) <= capabilities
            ):
                siblings.append((record.name, record.epoch))
        return siblings, str(version or "")


def _pairs(reply: Any) -> dict[str, Any]:
    """An HGETALL reply as the channel gives it (RESP2: a flat list) as a dict."""
    if isinstance(reply, dict):
        return reply
    items = list(reply or [])
    return dict(zip(items[::2], items[1::2], strict=True))
