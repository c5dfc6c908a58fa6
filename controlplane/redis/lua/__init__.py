"""kcp's Lua scripts, one `.lua` file each (its header documents KEYS, ARGV and the reply), and
their names: `Script` holds a file's source and the SHA1 that EVALSHA names it by.

`controlplane.redis.scripts` sends them; `controlplane.redis.errors` names a failed one.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from importlib import resources


@dataclass(frozen=True, slots=True)
class Script:
    """A Lua script and its SHA1 (what EVALSHA names it by)."""

    name: str
    source: str
    sha: str

    @classmethod
    def of(cls, name: str, source: str) -> Script:
        return cls(name, source, hashlib.sha1(source.encode("utf-8"), usedforsecurity=False).hexdigest())

    @classmethod
    def load(cls, name: str) -> Script:
        """`lua/{name}.lua`."""
        return cls.of(name, resources.files(__package__).joinpath(f"{name}.lua").read_text(encoding="utf-8"))


@functools.cache
def names_by_sha() -> dict[str, str]:
    """SHA1 -> name of every script in this folder."""
    return {
        script.sha: script.name
        for f in resources.files(__package__).iterdir()
        if f.name.endswith(".lua") and (script := Script.load(f.name.removesuffix(".lua")))
    }
