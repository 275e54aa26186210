"""Where things are in a partition: verified end offsets and timestamp -> offset lookup.

(Plus :func:`parse_time`, which turns the times users type into epoch milliseconds.)

``offset_for_time`` answers like Kafka's ListOffsets-by-timestamp: the earliest offset
whose message timestamp is >= ``ts_ms``, or the end offset when there is none. On real
Kafka it asks the broker (``offsets_for_times``) and then checks the answer against
the messages around it; the embedded broker always answers 0, which fails that check,
so the offset is found by bisecting message timestamps instead (one fetched message
per probe, about log2(N) probes). Bisection assumes timestamps that do not decrease
within the partition, which replay and single-writer producers give.

The ListOffsets *end* offset is not trusted either: the embedded broker
reports one that is too low. A fetch response carries the true high watermark, which
librdkafka caches, so :func:`watermarks` probes at the reported end until a fetch
there finds nothing (see ``docs/replay.md``).
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from pipeline.config import KafkaSettings
from pipeline.errors import PipelineError
from pipeline.kafka import consumer as make_consumer

__all__ = [
    "Probe",
    "TimeseekError",
    "fetch_at",
    "offset_for_time",
    "parse_time",
    "partitions_of",
    "seek_consumer",
    "watermarks",
]

log = logging.getLogger(__name__)

_POLL_S = 0.05
_MAX_END_PROBES = 64
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class TimeseekError(PipelineError):
    """A partition could not be read to locate an offset (broker down, topic missing)."""


@dataclass(frozen=True)
class Probe:
    """One fetched message: its offset and its timestamp in ms (-1 when it has none)."""

    offset: int
    timestamp: int


def parse_time(text: str) -> int:
    """Milliseconds since the epoch from ``1704067200000`` or ISO 8601 (UTC when naive)."""
    value = text.strip()
    if re.fullmatch(r"-?\d+", value):
        return int(value)
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise PipelineError(
            f"{text!r} is not a time: give milliseconds since the epoch or ISO 8601 such as "
            "2024-01-01T00:00 (UTC unless an offset like +02:00 is given)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return (moment - _EPOCH) // timedelta(milliseconds=1)


def seek_consumer(settings: KafkaSettings, **extra: Any) -> Any:
    """A consumer suited to probing: never joins a group, reports end of partition,
    fetches one record batch at a time and does not wait long for data at the end."""
    conf: dict[str, Any] = {
        "enable.partition.eof": True,
        "fetch.wait.max.ms": 1,  # a probe at the end answers at once
        "max.partition.fetch.bytes": 1,  # the broker still returns one whole batch
        "queued.max.messages.kbytes": 1024,
        "auto.offset.reset": "earliest",
        **extra,
    }
    return make_consumer(settings, f"pipeline-timeseek-{uuid.uuid4().hex[:8]}", **conf)


def partitions_of(client: Any, topic: str, timeout_s: float = 10.0) -> list[int]:
    """Partition ids of ``topic`` (a Consumer, Producer or AdminClient asks the cluster).

    Asks for all topics: a metadata request naming a missing topic makes brokers that
    allow auto-creation (the embedded one does) create it instead of saying it is missing.
    """
    try:
        meta = client.list_topics(timeout=timeout_s)
    except Exception as exc:  # KafkaException: broker unreachable
        raise TimeseekError(f"cannot read metadata of topic {topic!r}: {exc}") from None
    info = meta.topics.get(topic)
    if info is None or info.error is not None or not info.partitions:
        why = info.error if info is not None and info.error is not None else "no partitions"
        raise TimeseekError(
            f"topic {topic!r} does not exist ({why}); create it with `pipeline topics apply`"
        )
    return sorted(info.partitions)


def fetch_at(
    consumer: Any, topic: str, partition: int, offset: int, timeout_s: float = 10.0
) -> Probe | None:
    """The first readable message at or after ``offset``; None when there is none.

    Gaps (compaction, transaction markers) are skipped the way a consumer skips them.
    The end is recognised by an end-of-partition event (``enable.partition.eof``), by a
    reset to an earlier offset (offset past the end on real Kafka), or, for consumers
    without EOF events, by the high watermark the fetch at ``offset`` reported.
    """
    from confluent_kafka import KafkaError, TopicPartition

    consumer.assign([TopicPartition(topic, partition, offset)])
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        msg = consumer.poll(_POLL_S)
        if msg is None:
            high = consumer.get_watermark_offsets(TopicPartition(topic, partition), cached=True)[1]
            if 0 <= high <= offset:
                return None
            continue
        if msg.topic() != topic or msg.partition() != partition:
            continue
        err = msg.error()
        if err is not None:
            if err.code() == KafkaError._PARTITION_EOF:
                return None
            if err.code() in (KafkaError._AUTO_OFFSET_RESET, KafkaError.OFFSET_OUT_OF_RANGE):
                return None  # only reachable past the end: offsets below it reset forward
            raise TimeseekError(f"fetching {topic}[{partition}]@{offset}: {err}")
        if msg.offset() < offset:
            return None  # out of range past the end, reset to the earliest offset
        kind, ts = msg.timestamp()
        return Probe(msg.offset(), int(ts) if kind else -1)
    raise TimeseekError(f"no answer fetching {topic}[{partition}]@{offset} within {timeout_s:g} s")


def watermarks(
    consumer: Any, topic: str, partition: int, timeout_s: float = 10.0
) -> tuple[int, int]:
    """``(low, end)``: the first offset kept and one past the last message, verified.

    The reported end is accepted only once a fetch there finds nothing; while one finds
    a message, the end moves to the high watermark that fetch reported (cached by
    librdkafka), or just past the message found.
    """
    from confluent_kafka import TopicPartition

    tp = TopicPartition(topic, partition)
    try:
        low, high = consumer.get_watermark_offsets(tp, timeout=timeout_s)
    except Exception as exc:  # KafkaException
        raise TimeseekError(f"watermarks of {topic}[{partition}]: {exc}") from None
    for _ in range(_MAX_END_PROBES):
        hit = fetch_at(consumer, topic, partition, high, timeout_s)
        if hit is None:
            return low, max(low, high)
        cached = consumer.get_watermark_offsets(tp, cached=True)[1]
        high = max(hit.offset + 1, cached)
    raise TimeseekError(f"the end of {topic}[{partition}] kept moving; is a producer writing?")


def offset_for_time(
    consumer: Any,
    topic: str,
    partition: int,
    ts_ms: int,
    *,
    bounds: tuple[int, int] | None = None,
    timeout_s: float = 10.0,
) -> int:
    """Earliest offset whose timestamp is >= ``ts_ms``, else the end offset.

    ``bounds`` is ``(low, end)`` from :func:`watermarks` when the caller has it. The
    consumer's assignment is replaced while probing (use :func:`seek_consumer`).
    """
    low, end = bounds if bounds is not None else watermarks(consumer, topic, partition, timeout_s)
    if low >= end:
        return end
    answer = _broker_answer(consumer, topic, partition, ts_ms, end, timeout_s)
    if answer is not None and _consistent(
        consumer, topic, partition, ts_ms, answer, (low, end), timeout_s
    ):
        return answer
    log.debug(
        "%s[%d]: answer %s for ts %d not verified; bisecting", topic, partition, answer, ts_ms
    )
    return _bisect(consumer, topic, partition, ts_ms, (low, end), timeout_s)


def _broker_answer(
    consumer: Any, topic: str, partition: int, ts_ms: int, end: int, timeout_s: float
) -> int | None:
    """The broker's ListOffsets-by-time answer (-1 means "after the last": ``end``)."""
    from confluent_kafka import TopicPartition

    try:
        (tp,) = consumer.offsets_for_times([TopicPartition(topic, partition, ts_ms)], timeout_s)
    except Exception as exc:  # KafkaException: unsupported or failed; bisect instead
        log.debug("offsets_for_times(%s[%d]) failed: %s", topic, partition, exc)
        return None
    if tp.error is not None:
        return None
    return end if tp.offset < 0 else int(tp.offset)


def _consistent(
    consumer: Any,
    topic: str,
    partition: int,
    ts_ms: int,
    answer: int,
    bounds: tuple[int, int],
    timeout_s: float,
) -> bool:
    """True when the message at ``answer`` is at or after ``ts_ms`` and the one just
    before it is earlier (Kafka's correct answer always passes)."""
    low, end = bounds
    if not low <= answer <= end:
        return False
    if answer < end:
        hit = fetch_at(consumer, topic, partition, answer, timeout_s)
        if hit is None or hit.offset != answer or hit.timestamp < ts_ms:
            return False
    if answer > low:
        before = fetch_at(consumer, topic, partition, answer - 1, timeout_s)
        if before is not None and before.offset < answer and before.timestamp >= ts_ms:
            return False
    return True


def _bisect(
    consumer: Any,
    topic: str,
    partition: int,
    ts_ms: int,
    bounds: tuple[int, int],
    timeout_s: float,
) -> int:
    """Smallest offset whose first readable message is at/after ``ts_ms`` (or the end).

    Invariant: the answer lies in ``[lo, hi]``; ``hi`` (initially the end) qualifies.
    """
    lo, hi = bounds
    while lo < hi:
        mid = (lo + hi) // 2
        hit = fetch_at(consumer, topic, partition, mid, timeout_s)
        if hit is None or hit.offset >= hi or hit.timestamp >= ts_ms:
            hi = mid
        else:
            lo = hit.offset + 1
    if lo >= bounds[1]:
        return bounds[1]
    hit = fetch_at(consumer, topic, partition, lo, timeout_s)
    return bounds[1] if hit is None else min(hit.offset, bounds[1])
