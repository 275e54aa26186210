"""Snapshot retention and the merge of shard offsets into resume positions."""

from __future__ import annotations

import pytest

from pipeline.snapshot.coordinator import resume_offsets
from pipeline.snapshot.layout import retained
from pipeline.snapshot.protocol import PartAck

pytestmark = pytest.mark.unit

DAY = 86_400_000


def test_retained_keeps_newest_n_and_newest_of_each_recent_day() -> None:
    snaps = [
        ("d1-a", 1 * DAY + 10),
        ("d1-b", 1 * DAY + 20),
        ("d2-a", 2 * DAY + 10),
        ("d3-a", 3 * DAY + 10),
        ("d3-b", 3 * DAY + 20),
        ("d3-c", 3 * DAY + 30),
    ]
    assert retained(snaps, keep=2, keep_daily=0) == {"d3-b", "d3-c"}
    assert retained(snaps, keep=2, keep_daily=2) == {"d3-b", "d3-c", "d2-a"}
    assert retained(snaps, keep=1, keep_daily=5) == {"d3-c", "d2-a", "d1-b"}
    assert retained(snaps, keep=10, keep_daily=0) == {s for s, _ in snaps}
    assert retained([], keep=1, keep_daily=1) == set()


def test_retained_rejects_bad_counts() -> None:
    with pytest.raises(ValueError, match="keep must be >= 1"):
        retained([("a", 0)], keep=0, keep_daily=1)
    with pytest.raises(ValueError, match="keep_daily >= 0"):
        retained([("a", 0)], keep=1, keep_daily=-1)


def test_resume_offsets_take_the_lowest_over_shards() -> None:
    acks = [
        PartAck("ok", offsets={"s": {"0": 30, "1": 12}}),
        PartAck("ok", offsets={"s": {"0": 20}, "t": {"3": 7}}),
        PartAck("ok", offsets={}),
    ]
    assert resume_offsets(acks) == [
        {"topic": "s", "partition": 0, "offset": 20},
        {"topic": "s", "partition": 1, "offset": 12},
        {"topic": "t", "partition": 3, "offset": 7},
    ]


def test_part_ack_round_trips_through_json() -> None:
    ack = PartAck("ok", rows=3, stream_id="1-0", meta_sha256="ab", offsets={"s": {"0": 1}})
    assert PartAck.from_json(ack.to_json()) == ack
