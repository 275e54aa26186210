"""Settings of a trainer (``pipeline train``), each field set by ``PIPELINE_TRAIN_<FIELD>``."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipeline.config import check_exclusive, readable_file, secret_value
from pipeline.errors import ConfigError
from pipeline.train.schedule import StepSchedule

__all__ = ["TrainerSettings"]


class TrainerSettings(BaseSettings):
    """How one trainer consumes samples, uses the device cache and syncs with the PS."""

    model_config = SettingsConfigDict(env_prefix="PIPELINE_TRAIN_", frozen=True, extra="forbid")

    job: str = Field("ctr", min_length=1, description="Job name: metrics keys, consumer group")
    model: str | None = Field(
        None, description="Model spec YAML (default: deploy/models/<kind>.yaml of --model)"
    )
    tables: str | None = Field(None, description="Table catalog YAML (default deploy/tables.yaml)")
    trainer_id: str | None = Field(None, description="Trainer id (default: host-pid)")
    mode: Literal["async", "geo", "sync"] = Field(
        "async",
        description="async: push summed grads per pass; geo: local steps, push deltas; "
        "sync: push and wait until applied every batch",
    )
    batch_rows: int = Field(
        1024,
        ge=1,
        description="Samples per training step once the stream is established (async mode "
        "grows its steps up to this; sync and geo modes always use it)",
    )
    young_batch_rows: int = Field(
        32,
        ge=1,
        description="Async mode: samples per step while the stream is young; the step size "
        "doubles every --stage-batches batches up to --batch-rows (equal to --batch-rows: "
        "a fixed step size)",
    )
    stage_batches: int = Field(
        256, ge=1, description="Async mode: batches per stage of the step schedule"
    )
    sync_below_rows: int = Field(
        256,
        ge=0,
        description="Async mode: steps smaller than this are synchronous (pushed and applied "
        "before the next pull; 0: never)",
    )
    pass_batches: int = Field(
        2, ge=1, description="Batches per pass (the device cache window; sync mode uses 1)"
    )
    cache_rows: int = Field(1_000_000, ge=1, description="Device cache capacity per table (rows)")
    max_age_passes: int = Field(
        0, ge=0, description="Reuse cached rows pulled up to this many passes ago (geo: 8)"
    )
    device: str = Field("auto", description="Training device: auto (cuda if present), cpu, cuda")
    dense_sync_steps: int = Field(
        10, ge=1, description="Merge dense parameters through the PS dense table every N steps"
    )
    dense_sync_min_s: float = Field(
        0.25,
        ge=0,
        description="...and at most this often (seconds): small steps would otherwise move "
        "the dense blob through Redis hundreds of times a second",
    )
    geo_lr: float = Field(0.05, gt=0, description="Geo mode: local Adagrad learning rate")
    max_inflight: int = Field(
        4, ge=1, description="Pushes not yet applied before the trainer waits (staleness bound)"
    )
    metrics_window_s: float = Field(10.0, gt=0, description="Metrics window length (seconds)")
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="Prometheus port (0 = any free port, unset = none)"
    )
    metrics_host: str = Field(
        "127.0.0.1",
        description="Address the Prometheus exporter listens on (0.0.0.0: every interface, "
        "for a scraper on another host or container)",
    )
    metrics_token: SecretStr | None = Field(
        None,
        description="Bearer token the exporter requires on /metrics (secret; /health stays "
        "open); unset: no authentication",
    )
    metrics_token_file: Path | None = Field(
        None, description="File holding the exporter's bearer token (instead of METRICS_TOKEN)"
    )
    samples_topic: str = Field("samples", description="Topic of SampleBatch messages")
    dlq_topic: str = Field("samples.dlq", description="Dead-letter topic")
    metrics_topic: str = Field("metrics", description="Metrics topic")
    seed: int = Field(0, description="Seed of the dense initialization (same on every trainer)")
    ps_wait_s: float = Field(
        300.0,
        ge=0,
        description="At start, wait this long for the shard servers of every table to "
        "register and come up (a trainer may start before them), and for a running trainer "
        "to write back lost dense parameters, before failing",
    )
    snapshot_dir: str | None = Field(
        None,
        description="The job's snapshot directory: a trainer that finds the dense table gone "
        "(Redis lost its data) while the model exists restores it, and its dense optimizer "
        "state, from the newest snapshot there",
    )

    @field_validator("metrics_token_file")
    @classmethod
    def _token_file(cls, value: Path | None) -> Path | None:
        return readable_file(value)

    @model_validator(mode="after")
    def _one_token(self) -> TrainerSettings:
        check_exclusive(self, "metrics_token", "metrics_token_file")
        return self

    def metrics_token_value(self) -> str | None:
        """The exporter's bearer token, inline or from :attr:`metrics_token_file`."""
        value = secret_value(self.metrics_token, self.metrics_token_file)
        if value is not None and not value.strip():
            raise ConfigError("the metrics token is empty (PIPELINE_TRAIN_METRICS_TOKEN[_FILE])")
        return value

    def schedule(self) -> StepSchedule:
        """The step schedule of :attr:`mode`: growing in async mode, fixed otherwise."""
        if self.mode == "sync":
            return StepSchedule.fixed(self.batch_rows, 1, synchronous=True)
        if self.mode == "geo":
            return StepSchedule.fixed(self.batch_rows, self.pass_batches)
        return StepSchedule(
            batch_rows=self.batch_rows,
            pass_batches=self.pass_batches,
            young_rows=min(self.young_batch_rows, self.batch_rows),
            stage_batches=self.stage_batches,
            sync_below_rows=self.sync_below_rows,
        )
