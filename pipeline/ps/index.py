"""Vectorized open-addressing hash index (uint64 id -> row slot) and a slot allocator.

Every id is valid (0 and 2**64-1 included), so occupancy lives in a separate
``state`` byte array (empty / full / tombstone) instead of a sentinel key.
Linear probing; all batch operations loop over *probe rounds* with numpy,
never over ids. The home bucket is ``(mix(id) >> 32) * capacity >> 32``
(Lemire's fast range reduction), so the capacity need not be a power of two
and can grow by 1.5x instead of 2x. Slots are stored as int32 (a shard table
holds < 2**31 rows), so a bucket costs 13 bytes (key 8, slot 4, state 1) and a
row 19-23 bytes at the 0.56-0.7 load this index keeps.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import numpy.typing as npt

from pipeline.arrayops import unique
from pipeline.ps.initializers import splitmix64

__all__ = ["HashIndex", "SlotMap", "grow_rows"]

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]

_A = TypeVar("_A", bound=np.generic)
_EMPTY, _FULL, _TOMB = np.uint8(0), np.uint8(1), np.uint8(2)
_MAX_SLOT = 2**31 - 1
_SCALAR_TAIL = 12  # probe chains left when the rest is walked one id at a time


class HashIndex:
    """Batch map uint64 -> int64 slot with linear probing, tombstones and rehash on growth.

    When live + tombstone buckets would exceed ``max_load`` of the capacity, it
    rebuilds without tombstones at a load of ``0.8 * max_load`` (growing 1.25x when
    full of live ids, keeping or shrinking the size when full of tombstones).
    Not thread-safe.
    """

    def __init__(self, capacity: int = 1024, max_load: float = 0.7) -> None:
        if not 0.1 <= max_load <= 0.9:
            raise ValueError(f"max_load must be in [0.1, 0.9], got {max_load}")
        self.max_load = max_load
        self._alloc(max(8, capacity))
        self._size = 0

    def _alloc(self, capacity: int) -> None:
        self._keys = np.zeros(capacity, dtype=np.uint64)
        self._vals = np.zeros(capacity, dtype=np.int32)
        self._state = np.zeros(capacity, dtype=np.uint8)
        self._used = 0  # full + tombstone buckets: what probe chains pay for

    def __len__(self) -> int:
        return self._size

    @property
    def capacity(self) -> int:
        return int(self._keys.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self._keys.nbytes + self._vals.nbytes + self._state.nbytes)

    def _home(self, ids: U64) -> I64:
        top = splitmix64(ids) >> np.uint64(32)
        return ((top * np.uint64(self.capacity)) >> np.uint64(32)).astype(np.int64)

    def _next(self, pos: I64) -> I64:
        nxt = pos + 1
        nxt[nxt == self.capacity] = 0
        return nxt

    def _find(self, ids: U64) -> I64:
        """Bucket of each id, or -1 when absent (probes skip tombstones, stop at empty)."""
        out = np.full(ids.shape[0], -1, dtype=np.int64)
        active = np.arange(ids.shape[0])
        pos = self._home(ids)
        while active.shape[0]:
            if active.shape[0] <= _SCALAR_TAIL:
                self._find_tail(ids, active, pos, out)
                break
            state = self._state[pos]
            hit = (state == _FULL) & (self._keys[pos] == ids[active])
            out[active[hit]] = pos[hit]
            keep = ~(hit | (state == _EMPTY))
            active, pos = active[keep], self._next(pos[keep])
        return out

    def _find_tail(self, ids: U64, active: I64, pos: I64, out: I64) -> None:
        """The last few probe chains one id at a time.

        A batch needs as many vectorized rounds as its longest chain (10-20 at the
        loads kept here), each a handful of numpy calls; the few ids left after the
        first rounds walk their chains faster in plain Python.
        """
        keys, state, cap = self._keys, self._state, self.capacity
        for i, p in zip(active.tolist(), pos.tolist(), strict=True):
            key = ids[i]
            while True:
                st = state[p]
                if st == _EMPTY:
                    break
                if st == _FULL and keys[p] == key:
                    out[i] = p
                    break
                p = p + 1 if p + 1 < cap else 0

    def lookup(self, ids: U64) -> I64:
        """Slot of each id, -1 where missing."""
        ids = np.asarray(ids, dtype=np.uint64)
        buckets = self._find(ids)
        found = buckets >= 0
        out = np.full(ids.shape[0], -1, dtype=np.int64)
        out[found] = self._vals[buckets[found]]
        return out

    def insert(self, ids: U64, slots: I64) -> None:
        """Set ``id -> slot`` (upsert). With duplicate ids in the batch the last one wins."""
        ids = np.asarray(ids, dtype=np.uint64)
        slots = np.asarray(slots, dtype=np.int64)
        if ids.shape != slots.shape or ids.ndim != 1:
            raise ValueError(f"ids {ids.shape} and slots {slots.shape} must be equal 1-D shapes")
        if slots.shape[0] and (slots.min() < 0 or slots.max() > _MAX_SLOT):
            raise ValueError(f"slots must be in [0, {_MAX_SLOT}]")
        # Keep the last occurrence of each id: unique over the reversed batch.
        _, last = np.unique(ids[::-1], return_index=True)
        keep = ids.shape[0] - 1 - last
        ids, slots = ids[keep], slots[keep]
        buckets = self._find(ids)
        present = buckets >= 0
        self._vals[buckets[present]] = slots[present]
        self.add(ids[~present], slots[~present])

    def add(self, ids: U64, slots: I64) -> None:
        """Map ids that are unique and absent (the caller knows: no lookup, no dedup)."""
        new_ids, new_slots = ids, slots
        if new_ids.shape[0] == 0:
            return
        if self._used + new_ids.shape[0] > self.max_load * self.capacity:
            self._rehash(self._size + new_ids.shape[0])
        self._place(new_ids, new_slots)
        self._size += new_ids.shape[0]

    def _place(self, ids: U64, slots: I64) -> None:
        """Claim a free bucket for each (unique, absent) id; one winner per bucket per round."""
        active = np.arange(ids.shape[0])
        pos = self._home(ids)
        while active.shape[0]:
            if active.shape[0] <= _SCALAR_TAIL:
                self._place_tail(ids, slots, active, pos)
                break
            state = self._state[pos]
            free = np.flatnonzero(state != _FULL)
            # Among ids racing for the same free bucket, the first in batch order wins.
            _, first = np.unique(pos[free], return_index=True)
            win = free[first]
            wpos = pos[win]
            self._used += int(np.count_nonzero(self._state[wpos] == _EMPTY))
            self._keys[wpos] = ids[active[win]]
            self._vals[wpos] = slots[active[win]]
            self._state[wpos] = _FULL
            keep = np.ones(active.shape[0], dtype=bool)
            keep[win] = False
            active, pos = active[keep], self._next(pos[keep])

    def _place_tail(self, ids: U64, slots: I64, active: I64, pos: I64) -> None:
        """The last few ids of :meth:`_place`, one at a time (see :meth:`_find_tail`)."""
        keys, vals, state, cap = self._keys, self._vals, self._state, self.capacity
        for i, p in zip(active.tolist(), pos.tolist(), strict=True):
            while state[p] == _FULL:
                p = p + 1 if p + 1 < cap else 0
            self._used += int(state[p] == _EMPTY)
            keys[p], vals[p], state[p] = ids[i], slots[i], _FULL

    def _rehash(self, live_after: int) -> None:
        """Rebuild without tombstones, sized so ``live_after`` ids sit at 0.8 of max_load.

        0.8 trades a rebuild every ~0.14 * capacity inserts (amortized O(1)) for
        an index that stays dense (memory per row matters more than rebuilds).
        """
        live = self._state == _FULL
        keys, vals = self._keys[live], self._vals[live].astype(np.int64)
        capacity = max(8, int(live_after / (self.max_load * 0.8)) + 1)
        if capacity >= 2**32:
            raise OverflowError("hash index limited to 2**32 buckets")
        self._alloc(capacity)
        self._place(keys, vals)

    def delete(self, ids: U64) -> int:
        """Remove ids (missing ones are ignored); returns how many were removed."""
        buckets = unique(self._find(np.asarray(ids, dtype=np.uint64)))
        buckets = buckets[buckets >= 0]
        self._state[buckets] = _TOMB
        self._size -= buckets.shape[0]
        return int(buckets.shape[0])

    def items(self) -> tuple[U64, I64]:
        """All live ``(ids, slots)``, in bucket order."""
        live = self._state == _FULL
        return self._keys[live].copy(), self._vals[live].astype(np.int64)


class SlotMap:
    """Assigns dense row slots ``[0, high_water)`` to ids, reusing freed slots (a free list).

    Owners (the hot table, the memory tier) keep their row arrays at least
    ``high_water`` long and index them by slot.
    """

    def __init__(self, capacity: int = 1024) -> None:
        self.index = HashIndex(capacity)
        self.ids = np.zeros(capacity, dtype=np.uint64)  # slot -> id
        self.live = np.zeros(capacity, dtype=bool)
        self._free = np.zeros(0, dtype=np.int64)  # stack of released slots
        self.high_water = 0

    def __len__(self) -> int:
        return len(self.index)

    @property
    def nbytes(self) -> int:
        return int(self.index.nbytes + self.ids.nbytes + self.live.nbytes + self._free.nbytes)

    def lookup(self, ids: U64) -> I64:
        return self.index.lookup(ids)

    @property
    def capacity(self) -> int:
        return int(self.ids.shape[0])

    def slots_needed(self, new_ids: int) -> int:
        """``high_water`` after assigning ``new_ids`` more ids (free slots are reused first)."""
        return self.high_water + max(0, new_ids - self._free.shape[0])

    def reserve(self, rows: int) -> None:
        """Grow the per-slot arrays to at least ``rows`` (owners call this with their policy)."""
        if rows > self.ids.shape[0]:
            self.ids = grow_rows(self.ids, rows)
            self.live = grow_rows(self.live, rows)

    def assign(self, ids: U64) -> I64:
        """New slots for ``ids``, which must be unique and not yet mapped."""
        ids = np.asarray(ids, dtype=np.uint64)
        k = ids.shape[0]
        reuse = min(k, self._free.shape[0])
        fresh = np.arange(self.high_water, self.high_water + k - reuse, dtype=np.int64)
        slots = np.concatenate((self._free[self._free.shape[0] - reuse :], fresh))
        self._free = self._free[: self._free.shape[0] - reuse]
        self.high_water += k - reuse
        if self.high_water > self.ids.shape[0]:
            self.reserve(max(self.high_water, self.ids.shape[0] * 5 // 4))
        self.index.add(ids, slots)  # unique and not yet mapped, as documented
        self.ids[slots] = ids
        self.live[slots] = True
        return slots

    def release(self, slots: I64) -> None:
        """Free live ``slots`` (unique) and forget their ids."""
        slots = np.asarray(slots, dtype=np.int64)
        self.index.delete(self.ids[slots])
        self.live[slots] = False
        self._free = np.concatenate((self._free, slots))

    def live_slots(self) -> I64:
        """All slots currently in use, ascending."""
        return np.flatnonzero(self.live[: self.high_water])


def grow_rows(arr: npt.NDArray[_A], rows: int) -> npt.NDArray[_A]:
    """A copy of ``arr`` with ``rows`` rows along axis 0; new rows are zero."""
    out = np.zeros((rows, *arr.shape[1:]), dtype=arr.dtype)
    out[: arr.shape[0]] = arr
    return out
