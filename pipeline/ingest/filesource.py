"""Record sources for ``pipeline produce``: JSON lines, Avro container files, CSV and TSV.

Each reader yields :class:`SourceLine` items, one per record, with the line number it
starts on (the record number for Avro), and a per-line ``error`` instead of an
exception when one line is malformed, so a caller can report it and go on. CSV/TSV
cells are strings; :func:`coerce_flat` types them by an Avro schema. Formats and
conventions are described in ``docs/ingest-producing.md``.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import fastavro

from pipeline.codec import avro
from pipeline.codec.errors import CodecError
from pipeline.codec.hashing import hash64, to_signed_int
from pipeline.errors import PipelineError

__all__ = [
    "FORMATS",
    "SourceError",
    "SourceLine",
    "coerce_flat",
    "detect_format",
    "infer_layout",
    "read_avro",
    "read_delimited",
    "read_jsonl",
    "read_source",
    "sample_record",
]

FORMATS = ("jsonl", "avro", "csv", "tsv")

_EXTENSIONS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".avro": "avro",
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
}


class SourceError(PipelineError):
    """A source cannot be read at all (missing file, unknown format, not Avro)."""


@dataclass(frozen=True)
class SourceLine:
    """One record of a source: the parsed dict, or why its line could not be parsed."""

    line: int
    record: dict[str, Any] | None
    error: str | None = None


def detect_format(path: str | Path) -> str:
    """The format implied by a file name's extension (``-``, stdin, means jsonl)."""
    if str(path) == "-":
        return "jsonl"
    suffixes = [s.lower() for s in Path(path).suffixes if s.lower() != ".gz"]
    fmt = _EXTENSIONS.get(suffixes[-1]) if suffixes else None
    if fmt is None:
        raise SourceError(f"cannot tell the format of {path}; pass --format ({', '.join(FORMATS)})")
    return fmt


def read_source(path: str | Path, fmt: str | None = None) -> Iterator[SourceLine]:
    """Records of a file (``-`` for stdin; ``.gz`` is decompressed) in format ``fmt``."""
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise SourceError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if str(path) == "-":
        yield from _read(sys.stdin.buffer, fmt)
        return
    try:
        raw: IO[bytes] = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise SourceError(f"cannot open {path}: {exc.strerror}") from None
    with raw:
        if str(path).lower().endswith(".gz"):
            import gzip

            with gzip.open(raw, "rb") as unzipped:
                yield from _read(unzipped, fmt)
        else:
            yield from _read(raw, fmt)


def _read(stream: Any, fmt: str) -> Iterator[SourceLine]:
    if fmt == "jsonl":
        return read_jsonl(stream)
    if fmt == "avro":
        return read_avro(stream)
    return read_delimited(stream, "," if fmt == "csv" else "\t")


def read_jsonl(stream: Iterable[bytes]) -> Iterator[SourceLine]:
    """One JSON object per line; blank lines are skipped but counted."""
    for number, raw in enumerate(stream, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except UnicodeDecodeError as exc:
            yield SourceLine(number, None, f"not UTF-8: {exc.reason} at byte {exc.start}")
            continue
        except json.JSONDecodeError as exc:
            yield SourceLine(number, None, f"malformed JSON: {exc.msg} (column {exc.colno})")
            continue
        if not isinstance(record, dict):
            yield SourceLine(number, None, f"expected a JSON object, got {type(record).__name__}")
            continue
        yield SourceLine(number, record)


def read_delimited(stream: Iterable[bytes], delimiter: str) -> Iterator[SourceLine]:
    """CSV/TSV with a header row; quoted cells may span lines (numbered by their start)."""
    problems: list[SourceLine] = []
    state = {"start": 0, "pending": 1}  # line a record starts on; 1 = record not begun

    def text_lines() -> Iterator[str]:
        for number, raw in enumerate(stream, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                problems.append(
                    SourceLine(number, None, f"not UTF-8: {exc.reason} at byte {exc.start}")
                )
                continue
            if state["pending"]:
                state["start"], state["pending"] = number, 0
            yield text

    reader = csv.reader(text_lines(), delimiter=delimiter, strict=True)
    header: list[str] | None = None
    while True:
        state["pending"] = 1
        try:
            cells: list[str] | None = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            error = f"malformed {_kind(delimiter)}: {exc}"
            problems.append(SourceLine(state["start"], None, error))
            cells = None
        while problems:
            yield problems.pop(0)
        if not cells:
            continue
        if header is None:
            header = cells
            if len(set(header)) != len(header) or not all(header):
                raise SourceError(f"line {state['start']}: empty or duplicate column names")
            continue
        if len(cells) != len(header):
            error = f"expected {len(header)} fields, got {len(cells)}"
            yield SourceLine(state["start"], None, error)
            continue
        yield SourceLine(state["start"], dict(zip(header, cells, strict=True)))
    yield from problems


def _kind(delimiter: str) -> str:
    return "CSV" if delimiter == "," else "TSV"


def read_avro(stream: IO[bytes]) -> Iterator[SourceLine]:
    """Records of an Avro object container file, numbered from 1; times as int ms.

    A corrupt block ends the file with one error line (the reader cannot resync).
    """
    try:
        records = fastavro.reader(stream)
    except Exception as exc:  # fastavro raises several types for a bad header
        raise SourceError(f"not an Avro container file: {exc}") from None
    number = 0
    while True:
        number += 1
        try:
            record = next(records)
        except StopIteration:
            return
        except Exception as exc:
            yield SourceLine(number, None, f"corrupt Avro data: {type(exc).__name__}: {exc}")
            return
        if not isinstance(record, dict):
            yield SourceLine(number, None, f"expected a record, got {type(record).__name__}")
            continue
        yield SourceLine(number, _plain(record))


def _plain(value: Any) -> Any:
    """Replace datetimes that fastavro made of timestamp fields by int milliseconds."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        delta = value - dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
        return delta // dt.timedelta(milliseconds=1)
    return value


def coerce_flat(schema: str, row: dict[str, str]) -> dict[str, Any]:
    """Type the string cells of a CSV/TSV row by the fields of Avro ``schema``.

    ``int``/``long`` cells become ints, ``float``/``double`` floats, ``boolean`` true or
    false; a column ``name.key`` goes into map field ``name`` under ``key`` (empty cells
    are left out of maps). An empty cell of a field with a default is left out; other
    columns stay as they are, so the schema check names them. Raises ValueError.
    """
    fields = {f["name"]: f for f in avro.parsed_schema(schema)["fields"]}
    out: dict[str, Any] = {}
    for column, cell in row.items():
        name, dot, sub = column.partition(".")
        field = fields.get(name)
        kind = _kind_of(field["type"]) if field else None
        if dot and kind == "map":
            if cell != "":
                out.setdefault(name, {})[sub] = cell
        elif field is None or dot:
            out[column] = cell
        elif cell == "" and "default" in field:
            continue
        else:
            out[name] = _typed(column, cell, kind)
    for name, field in fields.items():
        if _kind_of(field["type"]) == "map" and name not in out and "default" not in field:
            out[name] = {}
    return out


def _kind_of(avro_type: Any) -> str | None:
    """The primitive or complex kind of a field type, looking through ``["null", X]``."""
    if isinstance(avro_type, list):
        kinds = [_kind_of(t) for t in avro_type if t != "null"]
        return kinds[0] if len(kinds) == 1 else None
    if isinstance(avro_type, dict):
        return str(avro_type.get("type"))
    return str(avro_type)


def _typed(column: str, cell: str, kind: str | None) -> Any:
    try:
        if kind in ("int", "long"):
            return int(cell)
        if kind in ("float", "double"):
            return float(cell)
    except ValueError:
        raise ValueError(f"{column}: {cell!r} is not a valid {kind}") from None
    if kind == "boolean":
        if cell.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{column}: {cell!r} is not true/false")
        return cell.lower() in ("true", "1")
    return cell


_SAMPLE_COLUMNS = ("label", "weight", "event_time")
_U63 = 1 << 63


def sample_record(record: dict[str, Any], flat: bool) -> dict[str, Any]:
    """A validated Avro ``Sample`` record from a JSON/Avro Sample or a flat CSV/TSV row.

    JSON ids may be written unsigned (up to 2**64-1); they become two's complement.
    Flat rows have ``label``, ``event_time``, optional ``weight`` and ``dense.<i>``
    columns; every other column is a slot whose non-empty cell is a raw value, hashed
    as ``hash64(slot, cell)``. Raises CodecError or ValueError.
    """
    if flat:
        typed = coerce_flat("Sample", record)
        rec: dict[str, Any] = {k: typed[k] for k in _SAMPLE_COLUMNS if k in typed}
        dense = sorted((_dense_index(c), v) for c, v in record.items() if c.startswith("dense."))
        rec["dense"] = [_typed(f"dense.{i}", v, "float") for i, v in dense]
        rec["features"] = [
            {"slot": c, "ids": [to_signed_int(hash64(c, v))]}
            for c, v in record.items()
            if c not in _SAMPLE_COLUMNS and not c.startswith("dense.") and v != ""
        ]
    else:
        rec = dict(record)
        features = rec.get("features")
        if isinstance(features, list):
            rec["features"] = [_signed_slot(f) for f in features]
    avro.encode("Sample", rec)
    names = [f["slot"] for f in rec["features"]]
    if len(set(names)) != len(names):
        raise CodecError("schema_mismatch", f"Sample: a slot is listed twice in {names}")
    return rec


def _dense_index(column: str) -> int:
    index = column[len("dense.") :]
    if not index.isdigit():
        raise ValueError(f"{column}: dense columns are named dense.0, dense.1, ...")
    return int(index)


def _signed_slot(entry: Any) -> Any:
    if not isinstance(entry, dict) or not isinstance(entry.get("ids"), list):
        return entry  # left for the schema check to name
    ids = entry["ids"]
    for i in ids:
        if isinstance(i, int) and not -_U63 <= i < 1 << 64:
            raise CodecError("bad_id", f"slot {entry.get('slot')!r}: id {i} is outside uint64")
    return {**entry, "ids": [i - (1 << 64) if isinstance(i, int) and i >= _U63 else i for i in ids]}


def infer_layout(lines: Iterable[SourceLine], flat: bool) -> tuple[list[str], int]:
    """Slots (in order of first appearance) and dense width of the valid Sample records.

    Flat sources take every slot column of the header, even one that is always empty.
    Invalid lines are ignored here; the producing pass reports them.
    """
    slots: dict[str, None] = {}
    dense_dim: int | None = None
    for line in lines:
        if line.record is None:
            continue
        if flat:
            columns = [c for c in line.record if c not in _SAMPLE_COLUMNS]
            dense = [c for c in columns if c.startswith("dense.")]
            return [c for c in columns if c not in dense], len(dense)
        try:
            rec = sample_record(line.record, flat=False)
        except (CodecError, ValueError):
            continue
        slots.update((f["slot"], None) for f in rec["features"])
        if dense_dim is None:
            dense_dim = len(rec.get("dense", []))
    return list(slots), dense_dim or 0
