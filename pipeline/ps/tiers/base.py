"""The cold-tier contract: a batch key-value store of uint64 id -> float32[width] row.

The hot table demotes rows here when memory runs short and promotes them back
when a push touches them. A cold row packs everything a row owns (weights,
optimizer state, statistics) into one float32 vector, so a tier needs no
knowledge of tables. Implementations: :mod:`.memory` (numpy, for tests and
small tables) and :mod:`.ssd` (RocksDB). All of them pass the shared contract
tests in ``tests/unit/test_ps_tiers.py``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import numpy as np
import numpy.typing as npt

__all__ = ["ColdTier", "RowChunk"]

U64 = npt.NDArray[np.uint64]
F32 = npt.NDArray[np.float32]
RowChunk = tuple[U64, F32]


class ColdTier(ABC):
    """Batch store of rows of a fixed ``width``; ids are arbitrary uint64 (0 and 2**64-1 too).

    Semantics every implementation keeps: ``put`` is an upsert (last duplicate
    wins), ``get`` of a missing id yields ``found=False`` and a zero row,
    ``delete`` ignores missing ids, ``count()`` is exact.
    """

    def __init__(self, width: int) -> None:
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.width = width

    @abstractmethod
    def put(self, ids: U64, rows: F32) -> None:
        """Insert or overwrite ``rows[i]`` under ``ids[i]`` (one atomic batch where supported)."""

    @abstractmethod
    def get(self, ids: U64) -> tuple[npt.NDArray[np.bool_], F32]:
        """``(found_mask, rows)``; rows of missing ids are zero."""

    @abstractmethod
    def delete(self, ids: U64) -> None:
        """Remove ids; missing ids are ignored."""

    def pop(self, ids: U64) -> tuple[npt.NDArray[np.bool_], F32]:
        """``get`` then ``delete`` of the found ids: how the hot table promotes rows."""
        ids = self._check_ids(ids)
        found, rows = self.get(ids)
        if found.any():
            self.delete(ids[found])
        return found, rows

    @abstractmethod
    def count(self) -> int:
        """Exact number of stored rows."""

    def __len__(self) -> int:
        return self.count()

    @abstractmethod
    def iter_chunks(self, chunk_rows: int = 65_536) -> Iterator[RowChunk]:
        """Yield ``(ids, rows)`` copies covering every row once.

        The tier may be modified while iterating (shrink writes back decayed rows):
        implementations iterate over a snapshot of the ids present at the start.
        """

    @abstractmethod
    def checkpoint(self, path: str | Path) -> None:
        """Write a consistent on-disk copy of the whole tier to the new directory ``path``."""

    def prepare_checkpoint(self) -> bool:
        """Make the next :meth:`checkpoint` cheap, in the background where the store can
        (flush write buffers); True once it is ready. Call again until then; checkpointing
        before that is correct, only slower. The default tier needs nothing."""
        return True

    @abstractmethod
    def restore(self, path: str | Path) -> None:
        """Replace every row with those of a :meth:`checkpoint` directory (left unchanged)."""

    @abstractmethod
    def close(self) -> None:
        """Release resources; the tier must not be used afterwards."""

    def __enter__(self) -> ColdTier:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # Shared input checks, so every tier rejects the same bad input the same way.
    def _check_ids(self, ids: U64) -> U64:
        arr = np.asarray(ids)
        if arr.ndim != 1 or arr.dtype != np.uint64:
            raise ValueError(f"ids must be a 1-D uint64 array, got {arr.dtype}{arr.shape}")
        return arr

    def _check_rows(self, ids: U64, rows: F32) -> F32:
        arr = np.asarray(rows)
        if arr.dtype != np.float32 or arr.shape != (ids.shape[0], self.width):
            raise ValueError(
                f"rows must be float32[{ids.shape[0]}, {self.width}], got {arr.dtype}{arr.shape}"
            )
        return arr

    @staticmethod
    def _last_wins(ids: U64) -> npt.NDArray[np.int64]:
        """Positions of the last occurrence of each distinct id (upsert semantics)."""
        _, last_rev = np.unique(ids[::-1], return_index=True)
        return (ids.shape[0] - 1 - last_rev).astype(np.int64)
