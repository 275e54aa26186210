"""Settings of a trainer (``pipeline train``), each field set by ``PIPELINE_TRAIN_<FIELD>``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

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
    batch_rows: int = Field(256, ge=1, description="Samples per training step")
    pass_batches: int = Field(
        4, ge=1, description="Batches per pass (the device cache window; sync mode uses 1)"
    )
    cache_rows: int = Field(1_000_000, ge=1, description="Device cache capacity per table (rows)")
    max_age_passes: int = Field(
        0, ge=0, description="Reuse cached rows pulled up to this many passes ago (geo: 8)"
    )
    device: str = Field("auto", description="Training device: auto (cuda if present), cpu, cuda")
    dense_sync_steps: int = Field(
        10, ge=1, description="Merge dense parameters through the PS dense table every N steps"
    )
    geo_lr: float = Field(0.05, gt=0, description="Geo mode: local Adagrad learning rate")
    max_inflight: int = Field(
        4, ge=1, description="Pushes not yet applied before the trainer waits (staleness bound)"
    )
    metrics_window_s: float = Field(10.0, gt=0, description="Metrics window length (seconds)")
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="Prometheus port (0 = any free port, unset = none)"
    )
    samples_topic: str = Field("samples", description="Topic of SampleBatch messages")
    dlq_topic: str = Field("samples.dlq", description="Dead-letter topic")
    metrics_topic: str = Field("metrics", description="Metrics topic")
    seed: int = Field(0, description="Seed of the dense initialization (same on every trainer)")
