"""Criteo display-advertising TSV (Kaggle format): label, I1-I13 integers, C1-C26 hashes.

Each line is ``label \\t I1 .. I13 \\t C1 .. C26`` with empty fields for missing values
and no header. Slots are ``C1``..``C26`` (``id = hash64("C7", value)``; an empty field
gives that row no id in that slot). Dense features are ``log1p(max(x, 0))`` of
``I1``..``I13`` with missing = 0, optionally followed by 13 missing indicators (1.0 when
the field was empty). Criteo has no timestamps, so event times are derived from the
position in the file: ``base_time_ms + (line - 1) * step_ms``. See ``docs/datasets.md``.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from itertools import islice
from pathlib import Path

import numpy as np

from pipeline.codec import SampleBatch, SlotConfig
from pipeline.ingest.adapters.base import (
    Dataset,
    OnError,
    check_file,
    float_column,
    hash_single,
    make_batch,
    open_text,
    select,
)

__all__ = [
    "CRITEO_DENSE",
    "CRITEO_SLOTS",
    "DEFAULT_BASE_TIME_MS",
    "DEFAULT_STEP_MS",
    "CriteoDataset",
    "criteo_dense",
]

CRITEO_DENSE = tuple(f"I{i}" for i in range(1, 14))
CRITEO_SLOTS = tuple(f"C{i}" for i in range(1, 27))
_FIELDS = 1 + len(CRITEO_DENSE) + len(CRITEO_SLOTS)

#: 2014-01-01T00:00:00Z, around when the Kaggle Criteo data was logged.
DEFAULT_BASE_TIME_MS = 1_388_534_400_000
#: 10 ms per row: the Kaggle train set is 45.8M rows over 7 days, about 13 ms apart.
DEFAULT_STEP_MS = 10


def criteo_dense(raw: np.ndarray, missing: np.ndarray, indicators: bool) -> np.ndarray:
    """The dense transform: ``log1p(max(x, 0))``, missing = 0 (+ indicators if asked)."""
    values = np.log1p(np.maximum(np.where(missing, 0.0, raw), 0.0))
    if indicators:
        values = np.concatenate([values, missing.astype(np.float64)], axis=1)
    return values.astype(np.float32)


class CriteoDataset(Dataset):
    """A Criteo TSV file (optionally ``.gz``) as SampleBatch with 26 slots and dense I1-I13."""

    def __init__(
        self,
        path: str | Path,
        *,
        on_error: OnError = "raise",
        base_time_ms: int = DEFAULT_BASE_TIME_MS,
        step_ms: int = DEFAULT_STEP_MS,
        missing_indicators: bool = False,
    ) -> None:
        self.path = check_file(Path(path))
        self.base_time_ms = int(base_time_ms)
        self.step_ms = int(step_ms)
        self.missing_indicators = bool(missing_indicators)
        dense_dim = len(CRITEO_DENSE) * (2 if missing_indicators else 1)
        super().__init__(f"criteo:{self.path.name}", SlotConfig(CRITEO_SLOTS, dense_dim), on_error)

    def _blocks(self, chunk_rows: int) -> Generator[SampleBatch, None, None]:
        with open_text(self.path) as f:
            line = 0
            while True:
                raw = list(islice(f, chunk_rows))
                if not raw:
                    return
                fields: list[list[str]] = []
                lines: list[int] = []
                for text in raw:
                    line += 1
                    text = text.rstrip("\r\n")
                    if text.strip():  # blank lines are not rows
                        fields.append(text.split("\t"))
                        lines.append(line)
                if fields:
                    block = self._parse(fields, lines)
                    if block is not None:
                        yield block

    def _parse(self, fields: list[list[str]], lines: list[int]) -> SampleBatch | None:
        """One chunk of split lines -> a block (None when every row was skipped)."""
        errors = {
            i: f"expected {_FIELDS} tab-separated fields (label, I1-I13, C1-C26), got {len(f)}"
            for i, f in enumerate(fields)
            if len(f) != _FIELDS
        }
        if errors:
            keep = self._reject(errors, lines, self.path)
            fields, lines = select(fields, keep), select(lines, keep)
            if not fields:
                return None
        cols: list[Sequence[str]] = list(zip(*fields, strict=True))
        labels, _, errors = float_column(cols[0], "label", missing_ok=False)
        for i in np.flatnonzero((labels != 0) & (labels != 1)).tolist():
            errors.setdefault(i, f"label must be 0 or 1, got {cols[0][i]!r}")
        raw = np.empty((len(fields), len(CRITEO_DENSE)), dtype=np.float64)
        missing = np.empty(raw.shape, dtype=bool)
        for j, name in enumerate(CRITEO_DENSE):
            raw[:, j], missing[:, j], bad = float_column(cols[1 + j], name, missing_ok=True)
            for i, why in bad.items():
                errors.setdefault(i, why)
        if errors:
            keep = self._reject(errors, lines, self.path)
            if not keep.any():
                return None
            cols = [select(c, keep) for c in cols]
            labels, raw, missing = labels[keep], raw[keep], missing[keep]
            lines = select(lines, keep)
        first = 1 + len(CRITEO_DENSE)
        slot_ids = [hash_single(s, cols[first + k]) for k, s in enumerate(CRITEO_SLOTS)]
        times = self.base_time_ms + (np.asarray(lines, dtype=np.int64) - 1) * self.step_ms
        dense = criteo_dense(raw, missing, self.missing_indicators)
        return make_batch(self.config, labels, times, slot_ids, dense)
