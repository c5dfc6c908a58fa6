"""What TLS and ACL users cost a kcp connection, in one run, on one private redis-server.

    .venv/bin/python bench/security.py [--n 2000] [--repeat 3]

One redis-server listens on a plain port and a TLS port (certificates made with openssl in a
temp dir). Through `connection.connect()`, three ways in: plain as the `default` user (the
baseline), plain as the per-agent ACL user `kcp acl` generates, and TLS as that user. For
each: the median round trip of sequential PINGs, of a HSET+PEXPIRE pipeline (a load report)
and of an EVALSHA declaring two keys (the shape of claim.lua), plus the time to open a
connection. Prints the median over `--repeat` runs and each ratio to the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypedDict

import redis

from controlplane.ops.acl import build_users, passwords_for, setuser_args
from controlplane.ops.redis_server import free_port, start_redis_server
from controlplane.protocol.keys import Keys
from controlplane.redis.connect import connect
from controlplane.settings import Settings
from tests.certificates import make_certificates  # the tests' certificate maker

KEYS = Keys()
SCRIPT = "redis.call('HSET', KEYS[1], 'x', ARGV[1]) return redis.call('INCR', KEYS[2])"


class Credentials(TypedDict):
    """The `Settings` fields of an ACL user."""

    redis_username: str
    redis_password: str


class TlsFiles(TypedDict):
    """The `Settings` fields of mutual TLS."""

    redis_tls_ca_file: Path
    redis_tls_cert_file: Path
    redis_tls_key_file: Path


async def _median_ms(n: int, op: Callable[[], Awaitable[object]]) -> float:
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        await op()
        samples.append((time.perf_counter() - t) * 1000)
    return statistics.median(samples)


async def measure(url: str, n: int) -> dict[str, float]:
    t = time.perf_counter()
    client = connect(url)
    await client.ping()
    connect_ms = (time.perf_counter() - t) * 1000
    sha = await client.script_load(SCRIPT)
    load, epoch = KEYS.load("bench", "c", "k"), KEYS.cluster_epoch("c")

    async def pipeline() -> None:
        async with client.pipeline(transaction=False) as pipe:
            pipe.hset(load, mapping={"cpu": "0.1", "memory": "0.2"})
            pipe.pexpire(load, 3000)
            await pipe.execute()

    async def script() -> None:
        await client.evalsha(sha, 2, load, epoch, "1")

    out = {
        "connect": connect_ms,
        "PING": await _median_ms(n, client.ping),
        "HSET+PEXPIRE": await _median_ms(n, pipeline),
        "EVALSHA 2 keys": await _median_ms(n, script),
    }
    await client.aclose()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=2000, help="round trips per measurement")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kcp-bench-tls-") as tmp:
        try:
            certs = make_certificates(Path(tmp) / "certs")
        except (OSError, subprocess.CalledProcessError) as exc:
            print(f"bench/security.py: needs openssl ({exc})")
            return 0
        tls_port = free_port()
        tls_args = ["--tls-port", str(tls_port), "--tls-cert-file", str(certs["server"]),
                    "--tls-key-file", str(certs["server_key"]), "--tls-ca-cert-file", str(certs["ca"]),
                    "--tls-auth-clients", "yes"]  # fmt: skip
        with start_redis_server(data_dir=Path(tmp) / "redis", extra_args=tls_args) as server:
            users = build_users(KEYS, ["bench"])
            passwords = passwords_for(users, None)
            with redis.Redis.from_url(server.url) as admin:
                for user in users:
                    admin.execute_command("ACL", "SETUSER", *setuser_args(user, passwords[user.name]))
            agent = Credentials(redis_username="kcp-agent-bench", redis_password=passwords["kcp-agent-bench"])
            tls = TlsFiles(
                redis_tls_ca_file=certs["ca"],
                redis_tls_cert_file=certs["client"],
                redis_tls_key_file=certs["client_key"],
            )
            ways = {
                "plain, default user": server.url,
                "plain, agent ACL user": Settings(redis_url=server.url, **agent).redis_url,
                "TLS, agent ACL user": Settings(
                    redis_url=f"rediss://127.0.0.1:{tls_port}/0", **agent, **tls
                ).redis_url,
            }
            runs: dict[str, list[dict[str, float]]] = {way: [] for way in ways}
            for _ in range(args.repeat):
                for way, url in ways.items():
                    runs[way].append(asyncio.run(measure(url, args.n)))
    metrics = list(next(iter(runs.values()))[0])
    medians = {way: {m: statistics.median(r[m] for r in rs) for m in metrics} for way, rs in runs.items()}
    base = medians["plain, default user"]
    print(
        f"median ms over {args.repeat} runs of {args.n} sequential round trips (ratio to plain, default user)"
    )
    print(f"{'':24}" + "".join(f"{m:>22}" for m in metrics))
    for way, values in medians.items():
        cells = "".join(f"{values[m]:>13.3f} ({values[m] / base[m]:4.2f}x)" for m in metrics)
        print(f"{way:24}{cells}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
