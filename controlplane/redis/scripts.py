"""The Lua scripts in `lua/`, registered on a Redis client (EVALSHA, reloaded on NOSCRIPT)."""

from __future__ import annotations

from importlib import resources

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript


def lua_source(name: str) -> str:
    return resources.files("controlplane.redis").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


class Scripts:
    """One attribute per script; each file's header documents its KEYS and ARGV."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.enqueue: AsyncScript = redis.register_script(lua_source("enqueue"))
        self.claim: AsyncScript = redis.register_script(lua_source("claim"))
        self.finish: AsyncScript = redis.register_script(lua_source("finish"))
        self.cancel: AsyncScript = redis.register_script(lua_source("cancel"))
        self.kernel_start: AsyncScript = redis.register_script(lua_source("kernel_start"))
        self.kernel_stop: AsyncScript = redis.register_script(lua_source("kernel_stop"))
        self.rebind: AsyncScript = redis.register_script(lua_source("rebind"))
        self.leader: AsyncScript = redis.register_script(lua_source("leader"))
        self.outlier: AsyncScript = redis.register_script(lua_source("outlier"))
