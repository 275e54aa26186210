"""The bounded, rebalance-aware queue between a dataset's reader thread and the trainer.

The reader :meth:`~BatchQueue.put` s finished chunks (blocking while the queue is full:
back-pressure when reading is faster than training); the trainer :meth:`~BatchQueue.get`
s them as :class:`~pipeline.train.batching.TrainBatch` es. On a partition revocation,
:meth:`~BatchQueue.revoke` takes back, under the queue lock, every row of the revoked
partitions that the trainer has not been given, except the rest of a message whose
first rows it already got: that message is *started* and must be finished, or its
offset could never be committed without training its first rows twice. No Kafka here.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass

from pipeline.errors import PipelineError
from pipeline.train.batching import Batcher, Chunk, Source, TopicPartition, TrainBatch

__all__ = ["BatchQueue", "QueueClosed", "Revoked"]


class QueueClosed(PipelineError):
    """The queue was closed while a put was waiting for room."""


@dataclass(frozen=True)
class Revoked:
    """What a revocation took back and what it left for the trainer to finish."""

    dropped_messages: int
    dropped_rows: int
    unfinished: tuple[Source, ...]


@dataclass
class _Entry:
    chunk: Chunk
    batch: TrainBatch


class BatchQueue:
    """FIFO of at most ``capacity`` batches, with a generation counter and revocation."""

    def __init__(self, capacity: int) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"queue capacity must be an int >= 1, got {capacity!r}")
        self.capacity = capacity
        self._cond = threading.Condition()
        self._entries: deque[_Entry] = deque()
        self._started: set[Source] = set()  # handed out in part, last rows still queued
        self._generation = 0
        self._closed = False
        self._error: BaseException | None = None

    def __len__(self) -> int:
        with self._cond:
            return len(self._entries)

    @property
    def generation(self) -> int:
        """Revocations so far; stamped on every batch when it is queued."""
        with self._cond:
            return self._generation

    def put(self, chunk: Chunk, timeout: float | None = None) -> float:
        """Queue ``chunk`` once there is room; return the seconds spent waiting for it.

        Raises QueueClosed when the queue is closed meanwhile, TimeoutError after
        ``timeout`` seconds without room.
        """
        began = time.perf_counter()
        with self._cond:
            ok = self._cond.wait_for(
                lambda: self._closed or len(self._entries) < self.capacity, timeout
            )
            if self._closed:
                raise QueueClosed("the dataset was closed")
            if not ok:
                raise TimeoutError(f"no room in the batch queue within {timeout:g} s")
            self._append(chunk)
        return time.perf_counter() - began

    def get(self, timeout: float) -> TrainBatch | None:
        """The oldest batch, or None after ``timeout`` seconds without one.

        Raises the reader's failure (see :meth:`fail`) as soon as there is one, before
        any batch still queued.
        """
        with self._cond:
            self._cond.wait_for(
                lambda: self._entries or self._error is not None or self._closed, timeout
            )
            if self._error is not None:
                raise PipelineError(f"the dataset reader failed: {self._error}") from self._error
            if not self._entries:
                return None
            entry = self._entries.popleft()
            for piece in entry.chunk.pieces:
                if piece.last:
                    self._started.discard(piece.source)
                else:
                    self._started.add(piece.source)
            self._cond.notify_all()
            return entry.batch

    def unfinished(
        self, partitions: Collection[TopicPartition] | None = None
    ) -> tuple[Source, ...]:
        """Started messages (of ``partitions``, default all) whose last rows are not out yet."""
        with self._cond:
            return tuple(
                sorted(s for s in self._started if partitions is None or (s[0], s[1]) in partitions)
            )

    def revoke(
        self, partitions: Collection[TopicPartition], batcher: Batcher, *, lost: bool = False
    ) -> Revoked:
        """Take back every row of ``partitions`` not yet handed out, then bump the generation.

        The rest of a started message stays, and if some of it still sits in the
        ``batcher`` the open chunk is queued now (past the capacity: the reader thread
        calls this from the rebalance callback and must not block). With ``lost`` the
        partitions are gone without a chance to commit, so started messages go too.
        """
        wanted = set(partitions)
        with self._cond:
            keep: set[Source] = set() if lost else {s for s in self._started if s[:2] in wanted}
            dropped = batcher.drop(wanted, keep)
            if batcher.holds(wanted):
                for chunk in batcher.flush():
                    self._append(chunk)
            messages = {p.source for p in dropped if p.last}
            rows = sum(p.num_rows for p in dropped)
            survivors: deque[_Entry] = deque()
            for entry in self._entries:
                smaller, gone = entry.chunk.split(wanted, keep)
                if not gone:
                    survivors.append(entry)
                    continue
                messages.update(p.source for p in gone if p.last)
                rows += sum(p.num_rows for p in gone)
                if smaller.pieces:
                    survivors.append(_Entry(smaller, smaller.train_batch(entry.batch.generation)))
            self._entries = survivors
            if lost:
                self._started -= {s for s in self._started if s[:2] in wanted}
            self._generation += 1
            self._cond.notify_all()
            return Revoked(len(messages), rows, tuple(sorted(keep)))

    def fail(self, error: BaseException) -> None:
        """Make every later :meth:`get` raise ``error`` (the reader thread died)."""
        with self._cond:
            self._error = error
            self._cond.notify_all()

    def close(self) -> None:
        """Wake every waiter; puts fail and gets return what is left, then None."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _append(self, chunk: Chunk) -> None:
        self._entries.append(_Entry(chunk, chunk.train_batch(self._generation)))
        self._cond.notify_all()
