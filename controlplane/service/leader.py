"""One `kcp serve` leads at a time, through a TTL lease in Redis."""

from __future__ import annotations

import logging
import os
import socket
import uuid

from ..keys import Keys
from ..scripts import Scripts

logger = logging.getLogger(__name__)


class LeaderLease:
    """Take, renew and release `{prefix}leader`. Renew well within the TTL."""

    def __init__(self, scripts: Scripts, keys: Keys, ttl: float, *, token: str | None = None) -> None:
        self.scripts = scripts
        self.keys = keys
        self.ttl_ms = max(int(ttl * 1000), 1)
        # host:pid:random, so `redis-cli GET kcp:leader` tells an operator who leads
        self.token = token or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self.leading = False

    async def acquire(self) -> bool:
        """Take or renew the lease; True while we lead."""
        leading = bool(await self.scripts.leader(keys=[self.keys.leader()], args=[self.token, self.ttl_ms]))
        if leading != self.leading:
            logger.info("%s leadership (token %s)", "took" if leading else "lost", self.token)
        self.leading = leading
        return leading

    async def release(self) -> None:
        await self.scripts.leader(keys=[self.keys.leader()], args=[self.token, 0])
        self.leading = False
