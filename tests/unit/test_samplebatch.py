"""SampleBatch round-trips exactly, and every defect maps to its CodecError reason."""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.codec import avro
from pipeline.codec.errors import CodecError
from pipeline.codec.samplebatch import (
    SampleBatch,
    concat,
    decode_batch,
    encode_batch,
    from_rows,
    from_sample_records,
    to_sample_records,
)
from pipeline.codec.slots import SlotConfig
from tests.strategies import sample_batches

pytestmark = pytest.mark.unit

CFG = SlotConfig(("a", "b"), 2)


def _base() -> SampleBatch:
    """3 rows; slot a has 2, 0, 1 ids; slot b has 0, 0, 1: offsets [[0,2,2,3],[3,3,3,4]]."""
    return from_rows(
        CFG,
        [1.0, 0.0, 1.0],
        [{"a": [1, 2**64 - 1]}, {}, {"a": 3, "b": [5]}],
        [10, 20, 30],
        weights=[1.0, 2.0, 0.0],
        dense=[[1, 2], [3, 4], [5, 6]],
    )


def _tampered(**changes: Callable[[dict[str, Any]], Any] | Any) -> bytes:
    """Encoded base batch with record fields replaced (callables get the record)."""
    rec = avro.decode("SampleBatch", encode_batch(_base()))
    for key, value in changes.items():
        rec[key] = value(rec) if callable(value) else value
    return avro.encode("SampleBatch", rec)


def _i4(*values: int) -> bytes:
    return struct.pack(f"<{len(values)}i", *values)


def _f4(*values: float) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def _reason(fn: Callable[[], object]) -> str:
    with pytest.raises(CodecError) as err:
        fn()
    return err.value.reason


# --- round trips -------------------------------------------------------------


@given(sample_batches())
def test_encode_decode_roundtrip_is_exact(batch: SampleBatch) -> None:
    batch.validate()
    decoded = decode_batch(encode_batch(batch), expected=batch.config)
    assert decoded.equals(batch)
    assert decoded.ids.tolist() == batch.ids.tolist()
    assert decoded.labels.tobytes() == batch.labels.astype("<f4").tobytes()


def test_base_layout_is_as_documented() -> None:
    batch = _base()
    assert batch.offsets.tolist() == [[0, 2, 2, 3], [3, 3, 3, 4]]
    assert batch.ids.tolist() == [1, 2**64 - 1, 3, 5]
    assert batch.fingerprint == CFG.fingerprint


def test_decoded_arrays_are_zero_copy_read_only_views() -> None:
    data = encode_batch(_base())
    batch = decode_batch(data)
    assert not batch.ids.flags.writeable
    assert not batch.labels.flags.writeable
    assert batch.dense.shape == (3, 2)


@given(sample_batches())
def test_from_rows_rebuilds_the_batch(batch: SampleBatch) -> None:
    rows = [batch.row_features(r) for r in range(batch.num_rows)]
    rebuilt = from_rows(
        batch.config,
        batch.labels,
        rows,
        batch.event_times,
        weights=batch.weights,
        dense=batch.dense,
    )
    assert rebuilt.equals(batch)


@given(sample_batches())
def test_row_records_roundtrip_through_avro(batch: SampleBatch) -> None:
    records = [avro.decode("Sample", avro.encode("Sample", r)) for r in to_sample_records(batch)]
    assert from_sample_records(batch.config, records).equals(batch)


@given(sample_batches(), st.data())
def test_slice_and_concat(batch: SampleBatch, data: st.DataObject) -> None:
    cut = data.draw(st.integers(1, batch.num_rows))
    head = batch.slice(0, cut)
    assert head.num_rows == cut
    for r in range(cut):
        got, want = head.row_features(r), batch.row_features(r)
        assert {k: v.tolist() for k, v in got.items()} == {k: v.tolist() for k, v in want.items()}
    if cut < batch.num_rows:
        assert concat([head, batch.slice(cut, batch.num_rows)]).equals(batch)
    assert concat([batch]).equals(batch)
    head.validate(batch.config)


@given(sample_batches())
def test_slot_ids_match_rows(batch: SampleBatch) -> None:
    for slot in batch.slots:
        row_offsets, ids = batch.slot_ids(slot)
        assert row_offsets[0] == 0 and len(row_offsets) == batch.num_rows + 1
        assert np.shares_memory(ids, batch.ids) or len(ids) == 0
        for r in range(batch.num_rows):
            piece = ids[row_offsets[r] : row_offsets[r + 1]].tolist()
            assert piece == batch.row_features(r)[slot].tolist()


def test_slot_ids_of_first_slot_is_a_view() -> None:
    batch = _base()
    offsets, _ = batch.slot_ids("a")
    assert np.shares_memory(offsets, batch.offsets)
    assert batch.slot_ids("b")[0].tolist() == [0, 0, 0, 1]
    with pytest.raises(KeyError):
        batch.slot_ids("zz")


# --- decode validation: one hand-corrupted record per reason ----------------

CORRUPTIONS: list[tuple[str, dict[str, Any], str]] = [
    ("labels short", {"labels": lambda r: r["labels"][:-1]}, "length_mismatch"),
    ("weights long", {"weights": lambda r: r["weights"] + bytes(4)}, "length_mismatch"),
    ("event_times", {"event_times": bytes(8)}, "length_mismatch"),
    ("offsets", {"offsets": lambda r: r["offsets"][:-4]}, "length_mismatch"),
    ("ids ragged", {"ids": lambda r: r["ids"] + b"\x00"}, "length_mismatch"),
    ("dense", {"dense_dim": 3}, "length_mismatch"),
    ("negative rows", {"num_rows": -1}, "length_mismatch"),
    ("no rows", {"num_rows": 0}, "empty_batch"),
    ("layout", {"layout_version": 2}, "unsupported_layout"),
    ("fingerprint", {"fingerprint": lambda r: r["fingerprint"] ^ 1}, "fingerprint_mismatch"),
    ("duplicate slots", {"slots": ["a", "a"]}, "bad_slots"),
    ("empty slot name", {"slots": ["a", ""]}, "bad_slots"),
    ("decreasing", {"offsets": _i4(0, 3, 2, 3, 3, 3, 3, 4)}, "offsets_not_monotonic"),
    ("gap", {"offsets": _i4(0, 2, 2, 3, 2, 3, 3, 4)}, "offsets_not_contiguous"),
    ("start", {"offsets": _i4(1, 2, 2, 3, 3, 3, 3, 4)}, "offsets_out_of_bounds"),
    ("end", {"offsets": _i4(0, 2, 2, 3, 3, 3, 3, 3)}, "offsets_out_of_bounds"),
    ("ids vs offsets", {"ids": lambda r: r["ids"][:-8]}, "offsets_out_of_bounds"),
    ("label nan", {"labels": _f4(1, float("nan"), 0)}, "non_finite"),
    ("weight inf", {"weights": _f4(1, float("inf"), 0)}, "non_finite"),
    ("dense nan", {"dense": _f4(1, 2, 3, 4, 5, float("nan"))}, "non_finite"),
    ("negative weight", {"weights": _f4(1, -0.5, 0)}, "negative_weight"),
]


@pytest.mark.parametrize(
    ("case", "changes", "reason"), CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS]
)
def test_corrupted_record_reason(case: str, changes: dict[str, Any], reason: str) -> None:
    assert _reason(lambda: decode_batch(_tampered(**changes))) == reason


def test_uncorrupted_base_decodes() -> None:
    assert decode_batch(_tampered()).equals(_base())


@pytest.mark.parametrize("data", [b"", b"\x00", b"\xff" * 40, b"not avro at all"])
def test_garbage_is_avro_decode(data: bytes) -> None:
    assert _reason(lambda: decode_batch(data)) == "avro_decode"


def test_expected_config_mismatches() -> None:
    data = encode_batch(_base())
    assert decode_batch(data, expected=CFG).num_rows == 3
    assert _reason(lambda: decode_batch(data, SlotConfig(("a",), 2))) == "unknown_slot"
    assert _reason(lambda: decode_batch(data, SlotConfig(("a", "b"), 3))) == "fingerprint_mismatch"
    assert _reason(lambda: decode_batch(data, SlotConfig(("b", "a"), 2))) == "fingerprint_mismatch"
    superset = SlotConfig(("a", "b", "c"), 2)
    assert _reason(lambda: decode_batch(data, superset)) == "fingerprint_mismatch"


@settings(max_examples=300)
@given(sample_batches(max_rows=6), st.data())
def test_tampered_bytes_only_raise_codec_error(batch: SampleBatch, data: st.DataObject) -> None:
    raw = bytearray(encode_batch(batch))
    op = data.draw(st.sampled_from(["flip", "truncate", "insert", "overwrite"]))
    pos = data.draw(st.integers(0, len(raw) - 1))
    if op == "flip":
        raw[pos] ^= data.draw(st.integers(1, 255))
    elif op == "truncate":
        del raw[pos:]
    elif op == "insert":
        raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=9))
    else:
        chunk = data.draw(st.binary(min_size=1, max_size=16))
        raw[pos : pos + len(chunk)] = chunk
    try:
        decoded = decode_batch(bytes(raw))
    except CodecError as exc:
        assert exc.reason
    else:
        decoded.validate()  # whatever survives tampering is still a well-formed batch


@given(
    st.integers(-3, 5),
    st.integers(-2, 3),
    st.lists(st.text(max_size=3), max_size=3),
    st.lists(st.binary(max_size=40), min_size=6, max_size=6),
)
def test_arbitrary_records_only_raise_codec_error(
    n: int, d: int, slots: list[str], blobs: list[bytes]
) -> None:
    names = ["labels", "weights", "event_times", "offsets", "ids", "dense"]
    rec: dict[str, Any] = dict(zip(names, blobs, strict=True))
    rec.update(layout_version=1, fingerprint=0, num_rows=n, slots=slots, dense_dim=d)
    try:
        batch = decode_batch(avro.encode("SampleBatch", rec))
    except CodecError as exc:
        assert exc.reason
    else:
        batch.validate()


# --- validate() on in-memory batches and builder errors ----------------------


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("labels", np.zeros(3, dtype=np.float64), "bad_dtype"),
        ("ids", np.zeros(4, dtype=np.int64), "bad_dtype"),
        ("offsets", np.zeros(8, dtype=np.int32), "bad_dtype"),
        ("dense", [[1.0, 2.0]] * 3, "bad_dtype"),
        ("weights", np.ones(2, dtype=np.float32), "length_mismatch"),
        ("dense", np.zeros((2, 2), dtype=np.float32), "length_mismatch"),
        ("fingerprint", 123, "fingerprint_mismatch"),
        ("slots", ("a", 5), "bad_slots"),
        ("slots", ["a", "b"], "bad_slots"),
    ],
)
def test_validate_reasons(field: str, value: Any, reason: str) -> None:
    batch = dataclasses.replace(_base(), **{field: value})
    assert _reason(batch.validate) == reason
    assert _reason(lambda: encode_batch(batch)) == reason


def test_validate_empty_batch() -> None:
    empty = _base().slice(0, 1)
    empty = dataclasses.replace(
        empty,
        labels=empty.labels[:0],
        weights=empty.weights[:0],
        event_times=empty.event_times[:0],
        offsets=np.zeros((2, 1), dtype=np.int32),
        ids=empty.ids[:0],
        dense=empty.dense[:0],
    )
    assert _reason(empty.validate) == "empty_batch"


def test_encode_without_validation_still_writes() -> None:
    batch = dataclasses.replace(_base(), labels=np.array([np.nan, 0, 1], dtype=np.float32))
    data = encode_batch(batch, validate=False)
    assert _reason(lambda: decode_batch(data)) == "non_finite"


def test_from_rows_errors() -> None:
    def build(**kw: Any) -> SampleBatch:
        args: dict[str, Any] = {"labels": [1.0], "features": [{"a": [1]}], "event_times": [0]}
        args["dense"] = [[0.0, 0.0]]
        args.update(kw)
        return from_rows(CFG, **args)

    assert build().ids.tolist() == [1]
    assert _reason(lambda: build(features=[{"zz": [1]}])) == "unknown_slot"
    assert _reason(lambda: build(features=[{"a": [-1]}])) == "bad_id"
    assert _reason(lambda: build(features=[{"a": [2**64]}])) == "bad_id"
    assert _reason(lambda: build(dense=[[0.0]])) == "length_mismatch"
    assert _reason(lambda: build(labels=[1.0, 0.0])) == "length_mismatch"
    assert _reason(lambda: build(labels=[float("inf")])) == "non_finite"
    assert _reason(lambda: build(weights=[-1.0])) == "negative_weight"
    assert _reason(lambda: build(labels=["x"])) == "bad_dtype"


def test_concat_and_slice_errors() -> None:
    batch = _base()
    other = from_rows(SlotConfig(("a",), 2), [1.0], [{}], [0], dense=[[0, 0]])
    assert _reason(lambda: concat([batch, other])) == "fingerprint_mismatch"
    assert _reason(lambda: concat([])) == "empty_batch"
    for start, stop in [(0, 0), (2, 1), (-1, 2), (0, 4)]:
        with pytest.raises(ValueError):
            batch.slice(start, stop)


# --- SlotConfig ---------------------------------------------------------------


def test_fingerprint_known_value_and_sensitivity() -> None:
    # Documented in docs/codec.md.
    assert SlotConfig(("C1", "C2"), 13).fingerprint == 0x0C6E32AF8E75CD13
    base = SlotConfig(("C1", "C2"), 13).fingerprint
    assert SlotConfig(("C2", "C1"), 13).fingerprint != base
    assert SlotConfig(("C1", "C2"), 12).fingerprint != base
    assert SlotConfig(("C1",), 13).fingerprint != base
    assert 0 <= base < 2**64


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"slots": ("a", "a")}, "slots"),
        ({"slots": ("",)}, "slots"),
        ({"slots": ("a\x1fb",)}, "slots"),
        ({"slots": ("\ud800",)}, "slots"),
        ({"slots": "ab"}, "slots"),
        ({"slots": ("a",), "dense_dim": -1}, "dense_dim"),
        ({"slots": ("a",), "dense_dim": 1.5}, "dense_dim"),
        ({"slots": ("a",), "dense_dim": True}, "dense_dim"),
    ],
)
def test_slot_config_validation_names_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}:"):
        SlotConfig(**kwargs)


def test_slot_config_accepts_list_and_is_frozen() -> None:
    cfg = SlotConfig(["x", "y"], 1)  # type: ignore[arg-type]
    assert cfg.slots == ("x", "y") and cfg.index("y") == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.dense_dim = 2  # type: ignore[misc]
