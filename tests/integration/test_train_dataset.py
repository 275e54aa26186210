"""QueueDataset and InMemoryDataset against the real (embedded) broker.

Rows carry unique tags in ``event_times`` (see ``tests/unit/test_train_batching.py``),
so every check is exact: which rows arrived, in which order, how often.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from confluent_kafka import Producer

from pipeline.codec.samplebatch import SampleBatch, concat, encode_batch
from pipeline.codec.slots import SlotConfig
from pipeline.config import KafkaSettings
from pipeline.ingest.dlq import DeadLetterWriter, read_dead_letters
from pipeline.train.batching import TrainBatch, next_positions
from pipeline.train.dataset import QueueDataset
from pipeline.train.inmemory import InMemoryDataset
from tests.unit.test_train_batching import CONFIG, tagged

pytestmark = pytest.mark.integration

Message = tuple[int, bytes, int | None]  # partition, value, timestamp


@pytest.fixture
def settings(kafka_bootstrap: str) -> KafkaSettings:
    # short sessions: the embedded broker's group join takes about half of it
    return KafkaSettings(bootstrap=kafka_bootstrap, session_timeout_ms=2000)


def produce(settings: KafkaSettings, topic: str, messages: list[Message]) -> None:
    prod = Producer({"bootstrap.servers": settings.bootstrap, "linger.ms": 5})
    for partition, value, ts in messages:
        extra: dict[str, Any] = {} if ts is None else {"timestamp": ts}
        prod.produce(topic, value, partition=partition, **extra)
    assert prod.flush(30) == 0


def tagged_stream(
    sizes: list[int], partitions: list[int], start: int = 0
) -> list[tuple[int, SampleBatch]]:
    out, tag = [], start
    for size, p in zip(sizes, partitions, strict=True):
        out.append((p, tagged(np.arange(tag, tag + size))))
        tag += size
    return out


def collect(
    ds: QueueDataset, done: Callable[[list[TrainBatch]], bool], timeout: float = 30.0
) -> list[TrainBatch]:
    got: list[TrainBatch] = []
    deadline = time.monotonic() + timeout
    while not done(got):
        assert time.monotonic() < deadline, f"timed out with {len(got)} batches, {ds.stats}"
        b = ds.get(0.2)
        if b is not None:
            got.append(b)
    return got


def completed(n: int) -> Callable[[list[TrainBatch]], bool]:
    return lambda got: sum(len(b.completes) for b in got) >= n


def tags_of(batches: list[TrainBatch]) -> np.ndarray:
    parts = [b.batch.event_times for b in batches if b.batch is not None]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


@pytest.fixture
def dataset_factory(settings: KafkaSettings) -> Iterator[Callable[..., QueueDataset]]:
    made: list[QueueDataset] = []

    def make(topic: str, group: str, **kwargs: object) -> QueueDataset:
        kwargs.setdefault("dlq", None)
        ds = QueueDataset(settings, topic, group, CONFIG, kwargs.pop("batch_rows", 64), **kwargs)  # type: ignore[arg-type]
        made.append(ds)
        ds.start()
        return ds

    yield make
    for ds in made:
        ds.close()


def test_rows_arrive_whole_in_order_per_partition_in_full_batches(
    settings: KafkaSettings,
    project_topics: dict[str, str],
    group_id: str,
    dataset_factory: Callable[..., QueueDataset],
) -> None:
    topic = project_topics["samples"]  # 6 partitions
    rng = np.random.default_rng(3)
    sizes = [int(s) for s in rng.integers(1, 300, 30)]
    parts = [int(p) for p in rng.integers(0, 6, 30)]
    stream = tagged_stream(sizes, parts)
    produce(settings, topic, [(p, encode_batch(b), None) for p, b in stream])
    ds = dataset_factory(topic, group_id, batch_rows=128, linger_s=1.0)
    got = collect(ds, completed(len(stream)))
    assert all(b.num_rows == 128 for b in got[:-1]) and 0 < got[-1].num_rows <= 128
    seen = tags_of(got)
    assert sorted(seen) == list(range(sum(sizes)))  # every row once
    for p in range(6):
        mine = [b for q, b in stream if q == p]
        if not mine:
            continue
        rows = concat(mine)
        order = seen[np.isin(seen, rows.event_times)]
        assert np.array_equal(order, rows.event_times)  # the partition's order
    # features travel with their rows
    everything = concat([b.batch for b in got if b.batch is not None])
    produced = concat([b for _, b in stream])
    index = {int(t): i for i, t in enumerate(produced.event_times)}
    for r in rng.integers(0, everything.num_rows, 20):
        want = produced.row_features(index[int(everything.event_times[r])])
        for slot, ids in everything.row_features(int(r)).items():
            assert np.array_equal(ids, want[slot])
    completes = [s for b in got for s in b.completes]
    assert len(completes) == len(set(completes)) == len(stream)
    stats = ds.stats
    assert (stats.messages, stats.rows, stats.dead_letters_total) == (30, sum(sizes), 0)
    assert stats.batches == len(got) and ds.generation == 0


def test_bad_messages_are_dead_lettered_with_reasons_and_complete_in_order(
    settings: KafkaSettings,
    project_topics: dict[str, str],
    group_id: str,
    dataset_factory: Callable[..., QueueDataset],
) -> None:
    topic, dlq_topic = project_topics["samples"], project_topics["samples.dlq"]
    good = [tagged(np.arange(i * 10, i * 10 + 7)) for i in range(3)]
    nan = tagged(np.arange(3))
    labels = nan.labels.copy()
    labels[0] = np.inf
    from dataclasses import replace

    values: list[tuple[bytes, str | None]] = [
        (encode_batch(good[0]), None),
        (b"\x00garbage", "avro_decode"),
        (encode_batch(tagged(np.arange(4), SlotConfig(CONFIG.slots, 5))), "dense_dim_mismatch"),
        (encode_batch(good[1]), None),
        (encode_batch(replace(nan, labels=labels), validate=False), "non_finite"),
        (encode_batch(tagged(np.arange(2), SlotConfig(("user", "item", "x"), 2))), "unknown_slot"),
        (encode_batch(tagged(np.arange(0)), validate=False), "empty_batch"),
        (encode_batch(tagged(np.arange(2), SlotConfig(("user",), 2))), "missing_slot"),
        (encode_batch(good[2]), None),
    ]
    produce(settings, topic, [(2, v, None) for v, _ in values])
    with DeadLetterWriter(settings, dlq_topic) as dlq:
        ds = dataset_factory(topic, group_id, batch_rows=100, dlq=dlq)
        got = collect(ds, completed(len(values)))
        assert ds.commit(next_positions(s for b in got for s in b.completes)) == {(topic, 2): 9}
    completes = [s for b in got for s in b.completes]
    assert completes == [(topic, 2, i) for i in range(len(values))]  # commit order kept
    dead = [b.completes[0][2] for b in got if b.batch is None]
    assert dead == [i for i, (_, reason) in enumerate(values) if reason]
    assert np.array_equal(tags_of(got), concat(good).event_times)
    letters = {d.source_offset: d for d in read_dead_letters(settings, dlq_topic)}
    assert {off: d.reason for off, d in letters.items()} == {
        i: r for i, (_, r) in enumerate(values) if r
    }
    for off, letter in letters.items():
        assert (letter.value, letter.source_topic, letter.source_partition) == (
            values[off][0],
            topic,
            2,
        )
    assert ds.stats.dead_letters == {r: 1 for _, r in values if r}


def test_a_new_consumer_resumes_exactly_after_the_committed_offset(
    settings: KafkaSettings,
    project_topics: dict[str, str],
    group_id: str,
    dataset_factory: Callable[..., QueueDataset],
) -> None:
    topic = project_topics["samples"]
    stream = tagged_stream([50] * 10, [4] * 10)
    produce(settings, topic, [(p, encode_batch(b), None) for p, b in stream])
    first = dataset_factory(topic, group_id, batch_rows=50)
    got = collect(first, completed(10))
    assert [b.completes for b in got] == [((topic, 4, i),) for i in range(10)]
    assert first.commit(next_positions(got[3].completes)) == {(topic, 4): 4}
    assert first.commit({(topic, 4): 2}) == {}  # never backwards
    assert first.commit({(topic + "x", 0): 1}) == {}  # not assigned to this consumer
    assert first.stats.refused_commits == 1
    first.close()
    second = dataset_factory(topic, group_id, batch_rows=50)
    again = collect(second, completed(6))
    assert [b.completes[0] for b in again] == [(topic, 4, i) for i in range(4, 10)]
    assert np.array_equal(tags_of(again), np.arange(200, 500))


def test_hold_finishes_started_messages_and_takes_nothing_new_until_released(
    settings: KafkaSettings,
    project_topics: dict[str, str],
    group_id: str,
    dataset_factory: Callable[..., QueueDataset],
) -> None:
    """The clean point of a snapshot cut on a stream whose messages straddle batches."""
    topic = project_topics["samples"]
    first = tagged_stream([100] * 20, [0, 1] * 10)
    produce(settings, topic, [(p, encode_batch(b), None) for p, b in first])
    # 100-row messages in 64-row batches; a 60 s linger never flushes a tail by itself
    ds = dataset_factory(topic, group_id, batch_rows=64, linger_s=60.0)
    got = collect(ds, lambda g: len(g) >= 3)
    ds.hold(True)
    # what the reader took before the pause still comes out, then nothing: every message
    # started is finished (the partial tail is handed out at once) and the queue runs dry
    deadline, quiet = time.monotonic() + 15, 0
    while quiet < 5 or ds.unfinished():
        assert time.monotonic() < deadline, f"still unfinished: {ds.unfinished()}"
        b = ds.get(0.2)
        quiet = quiet + 1 if b is None else 0
        if b is not None:
            got.append(b)
    held_at = len(got)
    second = tagged_stream([100] * 10, [0, 1] * 5, start=2000)
    produce(settings, topic, [(p, encode_batch(b), None) for p, b in second])
    quiet_until = time.monotonic() + 2.0
    while time.monotonic() < quiet_until:  # held: nothing new is taken
        b = ds.get(0.2)
        assert b is None, f"a batch while held: {b.completes}"
    assert not ds.unfinished() and held_at == len(got)
    ds.hold(False)  # the new messages flow: 15 full batches, the 40-row tail lingers
    got += collect(ds, lambda g: sum(b.num_rows for b in g) >= 960, timeout=30)
    ds.hold(True)  # holding again hands the tail out at once
    got += collect(ds, lambda g: len(tags_of(got + g)) >= 3000, timeout=30)
    assert sorted(tags_of(got)) == list(range(3000))  # every row once


class ToyTrainer:
    """Trains (records) batches in a thread; commits after each; drains on revocation."""

    def __init__(self, ds_box: list[QueueDataset], delay_s: float) -> None:
        self.box, self.delay_s = ds_box, delay_s
        self.tags: list[np.ndarray] = []
        self.revoked: list[list[tuple[str, int]]] = []
        self.generations: set[int] = set()
        self.step = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        ds = self.box[0]
        while not self.stop.is_set():
            with self.step:  # one batch from get() to commit
                b = ds.get(0.05)
                if b is None:
                    continue
                if b.batch is not None:
                    self.tags.append(np.array(b.batch.event_times))
                self.generations.add(b.generation)
                time.sleep(self.delay_s)
                ds.commit(next_positions(b.completes))

    def on_revoke(self, partitions: list[tuple[str, int]]) -> None:
        """Return once nothing taken from ``partitions`` is untrained or uncommitted."""
        self.revoked.append(partitions)
        while True:
            with self.step:
                if not self.box[0].unfinished(partitions):
                    return
            time.sleep(0.005)


@pytest.mark.slow
def test_a_joining_consumer_triggers_revocation_and_no_row_is_lost_or_trained_twice(
    settings: KafkaSettings,
    project_topics: dict[str, str],
    group_id: str,
    dataset_factory: Callable[..., QueueDataset],
) -> None:
    topic = project_topics["samples"]
    sizes = [40] * 240  # batches of 64 cut most messages in two
    stream = tagged_stream(sizes, [i % 6 for i in range(240)])
    produce(settings, topic, [(p, encode_batch(b), None) for p, b in stream])
    total = sum(sizes)
    box_a: list[QueueDataset] = []
    a = ToyTrainer(box_a, delay_s=0.05)  # about 1300 rows/s: A is not done when B joins
    box_a.append(dataset_factory(topic, group_id, queue_batches=2, on_revoke=a.on_revoke))
    a.thread.start()
    deadline = time.monotonic() + 20
    while sum(len(t) for t in a.tags) < total // 10:  # A is well into the stream
        assert time.monotonic() < deadline, box_a[0].stats
        time.sleep(0.02)
    owned_before = box_a[0].assignment()
    assert len(owned_before) == 6
    box_b: list[QueueDataset] = []
    b = ToyTrainer(box_b, delay_s=0.0)
    box_b.append(dataset_factory(topic, group_id, queue_batches=2, on_revoke=b.on_revoke))
    b.thread.start()
    deadline = time.monotonic() + 40
    while sum(len(t) for t in a.tags + b.tags) < total:
        assert time.monotonic() < deadline, (box_a[0].stats, box_b[0].stats)
        time.sleep(0.05)
    time.sleep(0.5)  # anything trained twice would show up now
    a.stop.set()
    b.stop.set()
    a.thread.join(5)
    b.thread.join(5)
    assert a.revoked and a.revoked[0] == owned_before
    trained = np.concatenate(a.tags + b.tags)
    assert len(trained) == total and sorted(trained) == list(range(total))
    assert b.tags, "the new member got partitions and trained"
    assert box_a[0].stats.revocations >= 1 and max(a.generations) >= 1
    assert box_a[0].generation >= 1


# -- InMemoryDataset ------------------------------------------------------------


@pytest.fixture
def window_topic(settings: KafkaSettings, project_topics: dict[str, str]) -> tuple[str, dict]:
    """Partitions 0-2 get 5 messages of 20 rows each, stamped 1000*(i+1) + p."""
    topic = project_topics["samples"]
    batches: dict[tuple[int, int], SampleBatch] = {}
    messages: list[Message] = []
    tag = 0
    for i in range(5):
        for p in range(3):
            batches[(p, i)] = tagged(np.arange(tag, tag + 20))
            tag += 20
            messages.append((p, encode_batch(batches[(p, i)]), 1000 * (i + 1) + p))
    produce(settings, topic, messages)
    return topic, batches


def test_in_memory_load_reads_exactly_an_offset_range(
    settings: KafkaSettings, window_topic: tuple[str, dict]
) -> None:
    topic, batches = window_topic
    ds = InMemoryDataset.load(settings, topic, CONFIG, start={0: 1, 1: 0, 2: 2}, end={0: 4, 2: 5})
    want = [batches[(0, i)] for i in (1, 2, 3)]
    want += [batches[(1, i)] for i in range(5)] + [batches[(2, i)] for i in (2, 3, 4)]
    assert ds.rows is not None and ds.rows.equals(concat(want))
    assert ds.num_rows == 220 and ds.stats.messages == 11
    assert [(r.partition, r.start, r.stop) for r in ds.ranges] == [(0, 1, 4), (1, 0, 5), (2, 2, 5)]
    assert ds.nbytes > 220 * 4 * 4


def test_in_memory_load_reads_exactly_a_time_range_of_every_partition(
    settings: KafkaSettings, window_topic: tuple[str, dict]
) -> None:
    topic, batches = window_topic
    ds = InMemoryDataset.load(settings, topic, CONFIG, start_time_ms=2001, end_time_ms=4001)
    # stamps 1000*(i+1)+p in [2001, 4001): p0 i=2,3; p1 i=1,2; p2 i=1,2
    want = [batches[k] for k in [(0, 2), (0, 3), (1, 1), (1, 2), (2, 1), (2, 2)]]
    assert ds.rows is not None and ds.rows.equals(concat(want))
    everything = InMemoryDataset.load(settings, topic, CONFIG)
    assert everything.num_rows == 15 * 20
    empty = InMemoryDataset.load(settings, topic, CONFIG, start_time_ms=99_000)
    assert empty.num_rows == 0 and list(empty.batches(8)) == []
