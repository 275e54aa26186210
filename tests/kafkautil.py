"""Test helpers that read topics directly (no consumer group, so no join delay)."""

from __future__ import annotations

import time
from typing import Any

from confluent_kafka import Consumer, KafkaError, TopicPartition

__all__ = ["drain"]


def drain(bootstrap: str, topic: str, until: int | None = None, timeout: float = 20.0) -> list[Any]:
    """Messages of ``topic`` from the start: up to the end, or until ``until`` arrived.

    The end is detected with partition-EOF events, not the broker's end offset (which
    the embedded broker under-reports).
    """
    cons = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "unused",
            "enable.partition.eof": True,
            "enable.auto.commit": False,
        }
    )
    parts = cons.list_topics(topic, timeout=10).topics[topic].partitions
    cons.assign([TopicPartition(topic, p, 0) for p in parts])
    got: list[Any] = []
    at_end: set[int] = set()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            for msg in cons.consume(100, 0.2):
                if msg.error() is None:
                    got.append(msg)
                    at_end.discard(msg.partition())
                elif msg.error().code() == KafkaError._PARTITION_EOF:
                    at_end.add(msg.partition())
                else:
                    raise AssertionError(msg.error())
            if len(at_end) == len(parts) and (until is None or len(got) >= until):
                break
    finally:
        cons.close()
    return got
