"""The layout rule for default learning rates, and the linear_lr optimizer group."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline.codec.slots import SlotConfig
from pipeline.errors import ConfigError
from pipeline.ingest.adapters.criteo import CRITEO_SLOTS
from pipeline.model.modules import build_model
from pipeline.ps.catalog import load_catalog
from pipeline.train.defaults import deep_lr, default_model, default_tables, wide_lr
from pipeline.train.dense_opt import dense_optimizer

pytestmark = pytest.mark.unit


def test_rule_matches_the_shipped_criteo_catalog() -> None:
    layout = SlotConfig(CRITEO_SLOTS, 13)
    assert wide_lr(layout) == pytest.approx(1.5 / 40)
    assert deep_lr(layout) == pytest.approx(0.5 / 26)
    shipped = {t.name: t for t in load_catalog()}
    assert shipped["wide"].optimizer.lr == pytest.approx(wide_lr(layout))
    assert shipped["deep"].optimizer.lr == pytest.approx(deep_lr(layout), rel=0.05)


def test_default_model_checks_against_its_tables() -> None:
    layout = SlotConfig(("a", "b", "c"), 2)
    tables = default_tables(layout, prefix="x_")
    spec = default_model(layout, prefix="x_")
    spec.check({t.name: t for t in tables}, layout)
    assert spec.linear_lr == pytest.approx(1.5 / 6)
    assert tables[0].optimizer.lr == pytest.approx(1.5 / 6)
    assert tables[1].optimizer.lr == pytest.approx(0.5 / 3)


def test_linear_lr_trains_bias_and_linear_with_adagrad_and_the_rest_with_adam() -> None:
    layout = SlotConfig(("a", "b"), 3)
    spec = default_model(layout, hidden=(4,))
    model = build_model(spec)
    opt = dense_optimizer(spec, model)
    parts = opt.parts
    assert isinstance(parts[0], torch.optim.Adagrad)
    assert isinstance(parts[1], torch.optim.Adam)
    linear = {id(p) for g in parts[0].param_groups for p in g["params"]}
    assert linear == {id(model.bias), id(model.dense_linear.weight)}  # type: ignore[union-attr]
    rest = {id(p) for g in parts[1].param_groups for p in g["params"]}
    assert rest == {id(p) for p in model.parameters()} - linear
    with pytest.raises(ConfigError, match="linear_lr"):
        dataclasses.replace(spec, linear_lr=0.0)
