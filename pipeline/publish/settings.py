"""Settings of ``pipeline serve``, each field set by ``PIPELINE_SERVE_<FIELD>``."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipeline.config import check_exclusive, readable_file, secret_value
from pipeline.errors import ConfigError

__all__ = ["ServeSettings"]


class ServeSettings(BaseSettings):
    """Where the prediction server listens and who may call it.

    Loopback by default: a container or a host that serves others sets
    ``PIPELINE_SERVE_HOST=0.0.0.0`` (or ``--host``) explicitly, ideally with a token.
    """

    model_config = SettingsConfigDict(env_prefix="PIPELINE_SERVE_", frozen=True, extra="forbid")

    host: str = Field("127.0.0.1", description="Address to listen on (0.0.0.0: every interface)")
    port: int = Field(8080, ge=0, le=65535, description="Port to listen on (0: any free port)")
    token: SecretStr | None = Field(
        None,
        description="Bearer token required on /predict and /metrics (secret; /health stays "
        "open); unset: no authentication",
    )
    token_file: Path | None = Field(
        None, description="File holding the bearer token (instead of PIPELINE_SERVE_TOKEN)"
    )

    @field_validator("token_file")
    @classmethod
    def _file_exists(cls, value: Path | None) -> Path | None:
        return readable_file(value)

    @model_validator(mode="after")
    def _one_token(self) -> ServeSettings:
        check_exclusive(self, "token", "token_file")
        return self

    def token_value(self) -> str | None:
        """The bearer token, inline or read from :attr:`token_file` (None: no auth)."""
        value = secret_value(self.token, self.token_file)
        if value is not None and not value.strip():
            raise ConfigError("the serve token is empty (PIPELINE_SERVE_TOKEN or _TOKEN_FILE)")
        return value
