"""Avazu CTR CSV: a header row, ``click`` label, ``hour`` as YYMMDDHH, categorical columns.

``id`` identifies the impression and is not a feature; ``click`` is the label (0/1);
``hour`` (``YYMMDDHH``, UTC) becomes the event time in ms. Every other column is a slot
named after the column (``id = hash64("site_id", value)``, empty value = no id). With
``time_slots`` (the default) two derived slots ``hour_of_day`` ("00".."23") and
``day_of_week`` ("0" = Monday .. "6") are appended, the usual Avazu time features.
"""

from __future__ import annotations

import csv
from collections.abc import Generator, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from pipeline.codec import SampleBatch, SlotConfig
from pipeline.ingest.adapters.base import (
    Dataset,
    DatasetError,
    OnError,
    SlotIds,
    check_file,
    csv_chunks,
    float_column,
    hash_single,
    make_batch,
    open_text,
)

__all__ = ["AVAZU_REQUIRED", "TIME_SLOTS", "AvazuDataset", "parse_hour"]

#: Columns an Avazu file must have; every other column is a categorical slot.
AVAZU_REQUIRED = ("id", "click", "hour")
TIME_SLOTS = ("hour_of_day", "day_of_week")


def parse_hour(value: str) -> tuple[int, str, str]:
    """``YYMMDDHH`` (20YY, UTC) -> (ms since the epoch, hour of day, day of week)."""
    if len(value) != 8 or not value.isdigit():
        raise ValueError(f"hour must be YYMMDDHH, got {value!r}")
    yy, mm, dd, hh = (int(value[i : i + 2]) for i in range(0, 8, 2))
    try:
        when = datetime(2000 + yy, mm, dd, hh, tzinfo=timezone.utc)
    except ValueError:
        raise ValueError(f"hour {value!r} is not a valid date and hour") from None
    return int(when.timestamp()) * 1000, f"{hh:02d}", str(when.weekday())


class AvazuDataset(Dataset):
    """An Avazu CSV file (optionally ``.gz``) as SampleBatch; slots follow its header."""

    def __init__(
        self, path: str | Path, *, on_error: OnError = "raise", time_slots: bool = True
    ) -> None:
        self.path = check_file(Path(path))
        self.time_slots = bool(time_slots)
        self.header = self._read_header()
        missing = [c for c in AVAZU_REQUIRED if c not in self.header]
        if missing:
            raise DatasetError(
                f"not an Avazu file: header lacks {', '.join(missing)} "
                f"(unlabelled test files cannot be training samples)",
                path=self.path,
                line=1,
            )
        self._feature_cols = [i for i, c in enumerate(self.header) if c not in AVAZU_REQUIRED]
        slots = tuple(self.header[i] for i in self._feature_cols)
        if time_slots:
            slots += TIME_SLOTS
        try:
            config = SlotConfig(slots, 0)
        except ValueError as exc:
            raise DatasetError(f"bad header: {exc}", path=self.path, line=1) from None
        super().__init__(f"avazu:{self.path.name}", config, on_error)
        self._hours: dict[str, tuple[int, str, str]] = {}

    def _read_header(self) -> list[str]:
        with open_text(self.path) as f:
            try:
                header = next(csv.reader(f))
            except StopIteration:
                raise DatasetError("empty file, expected a header row", path=self.path) from None
            except csv.Error as exc:
                raise DatasetError(f"unreadable header: {exc}", path=self.path, line=1) from None
        return [c.strip() for c in header]

    def _blocks(self, chunk_rows: int) -> Generator[SampleBatch, None, None]:
        with open_text(self.path) as f:
            reader = csv.reader(f)
            next(reader)
            for rows, lines, errors in csv_chunks(reader, chunk_rows, len(self.header)):
                block = self._parse(rows, lines, errors)
                if block is not None:
                    yield block

    def _hour(self, value: str) -> tuple[int, str, str]:
        """Cached :func:`parse_hour` (a file has few distinct hours)."""
        parsed = self._hours.get(value)
        if parsed is None:
            parsed = self._hours[value] = parse_hour(value)
        return parsed

    def _parse(
        self, rows: list[list[str]], lines: list[int], errors: dict[int, str]
    ) -> SampleBatch | None:
        """One chunk of CSV rows -> a block (None when every row was skipped)."""
        rows, lines = self._drop(errors, rows, lines, self.path)
        if not rows:
            return None
        cols: list[Sequence[str]] = list(zip(*rows, strict=True))
        click_col = cols[self.header.index("click")]
        labels, _, errors = float_column(click_col, "click", missing_ok=False)
        for i in np.flatnonzero((labels != 0) & (labels != 1)).tolist():
            errors.setdefault(i, f"click must be 0 or 1, got {click_col[i]!r}")
        hours: list[tuple[int, str, str]] = []
        for i, value in enumerate(cols[self.header.index("hour")]):
            try:
                hours.append(self._hour(value))
            except ValueError as exc:
                errors.setdefault(i, str(exc))
                hours.append((0, "", ""))
        if errors:
            keep = self._reject(errors, lines, self.path)
            if not keep.any():
                return None
            idx = np.flatnonzero(keep).tolist()
            cols = [[c[i] for i in idx] for c in cols]
            labels = labels[keep]
            hours = [hours[i] for i in idx]
        slot_ids: list[SlotIds] = [hash_single(self.header[c], cols[c]) for c in self._feature_cols]
        if self.time_slots:
            slot_ids.append(hash_single("hour_of_day", [h[1] for h in hours]))
            slot_ids.append(hash_single("day_of_week", [h[2] for h in hours]))
        times = np.fromiter((h[0] for h in hours), dtype=np.int64, count=len(hours))
        return make_batch(self.config, labels, times, slot_ids)
