"""TableSpec parsing: defaults, round trip, and errors that name the field and allowed values."""

from __future__ import annotations

import json

import pytest

from pipeline.errors import ConfigError
from pipeline.ps.spec import OptimizerSpec, SpecError, TableSpec

pytestmark = pytest.mark.unit


def test_minimal_dict_gets_documented_defaults() -> None:
    spec = TableSpec.from_dict({"name": "deep", "dim": 16})
    assert spec.optimizer.kind == "adagrad"
    assert spec.accessor.nonclk_coeff == 0.1 and spec.accessor.clk_coeff == 1.0
    assert spec.serving.fp16 is False


def test_round_trip_through_json() -> None:
    spec = TableSpec.from_dict(
        {
            "name": "wide",
            "dim": 1,
            "initializer": {"kind": "zeros"},
            "optimizer": {"kind": "ftrl", "ftrl_alpha": 0.1, "l1": 1, "weight_clip": 5},
            "accessor": {"admit_threshold": 0, "admit_probability": 0.5},
            "serving": {"min_score": 0.2, "fp16": True},
        }
    )
    again = TableSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    assert isinstance(spec.optimizer.l1, float)  # ints normalised to floats


BAD = [
    # (section, overrides, field named in the error, text in the message)
    ("optimizer", {"kind": "rmsprop"}, "optimizer.kind", "sgd, adagrad, adam, ftrl"),
    ("optimizer", {"lr": -1}, "optimizer.lr", "> 0"),
    ("optimizer", {"beta1": 1.0}, "optimizer.beta1", "< 1"),
    ("optimizer", {"eps": float("nan")}, "optimizer.eps", "finite"),
    ("accessor", {"admit_probability": 1.5}, "accessor.admit_probability", "<= 1"),
    ("accessor", {"colour": 1}, "accessor.colour", "allowed fields"),
    ("initializer", {"kind": "xavier"}, "initializer.kind", "zeros, uniform, normal"),
    ("serving", {"fp16": "yes"}, "serving.fp16", "true or false"),
    (None, {"dim": 0}, "dim", "[1, 4096]"),
    (None, {"dim": None}, "dim", "missing"),
    (None, {"name": "a:b"}, "name", "without"),
    (None, {"vocab": 10}, "vocab", "allowed fields"),
]


@pytest.mark.parametrize(("section", "overrides", "field", "text"), BAD)
def test_validation_names_field_and_allowed_values(
    section: str | None, overrides: dict, field: str, text: str
) -> None:
    data: dict = {"name": "t", "dim": 8}
    if section is None:
        data.update(overrides)
        data = {k: v for k, v in data.items() if v is not None}
    else:
        data[section] = overrides
    with pytest.raises(SpecError) as info:
        TableSpec.from_dict(data)
    assert info.value.field == field
    assert text in str(info.value)
    assert isinstance(info.value, ConfigError) and isinstance(info.value, ValueError)


def test_specs_are_frozen() -> None:
    spec = OptimizerSpec()
    with pytest.raises(AttributeError):
        spec.lr = 1.0  # type: ignore[misc]
