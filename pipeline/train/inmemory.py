"""InMemoryDataset: a bounded window of the ``samples`` topic held in memory.

For offline passes (several epochs over a replay window, evaluation, warm start):
every partition is read by assignment (no consumer group, nothing committed) from a
start to an end offset, found from offsets or from message timestamps with
:func:`pipeline.ingest.history.plan_ranges` (which bisects timestamps on brokers
whose ``offsets_for_times`` is unusable and verifies the end offset the embedded
broker under-reports). Rows are kept in (partition, offset, row) order, so a seeded
permutation of them is the same on every trainer: that is what makes
:meth:`InMemoryDataset.shard` a global shuffle with disjoint, complete shards.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.codec.errors import CodecError
from pipeline.codec.samplebatch import SampleBatch, concat
from pipeline.codec.slots import SlotConfig
from pipeline.config import KafkaSettings
from pipeline.errors import PipelineError
from pipeline.ingest.dlq import DeadLetterWriter
from pipeline.ingest.history import PartitionRange, plan_ranges
from pipeline.ingest.replay import take_rows
from pipeline.kafka import consumer as make_consumer
from pipeline.train.batching import TrainBatch
from pipeline.train.decoding import decode_for_training

__all__ = ["InMemoryDataset", "LoadStats"]

log = logging.getLogger(__name__)


@dataclass
class LoadStats:
    """What :meth:`InMemoryDataset.load` read."""

    messages: int = 0  # decoded and kept
    rows: int = 0
    bytes: int = 0  # message values read
    skipped: int = 0  # inside the offset span but with a timestamp outside the time bounds
    dead_letters: Counter[str] = field(default_factory=Counter)
    elapsed_s: float = 0.0


class InMemoryDataset:
    """Rows of a topic window, in (partition, offset, row) order, as one SampleBatch."""

    def __init__(
        self,
        rows: SampleBatch | None,
        expected: SlotConfig,
        *,
        ranges: Sequence[PartitionRange] = (),
        stats: LoadStats | None = None,
    ) -> None:
        if rows is not None and rows.fingerprint != expected.fingerprint:
            raise ValueError("rows do not have the expected slot layout")
        self.rows = rows
        self.expected = expected
        self.ranges = tuple(ranges)
        self.stats = stats or LoadStats()

    @classmethod
    def load(
        cls,
        kafka: KafkaSettings,
        topic: str,
        expected: SlotConfig,
        *,
        start: Mapping[int, int] | None = None,
        end: Mapping[int, int] | None = None,
        start_time_ms: int | None = None,
        end_time_ms: int | None = None,
        dlq: DeadLetterWriter | None = None,
        timeout_s: float = 30.0,
    ) -> InMemoryDataset:
        """Read ``[start, end)`` of every partition (or of those ``start`` names).

        Bounds are per-partition offsets (a partition missing from ``end`` is read to
        its end) or message timestamps in ms, half-open ``start_time_ms <= timestamp <
        end_time_ms`` (replayed batches are stamped with their last event time), not
        both. Without an end, each partition is read to its end as of the call. Bad
        messages go to ``dlq`` (or are skipped with a warning) and are counted.
        """
        by_time = start_time_ms is not None or end_time_ms is not None
        if by_time and (start is not None or end is not None):
            raise PipelineError("give offset bounds or time bounds, not both")
        began = time.perf_counter()
        if by_time:
            ranges = plan_ranges(
                kafka,
                topic,
                start=start_time_ms or 0,
                end=end_time_ms,
                by="time",
                timeout_s=timeout_s,
            )
        else:
            ranges = plan_ranges(
                kafka,
                topic,
                start=dict(start) if start is not None else 0,
                end=dict(end) if end is not None else None,
                by="offset",
                timeout_s=timeout_s,
            )
        stats = LoadStats()
        window = (start_time_ms or 0, end_time_ms) if by_time else None
        parts = _read(kafka, topic, ranges, expected, window, dlq, stats, timeout_s)
        if dlq is not None:
            dlq.flush()
        stats.elapsed_s = time.perf_counter() - began
        return cls(concat(parts) if parts else None, expected, ranges=ranges, stats=stats)

    @property
    def num_rows(self) -> int:
        return 0 if self.rows is None else self.rows.num_rows

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays held."""
        b = self.rows
        if b is None:
            return 0
        arrays = (b.labels, b.weights, b.event_times, b.offsets, b.ids, b.dense)
        return sum(int(a.nbytes) for a in arrays)

    def shard(self, rank: int, world: int, seed: int) -> InMemoryDataset:
        """Trainer ``rank``'s share of a global shuffle: ``perm[rank::world]``.

        ``perm`` is a permutation of all rows seeded by ``seed``, the same on every
        trainer that loaded the same window, so the ``world`` shards are disjoint and
        together hold every row once.
        """
        if not (isinstance(world, int) and world >= 1 and isinstance(rank, int)):
            raise ValueError(f"world must be an int >= 1 and rank an int, got {rank!r}/{world!r}")
        if not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, {world}), got {rank}")
        mine = np.random.default_rng(seed).permutation(self.num_rows)[rank::world]
        rows = take_rows(self.rows, mine) if self.rows is not None and len(mine) else None
        return InMemoryDataset(rows, self.expected, ranges=self.ranges, stats=self.stats)

    def batches(
        self, batch_rows: int, epochs: int = 1, shuffle_seed: int | None = None
    ) -> Iterator[TrainBatch]:
        """``epochs`` passes in batches of ``batch_rows`` (the last of a pass may be short).

        Without a seed the rows keep their order; with one, each epoch has its own
        permutation drawn from ``(shuffle_seed, epoch)``. Batches complete no offsets.
        """
        if isinstance(batch_rows, bool) or not isinstance(batch_rows, int) or batch_rows < 1:
            raise ValueError(f"batch_rows must be an int >= 1, got {batch_rows!r}")
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
            raise ValueError(f"epochs must be an int >= 0, got {epochs!r}")
        rows = self.rows
        if rows is None:
            return
        n = rows.num_rows
        for epoch in range(epochs):
            order = None
            if shuffle_seed is not None:
                order = np.random.default_rng([shuffle_seed, epoch]).permutation(n)
            for lo in range(0, n, batch_rows):
                hi = min(lo + batch_rows, n)
                part = rows.slice(lo, hi) if order is None else take_rows(rows, order[lo:hi])
                yield TrainBatch(part, (), 0)


def _read(
    kafka: KafkaSettings,
    topic: str,
    ranges: Sequence[PartitionRange],
    expected: SlotConfig,
    window: tuple[int, int | None] | None,
    dlq: DeadLetterWriter | None,
    stats: LoadStats,
    timeout_s: float,
) -> list[SampleBatch]:
    """Decoded messages of every range, in (partition, offset) order."""
    from confluent_kafka import KafkaError
    from confluent_kafka import TopicPartition as KafkaTP

    pending = {r.partition: r for r in ranges if r.size}
    got: dict[int, list[SampleBatch]] = {p: [] for p in pending}
    if not pending:
        return []
    cons = make_consumer(
        kafka, f"pipeline-inmemory-{uuid.uuid4().hex[:8]}", **{"enable.partition.eof": True}
    )
    try:
        cons.assign([KafkaTP(topic, p, r.start) for p, r in pending.items()])
        idle_since = time.monotonic()
        while pending:
            msgs = cons.consume(num_messages=500, timeout=0.2)
            if msgs:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > timeout_s:
                where = ", ".join(f"[{p}]@{r.start}..{r.stop}" for p, r in pending.items())
                raise PipelineError(f"no data from {topic} {where} within {timeout_s:g} s")
            for msg in msgs:
                p = msg.partition()
                r = pending.get(p)
                if r is None:
                    continue  # fetched before the partition was paused
                err = msg.error()
                if err is not None and err.code() != KafkaError._PARTITION_EOF:
                    raise PipelineError(f"reading {topic}[{p}]: {err}")
                if err is None and msg.offset() < r.stop:
                    batch = _accept(msg, expected, window, dlq, stats)
                    if batch is not None:
                        got[p].append(batch)
                if err is not None or msg.offset() + 1 >= r.stop:
                    del pending[p]
                    cons.pause([KafkaTP(topic, p)])
    finally:
        cons.close()
    return [b for p in sorted(got) for b in got[p]]


def _accept(
    msg: Any,
    expected: SlotConfig,
    window: tuple[int, int | None] | None,
    dlq: DeadLetterWriter | None,
    stats: LoadStats,
) -> SampleBatch | None:
    """The message's rows, or None when it is outside the time window or bad."""
    value = msg.value() or b""
    stats.bytes += len(value)
    if window is not None:
        stamp = msg.timestamp()[1] if msg.timestamp()[0] else -1
        lo, hi = window
        if stamp < lo or (hi is not None and stamp >= hi):
            stats.skipped += 1
            return None
    try:
        batch = decode_for_training(value, expected)
    except CodecError as exc:
        stats.dead_letters[exc.reason] += 1
        if dlq is None:
            log.warning("skipping %s[%d]@%d: %s", msg.topic(), msg.partition(), msg.offset(), exc)
        else:
            dlq.send_error(msg, exc)
        return None
    stats.messages += 1
    stats.rows += batch.num_rows
    return batch
