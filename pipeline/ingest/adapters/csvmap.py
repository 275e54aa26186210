"""Any delimited text file, mapped to slots by a YAML file (see ``docs/datasets.md``).

The mapping names the label column (numeric, a value table, or a threshold), an
optional timestamp column and its format, the categorical columns (each a slot,
optionally multi-valued with a separator) and the dense columns with their transform.
Without a timestamp, event times are derived from the line: ``base_time_ms +
(line - first data line) * step_ms``.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Generator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.codec import SampleBatch, SlotConfig
from pipeline.ingest.adapters.base import (
    Dataset,
    DatasetError,
    OnError,
    check_file,
    csv_chunks,
    float_column,
    hash_multi,
    hash_single,
    make_batch,
    open_text,
)

__all__ = ["TRANSFORMS", "CsvDataset", "CsvMapping", "load_mapping"]

F64 = npt.NDArray[np.float64]
_MAX_MS = 2.0**62  # keeps event times well inside int64
_TIME_CACHE = 1 << 16  # distinct parsed timestamps kept between chunks

#: Dense transforms by name.
TRANSFORMS: dict[str, Callable[[F64], F64]] = {
    "identity": lambda x: x,
    "log1p": lambda x: np.log1p(np.maximum(x, 0.0)),
    "signed_log1p": lambda x: np.sign(x) * np.log1p(np.abs(x)),
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LabelSpec(_Strict):
    """Where the label comes from; ``values`` or ``threshold`` turn raw cells into labels."""

    column: str = Field(description="Column holding the label.")
    values: dict[str, float] | None = Field(
        None, description="Raw value -> label (e.g. {yes: 1, no: 0}); other values are errors."
    )
    threshold: float | None = Field(
        None, description="Label = 1 when the numeric value is >= threshold, else 0."
    )

    @model_validator(mode="after")
    def _one_rule(self) -> LabelSpec:
        if self.values is not None and self.threshold is not None:
            raise ValueError("give either values or threshold, not both")
        return self


class TimestampSpec(_Strict):
    """The event-time column and how to read it (naive times are UTC)."""

    column: str = Field(description="Column holding the event time.")
    format: str = Field(
        "epoch_ms", description="epoch_ms, epoch_s, iso8601, or a strptime pattern with '%'."
    )

    @model_validator(mode="after")
    def _known_format(self) -> TimestampSpec:
        if self.format not in ("epoch_ms", "epoch_s", "iso8601") and "%" not in self.format:
            raise ValueError(
                "format must be epoch_ms, epoch_s, iso8601 or a strptime pattern with '%', "
                f"got {self.format!r}"
            )
        return self


class CategoricalSpec(_Strict):
    """A column hashed into a slot: ``id = hash64(slot, value)``; empty = no id."""

    column: str = Field(description="Source column.")
    slot: str | None = Field(None, description="Slot name (default: the column name).")
    separator: str | None = Field(None, description="Split the cell into several ids on this.")


class DenseSpec(_Strict):
    """A numeric column as one dense feature."""

    column: str = Field(description="Source column.")
    transform: Literal["identity", "log1p", "signed_log1p"] = Field(
        "identity", description="identity; log1p = log1p(max(x, 0)); sign(x) * log1p(|x|)."
    )
    missing: float | None = Field(
        0.0, description="Value of an empty cell (before the transform); null: empty is an error."
    )
    indicator: bool = Field(False, description="Also emit 1.0/0.0 'was empty' as a feature.")


class CsvMapping(_Strict):
    """The YAML mapping file of a generic CSV dataset."""

    name: str | None = Field(None, description="Dataset name (default: the file name).")
    delimiter: str = Field(",", min_length=1, max_length=1, description="Field delimiter.")
    header: bool = Field(True, description="Whether the first line names the columns.")
    columns: list[str] | None = Field(None, description="Column names when header is false.")
    label: LabelSpec
    timestamp: TimestampSpec | None = None
    base_time_ms: int = Field(1_388_534_400_000, description="Derived time of the first row.")
    step_ms: int = Field(10, ge=0, description="Derived time between consecutive lines.")
    weight: str | None = Field(None, description="Column holding sample weights (>= 0).")
    categorical: list[CategoricalSpec] = Field(default_factory=list)
    dense: list[DenseSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _columns_when_headless(self) -> CsvMapping:
        if not self.header and not self.columns:
            raise ValueError("columns must list the column names when header is false")
        return self

    def config(self) -> SlotConfig:
        """The slot layout: categorical slots in order; dense values, then indicators."""
        slots = tuple(c.slot or c.column for c in self.categorical)
        return SlotConfig(slots, len(self.dense) + sum(d.indicator for d in self.dense))


def load_mapping(path: Path) -> CsvMapping:
    """Parse and validate a mapping file; errors name the file and the bad field."""
    check_file(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise DatasetError(f"not valid YAML: {exc}", path=path) from None
    if not isinstance(doc, dict):
        raise DatasetError("expected a mapping (label, categorical, dense ...)", path=path)
    try:
        return CsvMapping.model_validate(doc)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'mapping'}: {e['msg']}" for e in exc.errors()
        )
        raise DatasetError(f"invalid mapping: {problems}", path=path) from None


def _timestamp_parser(fmt: str) -> Callable[[str], int]:
    """A str -> epoch-ms parser for the iso8601 and strptime formats (naive = UTC)."""

    def parse(value: str) -> int:
        if fmt == "iso8601":
            when = datetime.fromisoformat(value.replace("Z", "+00:00"))
        else:
            when = datetime.strptime(value, fmt)
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        return round(when.timestamp() * 1000)

    return parse


class CsvDataset(Dataset):
    """A delimited text file read through a :class:`CsvMapping`."""

    def __init__(
        self, path: str | Path, mapping: CsvMapping | Path | str, *, on_error: OnError = "raise"
    ) -> None:
        self.path = check_file(Path(path))
        if isinstance(mapping, CsvMapping):
            self.mapping_path: Path | None = None
            self.mapping = mapping
        else:
            self.mapping_path = Path(mapping)
            self.mapping = load_mapping(self.mapping_path)
        m = self.mapping
        self.columns = self._header() if m.header else list(m.columns or [])
        self._index = {c: i for i, c in enumerate(self.columns)}
        used = [m.label.column, *(c.column for c in m.categorical), *(d.column for d in m.dense)]
        used += [m.timestamp.column] if m.timestamp else []
        used += [m.weight] if m.weight else []
        unknown = sorted({c for c in used if c not in self._index})
        where = self.mapping_path or self.path
        if unknown:
            raise DatasetError(
                f"mapping names columns the file lacks: {', '.join(unknown)} "
                f"(columns: {', '.join(self.columns)})",
                path=where,
            )
        try:
            config = m.config()
        except ValueError as exc:
            raise DatasetError(f"invalid mapping: {exc}", path=where) from None
        super().__init__(m.name or f"csv:{self.path.name}", config, on_error)
        self._times: dict[str, int] = {}

    def _header(self) -> list[str]:
        with open_text(self.path) as f:
            try:
                return [c.strip() for c in next(csv.reader(f, delimiter=self.mapping.delimiter))]
            except StopIteration:
                raise DatasetError("empty file, expected a header row", path=self.path) from None
            except csv.Error as exc:
                raise DatasetError(f"unreadable header: {exc}", path=self.path, line=1) from None

    def _blocks(self, chunk_rows: int) -> Generator[SampleBatch, None, None]:
        with open_text(self.path) as f:
            reader = csv.reader(f, delimiter=self.mapping.delimiter)
            if self.mapping.header:
                next(reader, None)
            first = 2 if self.mapping.header else 1
            for rows, lines, errors in csv_chunks(reader, chunk_rows, len(self.columns)):
                block = self._parse(rows, lines, errors, first)
                if block is not None:
                    yield block

    def _col(self, cols: Sequence[Sequence[str]], name: str) -> Sequence[str]:
        return cols[self._index[name]]

    def _parse(
        self, rows: list[list[str]], lines: list[int], errors: dict[int, str], first: int
    ) -> SampleBatch | None:
        """One chunk of rows -> a block (None when every row was skipped)."""
        m = self.mapping
        rows, lines = self._drop(errors, rows, lines, self.path)
        if not rows:
            return None
        cols: list[Sequence[str]] = list(zip(*rows, strict=True))
        errors = {}
        labels = self._labels(self._col(cols, m.label.column), errors)
        times = self._event_times(cols, lines, first, errors)
        weights = None
        if m.weight:
            weights, _, bad = float_column(self._col(cols, m.weight), m.weight, missing_ok=False)
            errors.update({i: w for i, w in bad.items() if i not in errors})
            for i in np.flatnonzero(weights < 0).tolist():
                errors.setdefault(i, f"{m.weight}: negative weight {weights[i]}")
        values, indicators = [], []
        for d in m.dense:
            raw, missing, bad = float_column(
                self._col(cols, d.column), d.column, missing_ok=d.missing is not None
            )
            errors.update({i: w for i, w in bad.items() if i not in errors})
            raw[missing] = d.missing or 0.0
            values.append(TRANSFORMS[d.transform](raw))
            if d.indicator:
                indicators.append(missing.astype(np.float64))
        n = len(rows)
        dense = np.stack(values + indicators, axis=1) if values else np.zeros((n, 0))
        bad_dense = ~np.isfinite(dense).all(axis=1)
        for i in np.flatnonzero(bad_dense).tolist():
            errors.setdefault(i, "a dense transform gave NaN or infinity")
        if errors:
            keep = self._reject(errors, lines, self.path)
            if not keep.any():
                return None
            idx = np.flatnonzero(keep).tolist()
            cols = [[c[i] for i in idx] for c in cols]
            labels, times, dense = labels[keep], times[keep], dense[keep]
            weights = None if weights is None else weights[keep]
        slot_ids = [
            hash_multi(c.slot or c.column, self._col(cols, c.column), c.separator)
            if c.separator
            else hash_single(c.slot or c.column, self._col(cols, c.column))
            for c in m.categorical
        ]
        return make_batch(self.config, labels, times, slot_ids, dense, weights)

    def _labels(self, cells: Sequence[str], errors: dict[int, str]) -> F64:
        """Labels of the label column per the mapping's rule; bad cells go to ``errors``."""
        spec = self.mapping.label
        if spec.values is not None:
            table = spec.values
            out = np.zeros(len(cells))
            for i, v in enumerate(cells):
                if v in table:
                    out[i] = table[v]
                else:
                    errors.setdefault(i, f"{spec.column}: {v!r} is not one of {sorted(table)}")
            return out
        out, _, bad = float_column(cells, spec.column, missing_ok=False)
        errors.update(bad)
        if spec.threshold is not None:
            out = (out >= spec.threshold).astype(np.float64)
        return out

    def _event_times(
        self, cols: Sequence[Sequence[str]], lines: list[int], first: int, errors: dict[int, str]
    ) -> npt.NDArray[np.int64]:
        """Event times in ms from the timestamp column, or derived from line numbers."""
        m, spec = self.mapping, self.mapping.timestamp
        if spec is None:
            return m.base_time_ms + (np.asarray(lines, dtype=np.int64) - first) * m.step_ms
        cells = self._col(cols, spec.column)
        if spec.format in ("epoch_ms", "epoch_s"):
            raw, _, bad = float_column(cells, spec.column, missing_ok=False)
            errors.update({i: w for i, w in bad.items() if i not in errors})
            stamps = np.round(raw * (1000.0 if spec.format == "epoch_s" else 1.0))
            for i in np.flatnonzero(np.abs(stamps) >= _MAX_MS).tolist():
                errors.setdefault(i, f"{spec.column}: {cells[i]!r} is out of range")
                stamps[i] = 0
            return stamps.astype(np.int64)
        parse = _timestamp_parser(spec.format)
        out = np.zeros(len(cells), dtype=np.int64)
        if len(self._times) > _TIME_CACHE:
            self._times.clear()
        for i, v in enumerate(cells):
            ms = self._times.get(v)
            if ms is None:
                try:
                    ms = self._times[v] = parse(v)
                except ValueError:
                    errors.setdefault(i, f"{spec.column}: {v!r} is not a {spec.format} time")
                    continue
            out[i] = ms
        return out
