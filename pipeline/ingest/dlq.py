"""Dead letters: what a consumer could not parse or validate, kept byte for byte.

Every consumer (joiner, trainer, ingestion) routes a bad message here with
:class:`DeadLetterWriter` instead of dropping it or crashing: the original value and
key, where it came from (topic, partition, offset), a stable ``reason`` code
(usually ``CodecError.reason``) and the error text. Flush the writer before
committing the offsets it covers, so a dead letter is never lost (at-least-once).
:func:`read_dead_letters` reads them back; :func:`replay_dead_letters` re-submits the
original bytes once the cause is fixed. See ``docs/ingest-producing.md``.

A message too large to dead-letter whole (above the dead-letter topic's declared
``max.message.bytes``) is kept as its first :data:`PREFIX_BYTES` bytes with its
``original_size``: inspectable, never replayed (a prefix is not the message).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from pipeline import kafka
from pipeline.codec import avro
from pipeline.codec.errors import CodecError
from pipeline.config import KafkaSettings
from pipeline.errors import PipelineError
from pipeline.ingest.delivery import Deliveries, ProducerStats, produce_message
from pipeline.ingest.limits import BROKER_DEFAULT_MAX_MESSAGE_BYTES, FRAMING_BYTES, declared_limit

__all__ = [
    "PREFIX_BYTES",
    "TRUNCATED",
    "UNREADABLE",
    "DeadLetter",
    "DeadLetterWriter",
    "ReplaySummary",
    "dead_letter_body",
    "decode_dead_letter",
    "read_dead_letters",
    "replay_dead_letters",
]

#: Reason given to a message on the dead-letter topic that is not a DeadLetter record.
UNREADABLE = "unreadable_dead_letter"
#: Longest error text kept; the value is never truncated.
MAX_ERROR_CHARS = 16_384
REPLAY_HEADER = "pipeline.replayed_from"
#: Bytes of the value (and key) kept of a message too large to dead-letter whole.
PREFIX_BYTES = 1024
#: Skip reason of a truncated dead letter in :class:`ReplaySummary`.
TRUNCATED = "truncated: only its first bytes were kept"


def dead_letter_body(
    value: bytes,
    *,
    key: bytes | None,
    source_topic: str,
    source_partition: int,
    source_offset: int,
    reason: str,
    error: str,
    failed_at: int,
    max_bytes: int,
) -> tuple[bytes, bytes | None]:
    """The Avro DeadLetter body and the Kafka key to send it with.

    When the whole letter (plus key and framing) would exceed ``max_bytes``, value and
    key are cut to their first :data:`PREFIX_BYTES` bytes and ``original_size`` says
    how large the value was.
    """
    if len(error) > MAX_ERROR_CHARS:
        error = error[:MAX_ERROR_CHARS] + f"... ({len(error)} chars)"
    record = {
        "value": bytes(value),
        "key": None if key is None else bytes(key),
        "source_topic": source_topic,
        "source_partition": int(source_partition),
        "source_offset": int(source_offset),
        "reason": reason,
        "error": error,
        "failed_at": int(failed_at),
        "original_size": None,
    }
    data = avro.encode("DeadLetter", record)
    if len(data) + (len(key) if key else 0) + FRAMING_BYTES <= max_bytes:
        return data, key
    key = None if key is None else bytes(key[:PREFIX_BYTES])
    record |= {"value": bytes(value[:PREFIX_BYTES]), "key": key, "original_size": len(value)}
    return avro.encode("DeadLetter", record), key


def decode_dead_letter(data: bytes) -> dict[str, Any]:
    """A DeadLetter record (also one written before ``original_size`` existed)."""
    try:
        return avro.decode("DeadLetter", data)
    except CodecError as exc:
        try:  # a letter without the trailing field reads as one whose union index is null
            return avro.decode("DeadLetter", data + b"\x00")
        except CodecError:
            raise exc from None


class DeadLetterWriter:
    """Writes DeadLetter records to the dead-letter topic (``samples.dlq`` by default).

    Give it :class:`KafkaSettings` to own a producer (closed with the writer), or an
    existing confluent-kafka ``Producer`` to share one (only flushed). Letters above
    ``max_message_bytes`` (default: the topic's declared limit, else Kafka's 1 MB
    default) are truncated (see :func:`dead_letter_body`).
    """

    def __init__(
        self,
        producer_or_settings: KafkaSettings | Any,
        topic: str = "samples.dlq",
        *,
        max_message_bytes: int | None = None,
        **librdkafka_overrides: Any,
    ) -> None:
        self.topic = topic
        self.max_message_bytes = (
            max_message_bytes or declared_limit(topic) or BROKER_DEFAULT_MAX_MESSAGE_BYTES
        )
        if isinstance(producer_or_settings, KafkaSettings):
            self._producer = kafka.producer(producer_or_settings, **librdkafka_overrides)
        elif librdkafka_overrides:
            raise TypeError("librdkafka overrides apply only when the writer makes its producer")
        else:
            self._producer = producer_or_settings
        self._deliveries = Deliveries()

    def send(
        self,
        value: bytes,
        *,
        source_topic: str,
        source_partition: int,
        source_offset: int,
        reason: str,
        error: str,
        key: bytes | None = None,
    ) -> None:
        """Queue one dead letter (delivery is confirmed by :meth:`flush`)."""
        if not reason:
            raise ValueError("a dead letter needs a reason code")
        data, key = dead_letter_body(
            value,
            key=key,
            source_topic=source_topic,
            source_partition=source_partition,
            source_offset=source_offset,
            reason=reason,
            error=error,
            failed_at=int(time.time() * 1000),
            max_bytes=self.max_message_bytes,
        )
        headers = [("reason", reason.encode("utf-8"))]
        produce_message(
            self._producer, self._deliveries, self.topic, data, key=key, headers=headers
        )

    def send_message(self, msg: Any, reason: str, error: str) -> None:
        """Dead-letter a confluent-kafka ``Message`` as it was read (a None value as b"")."""
        self.send(
            msg.value() or b"",
            source_topic=msg.topic(),
            source_partition=msg.partition(),
            source_offset=msg.offset(),
            reason=reason,
            error=error,
            key=msg.key(),
        )

    def send_error(self, msg: Any, exc: CodecError) -> None:
        """Dead-letter ``msg`` with the reason and message of a CodecError."""
        self.send_message(msg, exc.reason, exc.message)

    @property
    def stats(self) -> ProducerStats:
        """Dead letters queued, delivered and failed."""
        return self._deliveries.snapshot()

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until every dead letter is acknowledged; PipelineError otherwise."""
        left = int(self._producer.flush(timeout))
        stats = self.stats
        if left or stats.failed:
            raise PipelineError(
                f"dead letters to {self.topic}: {left} undelivered after {timeout:g} s, "
                f"{stats.failed} failed (last error: {stats.last_error})"
            )

    def close(self, timeout: float = 30.0) -> None:
        """Flush (the producer, when owned, needs no other cleanup)."""
        self.flush(timeout)

    def __enter__(self) -> DeadLetterWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@dataclass(frozen=True)
class DeadLetter:
    """A dead letter as read back, with where it sits on the dead-letter topic."""

    partition: int
    offset: int
    value: bytes
    key: bytes | None
    source_topic: str
    source_partition: int
    source_offset: int
    reason: str
    error: str
    failed_at: int
    original_size: int | None = None  # set when value holds only the first bytes

    @property
    def size(self) -> int:
        """Bytes of the original value."""
        return len(self.value) if self.original_size is None else self.original_size

    @property
    def truncated(self) -> bool:
        """Whether only a prefix of the value (and key) was kept: it cannot be replayed."""
        return self.original_size is not None

    def to_json(self) -> dict[str, Any]:
        """JSON-friendly dict; value and key as base64."""
        import base64

        doc = {k: getattr(self, k) for k in self.__dataclass_fields__}
        doc["value"] = base64.b64encode(self.value).decode("ascii")
        doc["key"] = None if self.key is None else base64.b64encode(self.key).decode("ascii")
        doc["size"] = self.size
        doc["truncated"] = self.truncated
        return doc


def _parse(msg: Any) -> DeadLetter:
    try:
        rec = decode_dead_letter(msg.value() or b"")
    except CodecError as exc:
        return DeadLetter(
            partition=msg.partition(),
            offset=msg.offset(),
            value=msg.value() or b"",
            key=msg.key(),
            source_topic="",
            source_partition=-1,
            source_offset=-1,
            reason=UNREADABLE,
            error=exc.message,
            failed_at=msg.timestamp()[1],
        )
    return DeadLetter(partition=msg.partition(), offset=msg.offset(), **rec)


def read_dead_letters(
    settings: KafkaSettings,
    topic: str = "samples.dlq",
    *,
    reasons: Collection[str] | None = None,
    limit: int | None = None,
    from_offset: int = 0,
    timeout_s: float = 30.0,
) -> Iterator[DeadLetter]:
    """Dead letters on ``topic`` from ``from_offset`` up to the end as it was when read.

    Reads every partition by assignment (no consumer group, nothing committed) and
    stops at each partition's end; ``reasons`` keeps only those reason codes.
    """
    from confluent_kafka import OFFSET_BEGINNING, KafkaError, TopicPartition

    if from_offset < 0:
        raise ValueError(f"from_offset must be >= 0, got {from_offset}")
    # An explicit offset outside the log is an error, not a silent jump to either end.
    extra = {"enable.partition.eof": True, "log_level": 0, "auto.offset.reset": "error"}
    cons = kafka.consumer(settings, "pipeline-dlq-reader", **extra)
    try:
        meta = cons.list_topics(topic, timeout=10)
        info = meta.topics.get(topic)
        if info is None or info.error is not None:
            why = info.error.str() if info is not None else "missing"
            raise PipelineError(f"cannot read dead letters from {topic}: {why}")
        parts = sorted(info.partitions)
        start = from_offset or OFFSET_BEGINNING
        cons.assign([TopicPartition(topic, p, start) for p in parts])
        open_parts, seen = set(parts), 0
        deadline = time.monotonic() + timeout_s
        while open_parts:
            if time.monotonic() > deadline:
                raise PipelineError(f"reading {topic} did not reach its end in {timeout_s:g} s")
            for msg in cons.consume(num_messages=500, timeout=0.5):
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        open_parts.discard(msg.partition())
                        continue
                    raise PipelineError(f"reading {topic}: {err}")
                letter = _parse(msg)
                if reasons and letter.reason not in reasons:
                    continue
                yield letter
                seen += 1
                if limit is not None and seen >= limit:
                    return
    finally:
        cons.close()


@dataclass
class ReplaySummary:
    """What :func:`replay_dead_letters` re-submitted, per target topic and reason."""

    replayed: Counter[str] = field(default_factory=Counter)
    by_reason: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    failed: int = 0

    @property
    def total(self) -> int:
        return sum(self.replayed.values())


#: Optional repair step: the bytes to re-submit instead of ``letter.value``, None to skip.
FixFn = Callable[[DeadLetter], bytes | None]


def replay_dead_letters(
    settings: KafkaSettings,
    topic: str = "samples.dlq",
    *,
    to: str | None = None,
    reasons: Collection[str] | None = None,
    limit: int | None = None,
    from_offset: int = 0,
    fix: FixFn | None = None,
    timeout_s: float = 30.0,
) -> ReplaySummary:
    """Re-submit dead letters' original bytes (and keys) to their source topic or ``to``.

    Each replayed message carries a ``pipeline.replayed_from`` header naming the
    dead letter. Unreadable entries and those ``fix`` returns None for are skipped;
    truncated ones are refused (counted in ``skipped[TRUNCATED]``, never given to
    ``fix``): only a prefix of their message was kept.
    """
    if to == topic:
        raise PipelineError(f"refusing to replay {topic} into itself")
    summary = ReplaySummary()
    producer = kafka.producer(settings)
    deliveries = Deliveries()
    letters = read_dead_letters(
        settings, topic, reasons=reasons, limit=limit, from_offset=from_offset, timeout_s=timeout_s
    )
    for letter in letters:
        target = to or letter.source_topic
        if letter.reason == UNREADABLE or not target:
            summary.skipped["unreadable"] += 1
            continue
        if letter.truncated:
            summary.skipped[TRUNCATED] += 1
            continue
        if target == topic:
            raise PipelineError(f"dead letter at offset {letter.offset} names {topic} as source")
        value = letter.value if fix is None else fix(letter)
        if value is None:
            summary.skipped["fix returned None"] += 1
            continue
        origin = f"{topic}/{letter.partition}/{letter.offset}".encode()
        produce_message(
            producer, deliveries, target, value, key=letter.key, headers=[(REPLAY_HEADER, origin)]
        )
        summary.replayed[target] += 1
        summary.by_reason[letter.reason] += 1
    left = int(producer.flush(timeout_s))
    summary.failed = deliveries.snapshot().failed + left
    return summary
