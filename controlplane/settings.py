"""KCP_* settings, read from the environment (and overridden by CLI flags)."""

from __future__ import annotations

import re

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Settings shared by every kcp process. Environment variables use the `KCP_` prefix."""

    model_config = SettingsConfigDict(env_prefix="KCP_", extra="ignore")

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis URL (redis:// or rediss://)")
    prefix: str = Field("kcp:", description="prefix of every Redis key kcp writes")
    heartbeat_interval: float = Field(1.0, gt=0, le=60, description="agent heartbeat period, seconds")
    lease_ttl: float = Field(3.0, gt=0, le=600, description="agent lease time-to-live, seconds")
    reconcile_interval: float = Field(0.5, gt=0, le=60, description="control-plane reconcile period, seconds")
    leader_ttl: float = Field(3.0, gt=0, le=600, description="control-plane leader lease, seconds")
    ready_timeout: float = Field(30.0, ge=0, le=3600, description="create/scale wait for kernels, seconds")
    max_kernels_per_cluster: int = Field(256, ge=1, le=10_000, description="upper bound on any kernel count")
    max_request_bytes: int = Field(1 << 20, ge=1024, description="largest accepted request, bytes (JSON)")

    @field_validator("prefix")
    @classmethod
    def _prefix_shape(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,32}:", value):
            raise ValueError("prefix must be 1-32 of [A-Za-z0-9_.-] followed by ':' (e.g. 'kcp:')")
        return value
