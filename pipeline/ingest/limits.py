"""Message size limits: a topic's declared ``max.message.bytes``, enforced by our producers.

A broker may accept more than a topic declares (the embedded broker does not enforce
it at all), while consumers and the dead-letter topic are sized for the declared
limit; so every producer of the project checks sizes itself, against the limit in
``topics/*.yaml`` (:mod:`pipeline.topics`). A declared topic without the setting gets
Kafka's broker default (1 MB); a topic not declared at all is checked only by
librdkafka's ``message.max.bytes``. Sizes are key + value, uncompressed, plus
:data:`FRAMING_BYTES` for Kafka's record headers: predictable, on the safe side.

Sample batches are split into messages that fit (:func:`encode_within`) rather
than refused; only a single row too large for the topic is refused.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from pathlib import Path

from pipeline.codec.errors import CodecError
from pipeline.codec.samplebatch import SampleBatch, encode_batch

__all__ = [
    "BROKER_DEFAULT_MAX_MESSAGE_BYTES",
    "FRAMING_BYTES",
    "check_size",
    "declared_limit",
    "encode_within",
]

log = logging.getLogger(__name__)

#: Kafka's broker ``message.max.bytes`` default: the limit of a topic that sets none.
BROKER_DEFAULT_MAX_MESSAGE_BYTES = 1_048_588
#: Room kept for Kafka's batch and record headers (and message headers we add).
FRAMING_BYTES = 512


def declared_limit(topic: str, directory: Path | None = None) -> int | None:
    """``max.message.bytes`` declared for ``topic`` (a physical name: any prefix + name).

    The longest declared name that ends ``topic`` wins (``t1.samples.dlq`` is
    ``samples.dlq``, not ``samples``). None when no declaration matches or the
    declarations cannot be read.
    """
    limits = _declared(str(directory) if directory is not None else None)
    for name, limit in limits:
        if topic.endswith(name):
            return limit
    return None


@functools.lru_cache(maxsize=8)
def _declared(directory: str | None) -> tuple[tuple[str, int], ...]:
    """(name, limit) of every declared topic, longest names first."""
    from pipeline.topics import TopicsError, load_topic_specs

    try:
        specs = load_topic_specs(Path(directory) if directory else None)
    except TopicsError as exc:
        log.warning("topic declarations unreadable, message sizes unchecked: %s", exc)
        return ()
    out = []
    for spec in specs:
        raw = spec.configs.get("max.message.bytes")
        out.append((spec.name, int(raw) if raw else BROKER_DEFAULT_MAX_MESSAGE_BYTES))
    return tuple(sorted(out, key=lambda item: -len(item[0])))


def check_size(topic: str, value: bytes, key: bytes | None, limit: int | None) -> None:
    """CodecError ``too_large`` naming topic, size and limit when the message does not fit."""
    if limit is None:
        return
    size = len(value) + (len(key) if key else 0)
    if size + FRAMING_BYTES > limit:
        raise CodecError(
            "too_large",
            f"a message of {size:,} bytes (+{FRAMING_BYTES} framing) is above "
            f"{topic}'s max.message.bytes of {limit:,}",
        )


def encode_within(
    batch: SampleBatch, topic: str, limit: int | None, key: bytes | None = None
) -> Iterator[tuple[SampleBatch, bytes]]:
    """``batch`` encoded as one message, or split into consecutive halves until each fits.

    Rows stay in order. CodecError ``too_large`` when a single row does not fit; the
    parts before it have been yielded by then.
    """
    value = encode_batch(batch, validate=False)
    if limit is None or len(value) + (len(key) if key else 0) + FRAMING_BYTES <= limit:
        yield batch, value
        return
    if batch.num_rows == 1:
        check_size(topic, value, key, limit)  # raises: one row cannot be split further
    half = batch.num_rows // 2
    yield from encode_within(batch.slice(0, half), topic, limit, key)
    yield from encode_within(batch.slice(half, batch.num_rows), topic, limit, key)
