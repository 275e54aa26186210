"""Default learning rates derived from a stream's layout (no per-dataset tuning).

Measured on the Criteo sample and synthetic streams (docs/trainer.md, "Defaults"):
per-id Adagrad on the wide part with ``lr = 1.5 / features per row`` (slots + dense
features + the bias), deep embeddings with ``lr = 0.5 / slots``, the bias and dense
linear weights on the wide rate, and the output bias left to the trainer, which
starts it at the logit of the running CTR (``bias_init`` unset). A summed (not
averaged) batch loss makes a feature's step independent of the batch size, which is
why the rate scales with how many features share each row's gradient instead. The
batch size itself follows the trainer's step schedule (pipeline.train.schedule).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pipeline.codec.slots import SlotConfig
from pipeline.model.spec import ModelSpec
from pipeline.ps.spec import TableSpec

__all__ = ["deep_lr", "default_model", "default_tables", "wide_lr"]


def wide_lr(layout: SlotConfig) -> float:
    """1.5 / (slots + dense features + 1)."""
    return 1.5 / (len(layout.slots) + layout.dense_dim + 1)


def deep_lr(layout: SlotConfig) -> float:
    """0.5 / slots."""
    return 0.5 / len(layout.slots)


def default_tables(layout: SlotConfig, prefix: str = "", deep_dim: int = 16) -> list[TableSpec]:
    """A wide (dim 1) and a deep table with the layout's learning rates."""
    accessor: dict[str, Any] = {"delete_threshold": 0.8, "delete_after_unseen_days": 30}
    wide = {
        "name": f"{prefix}wide",
        "dim": 1,
        "initializer": {"kind": "zeros"},
        "optimizer": {"kind": "adagrad", "lr": wide_lr(layout), "initial_accumulator": 0.1},
        "accessor": {**accessor, "admit_threshold": 0.0},
    }
    deep = {
        "name": f"{prefix}deep",
        "dim": deep_dim,
        "initializer": {"kind": "uniform", "scale": 0.01},
        "optimizer": {"kind": "adagrad", "lr": deep_lr(layout), "initial_accumulator": 0.1},
        "accessor": {**accessor, "nonclk_coeff": 0.1, "clk_coeff": 1.0, "admit_threshold": 1.0},
    }
    return [TableSpec.from_dict(wide), TableSpec.from_dict(deep)]


def default_model(
    layout: SlotConfig, kind: str = "deepfm", prefix: str = "", **overrides: Any
) -> ModelSpec:
    """A model over every slot of ``layout`` reading :func:`default_tables`."""
    spec = ModelSpec(
        name=f"{prefix}{kind}",
        kind=kind,
        slots=layout.slots,
        dense_dim=layout.dense_dim,
        wide_table=f"{prefix}wide",
        deep_table=f"{prefix}deep",
        deep_dim=16,
        hidden=(256, 128),
        linear_lr=wide_lr(layout),
    )
    return dataclasses.replace(spec, **overrides) if overrides else spec
