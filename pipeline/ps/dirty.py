"""Dirty tracking: which rows of a shard table changed since the last checkpoint cut.

Incremental checkpoints write only the rows that changed (a delta), so the table
must know them at a cost in the changed rows, never in the table size:

- **hot rows**: a bitmap over hot slots plus the list of slots set since the cut
  (a push marks its rows: O(rows in the push));
- **rows leaving the hot tier while dirty**: a demoted row is logged with its
  packed content at demotion (the content it keeps in the cold tier until a push
  promotes it, which marks it again); a deleted row is logged by id. A clean row
  that is demoted is not a change: its content is already in the checkpoint, only
  its tier differs, and tiers are placement, not state;
- **rows deleted from the cold tier** (shrink): logged by id.

When a change cannot be tracked row by row (shrink decaying every cold row) or
more than ``limit`` changes are pending, tracking gives up (``lost``): the next
checkpoint must be a full base, which is cheaper than a delta that large.
A tracker starts lost, so a table nobody checkpoints pays nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from pipeline.arrayops import unique
from pipeline.ps.export import RowBatch

__all__ = ["Changes", "DirtyRows", "Taken", "last_occurrence"]

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]
F32 = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Changes:
    """What changed in a table between two cuts: rows to upsert (every column, as
    stored now) and ids to delete. The two sets are disjoint."""

    rows: RowBatch
    deleted: U64  # sorted

    def __len__(self) -> int:
        return len(self.rows) + int(self.deleted.shape[0])


@dataclass(frozen=True)
class Taken:
    """Raw pending changes handed to the table at a cut (it resolves them into Changes)."""

    slots: I64  # dirty hot slots, sorted, unique, live
    gone_ids: U64  # ids that left the hot tier while dirty, or were deleted, in event order
    gone_deleted: npt.NDArray[np.bool_]  # per gone id: deleted (True) or demoted (False)
    gone_rows: F32  # packed rows of the demoted gone ids, in the same order


def last_occurrence(ids: U64) -> I64:
    """Positions of the last occurrence of each distinct id, in id order (stable sort)."""
    if ids.shape[0] == 0:
        return np.zeros(0, np.int64)
    order = np.argsort(ids, kind="stable")
    s = ids[order]
    last = np.ones(s.shape[0], dtype=bool)
    np.not_equal(s[1:], s[:-1], out=last[:-1])
    return order[last].astype(np.int64)


class DirtyRows:
    """Pending changes of one ShardTable since the last :meth:`take`; not thread-safe."""

    def __init__(self) -> None:
        self.tracking = False
        self.pending = 0  # upper bound of the rows a delta would hold
        self.limit: int | None = None
        self._capacity = 0
        self._bits = np.zeros(0, dtype=bool)
        self._reset()

    def _reset(self) -> None:
        self.pending = 0
        self._slots: list[I64] = []
        self._gone_ids: list[U64] = []
        self._gone_deleted: list[npt.NDArray[np.bool_]] = []
        self._gone_rows: list[F32] = []

    @property
    def nbytes(self) -> int:
        return int(self._bits.nbytes)

    def start(self, limit: int | None = None) -> None:
        """Track from now on with nothing pending (the table matches its checkpoint)."""
        self.tracking, self.limit = True, limit
        self._bits = np.zeros(self._capacity, dtype=bool)
        self._reset()

    def lose(self) -> None:
        """Stop tracking: the next :meth:`take` returns None (a full base is needed)."""
        self.tracking = False
        self._bits = np.zeros(0, dtype=bool)
        self._reset()

    def reserve(self, capacity: int) -> None:
        """The hot row blocks now hold ``capacity`` slots."""
        self._capacity = max(self._capacity, capacity)
        if self.tracking and capacity > self._bits.shape[0]:
            grown = np.zeros(capacity, dtype=bool)
            grown[: self._bits.shape[0]] = self._bits
            self._bits = grown

    def _over(self, more: int) -> bool:
        self.pending += more
        if self.limit is not None and self.pending > self.limit:
            self.lose()
            return True
        return False

    def mark(self, slots: I64) -> None:
        """Rows at these (unique) hot slots changed."""
        if not self.tracking or slots.shape[0] == 0:
            return
        new = slots[~self._bits[slots]]
        if new.shape[0] == 0 or self._over(int(new.shape[0])):
            return
        self._bits[new] = True
        self._slots.append(new)

    def moved(self, slots: I64, ids: U64, rows: F32) -> None:
        """Rows at these hot slots go to the cold tier as ``rows`` (packed)."""
        if not self.tracking or slots.shape[0] == 0:
            return
        dirty = self._bits[slots]
        if dirty.any():
            self._bits[slots[dirty]] = False
            self._gone_ids.append(ids[dirty])
            self._gone_deleted.append(np.zeros(int(dirty.sum()), dtype=bool))
            self._gone_rows.append(rows[dirty])

    def deleted(self, slots: I64, ids: U64) -> None:
        """Rows at these hot slots are deleted."""
        if not self.tracking or slots.shape[0] == 0:
            return
        dirty = self._bits[slots]
        self._bits[slots] = False
        self._log_deleted(ids)
        self._over(int(slots.shape[0] - dirty.sum()))

    def deleted_cold(self, ids: U64) -> None:
        """Rows of the cold tier are deleted."""
        if not self.tracking or ids.shape[0] == 0:
            return
        self._log_deleted(ids)
        self._over(int(ids.shape[0]))

    def _log_deleted(self, ids: U64) -> None:
        self._gone_ids.append(np.asarray(ids, dtype=np.uint64))
        self._gone_deleted.append(np.ones(ids.shape[0], dtype=bool))

    def take(self, width: int) -> Taken | None:
        """Hand over what is pending and restart from nothing; None if tracking was lost
        (tracking restarts either way, with the same limit)."""
        if not self.tracking:
            self.start(self.limit)
            return None
        slots = unique(np.concatenate(self._slots)) if self._slots else np.zeros(0, np.int64)
        slots = slots[self._bits[slots]]  # released slots were cleared (their rows left)
        empty_ids = np.zeros(0, np.uint64)
        taken = Taken(
            slots.astype(np.int64),
            np.concatenate(self._gone_ids) if self._gone_ids else empty_ids,
            np.concatenate(self._gone_deleted) if self._gone_deleted else np.zeros(0, bool),
            (
                np.concatenate(self._gone_rows)
                if self._gone_rows
                else np.zeros((0, width), np.float32)
            ),
        )
        self._bits[slots] = False
        self._reset()
        return taken
