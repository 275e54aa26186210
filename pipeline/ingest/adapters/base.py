"""What every dataset adapter shares: the :class:`Dataset` interface, errors, column helpers.

An adapter reads its file in chunks of rows, converts each column with one call over the
whole column (``float`` parsing, :func:`hash_strs`; no per-row objects), and yields
:class:`~pipeline.codec.SampleBatch` blocks; :meth:`Dataset.batches` re-cuts them to the
requested size. Malformed rows either raise :class:`DatasetError` naming file and line
or, with ``on_error="skip"``, are counted in :attr:`Dataset.skipped`.
"""

from __future__ import annotations

import csv
import gzip
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Generator, Iterator, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import IO, Any, Literal, NamedTuple

import numpy as np
import numpy.typing as npt
import xxhash

from pipeline.codec import SampleBatch, SlotConfig
from pipeline.codec.hashing import HASH_SEED, SEPARATOR
from pipeline.codec.samplebatch import concat
from pipeline.errors import PipelineError

__all__ = [
    "MAX_SKIP_EXAMPLES",
    "Dataset",
    "DatasetError",
    "OnError",
    "Row",
    "SlotIds",
    "check_file",
    "csv_chunks",
    "float_column",
    "hash_multi",
    "hash_single",
    "hash_strs",
    "make_batch",
    "open_text",
    "select",
]

log = logging.getLogger(__name__)

OnError = Literal["raise", "skip"]
F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]
BoolArr = npt.NDArray[np.bool_]

_digest = (
    xxhash.xxh64_intdigest if HASH_SEED == 0 else partial(xxhash.xxh64_intdigest, seed=HASH_SEED)
)

#: How many skipped-row errors a dataset keeps for diagnostics (the count is exact).
MAX_SKIP_EXAMPLES = 20


class DatasetError(PipelineError):
    """A dataset file or row that cannot be read; the message names file and line."""

    def __init__(self, message: str, *, path: Path | str | None = None, line: int | None = None):
        where = "" if path is None else f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(where + message)
        self.path = None if path is None else Path(path)
        self.line = line
        self.detail = message


class SlotIds(NamedTuple):
    """One slot of a block: ids per row (``counts[r]`` of them) concatenated in row order."""

    counts: I64
    ids: U64


class Row(NamedTuple):
    """One sample, row-wise (for inspection and row-wise producers)."""

    label: float
    weight: float
    event_time: int
    features: dict[str, U64]
    dense: F32


class Dataset(ABC):
    """A labelled dataset read as a stream of SampleBatch in file order.

    Subclasses set ``name`` and ``config`` and implement :meth:`_blocks`. Every call of
    :meth:`batches` re-reads the source from the start, so passes are repeatable.
    """

    name: str
    config: SlotConfig

    def __init__(self, name: str, config: SlotConfig, on_error: OnError = "raise") -> None:
        if on_error not in ("raise", "skip"):
            raise DatasetError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.name = name
        self.config = config
        self.on_error: OnError = on_error
        #: Malformed rows skipped by the current (or last) pass, with ``on_error="skip"``.
        self.skipped = 0
        #: The first :data:`MAX_SKIP_EXAMPLES` of those rows' errors (file, line, why).
        self.skip_examples: list[DatasetError] = []

    def __repr__(self) -> str:
        slots, dense = len(self.config.slots), self.config.dense_dim
        return f"{type(self).__name__}(name={self.name!r}, slots={slots}, dense_dim={dense})"

    @abstractmethod
    def _blocks(self, chunk_rows: int) -> Generator[SampleBatch, None, None]:
        """Parsed rows in file order, in blocks of at most ``chunk_rows`` (never empty)."""

    def batches(self, batch_rows: int = 1024, limit: int | None = None) -> Iterator[SampleBatch]:
        """Batches of exactly ``batch_rows`` rows (the last may be shorter), ``limit`` rows max.

        Each pass re-reads the source and resets :attr:`skipped`.
        """
        if batch_rows < 1:
            raise DatasetError(f"batch_rows must be >= 1, got {batch_rows}")
        if limit is not None and limit < 0:
            raise DatasetError(f"limit must be >= 0, got {limit}")
        return self._pass(batch_rows, math.inf if limit is None else limit)

    def _pass(self, batch_rows: int, remaining: float) -> Iterator[SampleBatch]:
        """One pass: blocks re-cut to ``batch_rows`` (a no-op when no row was skipped)."""
        self.skipped = 0
        self.skip_examples = []
        if remaining <= 0:
            return
        pending: list[SampleBatch] = []
        held = 0
        blocks = self._blocks(int(min(batch_rows, remaining)))
        try:
            for block in blocks:
                if block.num_rows > remaining:
                    block = block.slice(0, int(remaining))
                remaining -= block.num_rows
                if not pending and block.num_rows == batch_rows:
                    yield block  # the common case: no skipped rows, no re-cutting
                else:
                    pending.append(block)
                    held += block.num_rows
                    if held >= batch_rows:
                        merged = concat(pending)
                        cut = held - held % batch_rows
                        for start in range(0, cut, batch_rows):
                            yield merged.slice(start, start + batch_rows)
                        pending = [merged.slice(cut, held)] if cut < held else []
                        held -= cut
                if remaining <= 0:
                    break
            if pending:
                yield concat(pending)
        except (UnicodeDecodeError, EOFError, OSError) as exc:  # bad encoding, broken .gz
            raise DatasetError(f"cannot read: {exc}", path=getattr(self, "path", None)) from None
        finally:
            blocks.close()  # closes the file even when the caller stops early

    def rows(self, limit: int | None = None) -> Iterator[Row]:
        """The samples one by one (slow path; for inspection and row-wise producers)."""
        for batch in self.batches(1024, limit):
            for r in range(batch.num_rows):
                yield Row(
                    label=float(batch.labels[r]),
                    weight=float(batch.weights[r]),
                    event_time=int(batch.event_times[r]),
                    features=batch.row_features(r),
                    dense=batch.dense[r],
                )

    def _reject(self, errors: Mapping[int, str], lines: Sequence[int], path: Path) -> BoolArr:
        """Handle bad rows (chunk position -> reason): raise, or count them; return keep mask."""
        keep = np.ones(len(lines), dtype=bool)
        for pos in sorted(errors):
            err = DatasetError(errors[pos], path=path, line=lines[pos])
            if self.on_error == "raise":
                raise err
            keep[pos] = False
            self.skipped += 1
            if len(self.skip_examples) < MAX_SKIP_EXAMPLES:
                self.skip_examples.append(err)
                log.warning("skipping malformed row: %s", err)
        return keep

    def _drop(
        self, errors: Mapping[int, str], rows: list[Any], lines: list[int], path: Path
    ) -> tuple[list[Any], list[int]]:
        """:meth:`_reject` the bad rows and return the remaining ``(rows, lines)``."""
        if not errors:
            return rows, lines
        keep = self._reject(errors, lines, path)
        return select(rows, keep), select(lines, keep)


def csv_chunks(
    reader: Any, chunk_rows: int, width: int
) -> Iterator[tuple[list[list[str]], list[int], dict[int, str]]]:
    """``(rows, line numbers, {position: error})`` chunks of a ``csv.reader``.

    Blank lines are not rows. A row whose field count is not ``width``, or that the csv
    module cannot parse, is reported as an error (its entry in ``rows`` is empty).
    """
    while True:
        rows: list[list[str]] = []
        lines: list[int] = []
        errors: dict[int, str] = {}
        while len(rows) < chunk_rows:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                errors[len(rows)] = f"unreadable CSV: {exc}"
                row = []
            else:
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                if len(row) != width:
                    errors[len(rows)] = f"expected {width} fields, got {len(row)}"
            rows.append(row)
            lines.append(reader.line_num)
        if not rows:
            return
        yield rows, lines, errors


def open_text(path: Path, encoding: str = "utf-8-sig") -> IO[str]:
    """Open a text file (``.gz`` decompressed on the fly, a UTF-8 BOM dropped) or DatasetError."""
    try:
        if path.suffix == ".gz":
            return gzip.open(path, "rt", encoding=encoding, newline="")
        return path.open("r", encoding=encoding, newline="")
    except OSError as exc:
        raise DatasetError(f"cannot open: {exc.strerror or exc}", path=path) from None


def float_column(
    values: Sequence[str], name: str, *, missing_ok: bool
) -> tuple[F64, BoolArr, dict[int, str]]:
    """Parse a text column: ``(values, missing mask, {position: error})``.

    Empty strings are missing (value 0) when ``missing_ok``; anything ``float`` cannot
    parse, and NaN or infinity, is an error. One fast pass; the slow per-value pass runs
    only when the fast one fails, to find which rows are bad.
    """
    n = len(values)
    missing = ~np.fromiter(map(bool, values), dtype=bool, count=n)
    try:
        cells = [v or "0" for v in values] if missing.any() else values
        out = np.fromiter(map(float, cells), dtype=np.float64, count=n)
        errors: dict[int, str] = {}
    except ValueError:
        out = np.zeros(n, dtype=np.float64)
        errors = {}
        for i, v in enumerate(values):
            if v:
                try:
                    out[i] = float(v)
                except ValueError:
                    errors[i] = f"{name}: not a number: {v!r}"
    bad = ~np.isfinite(out)
    if bad.any():
        for i in np.flatnonzero(bad).tolist():
            errors.setdefault(i, f"{name}: not a finite number: {values[i]!r}")
        out[bad] = 0.0
    if not missing_ok and missing.any():
        for i in np.flatnonzero(missing).tolist():
            errors.setdefault(i, f"{name}: missing value")
    return out, missing, errors


def hash_strs(slot: str, values: Sequence[str]) -> U64:
    """``hash64_many(slot, values)`` for ``str`` values, about twice as fast.

    Same algorithm and ids (``XXH64(utf8(slot) + 0x1F + utf8(value))``, checked against
    :func:`~pipeline.codec.hash64` by the tests); it only drops the per-value type
    dispatch, which is most of the cost when a file has 26 slots per row.
    """
    prefix = slot.encode("utf-8") + SEPARATOR
    keys = [prefix + v.encode("utf-8") for v in values]
    return np.fromiter(map(_digest, keys), dtype=np.uint64, count=len(keys))


def hash_single(slot: str, values: Sequence[str]) -> SlotIds:
    """One id per row, ``hash64(slot, value)``; an empty value gives the row no id."""
    present = np.fromiter(map(bool, values), dtype=bool, count=len(values))
    kept = values if present.all() else [v for v in values if v]
    return SlotIds(present.astype(np.int64), hash_strs(slot, kept))


def hash_multi(slot: str, values: Sequence[str], separator: str) -> SlotIds:
    """Multi-valued cells split on ``separator``; each non-empty part is one id of the row."""
    parts = [[p for p in v.split(separator) if p] if v else [] for v in values]
    counts = np.fromiter(map(len, parts), dtype=np.int64, count=len(parts))
    return SlotIds(counts, hash_strs(slot, [p for row in parts for p in row]))


def make_batch(
    config: SlotConfig,
    labels: npt.ArrayLike,
    event_times: npt.ArrayLike,
    slot_ids: Sequence[SlotIds],
    dense: npt.ArrayLike | None = None,
    weights: npt.ArrayLike | None = None,
) -> SampleBatch:
    """A validated SampleBatch from per-slot columns (in ``config.slots`` order)."""
    labels_ = np.ascontiguousarray(labels, dtype=np.float32)
    n = labels_.shape[0]
    if len(slot_ids) != len(config.slots):
        raise ValueError(f"{len(slot_ids)} slot columns for {len(config.slots)} slots")
    offsets = np.zeros((len(slot_ids), n + 1), dtype=np.int64)
    base = 0
    for s, col in enumerate(slot_ids):
        offsets[s, 0] = base
        np.cumsum(col.counts, out=offsets[s, 1:])
        offsets[s, 1:] += base
        base = int(offsets[s, -1])
    ids = np.concatenate([c.ids for c in slot_ids]) if slot_ids else np.zeros(0, np.uint64)
    dense_ = (
        np.zeros((n, 0), dtype=np.float32)
        if dense is None
        else np.ascontiguousarray(dense, dtype=np.float32).reshape(n, config.dense_dim)
    )
    batch = SampleBatch(
        labels=labels_,
        weights=(
            np.ones(n, dtype=np.float32)
            if weights is None
            else np.ascontiguousarray(weights, dtype=np.float32)
        ),
        event_times=np.ascontiguousarray(event_times, dtype=np.int64),
        slots=config.slots,
        offsets=offsets.astype(np.int32),
        ids=ids.astype(np.uint64, copy=False),
        dense=dense_,
        fingerprint=config.fingerprint,
    )
    batch.validate(config)
    return batch


def check_file(path: Path) -> Path:
    """``path`` if it is a readable file, else a DatasetError saying what is wrong."""
    if not path.exists():
        raise DatasetError("no such file", path=path)
    if not path.is_file():
        raise DatasetError("not a file", path=path)
    return path


def select(values: Sequence[Any], keep: BoolArr) -> list[Any]:
    """The entries of ``values`` where ``keep`` is true."""
    return [v for v, k in zip(values, keep.tolist(), strict=True) if k]
