"""Rows due at an event time, popped when the watermark passes it.

A :class:`TimerQueue` holds ``(due, row, gen)`` entries in buckets of ``width`` ms of
event time, the bucket ids in a heap. Popping everything due before the watermark
touches only the buckets below it: whole buckets at once, the last one split by a
mask. Entries are never removed early: a row that changed since (a window closed by
a click, a freed and reused row) is recognised by its generation and its current due
time when popped, and skipped by the caller.
"""

from __future__ import annotations

import heapq
import itertools

import numpy as np
import numpy.typing as npt

__all__ = ["TimerQueue"]

I32 = npt.NDArray[np.int32]
I64 = npt.NDArray[np.int64]
U32 = npt.NDArray[np.uint32]

_MERGE = 8  # chunks in a bucket before they are concatenated


class TimerQueue:
    """Due times of rows, popped in bulk once the watermark passes them."""

    def __init__(self, width_ms: int = 1000) -> None:
        self.width = max(1, width_ms)
        self._buckets: dict[int, list[tuple[I64, I32, U32]]] = {}
        self._heap: list[int] = []
        self.size = 0

    def push(self, due: I64, rows: I32, gens: U32) -> None:
        if not len(due):
            return
        bucket = due // self.width
        lo, hi = int(bucket.min()), int(bucket.max())
        if lo == hi:
            self._add(lo, due, rows, gens)
        else:
            order = np.argsort(bucket, kind="stable")
            bucket, due, rows, gens = bucket[order], due[order], rows[order], gens[order]
            cuts = np.flatnonzero(bucket[1:] != bucket[:-1]) + 1
            bounds = [0, *cuts.tolist(), len(due)]
            for a, b in itertools.pairwise(bounds):
                self._add(int(bucket[a]), due[a:b], rows[a:b], gens[a:b])
        self.size += len(due)

    def _add(self, b: int, due: I64, rows: I32, gens: U32) -> None:
        chunks = self._buckets.get(b)
        if chunks is None:
            self._buckets[b] = [(due, rows, gens)]
            heapq.heappush(self._heap, b)
            return
        chunks.append((due, rows, gens))
        if len(chunks) > _MERGE:
            self._buckets[b] = [_concat(chunks)]

    def pop(self, watermark: int) -> tuple[I64, I32, U32]:
        """Every entry with ``due < watermark``, sorted by due time."""
        out: list[tuple[I64, I32, U32]] = []
        while self._heap and self._heap[0] * self.width < watermark:
            b = self._heap[0]
            merged = _concat(self._buckets[b])
            if (b + 1) * self.width <= watermark:  # the whole bucket is due
                heapq.heappop(self._heap)
                del self._buckets[b]
                out.append(merged)
                continue
            now_due = merged[0] < watermark
            out.append((merged[0][now_due], merged[1][now_due], merged[2][now_due]))
            rest = ~now_due
            self._buckets[b] = [(merged[0][rest], merged[1][rest], merged[2][rest])]
            if not rest.any():
                heapq.heappop(self._heap)
                del self._buckets[b]
            break
        if not out:
            return np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.uint32)
        due, rows, gens = _concat(out)
        self.size -= len(due)
        order = np.argsort(due, kind="stable")
        return due[order], rows[order], gens[order]

    def clear(self) -> None:
        self._buckets.clear()
        self._heap.clear()
        self.size = 0


def _concat(chunks: list[tuple[I64, I32, U32]]) -> tuple[I64, I32, U32]:
    if len(chunks) == 1:
        return chunks[0]
    return (
        np.concatenate([c[0] for c in chunks]),
        np.concatenate([c[1] for c in chunks]),
        np.concatenate([c[2] for c in chunks]),
    )
