"""One load-generating client process for the chaos tests.

python client_worker.py REDIS_URL CLUSTER TAG COUNT CONCURRENCY OUT_JSON [SLEEP_MS]

Runs COUNT `SLEEP` dispatches tagged `TAG-i`, CONCURRENCY at a time, and writes one JSON
record per dispatch (tag, ok, kernel, echoed tag, attempts, job id, error type) plus the
engine's metrics to OUT_JSON. Exits 0 once every dispatch has returned.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

from controlplane import KcpClient, KcpError, OrchestrationConfig, Settings
from controlplane.client.core import DispatchResult
from controlplane.errors import RedisError

#: How long a dispatch is retried while Redis is unreachable (a restart, a Sentinel failover), s.
UNAVAILABLE_RETRY = float(os.environ.get("CHAOS_RETRY_UNAVAILABLE", "0"))
#: SLEEP (default) or BURN: both take {"ms", "tag"} and echo the tag.
SYSCALL = os.environ.get("CHAOS_SYSCALL", "SLEEP")


async def dispatch(kcp: KcpClient, cluster: str, request: dict[str, object]) -> DispatchResult:
    """What a patient caller does: retry a dispatch that failed because Redis was unreachable or
    read-only (a transient failure: nothing was accepted then) for up to UNAVAILABLE_RETRY seconds."""
    deadline = time.monotonic() + UNAVAILABLE_RETRY
    while True:
        try:
            return await kcp.dispatch(cluster, request)
        except RedisError as exc:
            if not exc.transient or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def main() -> dict[str, object]:
    url, cluster, tag, count, concurrency, _ = sys.argv[1:7]
    sleep_ms = int(sys.argv[7]) if len(sys.argv) > 7 else 50
    records: list[dict[str, object]] = []
    sem = asyncio.Semaphore(int(concurrency))
    config = OrchestrationConfig(timeout_ms=8000, retry_count=3)
    async with KcpClient(Settings(redis_url=url), orchestration=config) as kcp:

        async def one(i: int) -> None:
            name = f"{tag}-{i}"
            async with sem:
                started = time.monotonic()
                try:
                    res = await dispatch(kcp, cluster, {"type": SYSCALL, "ms": sleep_ms, "tag": name})
                    records.append(
                        {
                            "tag": name,
                            "ok": True,
                            "echo": res.result.get("tag"),
                            "kernel": res.kernel,
                            "attempts": res.attempts,
                            "job_id": res.job_id,
                            "at": time.time(),
                            "seconds": time.monotonic() - started,
                        }
                    )
                except KcpError as exc:
                    records.append(
                        {
                            "tag": name,
                            "ok": False,
                            "error_type": getattr(exc, "error_type", type(exc).__name__),
                            "error": str(exc)[:300],
                            "at": time.time(),
                            "seconds": time.monotonic() - started,
                        }
                    )

        await asyncio.gather(*(one(i) for i in range(int(count))))
        metrics = kcp.engine.metrics.to_dict()
    return {"records": records, "metrics": metrics}


if __name__ == "__main__":
    Path(sys.argv[6]).write_text(json.dumps(asyncio.run(main())))
