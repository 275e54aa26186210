"""Typed, frozen settings, one object per role, each field settable by env var.

Every settings class reads ``PIPELINE_<GROUP>_<FIELD>`` (for example
``PIPELINE_KAFKA_BOOTSTRAP``); the env var of each field is listed in
``docs/configuration.md`` (generated from these classes by ``pipeline config
docs``). Defaults point at the embedded local stack (``pipeline up``).
Secrets are :class:`pydantic.SecretStr` and never printed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipeline.errors import ConfigError

__all__ = [
    "ALL_SETTINGS",
    "KafkaSettings",
    "PSSettings",
    "ProcessSettings",
    "RedisSettings",
    "StackSettings",
    "TopicsSettings",
    "env_var",
    "load",
]

DEFAULT_BROKER_PORT = 19092
DEFAULT_REDIS_PORT = 16379


def _settings(prefix: str) -> SettingsConfigDict:
    return SettingsConfigDict(env_prefix=prefix, frozen=True, extra="forbid")


class ProcessSettings(BaseSettings):
    """What every role process takes, whatever its role (``pipeline --threads``)."""

    model_config = _settings("PIPELINE_")

    threads: int | None = Field(
        None,
        ge=1,
        description="Cores this process may use for math (torch intra-op, OpenMP, BLAS); "
        "unset: the CPUs available to it (affinity, container CPU quota). Give each role on "
        "a shared box its share (pipeline/threads.py)",
    )


class KafkaSettings(BaseSettings):
    """How every role reaches Kafka (a real cluster or the embedded broker)."""

    model_config = _settings("PIPELINE_KAFKA_")

    bootstrap: str = Field(
        f"127.0.0.1:{DEFAULT_BROKER_PORT}", description="bootstrap.servers, host:port[,...]"
    )
    session_timeout_ms: int = Field(
        6000,
        ge=1000,
        le=300_000,
        description="Consumer-group session timeout; keep it short (2-6 s) on the embedded broker, "
        "whose group join takes about half of it.",
    )
    security_protocol: str = Field(
        "PLAINTEXT", description="security.protocol: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL"
    )
    sasl_mechanism: str | None = Field(
        None, description="sasl.mechanism, e.g. PLAIN, SCRAM-SHA-512"
    )
    sasl_username: str | None = Field(None, description="sasl.username")
    sasl_password: SecretStr | None = Field(None, description="sasl.password (secret)")

    @field_validator("security_protocol")
    @classmethod
    def _known_protocol(cls, value: str) -> str:
        allowed = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
        if value.upper() not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return value.upper()

    def client_config(self) -> dict[str, Any]:
        """The confluent-kafka settings common to producers, consumers and admin clients."""
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap,
            "security.protocol": self.security_protocol,
        }
        if self.sasl_mechanism:
            conf["sasl.mechanism"] = self.sasl_mechanism
        if self.sasl_username:
            conf["sasl.username"] = self.sasl_username
        if self.sasl_password is not None:
            conf["sasl.password"] = self.sasl_password.get_secret_value()
        return conf


class RedisSettings(BaseSettings):
    """How the parameter server front and its clients reach Redis."""

    model_config = _settings("PIPELINE_REDIS_")

    url: str = Field(
        f"redis://127.0.0.1:{DEFAULT_REDIS_PORT}/0",
        description="redis:// or rediss:// URL without password (use PIPELINE_REDIS_PASSWORD)",
    )
    password: SecretStr | None = Field(None, description="Redis AUTH password (secret)")
    cluster: bool = Field(False, description="Use a Redis Cluster client instead of a single node")

    @field_validator("url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value


class StackSettings(BaseSettings):
    """The embedded local stack started by ``pipeline up``."""

    model_config = _settings("PIPELINE_STACK_")

    state_dir: Path = Field(
        Path(".pipeline"), description="Where PIDs, logs and the stack state file live"
    )
    host: str = Field("127.0.0.1", description="Loopback address the services bind to")
    broker_port: int = Field(DEFAULT_BROKER_PORT, ge=1, le=65535, description="Broker port")
    redis_port: int = Field(DEFAULT_REDIS_PORT, ge=1, le=65535, description="redis-server port")
    bootstrap: str | None = Field(
        None, description="Use this external Kafka instead of starting the embedded broker"
    )
    redis_url: str | None = Field(
        None, description="Use this external Redis instead of starting redis-server"
    )
    start_timeout_s: float = Field(
        15.0, gt=0, description="How long to wait for each service to answer"
    )


class TopicsSettings(BaseSettings):
    """Where topic declarations live and how names are mapped onto a cluster."""

    model_config = _settings("PIPELINE_TOPICS_")

    dir: Path | None = Field(
        None, description="Folder of topics/*.yaml (default: the repository's topics/)"
    )
    prefix: str = Field(
        "", description="Prepended to every topic name (isolates tests and tenants)"
    )


class PSSettings(BaseSettings):
    """A parameter-server shard server (``pipeline ps``)."""

    model_config = _settings("PIPELINE_PS_")

    shard: int = Field(0, ge=0, description="This server's shard index (0-based)")
    shards: int = Field(1, ge=1, le=4096, description="Total number of shards of every table")
    tables: Path | None = Field(
        None, description="YAML file of table specs (default: the repository's deploy/tables.yaml)"
    )
    data_dir: Path | None = Field(
        None, description="Checkpoints and the SSD tier; unset = memory only, no crash recovery"
    )
    hot_budget_rows: int | None = Field(
        None, ge=1, description="Rows kept in memory per table; the rest go to the SSD tier"
    )
    checkpoint_interval_s: float = Field(30.0, gt=0, description="Seconds between checkpoints")
    shrink_interval_s: float = Field(3600.0, gt=0, description="Seconds between decay/eviction")
    read_count: int = Field(64, ge=1, description="Stream entries read per round")
    block_ms: int = Field(100, ge=1, description="How long one read waits for new entries")
    cold_block_cache_mb: int = Field(512, ge=8, description="RocksDB block cache of the SSD tier")


ALL_SETTINGS: tuple[type[BaseSettings], ...] = (
    ProcessSettings,
    KafkaSettings,
    RedisSettings,
    StackSettings,
    TopicsSettings,
    PSSettings,
)

_S = TypeVar("_S", bound=BaseSettings)


def env_var(cls: type[BaseSettings], field: str) -> str:
    """The environment variable that sets ``field`` of ``cls``."""
    prefix = str(cls.model_config.get("env_prefix", ""))
    return f"{prefix}{field}".upper()


def load(cls: type[_S], **overrides: Any) -> _S:
    """Build settings from env vars plus explicit overrides (None means unset).

    Raises :class:`ConfigError` naming each bad field with its env var.
    """
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        return cls(**given)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = ".".join(str(part) for part in err["loc"]) or "?"
            problems.append(f"{field} ({env_var(cls, field)}): {err['msg']}")
        raise ConfigError(f"invalid {cls.__name__}: " + "; ".join(problems)) from None
