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
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipeline.errors import ConfigError
from pipeline.redact import mask_url

__all__ = [
    "ALL_SETTINGS",
    "KafkaSettings",
    "PSSettings",
    "ProcessSettings",
    "RedisSettings",
    "StackSettings",
    "TopicsSettings",
    "check_exclusive",
    "env_var",
    "load",
    "readable_file",
    "secret_value",
]

DEFAULT_BROKER_PORT = 19092
DEFAULT_REDIS_PORT = 16379


def _settings(prefix: str) -> SettingsConfigDict:
    return SettingsConfigDict(env_prefix=prefix, frozen=True, extra="forbid")


def readable_file(path: Path | None) -> Path | None:
    """``path`` when it is a readable file (secrets and certificates fail at startup)."""
    if path is not None:
        try:
            with path.open("rb"):
                pass
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    return path


def secret_value(inline: SecretStr | None, path: Path | None) -> str | None:
    """A credential given inline or as a file: the file's text less trailing newlines,
    read on every call (a rotated secret file is picked up by new connections)."""
    if inline is not None:
        return inline.get_secret_value()
    if path is None:
        return None
    try:
        return path.read_text().rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(f"cannot read secret file {path}: {exc.strerror or exc}") from None


def check_exclusive(settings: BaseSettings, inline: str, file: str) -> None:
    if getattr(settings, inline) is not None and getattr(settings, file) is not None:
        prefix = str(settings.model_config.get("env_prefix", ""))
        raise ValueError(f"set {prefix}{inline.upper()} or {prefix}{file.upper()}, not both")


# librdkafka properties that have a setting of their own, or that the roles own
# (offsets are committed by the pipeline; each role picks its group).
_OWN_SETTING = {
    "bootstrap.servers": "PIPELINE_KAFKA_BOOTSTRAP",
    "security.protocol": "PIPELINE_KAFKA_SECURITY_PROTOCOL",
    "sasl.mechanism": "PIPELINE_KAFKA_SASL_MECHANISM",
    "sasl.mechanisms": "PIPELINE_KAFKA_SASL_MECHANISM",
    "sasl.username": "PIPELINE_KAFKA_SASL_USERNAME",
    "sasl.password": "PIPELINE_KAFKA_SASL_PASSWORD(_FILE)",
    "ssl.ca.location": "PIPELINE_KAFKA_SSL_CA_FILE",
    "ssl.certificate.location": "PIPELINE_KAFKA_SSL_CERT_FILE",
    "ssl.key.location": "PIPELINE_KAFKA_SSL_KEY_FILE",
    "ssl.key.password": "PIPELINE_KAFKA_SSL_KEY_PASSWORD",
    "session.timeout.ms": "PIPELINE_KAFKA_SESSION_TIMEOUT_MS",
}
_ROLE_OWNED = ("group.id", "enable.auto.commit", "transactional.id")


def _librdkafka_properties(values: dict[str, str]) -> dict[str, str]:
    """Pass-through properties by their librdkafka names (``SOCKET_KEEPALIVE_ENABLE`` ->
    ``socket.keepalive.enable``); refuses those with a setting of their own."""
    out: dict[str, str] = {}
    for raw, value in values.items():
        name = raw.strip().lower()
        if "." not in name:
            name = name.replace("_", ".")
        if name in _OWN_SETTING:
            raise ValueError(f"{name}: set it with {_OWN_SETTING[name]}")
        if name in _ROLE_OWNED:
            raise ValueError(f"{name} is set by each role and cannot be overridden")
        out[name] = str(value)
    return out


def _read_properties(path: Path | None) -> dict[str, str]:
    """``name=value`` lines of a librdkafka properties file (``#``/``!`` comments)."""
    if path is None:
        return {}
    out: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith(("#", "!")):
            continue
        name, sep, value = line.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"{path} line {number}: expected name=value")
        out[name.strip()] = value.strip()
    return out


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
    """How every role reaches Kafka (a real cluster or the embedded broker).

    Any other librdkafka property goes through ``extra`` (``PIPELINE_KAFKA_EXTRA__<NAME>``,
    underscores standing for dots) or ``extra_file`` (``name=value`` lines); both apply
    to every producer, consumer and admin client, after the roles' own tuning.
    """

    model_config = SettingsConfigDict(
        env_prefix="PIPELINE_KAFKA_", frozen=True, extra="forbid", env_nested_delimiter="__"
    )

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
        None, description="sasl.mechanism, e.g. PLAIN, SCRAM-SHA-256, SCRAM-SHA-512"
    )
    sasl_username: str | None = Field(None, description="sasl.username")
    sasl_password: SecretStr | None = Field(None, description="sasl.password (secret)")
    sasl_password_file: Path | None = Field(
        None, description="File holding sasl.password (instead of PIPELINE_KAFKA_SASL_PASSWORD)"
    )
    ssl_ca_file: Path | None = Field(
        None, description="ssl.ca.location: CA bundle (PEM) the brokers' certificates chain to"
    )
    ssl_cert_file: Path | None = Field(
        None, description="ssl.certificate.location: client certificate (PEM) for mutual TLS"
    )
    ssl_key_file: Path | None = Field(
        None, description="ssl.key.location: the client certificate's private key (PEM)"
    )
    ssl_key_password: SecretStr | None = Field(
        None, description="ssl.key.password: passphrase of the private key (secret)"
    )
    extra: dict[str, str] = Field(
        default_factory=dict,
        description="Any other librdkafka property: PIPELINE_KAFKA_EXTRA__<NAME>=value, "
        "underscores standing for dots (PIPELINE_KAFKA_EXTRA__SOCKET_KEEPALIVE_ENABLE=true), "
        'or a JSON object in PIPELINE_KAFKA_EXTRA (\'{"client.rack": "a"}\'); wins over '
        "extra_file",
    )
    extra_file: Path | None = Field(
        None,
        description="librdkafka properties file (name=value lines, # comments) applied to "
        "every client",
    )

    @field_validator("security_protocol")
    @classmethod
    def _known_protocol(cls, value: str) -> str:
        allowed = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
        if value.upper() not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return value.upper()

    @field_validator("sasl_password_file", "ssl_ca_file", "ssl_cert_file", "ssl_key_file")
    @classmethod
    def _files_exist(cls, value: Path | None) -> Path | None:
        return readable_file(value)

    @field_validator("extra_file")
    @classmethod
    def _extra_file(cls, value: Path | None) -> Path | None:
        if value is not None:
            _read_properties(readable_file(value))  # fail at startup, naming the line
        return value

    @field_validator("extra")
    @classmethod
    def _extra_names(cls, value: dict[str, str]) -> dict[str, str]:
        return _librdkafka_properties(value)

    @model_validator(mode="after")
    def _consistent(self) -> KafkaSettings:
        check_exclusive(self, "sasl_password", "sasl_password_file")
        tls = self.security_protocol in ("SSL", "SASL_SSL")
        sasl = self.security_protocol.startswith("SASL_")
        if not tls and (self.ssl_ca_file or self.ssl_cert_file or self.ssl_key_file):
            raise ValueError(
                "ssl_ca_file/ssl_cert_file/ssl_key_file need security_protocol SSL or SASL_SSL "
                f"(PIPELINE_KAFKA_SECURITY_PROTOCOL is {self.security_protocol})"
            )
        if (self.ssl_cert_file is None) != (self.ssl_key_file is None):
            raise ValueError("ssl_cert_file and ssl_key_file go together (mutual TLS)")
        has_sasl = self.sasl_username or self.sasl_password or self.sasl_password_file
        if has_sasl and not sasl:
            raise ValueError(
                "SASL credentials need security_protocol SASL_PLAINTEXT or SASL_SSL "
                f"(PIPELINE_KAFKA_SECURITY_PROTOCOL is {self.security_protocol})"
            )
        return self

    def sasl_password_value(self) -> str | None:
        """sasl.password, inline or read from :attr:`sasl_password_file`."""
        return secret_value(self.sasl_password, self.sasl_password_file)

    def extra_config(self) -> dict[str, str]:
        """The pass-through librdkafka properties: ``extra_file`` overridden by ``extra``."""
        from_file = _read_properties(self.extra_file) if self.extra_file else {}
        return {**_librdkafka_properties(from_file), **self.extra}

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
        if (password := self.sasl_password_value()) is not None:
            conf["sasl.password"] = password
        for key, path in (
            ("ssl.ca.location", self.ssl_ca_file),
            ("ssl.certificate.location", self.ssl_cert_file),
            ("ssl.key.location", self.ssl_key_file),
        ):
            if path is not None:
                conf[key] = str(path)
        if self.ssl_key_password is not None:
            conf["ssl.key.password"] = self.ssl_key_password.get_secret_value()
        return {**conf, **self.extra_config()}


class RedisSettings(BaseSettings):
    """How the parameter server front and its clients reach Redis.

    TLS: a ``rediss://`` URL, plus the CA (and a client certificate and key where the
    server asks for one). ACL: ``username`` and ``password`` (or ``password_file``).
    """

    model_config = _settings("PIPELINE_REDIS_")

    url: str = Field(
        f"redis://127.0.0.1:{DEFAULT_REDIS_PORT}/0",
        description="redis:// or rediss:// (TLS) URL; keep the password out of it "
        "(PIPELINE_REDIS_PASSWORD or PIPELINE_REDIS_PASSWORD_FILE); printed masked",
    )
    username: str | None = Field(None, description="Redis ACL user (AUTH username password)")
    password: SecretStr | None = Field(None, description="Redis AUTH password (secret)")
    password_file: Path | None = Field(
        None,
        description="File holding the Redis password (a compose or Kubernetes secret), "
        "instead of PIPELINE_REDIS_PASSWORD",
    )
    tls_ca_file: Path | None = Field(
        None, description="CA bundle (PEM) to verify the server with (rediss:// only)"
    )
    tls_cert_file: Path | None = Field(
        None, description="Client certificate (PEM) when the server asks for one (rediss://)"
    )
    tls_key_file: Path | None = Field(
        None, description="Private key of the client certificate (PEM)"
    )
    tls_check_hostname: bool = Field(
        True, description="Check that the server certificate names the host of the URL"
    )
    cluster: bool = Field(False, description="Use a Redis Cluster client instead of a single node")

    @field_validator("url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @field_validator("password_file", "tls_ca_file", "tls_cert_file", "tls_key_file")
    @classmethod
    def _files_exist(cls, value: Path | None) -> Path | None:
        return readable_file(value)

    @model_validator(mode="after")
    def _consistent(self) -> RedisSettings:
        check_exclusive(self, "password", "password_file")
        if (self.password or self.password_file) and urlsplit(self.url).password:
            raise ValueError(
                "the password is given twice: in the URL and in password/password_file"
            )
        tls_files = self.tls_ca_file or self.tls_cert_file or self.tls_key_file
        if tls_files and not self.url.startswith("rediss://"):
            raise ValueError("tls_* files need a rediss:// URL (TLS)")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together (mutual TLS)")
        return self

    def password_value(self) -> str | None:
        """The AUTH password, inline or read from :attr:`password_file`."""
        return secret_value(self.password, self.password_file)

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``redis.Redis.from_url`` (and ``RedisCluster.from_url``)."""
        kwargs: dict[str, Any] = {}
        if self.username:
            kwargs["username"] = self.username
        if (password := self.password_value()) is not None:
            kwargs["password"] = password
        if self.url.startswith("rediss://"):
            kwargs["ssl_check_hostname"] = self.tls_check_hostname
            for key, path in (
                ("ssl_ca_certs", self.tls_ca_file),
                ("ssl_certfile", self.tls_cert_file),
                ("ssl_keyfile", self.tls_key_file),
            ):
                if path is not None:
                    kwargs[key] = str(path)
        return kwargs

    def masked_url(self) -> str:
        """The URL as it may be printed (password masked)."""
        return mask_url(self.url)


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
            msg = str(err["msg"]).removeprefix("Value error, ")
            if not err["loc"]:  # a check across fields names them itself
                problems.append(msg)
                continue
            field = str(err["loc"][0])
            where = ".".join(str(part) for part in err["loc"])
            problems.append(f"{where} ({env_var(cls, field)}): {msg}")
        raise ConfigError(f"invalid {cls.__name__}: " + "; ".join(problems)) from None
