"""The join state of one partition as numpy columns: a key index and a row table.

Every join key the partition holds (an open window, a closed key remembered for
dedup, clicks waiting for their impression, or replay marks after a crash) is one
row of :class:`RowTable`, found by its 64-bit key hash through :class:`KeyIndex`.
Nothing here is a Python object per key: a remembered (closed) key costs its row,
about 40 bytes, plus about 24 bytes of index; an open window adds its feature ids
(9 bytes per slot) in a separate slab that is freed when the window closes.
Rows are recycled through a free list, so memory stays flat at a steady rate.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["DONE", "FREE", "NONE", "PENDING", "KeyIndex", "RowTable"]

I32 = npt.NDArray[np.int32]
I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]

# row status: FREE (unused), PENDING (window open), DONE (closed, remembered), NONE (no
# impression yet: clicks waiting for it, or marks of samples already on the topic)
FREE, PENDING, DONE, NONE = 0, 1, 2, 3

_EMPTY, _DELETED = -1, -2


class KeyIndex:
    """uint64 key -> int32 row, open addressing with linear probing, all vectorized.

    Lookups, inserts and deletes take arrays; each probe step is one numpy pass over
    the keys still unresolved. The table doubles at 50% load (live + deleted) and is
    rebuilt without tombstones then.
    """

    def __init__(self, capacity: int = 1024) -> None:
        cap = 1 << max(4, int(capacity - 1).bit_length())
        self._keys = np.zeros(cap, dtype=np.uint64)
        self._vals = np.full(cap, _EMPTY, dtype=np.int32)
        self.live = 0
        self._used = 0  # live + tombstones

    @property
    def capacity(self) -> int:
        return len(self._keys)

    def _home(self, keys: U64) -> I64:
        mixed = keys ^ (keys >> np.uint64(29))  # key hashes are XXH64: low bits are fine
        return (mixed & np.uint64(len(self._keys) - 1)).astype(np.int64)

    def lookup(self, keys: U64) -> I32:
        """Row of each key, -1 where absent."""
        out = np.full(len(keys), -1, dtype=np.int32)
        if not len(keys) or not self.live:
            return out
        mask = len(self._keys) - 1
        todo = np.arange(len(keys))
        slot = self._home(keys)
        want = keys
        while len(todo):
            vals = self._vals[slot]
            hit = (vals >= 0) & (self._keys[slot] == want)
            out[todo[hit]] = vals[hit]
            more = ~hit & (vals != _EMPTY)
            todo, slot, want = todo[more], (slot[more] + 1) & mask, want[more]
        return out

    def insert(self, keys: U64, rows: npt.ArrayLike) -> None:
        """Add distinct keys known to be absent."""
        n = len(keys)
        if not n:
            return
        if (self._used + n) * 2 > len(self._keys):
            self._rebuild(max(self.live + n, 8) * 4)
        rows32 = np.asarray(rows, dtype=np.int32)
        mask = len(self._keys) - 1
        todo = np.arange(n)
        slot = self._home(keys)
        while len(todo):
            free = self._vals[slot] < 0
            # of several keys aiming at one free slot, the first takes it
            cand = todo[free]
            cslot = slot[free]
            if len(cslot) < 256 and len(set(cslot.tolist())) == len(cslot):
                won, wslot = cand, cslot  # no two keys aim at one slot (the usual case)
            else:
                _, first = np.unique(cslot, return_index=True)
                won, wslot = cand[first], cslot[first]
            self._used += int((self._vals[wslot] == _EMPTY).sum())
            self._keys[wslot] = keys[won]
            self._vals[wslot] = rows32[won]
            placed = np.zeros(n, dtype=bool)
            placed[won] = True
            keep = ~placed[todo]
            todo, slot = todo[keep], slot[keep]
            slot = np.where(self._vals[slot] < 0, slot, (slot + 1) & mask)
        self.live += n

    def delete(self, keys: U64) -> None:
        """Remove keys known to be present."""
        if not len(keys):
            return
        mask = len(self._keys) - 1
        todo = np.arange(len(keys))
        slot = self._home(keys)
        want = keys
        while len(todo):
            vals = self._vals[slot]
            hit = (vals >= 0) & (self._keys[slot] == want)
            self._vals[slot[hit]] = _DELETED
            more = ~hit & (vals != _EMPTY)
            todo, slot, want = todo[more], (slot[more] + 1) & mask, want[more]
        self.live -= len(keys)

    def update(self, keys: U64, rows: npt.ArrayLike) -> None:
        """Point present keys at new rows."""
        if not len(keys):
            return
        rows32 = np.asarray(rows, dtype=np.int32)
        mask = len(self._keys) - 1
        todo = np.arange(len(keys))
        slot = self._home(keys)
        while len(todo):
            vals = self._vals[slot]
            hit = (vals >= 0) & (self._keys[slot] == keys[todo])
            self._vals[slot[hit]] = rows32[todo[hit]]
            more = ~hit & (vals != _EMPTY)
            todo, slot = todo[more], (slot[more] + 1) & mask

    def items(self) -> tuple[U64, I32]:
        """All (key, row) pairs."""
        live = self._vals >= 0
        return self._keys[live], self._vals[live]

    def _rebuild(self, capacity: int) -> None:
        keys, rows = self.items()
        cap = 1 << max(4, int(capacity - 1).bit_length())
        self._keys = np.zeros(cap, dtype=np.uint64)
        self._vals = np.full(cap, _EMPTY, dtype=np.int32)
        self.live = self._used = 0
        self.insert(keys, rows)

    def nbytes(self) -> int:
        return int(self._keys.nbytes + self._vals.nbytes)


class RowTable:
    """Columns of all rows, a free list, and a slab of feature ids for open windows.

    Columns (one entry per row): ``key`` (join key hash), ``status``, ``flags``
    (:data:`LATE`, :data:`CLICKED`, :data:`KEEP`), ``kind`` (of a closed key),
    ``emitted`` (bit per Kind already on the topic before a crash), ``time`` (the
    impression's event time; the earliest waiting click's for an orphan row), ``user``
    (route hash), ``feat`` (slab row or -1), ``gen`` (bumped when a row is freed, so
    stale timers can be told apart), ``written`` (the checkpoint delta that last wrote
    it) and ``dirty`` (changed since then).
    """

    COLUMNS = (
        "key",
        "status",
        "flags",
        "kind",
        "emitted",
        "time",
        "user",
        "feat",
        "gen",
        "written",
    )

    def __init__(self, num_slots: int, capacity: int = 1024) -> None:
        self.num_slots = num_slots
        self.key = np.zeros(0, dtype=np.uint64)
        self.status = np.zeros(0, dtype=np.uint8)
        self.flags = np.zeros(0, dtype=np.uint8)
        self.kind = np.zeros(0, dtype=np.uint8)
        self.emitted = np.zeros(0, dtype=np.uint8)
        self.time = np.zeros(0, dtype=np.int64)
        self.user = np.zeros(0, dtype=np.uint64)
        self.feat = np.zeros(0, dtype=np.int32)
        self.gen = np.zeros(0, dtype=np.uint32)
        self.written = np.zeros(0, dtype=np.int64)  # the delta that last wrote the row
        self.dirty = np.zeros(0, dtype=bool)
        self._free = np.zeros(0, dtype=np.int32)  # stack of free rows
        self._top = 0
        self.ids = np.zeros((0, num_slots), dtype=np.uint64)
        self.present = np.zeros((0, num_slots), dtype=bool)
        self._ffree = np.zeros(0, dtype=np.int32)
        self._ftop = 0
        self.index = KeyIndex(capacity)
        self._grow_rows(capacity)
        self._grow_feats(capacity)

    # -- rows ---------------------------------------------------------------------------

    @property
    def rows_used(self) -> int:
        return len(self.key) - self._top

    @property
    def feats_used(self) -> int:
        return len(self.ids) - self._ftop

    def _grow_rows(self, need: int) -> None:
        old = len(self.key)
        new = max(16, old * 2, old + need)
        for name in (*self.COLUMNS, "dirty"):
            col = getattr(self, name)
            grown = np.zeros(new, dtype=col.dtype)
            grown[:old] = col
            setattr(self, name, grown)
        self.feat[old:] = -1
        free = np.zeros(new, dtype=np.int32)
        free[: self._top] = self._free[: self._top]
        free[self._top : self._top + new - old] = np.arange(new - 1, old - 1, -1, dtype=np.int32)
        self._free, self._top = free, self._top + new - old

    def alloc(self, keys: U64) -> I32:
        """New rows (status FREE, zeroed) for ``keys``, entered in the index."""
        n = len(keys)
        if n > self._top:
            self._grow_rows(n - self._top)
        rows = self._free[self._top - n : self._top][::-1].copy()
        self._top -= n
        self.key[rows] = keys
        self.index.insert(keys, rows)
        return rows

    def release(self, rows: I32) -> None:
        """Free ``rows`` (and their features), removing their keys from the index."""
        if not len(rows):
            return
        self.index.delete(self.key[rows])
        self.drop_features(rows)
        self.status[rows] = FREE
        self.flags[rows] = self.kind[rows] = self.emitted[rows] = 0
        self.gen[rows] += np.uint32(1)
        self.dirty[rows] = False
        n = len(rows)
        self._free[self._top : self._top + n] = rows
        self._top += n

    # -- features -----------------------------------------------------------------------

    def _grow_feats(self, need: int) -> None:
        old = len(self.ids)
        new = max(16, old * 2, old + need)
        ids = np.zeros((new, self.num_slots), dtype=np.uint64)
        present = np.zeros((new, self.num_slots), dtype=bool)
        ids[:old], present[:old] = self.ids, self.present
        self.ids, self.present = ids, present
        free = np.zeros(new, dtype=np.int32)
        free[: self._ftop] = self._ffree[: self._ftop]
        free[self._ftop : self._ftop + new - old] = np.arange(new - 1, old - 1, -1, dtype=np.int32)
        self._ffree, self._ftop = free, self._ftop + new - old

    def set_features(self, rows: I32, ids: U64, present: npt.NDArray[np.bool_]) -> None:
        """Store feature ids (``[len(rows), num_slots]``) for rows that have none."""
        n = len(rows)
        if not n:
            return
        if n > self._ftop:
            self._grow_feats(n - self._ftop)
        slots = self._ffree[self._ftop - n : self._ftop][::-1].copy()
        self._ftop -= n
        self.ids[slots] = ids
        self.present[slots] = present
        self.feat[rows] = slots

    def drop_features(self, rows: I32) -> None:
        """Free the feature ids of ``rows`` (those that have some)."""
        slots = self.feat[rows]
        slots = slots[slots >= 0]
        if len(slots):
            self._ffree[self._ftop : self._ftop + len(slots)] = slots
            self._ftop += len(slots)
            self.present[slots] = False
        self.feat[rows] = -1

    def features(self, rows: I32) -> tuple[U64, npt.NDArray[np.bool_]]:
        """Feature ids and presence of ``rows`` (rows without features: none present)."""
        slots = self.feat[rows]
        has = slots >= 0
        safe = np.where(has, slots, 0)
        return self.ids[safe], self.present[safe] & has[:, None]

    def nbytes(self) -> int:
        cols: list[Any] = [getattr(self, c) for c in (*self.COLUMNS, "dirty")]
        cols += [self._free, self.ids, self.present, self._ffree]
        return int(sum(c.nbytes for c in cols)) + self.index.nbytes()
