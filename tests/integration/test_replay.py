"""``pipeline replay`` on the embedded broker: datasets into a topic, history by time/offset.

Everything is read back with partitions assigned from offset 0 up to the end-of-partition
event (the broker's reported end offsets are not trusted), so counts are exact.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
from click.testing import CliRunner
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from pipeline.cli.replay import replay
from pipeline.codec.samplebatch import (
    SampleBatch,
    concat,
    decode_batch,
    from_sample_records,
    to_sample_records,
)
from pipeline.codec.slots import SlotConfig
from pipeline.config import KafkaSettings
from pipeline.errors import PipelineError
from pipeline.ingest.history import replay_history
from pipeline.ingest.replay import replay_dataset, sort_by_event_time
from pipeline.ingest.timeseek import parse_time
from pipeline.smoke import random_batch

pytestmark = pytest.mark.integration

CONFIG = SlotConfig(("user", "item", "tag"), 2)
BASE = 1_704_067_200_000  # 2024-01-01T00:00Z


class Rec(NamedTuple):
    partition: int
    offset: int
    key: bytes
    value: bytes
    timestamp: int


class Source:
    """A tiny in-memory dataset with chosen event times (the adapter interface)."""

    def __init__(self, name: str, times: Sequence[Sequence[int]], seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.name, self.config = name, CONFIG
        self._batches = [
            dataclasses.replace(
                random_batch(CONFIG, len(t), rng), event_times=np.asarray(t, np.int64)
            )
            for t in times
        ]

    def batches(self, batch_rows: int = 1024, limit: int | None = None) -> Iterator[SampleBatch]:
        yield from self._batches


@pytest.fixture
def settings(kafka_bootstrap: str) -> KafkaSettings:
    return KafkaSettings(bootstrap=kafka_bootstrap, session_timeout_ms=4000)


def new_topic(conf: dict[str, object], name: str, partitions: int) -> str:
    admin = AdminClient(dict(conf))  # kept alive until the futures resolve
    for fut in admin.create_topics([NewTopic(name, partitions, 1)]).values():
        fut.result()
    return name


def read_all(conf: dict[str, object], topic: str, timeout_s: float = 30.0) -> list[Rec]:
    """Every message of ``topic``: each partition from 0 to its end-of-partition event."""
    cons = Consumer({**conf, "group.id": "reader", "enable.partition.eof": True})
    try:
        parts = list(cons.list_topics(topic, timeout=10).topics[topic].partitions)
        cons.assign([TopicPartition(topic, p, 0) for p in parts])
        open_, out = set(parts), []
        deadline = time.monotonic() + timeout_s
        while open_ and time.monotonic() < deadline:
            for m in cons.consume(500, timeout=0.2):
                if m.error() is not None:
                    assert m.error().code() == KafkaError._PARTITION_EOF, m.error()
                    open_.discard(m.partition())
                else:
                    out.append(Rec(m.partition(), m.offset(), m.key(), m.value(), m.timestamp()[1]))
        assert not open_, f"no end of partition {sorted(open_)} of {topic}"
        return out
    finally:
        cons.close()


def by_key_seq(recs: list[Rec]) -> list[Rec]:
    return sorted(recs, key=lambda r: int(r.key.rsplit(b":", 1)[1]))


def data_rows(path: Path, header: bool) -> int:
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return len(lines) - int(header)


# -- files -> Kafka ---------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("rel", "header"), [("criteo/train.tsv", False), ("avazu/train.csv", True)]
)
def test_real_dataset_round_trips_every_row(
    rel: str,
    header: bool,
    shared_data: Path,
    settings: KafkaSettings,
    kafka_conf: dict[str, object],
    project_topics: dict[str, str],
) -> None:
    from pipeline.ingest.adapters import open_dataset

    path = shared_data / rel
    data = open_dataset(path)
    summary = replay_dataset(settings, data, project_topics["samples"], batch_rows=1000)
    expected = list(data.batches(batch_rows=1000))
    got = by_key_seq(read_all(kafka_conf, project_topics["samples"]))
    decoded = [decode_batch(r.value, data.config) for r in got]
    rows = data_rows(path, header)
    assert summary.rows == sum(b.num_rows for b in decoded) == rows
    assert summary.batches == len(got) == len(expected)
    assert not summary.sorted_in_memory  # the samples are in file = time order
    for batch, want in zip(decoded, expected, strict=True):
        assert batch.equals(want)
    assert [r.timestamp for r in got] == [int(b.event_times.max()) for b in expected]
    assert summary.first_event_ms == int(expected[0].event_times[0])
    assert summary.last_event_ms == int(expected[-1].event_times[-1])


def test_unsorted_source_is_sorted_in_memory_with_a_warning(
    settings: KafkaSettings,
    kafka_conf: dict[str, object],
    project_topics: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    rng = np.random.default_rng(3)
    times = [BASE + rng.integers(0, 50, size=n) * 1000 for n in (30, 25, 40)]  # ties too
    src = Source("shuffled", [t.tolist() for t in times])
    with caplog.at_level(logging.WARNING, logger="pipeline.ingest.replay"):
        summary = replay_dataset(settings, src, project_topics["samples"], batch_rows=16)
    assert summary.sorted_in_memory and "not in event-time order" in caplog.text
    got = [
        decode_batch(r.value) for r in by_key_seq(read_all(kafka_conf, project_topics["samples"]))
    ]
    assert [b.num_rows for b in got] == [16] * 5 + [15]
    # reference: a stable row-wise sort, rebuilt from row records
    records = to_sample_records(concat(list(src.batches())))
    reference = from_sample_records(CONFIG, sorted(records, key=lambda r: r["event_time"]))
    assert concat(got).equals(reference)
    assert sort_by_event_time(concat(list(src.batches()))).equals(reference)


def test_unsorted_source_beyond_the_sort_limit_is_refused(
    settings: KafkaSettings, kafka_conf: dict[str, object], project_topics: dict[str, str]
) -> None:
    topic = project_topics["samples"]
    head_unsorted = Source("big", [[BASE + 5, BASE + 1], [BASE + 9], [BASE + 10]])
    with pytest.raises(PipelineError, match="not in event-time order.*in-memory sort limit"):
        replay_dataset(settings, head_unsorted, topic, max_sort_rows=2)
    assert read_all(kafka_conf, topic) == []  # refused before sending anything
    late_regression = Source("late", [[BASE, BASE + 1], [BASE + 2], [BASE + 3, BASE + 1]])
    with pytest.raises(PipelineError, match=r"row 4 \(event time"):
        replay_dataset(settings, late_regression, topic, max_sort_rows=2)
    assert sum(decode_batch(r.value).num_rows for r in read_all(kafka_conf, topic)) == 3


def test_speedup_paces_batches_by_event_time(
    settings: KafkaSettings, project_topics: dict[str, str]
) -> None:
    src = Source("paced", [[BASE + 1000 * i, BASE + 1000 * i] for i in range(4)])
    sent_at: list[float] = []
    summary = replay_dataset(
        settings,
        src,
        project_topics["samples"],
        speedup=4.0,
        on_progress=lambda _rows, _total: sent_at.append(time.perf_counter()),
    )
    gaps = [t - sent_at[0] for t in sent_at]
    for i, gap in enumerate(gaps):  # 1 s of event time per 0.25 s of wall time
        assert 0.25 * i - 0.005 <= gap < 0.25 * i + 0.5
    assert summary.event_span_ms == 3000 and summary.speedup == 4.0
    with pytest.raises(PipelineError, match="speedup"):
        replay_dataset(settings, src, project_topics["samples"], speedup=0)


# -- Kafka history -> target --------------------------------------------------------------


@pytest.fixture
def history(
    settings: KafkaSettings, kafka_conf: dict[str, object], project_topics: dict[str, str]
) -> list[Rec]:
    """60 batches 100 ms apart replayed to the 6-partition samples topic."""
    src = Source("hist", [[BASE + 100 * i + r for r in range(4)] for i in range(60)], seed=1)
    replay_dataset(settings, src, project_topics["samples"])
    recs = read_all(kafka_conf, project_topics["samples"])
    assert len(recs) == 60 and len({r.partition for r in recs}) > 1
    return recs


@pytest.mark.slow
def test_time_range_copy_selects_exactly_the_records_in_range(
    history: list[Rec],
    settings: KafkaSettings,
    kafka_conf: dict[str, object],
    project_topics: dict[str, str],
    unique: str,
) -> None:
    stamps = sorted(r.timestamp for r in history)
    cases = [
        (stamps[10], stamps[20]),  # start on a message (kept), end on one (excluded)
        (stamps[10] + 1, stamps[20] + 1),
        (stamps[0] - 10_000, stamps[0]),  # before everything: nothing
        (stamps[-1] + 1, None),  # after everything: nothing
        (0, None),  # everything
    ]
    for i, (start, end) in enumerate(cases):
        target = new_topic(kafka_conf, f"t{unique}.copy{i}", 6)
        summary = replay_history(
            settings, project_topics["samples"], start=start, end=end, target_topic=target
        )
        want = {
            r.key: r for r in history if start <= r.timestamp and (end is None or r.timestamp < end)
        }
        got = {r.key: r for r in read_all(kafka_conf, target)}
        assert got.keys() == want.keys(), (start, end)
        for key, rec in got.items():
            src = want[key]
            assert (rec.value, rec.timestamp, rec.partition) == (
                src.value,
                src.timestamp,
                src.partition,
            )
        assert summary.messages == len(want) and summary.skipped == 0
        assert summary.bytes == sum(len(r.value) for r in want.values())


def test_out_of_order_timestamps_need_grace(
    settings: KafkaSettings, kafka_conf: dict[str, object], unique: str
) -> None:
    source = new_topic(kafka_conf, f"t{unique}.ooo", 1)
    prod = Producer(dict(kafka_conf))
    for ts in (100, 200, 150, 300, 250, 400):
        prod.produce(source, str(ts).encode(), key=str(ts).encode(), partition=0, timestamp=ts)
    assert prod.flush(10) == 0
    for grace, want, skipped in ((0, {b"200", b"150"}, 0), (100, {b"200", b"150", b"250"}, 1)):
        target = new_topic(kafka_conf, f"t{unique}.ooo{grace}", 1)
        summary = replay_history(
            settings, source, start=150, end=300, grace_ms=grace, target_topic=target
        )
        assert {r.key for r in read_all(kafka_conf, target)} == want
        assert summary.skipped == skipped  # 300 was read (within grace) and left out


def test_offset_range_copy(
    history: list[Rec],
    settings: KafkaSettings,
    kafka_conf: dict[str, object],
    project_topics: dict[str, str],
    unique: str,
) -> None:
    target = new_topic(kafka_conf, f"t{unique}.offsets", 6)
    replay_history(
        settings, project_topics["samples"], start=1, end=3, by="offset", target_topic=target
    )
    want = {(r.partition, r.key) for r in history if 1 <= r.offset < 3}
    assert {(r.partition, r.key) for r in read_all(kafka_conf, target)} == want
    one = new_topic(kafka_conf, f"t{unique}.offsets1", 6)
    busiest = max(range(6), key=lambda p: sum(r.partition == p for r in history))
    summary = replay_history(
        settings,
        project_topics["samples"],
        start={busiest: 2},
        by="offset",
        partitions=[busiest],
        target_topic=one,
    )
    want = {r.key for r in history if r.partition == busiest and r.offset >= 2}
    assert {r.key for r in read_all(kafka_conf, one)} == want
    assert [(r.partition, r.start) for r in summary.ranges] == [(busiest, 2)]


def test_into_group_commits_the_start_offsets(
    history: list[Rec],
    settings: KafkaSettings,
    kafka_conf: dict[str, object],
    project_topics: dict[str, str],
    group_id: str,
) -> None:
    topic = project_topics["samples"]
    start = sorted(r.timestamp for r in history)[30]
    summary = replay_history(settings, topic, start=start, group=group_id)
    expected = {}
    for p in range(6):
        offsets = [r.offset for r in history if r.partition == p and r.timestamp >= start]
        expected[p] = min(offsets, default=sum(r.partition == p for r in history))
    assert {r.partition: r.start for r in summary.ranges} == expected
    cons = Consumer({**kafka_conf, "group.id": group_id})
    try:
        committed = cons.committed([TopicPartition(topic, p) for p in range(6)], timeout=10)
    finally:
        cons.close()
    assert {tp.partition: tp.offset for tp in committed} == expected


def test_history_errors_are_clear(
    settings: KafkaSettings, project_topics: dict[str, str], unique: str
) -> None:
    topic = project_topics["samples"]
    cases: list[tuple[dict[str, Any], str]] = [
        ({"start": 0, "target_topic": "x", "group": "g"}, "exactly one destination"),
        ({"start": 0}, "exactly one destination"),
        ({"start": 0, "end": 5, "group": "g"}, "no meaning for a group"),
        ({"start": 10, "end": 5, "target_topic": "x"}, "before start"),
        ({"start": -1, "by": "offset", "target_topic": "x"}, "must be >= 0"),
        ({"start": 0, "target_topic": topic}, "is the source topic"),
    ]
    for kwargs, message in cases:
        with pytest.raises(PipelineError, match=message):
            replay_history(settings, topic, **kwargs)
    with pytest.raises(PipelineError, match="does not exist"):
        replay_history(settings, f"t{unique}.missing", start=0, target_topic=topic)


def test_parse_time() -> None:
    assert parse_time("2024-01-01T00:00") == BASE
    assert parse_time("2024-01-01T01:00+01:00") == BASE
    assert parse_time("2024-01-01T00:00:00.250Z") == BASE + 250
    assert parse_time(str(BASE)) == BASE
    with pytest.raises(PipelineError, match="not a time"):
        parse_time("yesterday")


# -- CLI ------------------------------------------------------------------------------


def test_cli_replay_dataset_and_errors(
    shared_data: Path,
    kafka_bootstrap: str,
    kafka_conf: dict[str, object],
    project_topics: dict[str, str],
    topic_prefix: str,
) -> None:
    runner = CliRunner()
    common = ["--bootstrap", kafka_bootstrap, "--prefix", topic_prefix]
    criteo = str(shared_data / "criteo" / "train.tsv")
    ok = runner.invoke(
        replay, ["dataset", criteo, "--limit", "500", "--batch-rows", "128", *common]
    )
    assert ok.exit_code == 0, ok.output
    assert "replayed 500 rows" in ok.output and "4 batches" in ok.output
    assert (
        sum(decode_batch(r.value).num_rows for r in read_all(kafka_conf, project_topics["samples"]))
        == 500
    )
    missing = runner.invoke(replay, ["dataset", "/nonexistent/x.tsv", *common])
    assert missing.exit_code == 1 and "error: /nonexistent/x.tsv: no such file" in missing.output
    bad = runner.invoke(replay, ["dataset", criteo, "--format", "parquet", *common])
    assert bad.exit_code == 1 and "unknown dataset format 'parquet'" in bad.output
    no_topic = runner.invoke(replay, ["dataset", criteo, "--topic", "nope", *common])
    assert no_topic.exit_code == 1 and "does not exist" in no_topic.output


def test_cli_replay_topic(
    history: list[Rec],
    kafka_bootstrap: str,
    kafka_conf: dict[str, object],
    project_topics: dict[str, str],
    topic_prefix: str,
    group_id: str,
) -> None:
    runner = CliRunner()
    common = ["--bootstrap", kafka_bootstrap, "--prefix", topic_prefix]
    stamps = sorted(r.timestamp for r in history)
    args = ["topic", "samples", "--from", str(stamps[5]), "--to", str(stamps[15])]
    ok = runner.invoke(replay, [*args, "--to-topic", "samples.dlq", *common])
    assert ok.exit_code == 0, ok.output
    assert "copied 10 messages" in ok.output
    assert len(read_all(kafka_conf, project_topics["samples.dlq"])) == 10
    iso = "2024-01-01T00:00:03Z"  # BASE + 3 s: batch 30 onwards
    grp = runner.invoke(
        replay, ["topic", "samples", "--from", iso, "--into-group", group_id, *common]
    )
    assert grp.exit_code == 0, grp.output
    assert f"group {group_id} now starts" in grp.output
    both = runner.invoke(
        replay,
        [
            "topic",
            "samples",
            "--from",
            "0",
            "--from-offset",
            "0",
            "--to-topic",
            "samples.dlq",
            *common,
        ],
    )
    assert both.exit_code == 2 and "exactly one of --from" in both.output
    bad = runner.invoke(replay, ["topic", "samples", "--from", "soon", "--to-topic", "x", *common])
    assert bad.exit_code == 1 and "not a time" in bad.output
