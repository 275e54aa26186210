"""Joiner input records: decoding and validating impressions and clicks, dead letters.

A message that is not a valid ``Impression`` / ``Click`` raises :class:`CodecError`
with a stable reason (``avro_decode`` from the codec, ``invalid_event`` for a record
that parses but cannot be joined); the engines turn it into a ``DeadLetter``
(``schemas/DeadLetter.avsc``) holding the original bytes and their position.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.codec import avro
from pipeline.codec.errors import CodecError
from pipeline.codec.hashing import SEPARATOR
from pipeline.codec.validation import MAX_FUTURE_SKEW_MS, now_ms
from pipeline.ingest.dlq import dead_letter_body
from pipeline.ingest.limits import BROKER_DEFAULT_MAX_MESSAGE_BYTES

__all__ = [
    "INVALID_EVENT",
    "ORPHAN_CLICK",
    "Click",
    "Impression",
    "JoinKey",
    "Origin",
    "dead_letter",
    "decode_click",
    "decode_impression",
    "key_bytes",
]

#: Dead-letter reasons of the joiner (besides the codec's ``avro_decode``).
INVALID_EVENT = "invalid_event"
ORPHAN_CLICK = "orphan_click"

JoinKey = tuple[str, str]  # (request_id, item_id)


def key_bytes(key: JoinKey) -> bytes:
    """Canonical bytes of a join key: UTF-8 request_id, 0x1F, UTF-8 item_id."""
    return key[0].encode("utf-8") + SEPARATOR + key[1].encode("utf-8")


@dataclass(frozen=True)
class Impression:
    """An item shown in a request, with the raw feature values to hash."""

    request_id: str
    user_id: str
    item_id: str
    event_time: int
    features: Mapping[str, str]


@dataclass(frozen=True)
class Click:
    """A click on an item of a request."""

    request_id: str
    user_id: str
    item_id: str
    event_time: int


@dataclass(frozen=True)
class Origin:
    """Where a message came from, with its bytes, so it can be dead-lettered later."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes

    def to_json(self) -> list[Any]:
        """JSON-able form (bytes as base64) for the state checkpoint."""
        key = None if self.key is None else base64.b64encode(self.key).decode()
        return [self.topic, self.partition, self.offset, key, base64.b64encode(self.value).decode()]

    @classmethod
    def from_json(cls, doc: list[Any]) -> Origin:
        """Inverse of :meth:`to_json`."""
        topic, partition, offset, key, value = doc
        raw_key = None if key is None else base64.b64decode(key)
        return cls(topic, partition, offset, raw_key, base64.b64decode(value))


def _check_common(kind: str, rec: Mapping[str, Any]) -> None:
    for name in ("request_id", "user_id", "item_id"):
        if not rec[name]:
            raise CodecError(INVALID_EVENT, f"{kind}: empty {name}")
    if rec["event_time"] < 0:
        raise CodecError(INVALID_EVENT, f"{kind}: negative event_time {rec['event_time']}")
    if rec["event_time"] > now_ms() + MAX_FUTURE_SKEW_MS:
        raise CodecError(
            INVALID_EVENT,
            f"{kind}: event_time {rec['event_time']} is more than "
            f"{MAX_FUTURE_SKEW_MS // 3_600_000} h past now (ms since the Unix epoch expected)",
        )


def decode_impression(data: bytes) -> Impression:
    """An :class:`Impression` from its Avro body; CodecError on any defect."""
    rec = avro.decode("Impression", data)
    _check_common("Impression", rec)
    return Impression(
        rec["request_id"], rec["user_id"], rec["item_id"], rec["event_time"], rec["features"]
    )


def decode_click(data: bytes) -> Click:
    """A :class:`Click` from its Avro body; CodecError on any defect."""
    rec = avro.decode("Click", data)
    _check_common("Click", rec)
    return Click(rec["request_id"], rec["user_id"], rec["item_id"], rec["event_time"])


def dead_letter(
    origin: Origin,
    reason: str,
    error: str,
    failed_at_ms: int,
    max_bytes: int = BROKER_DEFAULT_MAX_MESSAGE_BYTES,
) -> tuple[bytes, bytes | None]:
    """Avro ``DeadLetter`` body for a message that could not be joined, and its key.

    Above ``max_bytes`` only the first bytes of the message are kept
    (:func:`pipeline.ingest.dlq.dead_letter_body`).
    """
    return dead_letter_body(
        origin.value,
        key=origin.key,
        source_topic=origin.topic,
        source_partition=origin.partition,
        source_offset=origin.offset,
        reason=reason,
        error=error,
        failed_at=failed_at_ms,
        max_bytes=max_bytes,
    )
