"""Decode many schemaless Avro bodies of one record schema at once, into columns.

``fastavro.schemaless_reader`` costs about 10 us per small record here, which alone
would cap a consumer of row-wise events (Impression, Click) near 100k records/s.
This reader walks all records in lock-step: field by field, every record's cursor
advances in one numpy step (varints, string lengths, map blocks), so the Python cost
is per batch and per field, not per record. String and bytes fields come back as
``(start, length)`` ranges into one buffer (no Python objects), ready for vectorized
hashing.

It is deliberately conservative: it supports records of ``string``, ``bytes``,
``int``, ``long``, ``boolean``, ``float``, ``double``, maps of those and unions with
``null``, and a record is ``ok`` only when it parses exactly (no trailing bytes), its
strings are ASCII and its maps have no repeated key. Anything else (a broken body, a
non-ASCII string, a negative block count) is left for the caller to decode with
:func:`pipeline.codec.avro.decode`, which gives the exact answer or the exact error;
a record this reader marks ``ok`` always decodes with fastavro to the same values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.codec import avro
from pipeline.codec.errors import CodecError
from pipeline.codec.xxh64 import P1, P2, P3
from pipeline.codec.xxh64 import reader as xxh64_reader

__all__ = ["MapColumn", "RecordColumns", "StrColumn", "decode_columns", "supports"]

I64 = npt.NDArray[np.int64]
_PAD = 64  # zero bytes after the last body: any read of a (clamped) cursor stays inside
_AR10 = np.arange(10, dtype=np.int64)
_SHIFTS = (np.arange(10, dtype=np.uint64) * np.uint64(7)).astype(np.uint64)
_MASK64 = (1 << 64) - 1
_FIXED = {"boolean": 1, "float": 4, "double": 8}


@dataclass
class StrColumn:
    """``string``/``bytes`` values as ranges of :attr:`RecordColumns.buf`."""

    start: I64
    length: I64


@dataclass
class MapColumn:
    """Map entries of all records, grouped by record in wire order."""

    record: I64  # which record each entry belongs to (non-decreasing)
    key: StrColumn
    value: Any
    key_hash: npt.NDArray[np.uint64]  # fingerprint(key): equal keys, equal values


@dataclass
class RecordColumns:
    """One column per field; values of records with ``ok`` False are meaningless."""

    buf: npt.NDArray[np.uint8]
    ok: npt.NDArray[np.bool_]
    fields: dict[str, Any] = field(default_factory=dict)
    present: dict[str, npt.NDArray[np.bool_]] = field(default_factory=dict)  # unions
    words: Any = None  # the buffer prepared for pipeline.codec.xxh64 (reuse it)

    def text(self, col: StrColumn, i: int) -> str:
        """One string value (for messages and rare per-record paths)."""
        s = int(col.start[i])
        return bytes(self.buf[s : s + int(col.length[i])]).decode("utf-8")


def key_words(
    buf: npt.NDArray[np.uint8], start: I64, length: I64, words: Any = None
) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
    """The first 16 bytes of each range as two little-endian words (zero past its end).

    With the length, they identify a range of at most 16 bytes exactly.
    """
    read = (words or xxh64_reader(buf)).u64
    out = []
    for w in range(2):
        keep = np.clip(length - 8 * w, 0, 8).astype(np.uint64) * np.uint64(8)
        mask = np.where(keep == 64, np.uint64(_MASK64), (np.uint64(1) << keep) - np.uint64(1))
        out.append(read(start + 8 * w) & mask)
    return out[0], out[1]


def fingerprint(
    buf: npt.NDArray[np.uint8], start: I64, length: I64, words: Any = None
) -> npt.NDArray[np.uint64]:
    """A cheap 64-bit fingerprint of short byte ranges: equal bytes give equal values.

    Made from the length and the first 16 bytes only, so distinct keys may share one
    (callers compare the bytes before they trust a match); cheaper than XXH64.
    """
    w0, w1 = key_words(buf, start, length, words)
    fp = w0 * P1 ^ (w1 * P2) ^ (length.astype(np.uint64) * P3)
    return fp ^ (fp >> np.uint64(29))


def supports(name: str) -> bool:
    """Whether the schema ``name`` can be read in columns (else: decode record by record)."""
    try:
        _plan(name, id(avro.parsed_schema(name)))
    except CodecError:
        return False
    return True


def decode_columns(name: str, values: Sequence[bytes]) -> RecordColumns:
    """Columns of the records ``values`` (schemaless bodies of schema ``name``)."""
    plan = _plan(name, id(avro.parsed_schema(name)))
    n = len(values)
    lengths = np.fromiter(map(len, values), dtype=np.int64, count=n)
    ends = np.cumsum(lengths)
    joined = b"".join(values)
    buf = np.zeros(len(joined) + _PAD, dtype=np.uint8)
    buf[: len(joined)] = np.frombuffer(joined, dtype=np.uint8)
    reader = _Reader(buf, ends - lengths, ends)
    cols = RecordColumns(buf, reader.ok)
    everyone = np.arange(n, dtype=np.int64)
    for fname, ftype in plan:
        if isinstance(ftype, tuple) and ftype[0] == "union":
            _, null_index, inner = ftype
            branch = reader.long(everyone)
            reader.fail(everyone[(branch != null_index) & (branch != 1 - null_index)])
            present = branch != null_index
            cols.present[fname] = present
            idx = everyone[present]
            col = reader.value(inner, idx)
            cols.fields[fname] = _spread(col, idx, n)
        else:
            cols.fields[fname] = reader.value(ftype, everyone)
    reader.finish()
    cols.words = reader.words()
    return cols


@lru_cache(maxsize=32)
def _plan(name: str, _schema_id: int) -> tuple[tuple[str, Any], ...]:
    """(field name, type) pairs of a supported schema; CodecError when unsupported."""
    schema = avro.parsed_schema(name)
    return tuple((f["name"], _type(f["type"], name)) for f in schema["fields"])


def _type(t: Any, name: str) -> Any:
    if isinstance(t, str) and t in ("string", "bytes", "int", "long", *_FIXED):
        return t
    if isinstance(t, dict) and t.get("type") == "map":
        values = t["values"]
        if isinstance(values, str) and values in ("string", "bytes", "int", "long"):
            return ("map", values)
    if isinstance(t, list) and len(t) == 2 and "null" in t:
        inner = _type(t[1 - t.index("null")], name)
        if not (isinstance(inner, tuple) and inner[0] == "union"):
            return ("union", t.index("null"), inner)
    if isinstance(t, dict) and isinstance(t.get("type"), str) and "logicalType" not in t:
        return _type(t["type"], name)
    raise CodecError("unknown_schema", f"{name}: type {t!r} has no column reader")


def _spread(col: Any, idx: I64, n: int) -> Any:
    """A column of the records ``idx`` as a column of all ``n`` (zeros elsewhere)."""
    if isinstance(col, StrColumn):
        start, length = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
        start[idx], length[idx] = col.start, col.length
        return StrColumn(start, length)
    if isinstance(col, MapColumn):
        return MapColumn(idx[col.record], col.key, col.value, col.key_hash)
    out = np.zeros(n, dtype=col.dtype)
    out[idx] = col
    return out


class _Reader:
    """Cursors of every record over one buffer; a failed record stops at its end."""

    def __init__(self, buf: npt.NDArray[np.uint8], starts: I64, ends: I64) -> None:
        self.buf = buf
        self.starts = starts
        self.limit = int(ends[-1]) + 1 if len(ends) else 1  # past every record, inside the pad
        self.pos = starts.copy()
        self.ends = ends
        self.ok = np.ones(len(starts), dtype=bool)
        self._high: I64 | None = None  # positions of bytes >= 0x80 (made on demand)
        self.allowed = np.zeros(len(starts), dtype=np.int64)  # of those, outside strings
        self._words: Any = None

    def fail(self, idx: I64) -> None:
        if len(idx):
            self.ok[idx] = False
            self.pos[idx] = self.ends[idx]

    def long(self, idx: I64) -> I64:
        """Zigzag varints at the cursors of ``idx`` (advanced past them)."""
        pos = self.pos[idx]
        first = self.buf[pos]
        if not (first & 0x80).any():  # every varint is one byte (short strings, counts)
            raw = first.astype(np.int64)
            self.pos[idx] = pos + 1
        else:
            b = self.buf[pos[:, None] + _AR10]
            cont = b >= 0x80
            size = np.argmin(cont, axis=1) + 1
            self.fail(idx[cont.all(axis=1)])
            used = _AR10[None, :] < size[:, None]
            parts = (b & 0x7F).astype(np.uint64) << _SHIFTS[None, :]
            raw = np.bitwise_or.reduce(np.where(used, parts, 0), axis=1).view(np.int64)
            self.allowed[idx] += size - 1
            self.pos[idx] = np.where(self.ok[idx], pos + size, self.pos[idx])
        return (raw >> 1) ^ -(raw & 1)

    def string(self, idx: I64, text: bool) -> StrColumn:
        full = len(idx) == len(self.pos)  # idx is a sorted subset: all records, in order
        pos = self.pos if full else self.pos[idx]
        first = self.buf[pos]
        if text and not (first & 0x81).any():
            # the common case, in fewer steps: every length is one varint byte, >= 0
            start = pos + 1
            length = (first >> 1).astype(np.int64)
            moved = np.minimum(start + length, self.limit)
            if full:
                self.pos = moved
            else:
                self.pos[idx] = moved
            return StrColumn(start, length)
        length = self.long(idx)
        self.fail(idx[length < 0])
        length = np.maximum(length, 0)
        start = self.pos[idx].copy()
        # a cursor past its record's end fails at finish() (cursors only move forward);
        # past the last record it is held just beyond it, so every read stays in bounds
        self.pos[idx] = np.minimum(start + length, self.limit)
        if not text:
            self._count_high(idx, start, length)
        return StrColumn(start, length)

    def _count_high(self, idx: I64, start: I64, length: I64) -> None:
        """Bytes >= 0x80 in the given ranges are allowed (varints, bytes, floats)."""
        if self._high is None:
            self._high = np.flatnonzero(self.buf >= 0x80)
        np.add.at(
            self.allowed,
            idx,
            np.searchsorted(self._high, start + length) - np.searchsorted(self._high, start),
        )

    def _fail_non_ascii(self) -> None:
        """Records with more bytes >= 0x80 than their varints, floats and bytes fields hold:
        a string has one (left to fastavro's UTF-8 check)."""
        high = np.flatnonzero(self.buf >= 0x80) if self._high is None else self._high
        total = np.searchsorted(high, self.ends) - np.searchsorted(high, self.starts)
        self.ok &= total == self.allowed

    def value(self, t: Any, idx: I64) -> Any:
        if t in ("string", "bytes"):
            return self.string(idx, text=t == "string")
        if t in ("int", "long"):
            return self.long(idx)
        if t in _FIXED:
            size = _FIXED[t]
            pos = self.pos[idx]
            self.pos[idx] = np.minimum(pos + size, self.limit)
            raw = self.buf[pos[:, None] + np.arange(size)]
            self.allowed[idx] += (raw >= 0x80).sum(axis=1)
            if t == "boolean":
                self.fail(idx[raw[:, 0] > 1])
                return raw[:, 0] == 1
            return raw.copy().view("<f4" if size == 4 else "<f8").ravel().astype(np.float64)
        if isinstance(t, tuple) and t[0] == "map":
            return self.map(t[1], idx)
        raise AssertionError(f"no reader for {t!r}")

    def map(self, values_type: str, idx: I64) -> MapColumn:
        records: list[I64] = []
        ordinals: list[I64] = []
        keys: list[StrColumn] = []
        vals: list[Any] = []
        seen = np.zeros(len(idx), dtype=np.int64)  # entries so far, per record of idx
        live = np.arange(len(idx), dtype=np.int64)  # positions in idx still in the map
        while len(live):
            count = self.long(idx[live])
            rest = self.ends[idx[live]] - self.pos[idx[live]]
            # sized blocks (count < 0) are left to fastavro; an entry takes >= 2 bytes
            self.fail(idx[live[(count < 0) | (2 * count > rest)]])
            more = (count > 0) & self.ok[idx[live]]
            live, count = live[more], count[more]
            for e in range(int(count.max()) if len(count) else 0):
                here = live[(count > e) & self.ok[idx[live]]]
                rec = idx[here]
                keys.append(self.string(rec, text=True))
                vals.append(self.value(values_type, rec))
                records.append(here)
                ordinals.append(seen[here])
                seen[here] += 1
            live = live[self.ok[idx[live]]]
        if not records:
            empty = np.zeros(0, dtype=np.int64)
            nothing: Any = StrColumn(empty, empty) if values_type in ("string", "bytes") else empty
            return MapColumn(empty, StrColumn(empty, empty), nothing, empty.view(np.uint64))
        # entry j of record r goes to first[r] + j: records in order, entries in wire order
        first = np.cumsum(seen) - seen
        where = np.concatenate([first[r] + o for r, o in zip(records, ordinals, strict=True)])
        total = int(seen.sum())

        def place(parts: list[I64]) -> I64:
            out = np.empty(total, dtype=parts[0].dtype)
            out[where] = np.concatenate(parts)
            return out

        rec_all = np.repeat(np.arange(len(idx), dtype=np.int64), seen)
        key = StrColumn(place([k.start for k in keys]), place([k.length for k in keys]))
        if values_type in ("string", "bytes"):
            value: Any = StrColumn(place([v.start for v in vals]), place([v.length for v in vals]))
        else:
            value = place(vals)
        key_hash = fingerprint(self.buf, key.start, key.length, self.words())
        # a repeated key: fastavro keeps the last value; leave such records to it
        by_key = np.lexsort((key_hash, rec_all))
        same = (rec_all[by_key][1:] == rec_all[by_key][:-1]) & (
            key_hash[by_key][1:] == key_hash[by_key][:-1]
        )
        self.fail(idx[rec_all[by_key][1:][same]])
        return MapColumn(rec_all, key, value, key_hash)

    def words(self) -> Any:
        """The buffer prepared for hashing (made once per batch)."""
        if self._words is None:
            self._words = xxh64_reader(self.buf)
        return self._words

    def finish(self) -> None:
        """Records that did not end exactly at their last byte are not ok."""
        self._fail_non_ascii()
        self.ok &= self.pos == self.ends
