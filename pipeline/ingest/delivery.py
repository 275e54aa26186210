"""Delivery bookkeeping shared by every producer: counters, produce with back-off, keys.

``Deliveries`` counts what was handed to librdkafka and what the broker acknowledged or
refused (fed by delivery reports); ``produce_message`` waits for queue room instead of
failing; ``partition_for`` reproduces librdkafka's default keyed partitioner.
"""

from __future__ import annotations

import logging
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Deliveries", "DeliveryHook", "ProducerStats", "partition_for", "produce_message"]

log = logging.getLogger(__name__)

#: Called from librdkafka's delivery report with ``(error or None, message)``.
DeliveryHook = Callable[[Any, Any], None]


@dataclass(frozen=True)
class ProducerStats:
    """What a producer handed to Kafka and what the broker acknowledged or refused.

    ``rows`` counts samples (events for EventProducer: one per message); ``bytes`` are
    message values. Delivered + failed reaches messages once everything is flushed.
    """

    messages: int = 0
    rows: int = 0
    bytes: int = 0
    delivered: int = 0
    delivered_rows: int = 0
    failed: int = 0
    failed_rows: int = 0
    last_error: str | None = None


class Deliveries:
    """Thread-safe counters fed by ``produce`` calls and librdkafka delivery reports."""

    def __init__(self, hook: DeliveryHook | None = None) -> None:
        self._hook = hook
        self._lock = threading.Lock()
        self._counts = {k: 0 for k in ("messages", "rows", "bytes")}
        self._counts |= {k: 0 for k in ("delivered", "delivered_rows", "failed", "failed_rows")}
        self._last_error: str | None = None

    def produced(self, rows: int, nbytes: int) -> None:
        with self._lock:
            self._counts["messages"] += 1
            self._counts["rows"] += rows
            self._counts["bytes"] += nbytes

    def callback(self, rows: int) -> DeliveryHook:
        """The ``on_delivery`` of one message carrying ``rows`` rows."""

        def report(err: Any, msg: Any) -> None:
            with self._lock:
                if err is None:
                    self._counts["delivered"] += 1
                    self._counts["delivered_rows"] += rows
                else:
                    self._counts["failed"] += 1
                    self._counts["failed_rows"] += rows
                    self._last_error = str(err)
            if err is not None:
                log.warning("delivery to %s failed: %s", msg.topic(), err)
            if self._hook is not None:
                self._hook(err, msg)

        return report

    def lost(self, rows: int, error: str) -> None:
        """Rows that failed before reaching librdkafka (counted as one failed message)."""
        with self._lock:
            self._counts["failed"] += 1
            self._counts["failed_rows"] += rows
            self._last_error = error

    def snapshot(self) -> ProducerStats:
        with self._lock:
            return ProducerStats(**self._counts, last_error=self._last_error)


def produce_message(
    producer: Any,
    deliveries: Deliveries,
    topic: str,
    value: bytes,
    *,
    key: bytes | None = None,
    rows: int = 1,
    partition: int | None = None,
    headers: list[tuple[str, bytes]] | None = None,
) -> None:
    """``produce`` one message, waiting for room when librdkafka's queue is full."""
    kwargs: dict[str, Any] = {"key": key, "on_delivery": deliveries.callback(rows)}
    if partition is not None:
        kwargs["partition"] = partition
    if headers:
        kwargs["headers"] = headers
    while True:
        try:
            producer.produce(topic, value, **kwargs)
            break
        except BufferError:  # queue full: serve callbacks until there is room
            producer.poll(0.1)
    deliveries.produced(rows, len(value))
    producer.poll(0)


def partition_for(key: object, partitions: int) -> int:
    """CRC32(key) mod ``partitions``: librdkafka's default partitioner for keyed messages.

    str keys are UTF-8 encoded and ints written in decimal, so ``partition_for("u1", n)``
    is where a confluent-kafka producer would put a message keyed ``b"u1"``.
    """
    if isinstance(key, bytes):
        data = key
    elif isinstance(key, str):
        data = key.encode("utf-8")
    elif isinstance(key, int) and not isinstance(key, bool):
        data = str(key).encode("ascii")
    else:
        raise TypeError(f"a partitioning key must be str, bytes or int, got {type(key).__name__}")
    return zlib.crc32(data) % partitions
