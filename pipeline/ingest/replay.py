"""Replay a dataset file into the samples topic in event-time order, optionally paced.

Each message is one columnar :class:`SampleBatch` whose Kafka timestamp is the largest
event time in it, so history can later be re-read by time (:mod:`.history`). With a
``speedup`` the batches are paced by event time: ``speedup=3600`` plays one hour of
event time per second of wall time (a batch leaves once the scaled clock passes its last
event); without one, as fast as the broker takes them.

Order: rows must go out in event-time order. A dataset of up to ``max_sort_rows`` rows
is read whole first; if it is not sorted it is sorted in memory (stable, so ties keep
file order) with a warning. A longer dataset is streamed and must already be sorted:
the first row that goes back in time stops the replay with an error naming it.

Rows are checked for training (labels 0 or 1, sane event times) before they are
sent, and a batch above the topic's declared ``max.message.bytes`` goes out as
several smaller messages (:mod:`.limits`).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from pipeline.codec.errors import CodecError
from pipeline.codec.samplebatch import SampleBatch, concat
from pipeline.codec.slots import SlotConfig
from pipeline.codec.validation import validate_trainable
from pipeline.config import KafkaSettings
from pipeline.errors import PipelineError
from pipeline.ingest.limits import declared_limit, encode_within
from pipeline.ingest.timeseek import partitions_of
from pipeline.kafka import producer as make_producer

__all__ = [
    "DEFAULT_MAX_SORT_ROWS",
    "DeliveryErrors",
    "ReplaySource",
    "ReplaySummary",
    "produce_waiting",
    "replay_dataset",
    "sort_by_event_time",
    "take_rows",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_SORT_ROWS = 2_000_000
Progress = Callable[[int, int | None], None]


class ReplaySource(Protocol):
    """What replay needs from a dataset (``pipeline.ingest.adapters`` datasets fit)."""

    @property
    def name(self) -> str: ...

    @property
    def config(self) -> SlotConfig: ...

    def batches(self, batch_rows: int = 1024, limit: int | None = None) -> Iterator[SampleBatch]:
        """Batches in file order, with event times."""
        ...


@dataclass(frozen=True)
class ReplaySummary:
    """What a dataset replay sent and how fast."""

    topic: str
    rows: int
    batches: int
    bytes: int
    elapsed_s: float
    first_event_ms: int | None
    last_event_ms: int | None
    sorted_in_memory: bool
    speedup: float | None

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def event_span_ms(self) -> int:
        """Event time covered, last minus first (0 for an empty replay)."""
        if self.first_event_ms is None or self.last_event_ms is None:
            return 0
        return self.last_event_ms - self.first_event_ms


def replay_dataset(
    settings: KafkaSettings,
    dataset: ReplaySource,
    topic: str,
    *,
    speedup: float | None = None,
    batch_rows: int = 1024,
    limit: int | None = None,
    on_progress: Progress | None = None,
    max_sort_rows: int = DEFAULT_MAX_SORT_ROWS,
) -> ReplaySummary:
    """Produce ``dataset`` to ``topic`` as SampleBatch messages in event-time order.

    ``elapsed_s`` in the summary covers everything: reading, sorting, producing, flushing.

    Keys are ``<dataset name>:<index of the batch's first row>`` (replay order), so a
    consumer can put the batches back in order. ``on_progress(rows, total)`` gets the
    total when the whole dataset was read up front, else None.
    """
    if speedup is not None and not speedup > 0:
        raise PipelineError(f"speedup must be > 0, not {speedup}")
    if batch_rows < 1 or (limit is not None and limit < 0):
        raise PipelineError(f"batch_rows must be >= 1 and limit >= 0 ({batch_rows}, {limit})")
    began = time.perf_counter()
    prod = make_producer(settings)
    partitions_of(prod, topic)  # fail before reading the file when the topic is missing
    batches, total, resorted = _ordered(dataset, batch_rows, limit, max_sort_rows)
    max_bytes = declared_limit(topic)
    errors = DeliveryErrors()
    rows = sent = size = 0
    first: int | None = None
    last: int | None = None
    clock = time.perf_counter()  # wall time of the first event, for pacing
    try:
        for batch in batches:
            if first is None:
                first, clock = int(batch.event_times[0]), time.perf_counter()
            last = int(batch.event_times[-1])
            if speedup is not None:
                _wait_until(prod, clock + (last - first) / 1000.0 / speedup)
            try:
                batch.validate()
                validate_trainable(batch)
                first_key = f"{dataset.name}:{rows}".encode()
                parts = list(encode_within(batch, topic, max_bytes, first_key))
            except CodecError as exc:
                raise PipelineError(
                    f"{dataset.name}: the batch of rows {rows}-{rows + batch.num_rows - 1} "
                    f"cannot be sent ({exc}); the {rows} rows before it were sent"
                ) from None
            for part, payload in parts:
                key = f"{dataset.name}:{rows}".encode()
                stamp = int(part.event_times[-1])
                produce_waiting(prod, topic, payload, key=key, timestamp=stamp, on_delivery=errors)
                rows, sent, size = rows + part.num_rows, sent + 1, size + len(payload)
            if errors:
                break
            if on_progress is not None:
                on_progress(rows, total)
    finally:  # what was produced is delivered even when the source fails half-way
        unflushed = prod.flush(60.0)
    if unflushed or errors:
        raise PipelineError(
            f"producing to {topic} failed after {rows} rows: {errors[:3] or 'flush timed out'}"
        )
    return ReplaySummary(
        topic=topic,
        rows=rows,
        batches=sent,
        bytes=size,
        elapsed_s=time.perf_counter() - began,
        first_event_ms=first,
        last_event_ms=last,
        sorted_in_memory=resorted,
        speedup=speedup,
    )


def _wait_until(prod: Any, due: float) -> None:
    """Sleep until ``due`` (perf_counter time), serving delivery reports meanwhile."""
    while (left := due - time.perf_counter()) > 0:
        prod.poll(min(left, 0.1))


class DeliveryErrors(list[str]):
    """A delivery callback that keeps the error of every failed delivery."""

    def __call__(self, err: Any, _msg: Any) -> None:
        if err is not None:
            self.append(str(err))


def produce_waiting(prod: Any, topic: str, value: bytes | None, **kwargs: Any) -> None:
    """``prod.produce(topic, value, **kwargs)``, waiting for local queue space instead of
    failing (or dropping the message) when the queue is full."""
    while True:
        try:
            prod.produce(topic, value, **kwargs)
            break
        except BufferError:
            prod.poll(0.1)
    prod.poll(0)


def _ordered(
    dataset: ReplaySource, batch_rows: int, limit: int | None, max_sort_rows: int
) -> tuple[Iterator[SampleBatch], int | None, bool]:
    """Batches in event-time order, the row total when known, and whether we sorted."""
    source = iter(dataset.batches(batch_rows=batch_rows, limit=limit))
    head: list[SampleBatch] = []
    rows = 0
    for batch in source:
        head.append(batch)
        rows += batch.num_rows
        if rows > max_sort_rows:
            break
    else:  # the whole dataset is in memory
        if _is_sorted(head):
            return iter(head), rows, False
        log.warning(
            "%s is not in event-time order; sorting its %d rows in memory", dataset.name, rows
        )
        return iter(_rebatch(sort_by_event_time(concat(head)), batch_rows)), rows, True
    if not _is_sorted(head):
        raise PipelineError(
            f"{dataset.name} is not in event-time order and has more than {max_sort_rows} rows "
            "(the in-memory sort limit): sort the file by time first or raise max_sort_rows"
        )
    return _checked(dataset.name, itertools.chain(head, source)), None, False


def _is_sorted(batches: Iterable[SampleBatch]) -> bool:
    previous = np.iinfo(np.int64).min
    for batch in batches:
        times = batch.event_times
        if times[0] < previous or np.any(times[1:] < times[:-1]):
            return False
        previous = int(times[-1])
    return True


def _checked(name: str, batches: Iterable[SampleBatch]) -> Iterator[SampleBatch]:
    """Pass batches through, stopping with an error at the first row back in time."""
    previous = np.iinfo(np.int64).min
    row = 0
    for batch in batches:
        times = batch.event_times
        back = np.concatenate([[times[0] < previous], times[1:] < times[:-1]])
        bad = np.flatnonzero(back)
        if bad.size:
            at = row + int(bad[0])
            raise PipelineError(
                f"{name}: row {at} (event time {int(times[bad[0]])}) is earlier than the row "
                f"before it; the {at} rows before it were sent. Sort the file by time first"
            )
        previous = int(times[-1])
        row += batch.num_rows
        yield batch


def _rebatch(batch: SampleBatch, batch_rows: int) -> Iterator[SampleBatch]:
    for start in range(0, batch.num_rows, batch_rows):
        yield batch.slice(start, min(start + batch_rows, batch.num_rows))


def sort_by_event_time(batch: SampleBatch) -> SampleBatch:
    """The rows of ``batch`` in event-time order (stable: ties keep their order)."""
    return take_rows(batch, np.argsort(batch.event_times, kind="stable"))


def take_rows(batch: SampleBatch, order: np.ndarray[Any, np.dtype[Any]]) -> SampleBatch:
    """A new batch of rows ``order`` of ``batch`` (a permutation or any row selection)."""
    order = np.asarray(order, dtype=np.int64)
    n = len(order)
    ids: list[np.ndarray[Any, np.dtype[np.uint64]]] = []
    offsets = np.zeros((len(batch.slots), n + 1), dtype=np.int64)
    base = 0
    for s in range(len(batch.slots)):
        row = batch.offsets[s].astype(np.int64)
        starts, lengths = row[:-1][order], np.diff(row)[order]
        local = np.concatenate([[0], np.cumsum(lengths)])
        gather = np.repeat(starts - local[:-1], lengths) + np.arange(local[-1])
        ids.append(batch.ids[gather])
        offsets[s] = local + base
        base += int(local[-1])
    return SampleBatch(
        labels=batch.labels[order],
        weights=batch.weights[order],
        event_times=batch.event_times[order],
        slots=batch.slots,
        offsets=offsets.astype(np.int32),
        ids=np.concatenate(ids) if ids else np.zeros(0, dtype=np.uint64),
        dense=batch.dense[order],
        fingerprint=batch.fingerprint,
    )
