"""Cutting a stream of SampleBatch messages into training batches of a fixed row count.

Messages come in any size: small ones are concatenated, big ones cut, so every
batch has exactly ``batch_rows`` rows except the partial one :meth:`Batcher.flush`
emits (and, when the trainer's step schedule resizes the batcher, the one open then).
Each batch remembers which message every run of rows came from (a :class:`Piece`),
so a rebalance can take the rows of revoked partitions back out of batches the
trainer has not seen yet, and so the offsets a batch completes are known: a message
completes in the batch that holds its last row. Pure logic, no Kafka.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

from pipeline.codec.samplebatch import SampleBatch
from pipeline.train.assemble import assemble

__all__ = [
    "Batcher",
    "Chunk",
    "Piece",
    "Source",
    "TopicPartition",
    "TrainBatch",
    "next_positions",
]

#: ``(topic, partition, offset)`` of one Kafka message.
Source = tuple[str, int, int]
#: ``(topic, partition)``.
TopicPartition = tuple[str, int]


def next_positions(sources: Iterable[Source]) -> dict[TopicPartition, int]:
    """The offset to commit per partition once ``sources`` are done: max offset + 1."""
    out: dict[TopicPartition, int] = {}
    for topic, partition, offset in sources:
        key = (topic, partition)
        out[key] = max(out.get(key, 0), offset + 1)
    return out


@dataclass(frozen=True)
class TrainBatch:
    """What a trainer gets: rows to train on and the messages they finish.

    ``batch`` is None for a dead-lettered message, which still completes its offset
    (in order with the rest of its partition). ``completes`` lists the messages whose
    last rows are in this batch; once the batch is trained and pushed, committing them
    is safe. ``generation`` counts partition revocations before the rows were read.
    """

    batch: SampleBatch | None
    completes: tuple[Source, ...]
    generation: int

    @property
    def num_rows(self) -> int:
        """Rows to train on (0 for a dead letter)."""
        return 0 if self.batch is None else self.batch.num_rows


@dataclass(frozen=True)
class Piece:
    """Rows ``start:stop`` of one message inside one batch (``message`` None: dead letter)."""

    source: Source
    message: SampleBatch | None
    start: int
    stop: int
    last: bool

    @property
    def partition(self) -> TopicPartition:
        return self.source[0], self.source[1]

    @property
    def num_rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Chunk:
    """The pieces of one training batch, in row order."""

    pieces: tuple[Piece, ...]

    @property
    def num_rows(self) -> int:
        return sum(p.num_rows for p in self.pieces)

    def train_batch(self, generation: int) -> TrainBatch:
        """The concatenated rows and the completed messages (a dead letter stands alone)."""
        parts = [(p.message, p.start, p.stop) for p in self.pieces if p.message is not None]
        completes = tuple(p.source for p in self.pieces if p.last)
        return TrainBatch(assemble(parts) if parts else None, completes, generation)

    def split(
        self, partitions: Collection[TopicPartition], keep: Collection[Source] = ()
    ) -> tuple[Chunk, tuple[Piece, ...]]:
        """``(kept, taken)``: the pieces of ``partitions`` are taken, except ``keep`` messages'."""
        kept: list[Piece] = []
        taken: list[Piece] = []
        for piece in self.pieces:
            gone = piece.partition in partitions and piece.source not in keep
            (taken if gone else kept).append(piece)
        return Chunk(tuple(kept)), tuple(taken)


class Batcher:
    """Cuts and joins messages into :class:`Chunk` s of ``batch_rows`` rows.

    Chunks only reference row ranges of the messages; the rows are copied once, by
    :meth:`Chunk.train_batch` (:func:`~pipeline.train.assemble.assemble`).

    Not thread-safe: one reader thread feeds it. A message is always added whole, so
    the open (partial) chunk only ever holds the *last* piece of each message in it.
    """

    def __init__(self, batch_rows: int) -> None:
        if isinstance(batch_rows, bool) or not isinstance(batch_rows, int) or batch_rows < 1:
            raise ValueError(f"batch_rows must be an int >= 1, got {batch_rows!r}")
        self.batch_rows = batch_rows
        self._open: list[Piece] = []
        self._rows = 0

    @property
    def pending_rows(self) -> int:
        """Rows waiting in the open chunk."""
        return self._rows

    def add(self, source: Source, rows: SampleBatch) -> list[Chunk]:
        """Add one message; return the chunks it filled (possibly none)."""
        n = rows.num_rows
        if n == 0:
            raise ValueError(f"message {source} has no rows; dead-letter it instead")
        full: list[Chunk] = []
        start = 0
        while start < n:
            limit = self.batch_rows  # read once: another thread may resize between pieces
            if self._rows >= limit:
                full.extend(self.flush())
            take = min(limit - self._rows, n - start)
            stop = start + take
            self._open.append(Piece(source, rows, start, stop, last=stop == n))
            self._rows += take
            start = stop
            if self._rows >= limit:
                full.extend(self.flush())
        return full

    def resize(self, batch_rows: int) -> None:
        """Cut the next chunks at ``batch_rows`` rows (the open chunk keeps what it holds).

        Safe to call from another thread than the one adding messages: a chunk may
        then end at either size.
        """
        if isinstance(batch_rows, bool) or not isinstance(batch_rows, int) or batch_rows < 1:
            raise ValueError(f"batch_rows must be an int >= 1, got {batch_rows!r}")
        self.batch_rows = batch_rows

    def add_dead(self, source: Source) -> list[Chunk]:
        """A dead-lettered message: a chunk of its own, after its partition's open rows.

        Only when the open chunk holds rows of the same partition is it flushed first
        (commit order); rows of other partitions keep filling it.
        """
        out = self.flush() if self.holds([(source[0], source[1])]) else []
        out.append(Chunk((Piece(source, None, 0, 0, last=True),)))
        return out

    def flush(self) -> list[Chunk]:
        """The open chunk, however small (nothing when it is empty)."""
        if not self._open:
            return []
        chunk = Chunk(tuple(self._open))
        self._open, self._rows = [], 0
        return [chunk]

    def holds(self, partitions: Iterable[TopicPartition]) -> bool:
        """Whether the open chunk has rows of any of ``partitions``."""
        wanted = set(partitions)
        return any(p.partition in wanted for p in self._open)

    def drop(
        self, partitions: Collection[TopicPartition], keep: Collection[Source] = ()
    ) -> list[Piece]:
        """Remove the open pieces of ``partitions`` (except ``keep`` messages); return them."""
        kept, dropped = Chunk(tuple(self._open)).split(partitions, keep)
        self._open = list(kept.pieces)
        self._rows = kept.num_rows
        return list(dropped)
