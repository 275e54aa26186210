"""Timestamp -> offset lookup on the embedded broker, whose offsets_for_times answers 0.

Messages with known timestamps go to a fresh three-partition topic (one partition with
repeated timestamps, produced in several flushes so the broker's reported end is off,
one empty, one with a single message); every lookup is checked against a brute-force
answer over the produced timestamps.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from pipeline.config import KafkaSettings
from pipeline.ingest.timeseek import (
    TimeseekError,
    fetch_at,
    offset_for_time,
    partitions_of,
    seek_consumer,
    watermarks,
)
from pipeline.kafka import consumer as plain_consumer

pytestmark = pytest.mark.integration

# p0: 120 messages, each timestamp twice (equal timestamps: the earliest must win)
P0 = [10_000 + 50 * (i // 2) for i in range(120)]
P2 = [77_777]
LAYOUT = {0: P0, 1: [], 2: P2}


@pytest.fixture
def ts_topic(kafka_conf: dict[str, object], unique: str) -> str:
    topic = f"t{unique}.timeseek"
    admin = AdminClient(dict(kafka_conf))
    for fut in admin.create_topics([NewTopic(topic, 3, 1)]).values():
        fut.result()
    prod = Producer(dict(kafka_conf))
    for partition, stamps in LAYOUT.items():
        for i, ts in enumerate(stamps):
            prod.produce(topic, b"m%d" % i, partition=partition, timestamp=ts)
            if i % 25 == 24:
                prod.flush(10)  # several record batches
    assert prod.flush(10) == 0
    return topic


@pytest.fixture
def settings(kafka_bootstrap: str) -> KafkaSettings:
    return KafkaSettings(bootstrap=kafka_bootstrap, session_timeout_ms=4000)


@pytest.fixture
def probe(settings: KafkaSettings) -> Iterator[Any]:
    cons = seek_consumer(settings)
    try:
        yield cons
    finally:
        cons.close()


def expected(stamps: list[int], ts: int) -> int:
    return next((i for i, t in enumerate(stamps) if t >= ts), len(stamps))


def lookups(stamps: list[int]) -> list[int]:
    """Before the first, equal to, just before and just after each, after the last."""
    points = {0, -5, 10**13}
    for ts in stamps:
        points.update((ts - 1, ts, ts + 1))
    return sorted(points)


def test_partitions_and_verified_end_offsets(ts_topic: str, probe: Any) -> None:
    assert partitions_of(probe, ts_topic) == [0, 1, 2]
    for partition, stamps in LAYOUT.items():
        assert watermarks(probe, ts_topic, partition) == (0, len(stamps))


@pytest.mark.slow
def test_exact_offsets_for_many_timestamps(ts_topic: str, probe: Any) -> None:
    for partition, stamps in LAYOUT.items():
        bounds = watermarks(probe, ts_topic, partition)
        for ts in lookups(stamps):
            got = offset_for_time(probe, ts_topic, partition, ts, bounds=bounds)
            assert got == expected(stamps, ts), (partition, ts)


def test_lookup_without_given_bounds(ts_topic: str, probe: Any) -> None:
    assert offset_for_time(probe, ts_topic, 0, P0[61]) == 60  # the first of the pair
    assert offset_for_time(probe, ts_topic, 0, P0[-1] + 1) == len(P0)
    assert offset_for_time(probe, ts_topic, 1, 5) == 0  # empty partition
    assert offset_for_time(probe, ts_topic, 2, P2[0]) == 0
    assert offset_for_time(probe, ts_topic, 2, P2[0] + 1) == 1


def test_fetch_at_returns_first_message_or_end(ts_topic: str, probe: Any) -> None:
    hit = fetch_at(probe, ts_topic, 0, 7)
    assert hit is not None and (hit.offset, hit.timestamp) == (7, P0[7])
    assert fetch_at(probe, ts_topic, 0, len(P0)) is None
    assert fetch_at(probe, ts_topic, 1, 0) is None


@pytest.mark.slow  # a plain consumer waits fetch.wait.max.ms (500 ms) per probe
def test_consumer_without_eof_events_still_finds_the_end(
    ts_topic: str, settings: KafkaSettings
) -> None:
    cons = plain_consumer(settings, "timeseek-plain")  # no enable.partition.eof
    try:
        assert watermarks(cons, ts_topic, 0, timeout_s=5) == (0, len(P0))
        assert offset_for_time(cons, ts_topic, 0, P0[33]) == expected(P0, P0[33])
    finally:
        cons.close()


def test_missing_topic_is_a_clear_error(probe: Any, unique: str) -> None:
    with pytest.raises(TimeseekError, match="does not exist"):
        partitions_of(probe, f"t{unique}.nope", timeout_s=5)
