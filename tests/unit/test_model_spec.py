"""ModelSpec: validation messages, dict/YAML round trips, checks against catalog and stream."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipeline.codec.slots import SlotConfig
from pipeline.errors import ConfigError
from pipeline.ingest.adapters.criteo import CRITEO_SLOTS
from pipeline.model.spec import ModelSpec
from pipeline.ps.catalog import load_catalog
from pipeline.ps.spec import TableSpec

pytestmark = pytest.mark.unit

MODELS_DIR = Path(__file__).resolve().parents[2] / "deploy" / "models"
CATALOG = {"wide": TableSpec(name="wide", dim=1), "deep": TableSpec(name="deep", dim=16)}


def base(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"kind": "wide_deep", "slots": ["a", "b", "c"], "dense_dim": 2}
    doc.update(overrides)
    return doc


@pytest.mark.parametrize("kind", ["lr", "wide_deep", "deepfm"])
def test_dict_round_trip(kind: str) -> None:
    spec = ModelSpec.from_dict(
        base(kind=kind, name="m1", hidden=[8, 4], dense_optimizer="sgd", bias_init=-1.5)
    )
    again = ModelSpec.from_dict(spec.to_dict())
    assert again == spec
    assert spec.slots == ("a", "b", "c") and spec.hidden == (8, 4)
    assert isinstance(spec.to_dict()["slots"], list)


def test_yaml_round_trip(tmp_path: Path) -> None:
    import yaml

    spec = ModelSpec.from_dict(base(kind="deepfm", deep_dim=8, dropout=0.25, bias_init=0))
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(spec.to_dict()))
    assert ModelSpec.from_yaml(path) == spec
    assert spec.bias_init == 0.0 and isinstance(spec.bias_init, float)


def test_defaults_and_derived_names() -> None:
    spec = ModelSpec(kind="wide_deep", slots=("a",), dense_dim=0)
    assert spec.name == "ctr" and spec.deep_table == "deep" and spec.hidden == (128, 64)
    assert spec.tables() == {"wide": 1, "deep": 16}
    assert spec.dense_table_name() == "model:ctr"
    assert spec.has_deep


def test_lr_ignores_deep_table() -> None:
    spec = ModelSpec.from_dict(base(kind="lr", deep_table="deep", deep_dim=4))
    assert spec.deep_table is None and not spec.has_deep
    assert spec.tables() == {"wide": 1}
    spec.check({"wide": TableSpec(name="wide", dim=1)})  # no deep table needed


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ([1, 2], "model: expected a mapping, got list"),
        (base(colour="red"), "colour: unknown field; allowed fields: name, kind, slots"),
        ({"slots": ["a"], "dense_dim": 0}, "kind: required field is missing"),
        ({"kind": "lr", "dense_dim": 0}, "slots: required field is missing"),
        ({"kind": "lr", "slots": ["a"]}, "dense_dim: required field is missing"),
        (base(kind="fm"), "kind: must be one of lr, wide_deep, deepfm; got 'fm'"),
        (base(name="a b"), "name: must be a non-empty string without {}:/ or spaces; got 'a b'"),
        (base(name=""), "name: must be a non-empty string"),
        (base(slots=[]), "slots: must name at least one slot"),
        (base(slots="abc"), "slots: expected a list of names, got 'abc'"),
        (base(slots=["a", ""]), "slots: every slot must be a non-empty string, got ''"),
        (base(slots=["a", 3]), "slots: every slot must be a non-empty string, got 3"),
        (base(slots=["a", "b", "a"]), "slots: duplicate slot names: a"),
        (base(dense_dim=-1), "dense_dim: must be in [0, 1048576], got -1"),
        (base(dense_dim=True), "dense_dim: expected an integer, got True"),
        (base(dense_dim=1.5), "dense_dim: expected an integer, got 1.5"),
        (base(wide_table="w:1"), "wide_table: must be a non-empty string"),
        (base(deep_table=None), "deep_table: required for kind 'wide_deep'"),
        (base(deep_table="wide"), "deep_table: must differ from wide_table ('wide')"),
        (base(deep_table="{x}"), "deep_table: must be a non-empty string"),
        (base(deep_dim=0), "deep_dim: must be in [1, 4096], got 0"),
        (base(hidden=[64, 0]), "hidden: must be in [1, 65536], got 0"),
        (base(hidden=64), "hidden: expected a list of names, got 64"),
        (base(hidden=[2.5]), "hidden: expected an integer, got 2.5"),
        (base(dense_optimizer="rmsprop"), "dense_optimizer: must be one of adam, adagrad, sgd"),
        (base(dense_lr=0), "dense_lr: must be > 0, got 0"),
        (base(dense_lr="fast"), "dense_lr: expected a finite number, got 'fast'"),
        (base(bias_init=float("nan")), "bias_init: expected a finite number, got nan"),
        (base(dropout=1.0), "dropout: must be in [0, 1), got 1.0"),
        (base(dropout=-0.1), "dropout: must be in [0, 1), got -0.1"),
    ],
)
def test_invalid_fields_are_named(doc: Any, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        ModelSpec.from_dict(doc)
    assert message in str(info.value)


def test_yaml_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"model spec .*nope\.yaml: No such file"):
        ModelSpec.from_yaml(missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: [lr\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: malformed YAML"):
        ModelSpec.from_yaml(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("kind: lr\nslots: [a]\ndense_dim: 0\ndeep_dimm: 3\n")
    with pytest.raises(ConfigError, match=r"wrong\.yaml: deep_dimm: unknown field"):
        ModelSpec.from_yaml(wrong)


def test_check_missing_table() -> None:
    spec = ModelSpec.from_dict(base(deep_table="deep2"))
    with pytest.raises(ConfigError) as info:
        spec.check(CATALOG)
    assert str(info.value) == (
        "model spec 'ctr' references table 'deep2', which no table spec defines (known: wide, deep)"
    )


def test_check_dims() -> None:
    with pytest.raises(ConfigError) as info:
        ModelSpec.from_dict(base(deep_dim=8)).check(CATALOG)
    assert str(info.value) == (
        "model spec 'ctr' needs table 'deep' with dim 8 (deep_dim), but its table spec has dim 16"
    )
    wide4 = {"wide": TableSpec(name="wide", dim=4), "deep": CATALOG["deep"]}
    with pytest.raises(ConfigError, match=r"table 'wide' with dim 1 \(wide_table\).* dim 4"):
        ModelSpec.from_dict(base()).check(wide4)


def test_check_stream_layout() -> None:
    spec = ModelSpec.from_dict(base())
    spec.check(CATALOG, SlotConfig(("c", "x", "b", "a"), 2))  # a superset, any order
    with pytest.raises(ConfigError) as info:
        spec.check(CATALOG, SlotConfig(("a", "c"), 2))
    assert str(info.value) == (
        "model spec 'ctr' reads slot 'b', which the stream layout does not carry "
        "(stream slots: a, c)"
    )
    with pytest.raises(ConfigError) as info:
        spec.check(CATALOG, SlotConfig(("a", "b", "c"), 13))
    assert str(info.value) == (
        "model spec 'ctr' expects dense_dim 2, but the stream carries 13 dense features"
    )


def test_check_accepts_the_catalog_list() -> None:
    spec = ModelSpec.from_dict(base())
    spec.check(list(CATALOG.values()))
    with pytest.raises(ConfigError, match="known: none"):
        spec.check([])


@pytest.mark.parametrize(
    ("file", "kind"),
    [("lr.yaml", "lr"), ("wide_deep.yaml", "wide_deep"), ("deepfm.yaml", "deepfm")],
)
def test_deploy_models_match_catalog_and_criteo(file: str, kind: str) -> None:
    spec = ModelSpec.from_yaml(MODELS_DIR / file)
    assert spec.kind == kind
    assert spec.slots == CRITEO_SLOTS and spec.dense_dim == 13
    spec.check(load_catalog(), SlotConfig(CRITEO_SLOTS, 13))
    assert set(spec.tables()) == ({"wide"} if kind == "lr" else {"wide", "deep"})


def test_events_model_matches_catalog_and_the_joined_generator_events() -> None:
    from pipeline.ingest.generator import SLOTS, TrafficGenerator
    from pipeline.joiner.settings import JoinerSettings

    spec = ModelSpec.from_yaml(MODELS_DIR / "events_deepfm.yaml")
    assert spec.kind == "deepfm" and spec.slots == SLOTS and spec.dense_dim == 0
    # the layout the joiner emits with these slots, and the generator's sample layout
    joined = JoinerSettings(slots=",".join(SLOTS)).slot_config()
    assert joined == TrafficGenerator().slot_config
    spec.check(load_catalog(), joined)
    wide = next(t for t in load_catalog() if t.name == "wide")
    assert spec.linear_lr == wide.optimizer.lr  # as the comment in the spec says
