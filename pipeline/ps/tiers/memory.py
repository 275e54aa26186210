"""In-memory cold tier on numpy arrays: for tests, small tables and as a reference.

Same slot machinery as the hot table (:class:`~pipeline.ps.index.SlotMap`), so
every batch operation is vectorized. ``checkpoint`` writes ``ids.npy`` and
``rows.npy`` into a temp directory renamed into place; :meth:`MemoryTier.load`
and :meth:`MemoryTier.restore` read it back. Checkpoints copy every row while the
caller waits: this tier is for tests and small tables.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt

from pipeline.arrayops import unique
from pipeline.ps.index import SlotMap, grow_rows
from pipeline.ps.tiers.base import F32, U64, ColdTier, RowChunk

__all__ = ["MemoryTier"]


class MemoryTier(ColdTier):
    """A :class:`ColdTier` holding rows in one growable float32 matrix."""

    def __init__(self, width: int, capacity: int = 1024) -> None:
        super().__init__(width)
        self._slots = SlotMap(capacity)
        self._rows = np.zeros((capacity, width), dtype=np.float32)
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("MemoryTier is closed")

    def put(self, ids: U64, rows: F32) -> None:
        self._check_open()
        ids = self._check_ids(ids)
        rows = self._check_rows(ids, rows)
        keep = self._last_wins(ids)
        ids, rows = ids[keep], rows[keep]
        slots = self._slots.lookup(ids)
        new = slots < 0
        if new.any():
            slots[new] = self._slots.assign(ids[new])
            if self._slots.high_water > self._rows.shape[0]:
                grown = max(self._slots.high_water, self._rows.shape[0] * 3 // 2)
                self._rows = grow_rows(self._rows, grown)
        self._rows[slots] = rows

    def get(self, ids: U64) -> tuple[npt.NDArray[np.bool_], F32]:
        self._check_open()
        ids = self._check_ids(ids)
        slots = self._slots.lookup(ids)
        found = slots >= 0
        rows = np.zeros((ids.shape[0], self.width), dtype=np.float32)
        rows[found] = self._rows[slots[found]]
        return found, rows

    def delete(self, ids: U64) -> None:
        self._check_open()
        slots = self._slots.lookup(unique(self._check_ids(ids)))
        self._slots.release(slots[slots >= 0])

    def count(self) -> int:
        return len(self._slots)

    @property
    def nbytes(self) -> int:
        return int(self._rows.nbytes + self._slots.nbytes)

    def iter_chunks(self, chunk_rows: int = 65_536) -> Iterator[RowChunk]:
        self._check_open()
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        ids = self._slots.ids[self._slots.live_slots()]  # snapshot of the ids at the start
        for start in range(0, ids.shape[0], chunk_rows):
            chunk = ids[start : start + chunk_rows]
            found, rows = self.get(chunk)  # current values; skips ids deleted meanwhile
            if found.any():
                yield chunk[found], rows[found]

    def checkpoint(self, path: str | Path) -> None:
        self._check_open()
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.mkdir(parents=True)
        live = self._slots.live_slots()
        np.save(tmp / "ids.npy", self._slots.ids[live])
        np.save(tmp / "rows.npy", self._rows[live])
        (tmp / "meta.json").write_text(json.dumps({"tier": "memory", "width": self.width}))
        os.rename(tmp, path)  # fails if path exists: checkpoints are never overwritten

    def restore(self, path: str | Path) -> None:
        self._check_open()
        loaded = MemoryTier.load(path)
        if loaded.width != self.width:
            raise ValueError(f"{path} holds rows of width {loaded.width}, not {self.width}")
        self._slots, self._rows = loaded._slots, loaded._rows

    @classmethod
    def load(cls, path: str | Path) -> MemoryTier:
        """A new tier holding the rows of a :meth:`checkpoint` directory."""
        path = Path(path)
        meta = json.loads((path / "meta.json").read_text())
        ids = np.load(path / "ids.npy", allow_pickle=False)
        rows = np.load(path / "rows.npy", allow_pickle=False)
        tier = cls(int(meta["width"]), capacity=max(1024, ids.shape[0]))
        tier.put(ids, rows)
        return tier

    def close(self) -> None:
        self._closed = True
