"""Every schema parses and round-trips; strict encode and safe decode of row records."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import fastavro
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.codec import avro
from pipeline.codec.errors import REASONS, CodecError

pytestmark = pytest.mark.unit

EXAMPLES: dict[str, dict[str, Any]] = {
    "Impression": {
        "request_id": "r-1",
        "user_id": "u_42",
        "item_id": "i_7",
        "event_time": 1_700_000_000_123,
        "features": {"city": "Paris", "device": "ios"},
        "context": {"position": "3"},
    },
    "Click": {"request_id": "r-1", "user_id": "u_42", "item_id": "i_7", "event_time": 17},
    "Sample": {
        "label": 1.0,
        "weight": 0.5,
        "event_time": 1_700_000_000_000,
        "features": [{"slot": "C1", "ids": [-1, 0, 2**63 - 1]}, {"slot": "C2", "ids": []}],
        "dense": [0.25, -2.0],
    },
    "SampleBatch": {
        "layout_version": 1,
        "fingerprint": -5,
        "num_rows": 1,
        "slots": ["C1"],
        "dense_dim": 0,
        "labels": b"\x00\x00\x80?",
        "weights": b"\x00\x00\x80?",
        "event_times": bytes(8),
        "offsets": bytes(8),
        "ids": b"",
        "dense": b"",
    },
    "DeadLetter": {
        "value": b"\x00garbage",
        "key": b"k",
        "source_topic": "samples",
        "source_partition": 3,
        "source_offset": 12345678901,
        "reason": "avro_decode",
        "error": "avro_decode: SampleBatch: EOFError",
        "failed_at": 1_700_000_000_000,
        "original_size": None,
    },
    "ModelUpdateChunk": {
        "version": 42,
        "table": "deep",
        "chunk_index": 0,
        "chunk_count": 2,
        "kind": "tombstone",
        "payload": b"\x01\x02",
        "checksum": "sha256:00ff",
    },
    "ModelManifest": {
        "version": 42,
        "parent_version": 41,
        "kind": "delta",
        "chunk_counts": {"deep": 2, "wide": 1},
        "checksums": {"deep": ["sha256:aa", "sha256:bb"], "wide": ["sha256:cc"]},
        "max_event_time": 1_700_000_000_000,
        "offsets": [{"topic": "samples", "partition": 0, "offset": 99}],
        "created_ms": 1_700_000_000_500,
        "base_offset": 7,
    },
    "Metric": {
        "name": "auc",
        "window_start_ms": 0,
        "window_end_ms": 60_000,
        "trainer_id": "t0",
        "labels": {"scope": "window"},
        "value": 0.75,
        "auc_buckets": bytes(16),
    },
}


def test_schema_names_lists_every_schema() -> None:
    assert avro.schema_names() == sorted(EXAMPLES)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_schema_file_parses_with_logical_types_and_docs(name: str) -> None:
    raw = avro.load_schema(name)
    fastavro.parse_schema(raw, named_schemas={})
    assert raw["name"] == name
    assert raw["namespace"] == "pipeline"
    assert raw.get("doc")
    assert all(f.get("doc") for f in raw["fields"]), "every field documents itself"


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_roundtrip_every_schema(name: str) -> None:
    record = EXAMPLES[name]
    assert avro.decode(name, avro.encode(name, record)) == record


def test_defaults_fill_missing_optional_fields() -> None:
    record = {k: v for k, v in EXAMPLES["Impression"].items() if k != "context"}
    assert avro.decode("Impression", avro.encode("Impression", record))["context"] is None


def test_times_stay_int_milliseconds() -> None:
    decoded = avro.decode("Click", avro.encode("Click", EXAMPLES["Click"]))
    assert type(decoded["event_time"]) is int


@given(
    st.text(),
    st.dictionaries(st.text(), st.text(), max_size=5),
    st.integers(-(2**63), 2**63 - 1),
)
def test_impression_roundtrip_property(uid: str, features: dict[str, str], t: int) -> None:
    record = {
        "request_id": "r",
        "user_id": uid,
        "item_id": "i",
        "event_time": t,
        "features": features,
        "context": None,
    }
    assert avro.decode("Impression", avro.encode("Impression", record)) == record


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_unknown_field_is_named(name: str) -> None:
    with pytest.raises(CodecError, match="unknown field 'bogus_field'") as err:
        avro.encode(name, {**EXAMPLES[name], "bogus_field": 1})
    assert err.value.reason == "schema_mismatch"


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_missing_field_is_named(name: str) -> None:
    field = next(iter(EXAMPLES[name]))
    record = {k: v for k, v in EXAMPLES[name].items() if k != field}
    with pytest.raises(CodecError, match=f"missing field '{field}'") as err:
        avro.encode(name, record)
    assert err.value.reason == "schema_mismatch"


def test_nested_unknown_and_missing_fields_are_named() -> None:
    sample = EXAMPLES["Sample"]
    with pytest.raises(CodecError, match="extra") as err:
        avro.encode("Sample", {**sample, "features": [{"slot": "a", "ids": [], "extra": 1}]})
    assert err.value.reason == "schema_mismatch"
    with pytest.raises(CodecError, match="ids"):
        avro.encode("Sample", {**sample, "features": [{"slot": "a"}]})


@pytest.mark.parametrize(
    ("name", "field", "value"),
    [("Click", "event_time", "noon"), ("Sample", "label", "x"), ("ModelUpdateChunk", "kind", "x")],
)
def test_wrong_type_is_schema_mismatch(name: str, field: str, value: object) -> None:
    with pytest.raises(CodecError) as err:
        avro.encode(name, {**EXAMPLES[name], field: value})
    assert err.value.reason == "schema_mismatch"


@pytest.mark.parametrize("data", [b"", b"\xff" * 11, b"\x02\x7f", b"\x01"])
def test_garbage_bytes_raise_codec_error(data: bytes) -> None:
    with pytest.raises(CodecError) as err:
        avro.decode("Impression", data)
    assert err.value.reason == "avro_decode"


def test_trailing_bytes_are_rejected() -> None:
    data = avro.encode("Click", EXAMPLES["Click"])
    with pytest.raises(CodecError, match="trailing") as err:
        avro.decode("Click", data + b"\x00")
    assert err.value.reason == "avro_decode"


@given(st.sampled_from(sorted(EXAMPLES)), st.binary(max_size=200))
def test_random_bytes_decode_or_raise_codec_error(name: str, data: bytes) -> None:
    try:
        avro.decode(name, data)
    except CodecError as exc:
        assert exc.reason == "avro_decode"


def test_unknown_schema() -> None:
    with pytest.raises(CodecError) as err:
        avro.encode("NoSuchThing", {})
    assert err.value.reason == "unknown_schema"


def test_env_var_overrides_schema_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    schema = {
        "type": "record",
        "name": "Tiny",
        "namespace": "pipeline",
        "fields": [{"name": "x", "type": "long"}],
    }
    (tmp_path / "Tiny.avsc").write_text(json.dumps(schema))
    monkeypatch.setenv(avro.SCHEMAS_DIR_ENV, str(tmp_path))
    assert avro.schema_names() == ["Tiny"]
    assert avro.decode("Tiny", avro.encode("Tiny", {"x": -3})) == {"x": -3}


def test_load_schema_returns_a_private_copy() -> None:
    avro.load_schema("Click")["fields"].clear()
    assert avro.load_schema("Click")["fields"]


def test_codec_error_format_and_pickle() -> None:
    err = CodecError("non_finite", "labels contains NaN")
    assert str(err) == "non_finite: labels contains NaN"
    assert isinstance(err, ValueError)
    clone = pickle.loads(pickle.dumps(err))
    assert (clone.reason, clone.message, str(clone)) == (err.reason, err.message, str(err))
    assert "non_finite" in REASONS
