"""File sources: records with their line numbers, per-line errors, typed CSV cells."""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path
from typing import Any

import fastavro
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.codec import avro, hash64
from pipeline.codec.errors import CodecError
from pipeline.codec.hashing import to_signed_int
from pipeline.ingest.filesource import (
    SourceError,
    SourceLine,
    coerce_flat,
    detect_format,
    infer_layout,
    read_avro,
    read_delimited,
    read_jsonl,
    read_source,
    sample_record,
)

pytestmark = pytest.mark.unit


def _lines(items: list[SourceLine]) -> list[tuple[int, bool]]:
    return [(item.line, item.record is not None) for item in items]


def test_jsonl_numbers_lines_and_reports_each_bad_one() -> None:
    data = b'{"a": 1}\n\n[1, 2]\n{"a": \n\xff\xfe\n  {"b": "x"}  \n'
    got = list(read_jsonl(io.BytesIO(data)))
    assert _lines(got) == [(1, True), (3, False), (4, False), (5, False), (6, True)]
    assert got[0].record == {"a": 1} and got[-1].record == {"b": "x"}
    assert "expected a JSON object, got list" in str(got[1].error)
    assert "malformed JSON" in str(got[2].error)
    assert "not UTF-8" in str(got[3].error)


def test_csv_quoted_cells_span_lines_and_keep_the_start_line() -> None:
    data = b'a,b\n1,2\n"multi\nline",3\n\n4,5\n'
    got = list(read_delimited(io.BytesIO(data), ","))
    assert [(g.line, g.record) for g in got] == [
        (2, {"a": "1", "b": "2"}),
        (3, {"a": "multi\nline", "b": "3"}),
        (6, {"a": "4", "b": "5"}),
    ]


def test_csv_bad_lines_are_errors_and_reading_goes_on() -> None:
    data = b'a,b\n1,2\n1,2,3\n\xff,1\n"x"y,1\n7,8\n'
    got = list(read_delimited(io.BytesIO(data), ","))
    assert _lines(got) == [(2, True), (3, False), (4, False), (5, False), (6, True)]
    assert got[1].error == "expected 2 fields, got 3"
    assert "not UTF-8" in str(got[2].error)
    assert "malformed CSV" in str(got[3].error)
    assert got[-1].record == {"a": "7", "b": "8"}


def test_tsv_and_header_validation() -> None:
    got = list(read_delimited(io.BytesIO(b"x\ty\n1\t\n"), "\t"))
    assert got == [SourceLine(2, {"x": "1", "y": ""})]
    with pytest.raises(SourceError, match="duplicate"):
        list(read_delimited(io.BytesIO(b"x,x\n1,2\n"), ","))


# No bare CR (csv's own rule) and no lone surrogates (not encodable as UTF-8 in a file).
_cell = st.text(st.characters(blacklist_characters="\r", blacklist_categories=("Cs",)), max_size=8)


@given(
    rows=st.lists(
        st.tuples(_cell, _cell),
        max_size=20,
    )
)
def test_csv_round_trips_any_text_with_correct_line_numbers(rows: list[tuple[str, str]]) -> None:
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["a", "b"])
    starts = []
    for row in rows:
        starts.append(buf.getvalue().count("\n") + 1)
        writer.writerow(row)
    data = buf.getvalue().encode("utf-8")
    got = list(read_delimited(io.BytesIO(data), ","))
    assert [g.record for g in got] == [{"a": a, "b": b} for a, b in rows]
    assert [g.line for g in got] == starts


def _avro_file(path: Path, records: list[dict[str, Any]], schema: str = "Impression") -> None:
    with path.open("wb") as out:
        fastavro.writer(out, avro.load_schema(schema), records)


def test_avro_container_records_numbered_with_plain_int_times(tmp_path: Path) -> None:
    records = [
        {
            "request_id": f"r{i}",
            "user_id": "u",
            "item_id": "i",
            "event_time": 1_700_000_000_123 + i,
            "features": {"k": "v"},
            "context": None,
        }
        for i in range(3)
    ]
    path = tmp_path / "imps.avro"
    _avro_file(path, records)
    got = list(read_source(path))
    assert [g.line for g in got] == [1, 2, 3]
    assert [g.record for g in got] == records  # datetimes turned back into ms
    assert all(type(g.record["event_time"]) is int for g in got if g.record)


def test_avro_corrupt_block_ends_with_one_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.avro"
    rec = {"request_id": "r", "user_id": "u", "item_id": "i", "event_time": 1, "features": {}}
    _avro_file(path, [rec] * 50)
    data = bytearray(path.read_bytes())
    data[-30:-20] = b"\xff" * 10  # inside the last block
    got = list(read_avro(io.BytesIO(bytes(data))))
    assert got[-1].record is None and "corrupt Avro data" in str(got[-1].error)
    with pytest.raises(SourceError, match="not an Avro container"):
        list(read_avro(io.BytesIO(b"definitely not avro")))


def test_read_source_formats_gzip_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"a": 1}\n{"a": 2}\n'))
    assert [g.record for g in read_source(path)] == [{"a": 1}, {"a": 2}]
    assert detect_format("a/b.TSV") == "tsv" and detect_format("-") == "jsonl"
    assert detect_format("x.csv.gz") == "csv"
    with pytest.raises(SourceError, match="cannot tell the format"):
        detect_format("data.parquet")
    with pytest.raises(SourceError, match="cannot open"):
        list(read_source(tmp_path / "missing.jsonl"))
    with pytest.raises(SourceError, match="unknown format"):
        list(read_source(path, "xml"))


def test_coerce_flat_types_cells_and_fills_maps() -> None:
    row = {
        "request_id": "r1",
        "user_id": "u",
        "item_id": "i",
        "event_time": "1700000000000",
        "features.city": "Paris",
        "features.empty": "",
        "context.pos": "3",
    }
    rec = coerce_flat("Impression", row)
    assert rec == {
        "request_id": "r1",
        "user_id": "u",
        "item_id": "i",
        "event_time": 1_700_000_000_000,
        "features": {"city": "Paris"},
        "context": {"pos": "3"},
    }
    avro.encode("Impression", rec)
    no_features = coerce_flat("Impression", {k: v for k, v in row.items() if "." not in k})
    assert no_features["features"] == {} and "context" not in no_features
    with pytest.raises(ValueError, match="event_time: 'soon' is not a valid long"):
        coerce_flat("Click", {**row, "event_time": "soon"})
    with pytest.raises(CodecError, match="unknown field 'oops'"):
        avro.encode("Click", coerce_flat("Click", {"oops": "1", "request_id": "r"}))


def test_sample_record_from_a_flat_row_hashes_slots() -> None:
    row = {
        "label": "1",
        "event_time": "5",
        "dense.1": "0.5",
        "dense.0": "2",
        "user": "u7",
        "ad": "",
    }
    rec = sample_record(row, flat=True)
    assert rec["label"] == 1.0 and rec["event_time"] == 5 and "weight" not in rec
    assert rec["dense"] == [2.0, 0.5]  # ordered by index, not by column order
    assert rec["features"] == [{"slot": "user", "ids": [to_signed_int(hash64("user", "u7"))]}]
    with pytest.raises(ValueError, match="dense.x"):
        sample_record({**row, "dense.x": "1"}, flat=True)
    with pytest.raises(ValueError, match="label"):
        sample_record({**row, "label": "yes"}, flat=True)


def test_sample_record_from_json_accepts_unsigned_ids_and_rejects_bad_ones() -> None:
    big = 2**64 - 1
    rec = sample_record(
        {"label": 0, "event_time": 1, "features": [{"slot": "a", "ids": [big, 3]}]}, flat=False
    )
    assert rec["features"][0]["ids"] == [-1, 3]
    for bad, match in [
        (
            {"label": 0, "event_time": 1, "features": [{"slot": "a", "ids": [2**64]}]},
            "outside uint64",
        ),
        ({"label": 0, "features": []}, "missing field 'event_time'"),
        (
            {"label": 0, "event_time": 1, "features": [{"slot": "a", "ids": []}] * 2},
            "listed twice",
        ),
    ]:
        with pytest.raises(CodecError, match=match):
            sample_record(bad, flat=False)


def test_infer_layout_json_union_in_order_and_flat_header() -> None:
    docs = [
        {"label": 0, "event_time": 1, "features": [{"slot": "b", "ids": [1]}], "dense": [1.0]},
        {"label": 0, "features": "broken"},
        {
            "label": 1,
            "event_time": 2,
            "features": [{"slot": "a", "ids": []}, {"slot": "b", "ids": []}],
        },
    ]
    lines = list(read_jsonl(io.BytesIO("\n".join(json.dumps(d) for d in docs).encode())))
    assert infer_layout(lines, flat=False) == (["b", "a"], 1)
    header = b"label,event_time,u,dense.0,i\n1,2,,0.5,x\n"
    assert infer_layout(read_delimited(io.BytesIO(header), ","), flat=True) == (["u", "i"], 1)
