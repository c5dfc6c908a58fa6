"""One client process of the arq system test.

python arq_client.py REDIS_URL CLUSTER TAG COUNT SECONDS

Enqueues COUNT `echo_after` jobs (value TAG-i, each taking SECONDS) with ids TAG-i, waits for
every result and prints one JSON object {job id: result or "error:<type>"}.
"""

from __future__ import annotations

import asyncio
import json
import sys

from controlplane import KcpClient, KernelError, Settings


async def main() -> dict[str, object]:
    url, cluster, tag, count, seconds = sys.argv[1:6]
    out: dict[str, object] = {}
    async with KcpClient(Settings(redis_url=url)) as kcp:
        jobs = [
            await kcp.enqueue_job(cluster, "echo_after", f"{tag}-{i}", float(seconds), _job_id=f"{tag}-{i}")
            for i in range(int(count))
        ]
        for job in jobs:
            assert job is not None
            try:
                out[job.job_id] = await job.result(timeout=90)
            except KernelError as exc:
                out[job.job_id] = f"error:{exc.error_type}"
    return out


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main())))
