"""Settings of the joiner (``pipeline join``), each field set by ``PIPELINE_JOINER_<FIELD>``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipeline.codec.slots import SlotConfig

__all__ = ["JoinerSettings"]


class JoinerSettings(BaseSettings):
    """How impressions and clicks are joined into labelled sample batches."""

    model_config = SettingsConfigDict(env_prefix="PIPELINE_JOINER_", frozen=True, extra="forbid")

    engine: Literal["confluent", "faust"] = Field(
        "confluent",
        description="confluent: the checkpointing runner (crash-tested); faust: the faust app "
        "(see docs/joiner.md for what each guarantees)",
    )
    app_id: str = Field(
        "joiner",
        min_length=1,
        description="Consumer group / faust app id and changelog name (the topic prefix is added)",
    )
    slots: str = Field(
        "user_id,item_id",
        description="Comma list of sparse slots; user_id and item_id come from the event fields, "
        "others from the impression's features map",
    )
    window_ms: int = Field(600_000, ge=0, description="Attribution window after an impression")
    lateness_ms: int = Field(
        5_000, ge=0, description="Allowed event-time disorder: watermark = min stream time - this"
    )
    idle_ms: int = Field(
        30_000, gt=0, description="Wall time after which a quiet stream stops holding the watermark"
    )
    retention_ms: int = Field(
        600_000, ge=0, description="How long after its window a key is remembered for dedup"
    )
    negative_rate: float = Field(
        1.0, gt=0.0, le=1.0, description="Keep each negative with this probability (weight 1/r)"
    )
    late_corrections: bool = Field(
        False, description="Emit a late click as a correction positive (kind 2 in the header)"
    )
    positives: Literal["click", "close"] = Field(
        "click",
        description="When a positive is emitted: at its click (freshest) or when its window "
        "closes, with the negatives (event-time order kept; no run of positives ahead of "
        "their negatives)",
    )
    batch_size: int = Field(1024, ge=1, description="Samples per SampleBatch message at most")
    linger_ms: int = Field(200, ge=0, description="Longest a sample waits for its batch to fill")
    checkpoint_interval_s: float = Field(
        5.0, gt=0, description="Seconds between state checkpoints (bounds replay after a crash)"
    )
    start_from: Literal["earliest", "latest"] = Field(
        "earliest", description="Where partitions without a checkpoint start"
    )
    impressions_topic: str = Field("events.impressions", description="Impressions topic")
    clicks_topic: str = Field("events.clicks", description="Clicks topic")
    samples_topic: str = Field("samples", description="Output topic of SampleBatch messages")
    dlq_topic: str = Field("samples.dlq", description="Dead-letter topic")

    @field_validator("slots")
    @classmethod
    def _slot_list(cls, value: str) -> str:
        names = [name.strip() for name in value.split(",")]
        try:
            SlotConfig(tuple(names))
        except ValueError as exc:
            raise ValueError(f"comma list of distinct non-empty slot names: {exc}") from None
        return ",".join(names)

    def slot_config(self) -> SlotConfig:
        """The fixed layout every emitted batch has (no dense features)."""
        return SlotConfig(tuple(self.slots.split(",")))
