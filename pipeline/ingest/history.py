"""Re-read a topic's history between two timestamps or two offsets, partition by partition.

Two destinations (see ``docs/replay.md``):

* **copy** to a target topic (a backfill of ``samples``, a scratch topic for an
  experiment): keys, values, headers and timestamps are preserved, and each message
  keeps its partition number (modulo the target's partition count), so per-partition
  order, and with it event-time order, carries over;
* **a consumer group** (trainers): the start offsets are committed for the group, so
  its consumers begin there and continue into live data.

Time bounds select exactly the messages with ``start <= timestamp < end``: each
partition is read from the first offset at/after ``start`` up to the first offset
at/after ``end + grace_ms`` (both from :mod:`pipeline.ingest.timeseek`) and filtered by
timestamp. Messages inside that span whose timestamp is outside the bounds (out-of-order
writes) are counted as ``skipped`` in the summary, never silently lost.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pipeline.config import KafkaSettings
from pipeline.errors import PipelineError
from pipeline.ingest.replay import DeliveryErrors, produce_waiting
from pipeline.ingest.timeseek import offset_for_time, partitions_of, seek_consumer, watermarks
from pipeline.kafka import admin as make_admin
from pipeline.kafka import consumer as make_consumer
from pipeline.kafka import producer as make_producer

__all__ = [
    "Bound",
    "By",
    "HistorySummary",
    "PartitionRange",
    "plan_ranges",
    "replay_history",
]

log = logging.getLogger(__name__)

By = Literal["time", "offset"]
Bound = int | Mapping[int, int]
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class PartitionRange:
    """Offsets ``[start, stop)`` of one partition to re-read."""

    partition: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        """Offsets in the range (messages, unless the log has gaps)."""
        return max(0, self.stop - self.start)


@dataclass(frozen=True)
class HistorySummary:
    """What a history replay selected and moved."""

    source_topic: str
    destination: str  # "topic <name>" or "group <name>"
    by: By
    start: int
    end: int | None
    ranges: tuple[PartitionRange, ...]
    messages: int  # copied to the target (0 in group mode)
    bytes: int
    skipped: int  # read inside the offset span but outside the time bounds
    elapsed_s: float

    @property
    def messages_per_s(self) -> float:
        return self.messages / self.elapsed_s if self.elapsed_s > 0 else 0.0


def plan_ranges(
    settings: KafkaSettings,
    topic: str,
    *,
    start: Bound,
    end: Bound | None = None,
    by: By = "time",
    grace_ms: int = 0,
    partitions: Sequence[int] | None = None,
    timeout_s: float = 10.0,
) -> list[PartitionRange]:
    """Per-partition offset ranges for the bounds (``end=None``: up to the current end).

    Offset bounds may be one number for every partition or a ``{partition: offset}``
    map (which also selects the partitions); they are clamped to what the partition holds.
    """
    _time_bounds(start, end, by, grace_ms)
    if partitions is None and isinstance(start, Mapping):
        partitions = sorted(start)
    probe = seek_consumer(settings)
    try:
        existing = partitions_of(probe, topic, timeout_s)
        chosen = list(existing if partitions is None else partitions)
        unknown = sorted(set(chosen) - set(existing))
        if unknown:
            raise PipelineError(f"topic {topic!r} has partitions {existing}, not {unknown}")
        ranges = []
        for p in sorted(chosen):
            low, last = watermarks(probe, topic, p, timeout_s)
            if by == "offset":
                first = min(max(_bound(start, p, 0), low), last)
                stop = last if end is None else min(max(_bound(end, p, last), first), last)
            else:
                assert isinstance(start, int)
                first = offset_for_time(probe, topic, p, start, bounds=(low, last))
                stop = last
                if end is not None:
                    assert isinstance(end, int)
                    stop = offset_for_time(probe, topic, p, end + grace_ms, bounds=(low, last))
            ranges.append(PartitionRange(p, first, max(first, stop)))
        return ranges
    finally:
        probe.close()


def replay_history(
    settings: KafkaSettings,
    source_topic: str,
    *,
    start: Bound,
    end: Bound | None = None,
    by: By = "time",
    target_topic: str | None = None,
    group: str | None = None,
    grace_ms: int = 0,
    partitions: Sequence[int] | None = None,
    on_progress: Progress | None = None,
    timeout_s: float = 30.0,
) -> HistorySummary:
    """Copy ``source_topic`` between the bounds to ``target_topic``, or point ``group``
    at the start bound. Exactly one destination; a group takes no end bound."""
    if (target_topic is None) == (group is None):
        raise PipelineError("give exactly one destination: a target topic or a consumer group")
    if target_topic == source_topic:
        raise PipelineError(f"target topic {target_topic!r} is the source topic")
    if group is not None and end is not None:
        raise PipelineError(
            "an end bound has no meaning for a group: its consumers continue from the start "
            "offsets into live data"
        )
    began = time.perf_counter()
    time_bounds = _time_bounds(start, end, by, grace_ms)
    ranges = plan_ranges(
        settings,
        source_topic,
        start=start,
        end=end,
        by=by,
        grace_ms=grace_ms,
        partitions=partitions,
        timeout_s=timeout_s,
    )
    if group is not None:
        _commit_group(settings, source_topic, group, ranges, timeout_s)
        moved, size, skipped = 0, 0, 0
        destination = f"group {group}"
    else:
        assert target_topic is not None
        moved, size, skipped = _copy(
            settings, source_topic, target_topic, ranges, time_bounds, on_progress, timeout_s
        )
        destination = f"topic {target_topic}"
    return HistorySummary(
        source_topic=source_topic,
        destination=destination,
        by=by,
        start=start if isinstance(start, int) else min(start.values(), default=0),
        end=end if end is None or isinstance(end, int) else max(end.values(), default=0),
        ranges=tuple(ranges),
        messages=moved,
        bytes=size,
        skipped=skipped,
        elapsed_s=time.perf_counter() - began,
    )


def _time_bounds(
    start: Bound, end: Bound | None, by: By, grace_ms: int
) -> tuple[int, int | None] | None:
    """Check the bounds; ``(start, end)`` in time mode, None in offset mode."""
    if by not in ("time", "offset"):
        raise PipelineError(f"by must be 'time' or 'offset', not {by!r}")
    if grace_ms < 0:
        raise PipelineError(f"grace_ms must be >= 0, not {grace_ms}")
    if by == "offset":
        for name, bound in (("start", start), ("end", end)):
            values = bound.values() if isinstance(bound, Mapping) else [bound]
            if any(v is not None and v < 0 for v in values):
                raise PipelineError(f"{name} offsets must be >= 0")
        return None
    if not isinstance(start, int) or not (end is None or isinstance(end, int)):
        raise PipelineError("time bounds are one timestamp for all partitions")
    if end is not None and end < start:
        raise PipelineError(f"end {end} is before start {start}")
    return start, end


def _bound(value: Bound, partition: int, default: int) -> int:
    """One partition's offset bound; partitions missing from a map get ``default``."""
    return value.get(partition, default) if isinstance(value, Mapping) else value


def _copy(
    settings: KafkaSettings,
    source: str,
    target: str,
    ranges: Sequence[PartitionRange],
    time_bounds: tuple[int, int | None] | None,
    on_progress: Progress | None,
    timeout_s: float,
) -> tuple[int, int, int]:
    """Read each range once, write the selected messages; (messages, bytes, skipped)."""
    from confluent_kafka import KafkaError, TopicPartition

    pending = {r.partition: r for r in ranges if r.size}
    total = sum(r.size for r in pending.values())
    done = {p: 0 for p in pending}
    prod = make_producer(settings)
    targets = partitions_of(prod, target, timeout_s)  # before reading: the target must exist
    errors = DeliveryErrors()
    moved = size = skipped = 0
    cons = make_consumer(
        settings, f"pipeline-history-{uuid.uuid4().hex[:8]}", **{"enable.partition.eof": True}
    )
    try:
        cons.assign([TopicPartition(source, p, r.start) for p, r in pending.items()])
        idle_since = time.monotonic()
        while pending:
            msgs = cons.consume(num_messages=1000, timeout=0.2)
            if not msgs and time.monotonic() - idle_since > timeout_s:
                where = ", ".join(f"[{p}]@{r.start + done[p]}" for p, r in pending.items())
                raise PipelineError(f"no data from {source} {where} within {timeout_s:g} s")
            for msg in msgs:
                p = msg.partition()
                r = pending.get(p)
                if r is None:
                    continue  # a partition already finished; fetched before it was paused
                err = msg.error()
                if err is not None and err.code() != KafkaError._PARTITION_EOF:
                    raise PipelineError(f"reading {source}[{p}]: {err}")
                offset = msg.offset()
                if err is None and offset < r.stop:
                    stamp = msg.timestamp()[1] if msg.timestamp()[0] else -1
                    if time_bounds is not None and not _within(stamp, time_bounds):
                        skipped += 1
                    else:
                        _copy_message(prod, target, targets[p % len(targets)], msg, stamp, errors)
                        moved += 1
                        size += len(msg.value() or b"")
                done[p] = max(done[p], min(offset + 1, r.stop) - r.start)
                if err is not None or offset + 1 >= r.stop:
                    del pending[p]  # the end bound (or, after deletions, the log end)
                    cons.pause([TopicPartition(source, p)])
            if msgs:
                idle_since = time.monotonic()
                if on_progress is not None:
                    on_progress(sum(done.values()), total)
        if prod.flush(timeout_s) or errors:
            raise PipelineError(f"writing to {target} failed: {errors[:3] or 'flush timed out'}")
    finally:
        cons.close()
    if skipped:
        log.warning("%s: %d messages in the span had timestamps out of bounds", source, skipped)
    return moved, size, skipped


def _within(stamp: int, bounds: tuple[int, int | None]) -> bool:
    lo, hi = bounds
    return lo <= stamp and (hi is None or stamp < hi)


def _copy_message(prod: Any, topic: str, partition: int, msg: Any, stamp: int, cb: Any) -> None:
    """Produce a copy of ``msg``: same key, value, headers and (when it has one) timestamp."""
    extra: dict[str, Any] = {"timestamp": stamp} if stamp >= 0 else {}
    if msg.headers():
        extra["headers"] = msg.headers()
    produce_waiting(
        prod, topic, msg.value(), key=msg.key(), partition=partition, on_delivery=cb, **extra
    )


def _commit_group(
    settings: KafkaSettings,
    topic: str,
    group: str,
    ranges: Sequence[PartitionRange],
    timeout_s: float,
) -> None:
    """Set ``group``'s committed offsets to the range starts and read them back."""
    from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition

    admin = make_admin(settings)
    wanted = {r.partition: r.start for r in ranges}
    request = ConsumerGroupTopicPartitions(
        group, [TopicPartition(topic, p, off) for p, off in wanted.items()]
    )
    try:
        result = admin.alter_consumer_group_offsets([request])[group].result(timeout=timeout_s)
        failed = [tp for tp in result.topic_partitions if tp.error is not None]
        if failed:
            raise PipelineError(f"partition {failed[0].partition}: {failed[0].error}")
        check = ConsumerGroupTopicPartitions(group, [TopicPartition(topic, p) for p in wanted])
        listed = admin.list_consumer_group_offsets([check])[group].result(timeout=timeout_s)
    except PipelineError as exc:
        raise PipelineError(f"cannot move group {group!r}: {exc}") from None
    except Exception as exc:  # KafkaException, TimeoutError
        raise PipelineError(
            f"cannot move group {group!r}: {exc} (Kafka refuses while the group has active "
            "members: stop its consumers first)"
        ) from None
    got = {tp.partition: tp.offset for tp in listed.topic_partitions}
    if got != wanted:
        raise PipelineError(f"group {group!r} offsets read back as {got}, expected {wanted}")
