"""`kcp acl`: Redis ACL users for kcp's roles, least privilege from the key schema.

Roles (docs/security.md explains what each may and may not do):

- **service** (`kcp serve`): every key under the prefix.
- **client** (SDK, `OrchestrationTools`, CLI): clusters, kernel queues, jobs, replies, the bus;
  reads agent records and load records; cannot write anything of an agent or the leader lease.
- **agent** (one user per agent; the agent's kernel processes log in as it too): writes its own
  agent record, lease, wake list and load records, adds itself to the agent set (SADD only),
  reads its assignment and the cluster records; plus the keys its kernels' Lua scripts need
  (kernel keys, jobs, replies, cluster stats, the epoch counter, the bus), which the current key
  layout shares between agents.

Every pattern is built from `Keys` with ``*`` in place of a name, so the rules follow the key
schema. Names never contain glob characters (`models.NAME_PATTERN`), so an agent's patterns
cannot match another agent's keys.

Redis checks the keys a script declares in KEYS (all of them need read *and* write access)
and again every command the script runs, so ACLs hold inside EVALSHA too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import secrets
import stat
import string
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from controlplane.errors import InvalidRequest
from controlplane.protocol.keys import Keys
from controlplane.protocol.models import NAME_PATTERN
from controlplane.redis.connect import SyncRedis, connect_sync, every_node_sync
from controlplane.redis.errors import map_redis_errors, where_from_url
from controlplane.settings import Settings
from controlplane.tls import redact_url

#: Command categories every role gets, then what none of them may run. `@dangerous` covers
#: FLUSHALL, KEYS, CONFIG, DEBUG, MONITOR, ACL changes, CLIENT KILL, SHUTDOWN, ...
BASE_COMMANDS = (
    "-@all",
    "+@connection",
    "+@read",
    "+@write",
    "+@keyspace",
    "+@scripting",
    "+@transaction",
    "+@pubsub",
    "-@dangerous",
    "-function",
    "-script|flush",
    "-script|kill",
    "-script|debug",
    "+acl|whoami",  # so an operator can check which user a credential logs in as
    "+time",  # claim.lua and rebind.lua read the server's clock
    "+cluster|slots",  # a Redis Cluster client reads the slot table (harmless on one Redis)
)

_NAME_CHARS = frozenset(string.ascii_letters + string.digits + "_.-")


@dataclass(frozen=True, slots=True)
class AclUser:
    """One Redis user: its name, role, and ACL rules (without the password)."""

    name: str
    role: str
    rules: tuple[str, ...]
    agent: str | None = None


def _rw(*patterns: str) -> list[str]:
    return [f"~{p}" for p in patterns]


def _ro(*patterns: str) -> list[str]:
    return [f"%R~{p}" for p in patterns]


def _shared_kernel_side(k: Keys) -> list[str]:
    """Keys a kernel's scripts need and the current layout does not scope per agent."""
    return _rw(
        k.kernel_pattern("*"),  # kernel records and their queue/inflight/stats/lease/health keys
        k.job_pattern("*"),
        k.reply_pattern(),  # every client's reply lists (finish.lua, rebind.lua) and bell (ZADD)
        k.cluster_stats("*"),
        k.cluster_version("*"),  # kernel_start.lua and kernel_stop.lua INCR it
        k.cluster_deferred("*"),  # an arq function's Retry puts its job back there (defer.lua)
        k.cluster_epoch("*"),  # kernel_start.lua INCRs it
        f"{k.prefix}bus:*",
    )


def service_rules(k: Keys) -> list[str]:
    return ["resetkeys", *_rw(f"{k.prefix}*"), "resetchannels", f"&{k.prefix}*", *BASE_COMMANDS]


def client_rules(k: Keys) -> list[str]:
    keys = _rw(
        k.clusters(),
        k.cluster("*"),  # the record ...
        f"{k.cluster('*')}:*",  # ... and every other key of the cluster
        k.kernel_pattern("*"),
        k.job_pattern("*"),
        k.reply_pattern(),  # its reply and taken lists in each cluster's slot, and its bell
        k.service_wake(),
        k.rejections(),
        f"{k.prefix}metrics:*",
        f"{k.prefix}bus:*",
    )
    # enqueue.lua reads load records to route, and Redis wants write access to every key a
    # script declares; a forged load record can only skew routing, and its agent rewrites it
    # on every heartbeat (docs/security.md)
    keys += _rw(k.load("*", "*", "*"))
    keys += _ro(k.agents(), k.agent("*"), k.heartbeats(), k.reliability())
    keys += _ro(k.lapsed_agents(), k.lapsed_kernels())  # `kcp status`/`top` list lost agents and kernels
    # its reply lists' shard channels (on a Redis Cluster finish.lua publishes results there)
    channels = [f"&{k.notify()}", f"&{k.reply_pattern()}"]
    return ["resetkeys", *keys, "resetchannels", *channels, *BASE_COMMANDS]


def agent_rules(k: Keys, agent: str) -> list[str]:
    """The rules of agent `agent`'s user (its kernels use the same user)."""
    own = _rw(
        k.agent(agent),
        k.agent_lease(agent),
        k.agent_wake(agent),
        k.agent_running(agent),
        k.load(agent, "*", "*"),
    )
    own += _ro(k.agent_kernels(agent))
    # cluster records and kernel sets: a kernel looks up its siblings to take over their work
    own += _ro(k.cluster("*"), f"{k.cluster('*')}:*")
    selectors = [
        # join the agent set, but never remove another agent from it
        f"(+sadd ~{k.agents()})",
        # wake the leader
        f"(+lpush ~{k.service_wake()})",
        # on registering, no longer listed as a lapsed agent (another's entry only hides a
        # down agent from the metrics earlier than its retention)
        f"(+hdel ~{k.lapsed_agents()})",
    ]
    return [
        "resetkeys",
        *own,
        *_shared_kernel_side(k),
        "resetchannels",
        f"&{k.notify()}",
        f"&{k.reply_pattern()}",  # finish.lua SPUBLISHes results on the reply lists' shard channels
        *BASE_COMMANDS,
        *selectors,
    ]


def _check_agent(name: str) -> str:
    if not isinstance(name, str) or not re.fullmatch(NAME_PATTERN, name):
        raise InvalidRequest(
            f"invalid agent name {name!r}: use 1-64 letters, digits, '_', '.', '-' (starting with one "
            "of the first two)"
        )
    return name


def build_users(keys: Keys, agents: Iterable[str], *, user_prefix: str = "kcp-") -> list[AclUser]:
    """The service and client users, and one user per agent (names validated, duplicates dropped)."""
    if not user_prefix or not set(user_prefix) <= _NAME_CHARS:
        raise InvalidRequest(f"user prefix {user_prefix!r} must be letters, digits, '_', '.', '-'")
    users = [
        AclUser(f"{user_prefix}service", "service", tuple(service_rules(keys))),
        AclUser(f"{user_prefix}client", "client", tuple(client_rules(keys))),
    ]
    for agent in dict.fromkeys(_check_agent(a) for a in agents):
        users.append(AclUser(f"{user_prefix}agent-{agent}", "agent", tuple(agent_rules(keys, agent)), agent))
    return users


# ------------------------------------------------------------------ passwords and output


def new_password() -> str:
    """256 random bits, URL-, shell- and ACL-safe."""
    return secrets.token_urlsafe(32)


def env_file(user: str, password: str) -> str:
    """What an agent host (or service, or client) needs: `KCP_REDIS_USERNAME` / `_PASSWORD`."""
    return f"KCP_REDIS_USERNAME={user}\nKCP_REDIS_PASSWORD={password}\n"


def read_env_password(path: Path) -> str | None:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return None
    for line in lines:
        name, _, value = line.partition("=")
        if name.strip() == "KCP_REDIS_PASSWORD" and value.strip():
            return value.strip()
    return None


def passwords_for(users: Sequence[AclUser], secrets_dir: Path | None) -> dict[str, str]:
    """A password per user: reused from `secrets_dir/<user>.env` when there, else new (and saved
    there, mode 0600, when a directory is given). Re-running with one more agent keeps the others'."""
    out: dict[str, str] = {}
    if secrets_dir is not None:
        secrets_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for user in users:
        path = secrets_dir / f"{user.name}.env" if secrets_dir is not None else None
        password = read_env_password(path) if path is not None else None
        if password is None:
            password = new_password()
            if path is not None:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, stat.S_IRUSR | stat.S_IWUSR)
                with os.fdopen(fd, "w") as f:
                    f.write(env_file(user.name, password))
        out[user.name] = password
    return out


def setuser_args(user: AclUser, password: str) -> list[str]:
    """Arguments of ``ACL SETUSER`` (after the two command words): reset, then the rules."""
    return [user.name, "reset", "on", f">{password}", *user.rules]


def aclfile_line(user: AclUser, password: str) -> str:
    """A line of a Redis ``aclfile``: the password stored as its SHA-256."""
    digest = hashlib.sha256(password.encode()).hexdigest()
    return " ".join(["user", user.name, "on", f"#{digest}", *user.rules])


def command_line(user: AclUser, password: str) -> str:
    """One ``ACL SETUSER`` line for `redis-cli` (selectors are quoted: they hold spaces)."""
    args = [f'"{a}"' if " " in a else a for a in setuser_args(user, password)]
    return " ".join(["ACL", "SETUSER", *args])


def apply(client: SyncRedis, users: Sequence[AclUser], passwords: dict[str, str]) -> None:
    """Create or replace the users on a live server, or on every node of a Redis Cluster,
    replicas too: ACL users are per node, and a replica promoted after a failover must know
    them (needs an admin connection)."""
    with every_node_sync(client) as nodes:
        for node in nodes:
            for user in users:
                node.execute_command("ACL", "SETUSER", *setuser_args(user, passwords[user.name]))  # type: ignore[no-untyped-call]


# ------------------------------------------------------------------ `kcp acl`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--agent",
        action="append",
        default=[],
        metavar="NAME",
        help="an agent to make a user for (repeatable)",
    )
    parser.add_argument(
        "--format",
        choices=("commands", "aclfile"),
        default="commands",
        help="ACL SETUSER commands for redis-cli (default), or lines for a Redis aclfile",
    )
    parser.add_argument(
        "--secrets-dir",
        type=Path,
        help="read/write one <user>.env per user (KCP_REDIS_USERNAME/PASSWORD, mode 0600); "
        "required for --format aclfile, whose lines hold only password hashes",
    )
    parser.add_argument("--user-prefix", default="kcp-", help="prefix of the user names (default kcp-)")
    parser.add_argument(
        "--apply", action="store_true", help="run the ACL SETUSER commands on --redis-url (an admin user)"
    )
    parser.add_argument(
        "--disable-default", action="store_true", help="also turn the passwordless `default` user off"
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    """`kcp acl`: print (or apply) the users. Exit 0, 2 on bad input; with `--apply` a Redis
    failure raises its kcp error (`kcp` reports it with its exit code)."""
    try:
        users = build_users(Keys(settings.prefix), args.agent, user_prefix=args.user_prefix)
        if args.format == "aclfile" and args.secrets_dir is None:
            raise InvalidRequest("--format aclfile needs --secrets-dir (the file holds only password hashes)")
        passwords = passwords_for(users, args.secrets_dir)
    except OSError as exc:  # the secrets dir
        raise InvalidRequest(f"kcp acl: {exc}") from None
    if args.apply:
        with (
            map_redis_errors(where_from_url(settings.redis_url)),
            connect_sync(settings.redis_url, decode_responses=False) as client,
        ):
            apply(client, users, passwords)
            if args.disable_default:
                with every_node_sync(client) as nodes:
                    for node in nodes:
                        node.execute_command("ACL", "SETUSER", "default", "off")  # type: ignore[no-untyped-call]
        if args.json:
            print(json.dumps({"applied": [u.name for u in users], "url": redact_url(settings.redis_url)}))
        else:
            print(f"kcp acl: {len(users)} users set on {redact_url(settings.redis_url)}")
        return 0
    # stdout holds only lines Redis accepts (neither an aclfile nor redis-cli takes comments)
    line = aclfile_line if args.format == "aclfile" else command_line
    lines = [line(user, passwords[user.name]) for user in users]
    if args.disable_default:
        lines.append("user default off" if args.format == "aclfile" else "ACL SETUSER default off")
    if args.json:
        print(json.dumps({"format": args.format, "users": [u.name for u in users], "lines": lines}, indent=2))
    else:
        print("\n".join(lines))
    where = f"; credentials in {args.secrets_dir}" if args.secrets_dir else ""
    print(f"kcp acl: {len(users)} users for prefix {settings.prefix!r}{where}", file=sys.stderr)
    return 0
