"""KCP_* settings, read from the environment (and overridden by CLI flags)."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from controlplane.tls import ConnectionOptions, effective_url


class Settings(BaseSettings):
    """Settings shared by every kcp process. Environment variables use the `KCP_` prefix."""

    model_config = SettingsConfigDict(env_prefix="KCP_", extra="ignore")

    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        repr=False,  # it may hold a password
        description="Redis URL (redis://, rediss://, unix://, redis+sentinel://, redis+cluster:// and "
        "rediss+cluster://, docs/reliability.md says what each deployment guarantees); the "
        "redis_username/password/tls_* settings are folded into it (see controlplane/tls.py), so it is "
        "the complete connection string",
    )
    redis_username: str | None = Field(None, description="Redis ACL user (default: the URL's, or `default`)")
    redis_password: SecretStr | None = Field(None, description="Redis password (default: the URL's)")
    redis_tls_ca_file: Path | None = Field(None, description="CA bundle that signed the server's certificate")
    redis_tls_cert_file: Path | None = Field(None, description="client certificate (mutual TLS)")
    redis_tls_key_file: Path | None = Field(None, description="the client certificate's private key")
    redis_tls_check_hostname: bool | None = Field(
        None, description="verify the server certificate's host name (default: yes, for rediss:// URLs)"
    )
    prefix: str = Field("kcp:", description="prefix of every Redis key kcp writes")
    heartbeat_interval: float = Field(
        0.5, gt=0, le=60, description="agent heartbeat period (lease renewal, convergence), seconds"
    )
    lease_ttl: float = Field(
        1.5, gt=0, le=600, description="agent and kernel lease time-to-live (the detection time), seconds"
    )
    reconcile_interval: float = Field(0.5, gt=0, le=60, description="control-plane reconcile period, seconds")
    leader_ttl: float = Field(3.0, gt=0, le=600, description="control-plane leader lease, seconds")
    agent_poll: float = Field(
        5.0,
        gt=0,
        le=5,  # a blocking pop longer than `connect.MAX_BLOCK_SECONDS` would outlive the socket timeout
        description="agent: how often it re-reads its assignment without a wake-up (the level-triggered "
        "safety net behind `agent:{name}:wake`), seconds",
    )
    load_refresh: float = Field(
        5.0,
        gt=0,
        le=60,
        description="agent: a kernel's load record is rewritten at least this often when nothing changed "
        "(a change beyond a threshold is written within a heartbeat); it lives 3 times as long, seconds",
    )
    full_sweep_interval: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="control plane: a pass re-reads every agent, cluster and kernel at least this often "
        "(between sweeps it reads only what announced a change), seconds",
    )
    scrape_timeout: float = Field(
        2.0,
        gt=0,
        le=60,
        description="longest a /metrics scrape waits for Redis before reporting kcp_redis_up 0, seconds "
        "(keep it below Prometheus's scrape_timeout)",
    )
    down_retention: float = Field(
        900.0,
        ge=0,
        le=7 * 86400,
        description="how long an agent or kernel whose lease lapsed stays listed as down, seconds",
    )
    ready_timeout: float = Field(30.0, ge=0, le=3600, description="create/scale wait for kernels, seconds")
    max_kernels_per_cluster: int = Field(256, ge=1, le=10_000, description="upper bound on any kernel count")
    max_request_bytes: int = Field(
        1 << 20, ge=1024, le=64 << 20, description="largest accepted request, bytes (JSON)"
    )
    max_deliveries: int = Field(
        3, ge=1, le=100, description="redelivery budget: times a job may be handed to a kernel that then dies"
    )
    autoscale_cooldown: float = Field(
        10.0, ge=0, le=3600, description="autoscaler: pause after each scaling step, seconds"
    )
    autoscale_sustain: float = Field(
        2.0, ge=0, le=600, description="autoscaler: how long load must stay past a threshold, seconds"
    )

    @model_validator(mode="after")
    def _lease_outlives_heartbeats(self) -> Settings:
        # two renewals must fit in one lease, so one late heartbeat is never a death
        if self.lease_ttl < 2 * self.heartbeat_interval:
            raise ValueError(
                f"lease_ttl ({self.lease_ttl}s) must be at least twice heartbeat_interval "
                f"({self.heartbeat_interval}s)"
            )
        return self

    @model_validator(mode="after")
    def _fold_connection_options(self) -> Settings:
        password = self.redis_password.get_secret_value() if self.redis_password is not None else None
        self.redis_url = effective_url(
            self.redis_url,
            ConnectionOptions(
                username=self.redis_username,
                password=password,
                ca_file=self.redis_tls_ca_file,
                cert_file=self.redis_tls_cert_file,
                key_file=self.redis_tls_key_file,
                check_hostname=self.redis_tls_check_hostname,
            ),
        )
        return self

    @field_validator("prefix")
    @classmethod
    def _prefix_shape(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,32}:", value):
            raise ValueError("prefix must be 1-32 of [A-Za-z0-9_.-] followed by ':' (e.g. 'kcp:')")
        return value


def explain_settings_error(exc: ValidationError) -> str:
    """A settings error without the input values (they may hold a password or a URL with one)."""
    return "; ".join(
        f"{'.'.join(map(str, e['loc'])) + ': ' if e['loc'] else ''}{e['msg'].removeprefix('Value error, ')}"
        for e in exc.errors(include_input=False)
    )
