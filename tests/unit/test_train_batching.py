"""Batcher (fixed-size batches from messages of any size), the rebalance-aware queue,
commit requests, the trainer-side layout checks and InMemoryDataset's shuffling and
sharding, without Kafka.

Every row carries a unique tag in ``event_times`` (and ids derived from it), so a test
can say exactly which rows of which message ended up where.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.codec.errors import CodecError
from pipeline.codec.samplebatch import SampleBatch, concat, encode_batch
from pipeline.codec.slots import SlotConfig
from pipeline.config import KafkaSettings
from pipeline.errors import ConfigError, PipelineError
from pipeline.train.assemble import assemble
from pipeline.train.batching import Batcher, Chunk, Source, TrainBatch, next_positions
from pipeline.train.commits import CommitChannel
from pipeline.train.dataset import QueueDataset
from pipeline.train.decoding import check_layout, decode_for_training
from pipeline.train.handoff import BatchQueue, QueueClosed
from pipeline.train.inmemory import InMemoryDataset
from tests.strategies import sample_batches, slot_configs

pytestmark = pytest.mark.unit

CONFIG = SlotConfig(("user", "item"), 2)
TOPIC = "samples"


def tagged(tags: np.ndarray, config: SlotConfig = CONFIG) -> SampleBatch:
    """Rows tagged ``tags``: row r has ``tags[r] % 3`` ids per slot, derived from its tag."""
    tags = np.asarray(tags, dtype=np.int64)
    n, slots = len(tags), len(config.slots)
    lengths = np.tile(tags % 3, slots)
    flat = np.concatenate([[0], np.cumsum(lengths)])
    offsets = np.stack([flat[s * n : s * n + n + 1] for s in range(slots)]).astype(np.int32)
    owner = np.repeat(np.tile(tags, slots), lengths)
    ids = (owner * 1000 + np.arange(len(owner)) % 7).astype(np.uint64)
    return SampleBatch(
        labels=(tags % 2).astype(np.float32),
        weights=np.ones(n, np.float32),
        event_times=tags,
        slots=config.slots,
        offsets=offsets,
        ids=ids,
        dense=np.repeat(tags[:, None], config.dense_dim, axis=1).astype(np.float32),
        fingerprint=config.fingerprint,
    )


def stream(sizes: list[int], partitions: list[int]) -> list[tuple[Source, SampleBatch]]:
    """Messages with consecutive tags, offsets counted per partition."""
    out: list[tuple[Source, SampleBatch]] = []
    next_offset: dict[int, int] = {}
    tag = 0
    for size, p in zip(sizes, partitions, strict=True):
        off = next_offset.get(p, 0)
        next_offset[p] = off + 1
        out.append(((TOPIC, p, off), tagged(np.arange(tag, tag + size))))
        tag += size
    return out


def rows_of(batches: list[TrainBatch]) -> np.ndarray:
    parts = [b.batch.event_times for b in batches if b.batch is not None]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


# -- Batcher ---------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=25),
    seed=st.integers(0, 2**16),
    batch_rows=st.integers(1, 33),
)
def test_batches_are_full_keep_every_row_in_order_and_complete_each_message_once(
    sizes: list[int], seed: int, batch_rows: int
) -> None:
    parts = list(np.random.default_rng(seed).integers(0, 3, len(sizes)))
    messages = stream(sizes, [int(p) for p in parts])
    batcher = Batcher(batch_rows)
    chunks: list[Chunk] = []
    for source, rows in messages:
        chunks.extend(batcher.add(source, rows))
    full = len(chunks)
    chunks.extend(batcher.flush())
    assert batcher.pending_rows == 0 and batcher.flush() == []
    batches = [c.train_batch(0) for c in chunks]
    assert all(b.num_rows == batch_rows for b in batches[:full])
    tail = batches[full:]
    assert len(tail) <= 1 and all(0 < b.num_rows < batch_rows for b in tail)
    assert concat([b.batch for b in batches if b.batch is not None]).equals(
        concat([rows for _, rows in messages])
    )
    # each message completes exactly once, in the batch holding its last row
    completed_in = {s: i for i, b in enumerate(batches) for s in b.completes}
    assert sorted(completed_in) == sorted(s for s, _ in messages)
    for source, rows in messages:
        last = int(rows.event_times[-1])
        holder = next(i for i, b in enumerate(batches) if last in rows_of([b]))
        assert completed_in[source] == holder


def test_a_big_message_is_sliced_exactly_and_completes_in_the_batch_with_its_last_row() -> None:
    batcher = Batcher(1000)
    big = tagged(np.arange(2500))
    out = batcher.add((TOPIC, 0, 7), big)
    assert [c.num_rows for c in out] == [1000, 1000] and batcher.pending_rows == 500
    assert all(b.completes == () for b in (c.train_batch(3) for c in out))
    out += batcher.add((TOPIC, 1, 0), tagged(np.arange(5000, 5600)))  # fills the third
    third = out[2].train_batch(3)
    assert third.completes == ((TOPIC, 0, 7),) and third.generation == 3
    rest = batcher.flush()[0].train_batch(3)
    assert rest.num_rows == 100 and rest.completes == ((TOPIC, 1, 0),)
    got = concat([b for c in out if (b := c.train_batch(0).batch) is not None])
    assert got.slice(0, 2500).equals(big)
    for r in (0, 999, 1000, 2499):  # ids stay with their rows across the cuts
        for slot, ids in got.row_features(r).items():
            assert np.array_equal(ids, big.row_features(r)[slot])


def test_a_dead_letter_comes_after_its_partitions_rows_and_does_not_flush_others() -> None:
    batcher = Batcher(10)
    assert batcher.add((TOPIC, 0, 0), tagged(np.arange(4))) == []
    out = batcher.add_dead((TOPIC, 1, 0))  # another partition: the open rows stay
    assert [(c.train_batch(0).batch, c.train_batch(0).completes) for c in out] == [
        (None, ((TOPIC, 1, 0),))
    ]
    assert batcher.pending_rows == 4
    out = batcher.add_dead((TOPIC, 0, 1))  # same partition: its open rows go first
    batches = [c.train_batch(0) for c in out]
    assert [b.completes for b in batches] == [((TOPIC, 0, 0),), ((TOPIC, 0, 1),)]
    assert batches[0].num_rows == 4 and batches[1].batch is None
    assert batcher.pending_rows == 0


@st.composite
def row_ranges(draw: st.DrawFn) -> list[tuple[SampleBatch, int, int]]:
    """1..8 batches of one random layout, each with a row range."""
    config = draw(slot_configs())
    batches = draw(st.lists(sample_batches(config, max_rows=12), min_size=1, max_size=8))
    out = []
    for b in batches:
        lo = draw(st.integers(0, b.num_rows - 1))
        out.append((b, lo, draw(st.integers(lo + 1, b.num_rows))))
    return out


@settings(max_examples=80, deadline=None)
@given(parts=row_ranges())
def test_assemble_equals_concatenating_slices(parts: list[tuple[SampleBatch, int, int]]) -> None:
    want = concat([b.slice(lo, hi) for b, lo, hi in parts])
    got = assemble(parts)
    assert got.equals(want)
    got.validate()


def test_assemble_takes_the_gather_and_the_slice_paths_alike() -> None:
    config = SlotConfig(tuple(f"s{i}" for i in range(5)), 3)
    small = [tagged(np.arange(10 * i, 10 * i + 10), config) for i in range(20)]  # short ranges
    big = tagged(np.arange(1000, 1500) * 3 + 2, config)  # 2 ids per row: long ranges
    for parts in ([(b, 0, 10) for b in small], [(b, 2, 9) for b in small], [(big, 0, 500)]):
        assert assemble(parts).equals(concat([b.slice(lo, hi) for b, lo, hi in parts]))
    mixed = [(small[0], 3, 10), (big, 0, 500), (small[1], 0, 4), (big, 100, 101)]
    assert assemble(mixed).equals(concat([b.slice(lo, hi) for b, lo, hi in mixed]))
    with pytest.raises(ValueError, match="rows 3:3"):
        assemble([(small[0], 3, 3)])
    with pytest.raises(CodecError):
        assemble([(small[0], 0, 1), (tagged(np.arange(2)), 0, 1)])


def test_next_positions_are_one_past_the_highest_offset_per_partition() -> None:
    sources = [(TOPIC, 0, 5), (TOPIC, 0, 3), (TOPIC, 1, 0), ("other", 0, 9)]
    assert next_positions(sources) == {(TOPIC, 0): 6, (TOPIC, 1): 1, ("other", 0): 10}
    assert next_positions([]) == {}


def test_batcher_rejects_a_bad_size() -> None:
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="batch_rows"):
            Batcher(bad)  # type: ignore[arg-type]


# -- BatchQueue: back-pressure and revocation -------------------------------------


def fill(queue: BatchQueue, batcher: Batcher, messages: list[tuple[Source, SampleBatch]]) -> None:
    for source, rows in messages:
        for chunk in batcher.add(source, rows):
            queue.put(chunk)


def test_put_blocks_while_the_queue_is_full_and_reports_the_wait() -> None:
    queue = BatchQueue(2)
    chunk = Batcher(1).add((TOPIC, 0, 0), tagged(np.arange(1)))[0]
    assert queue.put(chunk) < 0.05 and queue.put(chunk) < 0.05
    with pytest.raises(TimeoutError):
        queue.put(chunk, timeout=0.05)
    timer = threading.Timer(0.2, lambda: queue.get(0))
    timer.start()
    waited = queue.put(chunk, timeout=5)
    timer.join()
    assert 0.15 < waited < 2 and len(queue) == 2
    assert queue.get(0) is not None and queue.get(0) is not None and queue.get(0.01) is None


def test_close_wakes_a_blocked_put_and_fail_reaches_get() -> None:
    queue = BatchQueue(1)
    chunk = Batcher(1).add((TOPIC, 0, 0), tagged(np.arange(1)))[0]
    queue.put(chunk)
    errors: list[BaseException] = []

    def blocked() -> None:
        try:
            queue.put(chunk)
        except QueueClosed as exc:
            errors.append(exc)

    t = threading.Thread(target=blocked)
    t.start()
    time.sleep(0.05)
    queue.close()
    t.join(5)
    assert len(errors) == 1
    assert queue.get(0) is not None and queue.get(1) is None  # what was queued, then None
    queue.fail(RuntimeError("broker gone"))
    with pytest.raises(PipelineError, match="broker gone"):
        queue.get(0)


def test_revoke_takes_back_unseen_rows_of_revoked_partitions_only() -> None:
    queue, batcher = BatchQueue(100), Batcher(10)
    # p0 and p1 interleaved, 6 rows each: batches mix both partitions
    messages = stream([6] * 8, [0, 1] * 4)
    fill(queue, batcher, messages)
    assert len(queue) == 4 and batcher.pending_rows == 8
    first = queue.get(0)
    assert first is not None and first.generation == 0
    # the first batch held p0@0 (6 rows) and the first 4 rows of p1@0: p1@0 is started
    assert queue.unfinished() == ((TOPIC, 1, 0),)
    result = queue.revoke([(TOPIC, 1)], batcher)
    assert result.unfinished == ((TOPIC, 1, 0),) and queue.generation == 1
    # p1 offsets 1..3 (18 rows) were never handed out: taken back
    assert (result.dropped_messages, result.dropped_rows) == (3, 18)
    assert queue.unfinished([(TOPIC, 1)]) == ((TOPIC, 1, 0),)
    for chunk in batcher.flush():
        queue.put(chunk)
    rest: list[TrainBatch] = []
    while (b := queue.get(0)) is not None:
        rest.append(b)
    assert queue.unfinished() == ()
    seen = np.concatenate([first.batch.event_times, rows_of(rest)])  # type: ignore[union-attr]
    p0 = np.concatenate([m.event_times for (_, p, _), m in messages if p == 0])
    p1_first = messages[1][1].event_times
    assert sorted(seen) == sorted(np.concatenate([p0, p1_first]))  # nothing else of p1
    completes = [s for b in [first, *rest] for s in b.completes]
    assert sorted(completes) == sorted([s for s, _ in messages if s[1] == 0] + [(TOPIC, 1, 0)])
    assert [b.generation for b in rest] == [0, 0, 0, 1]  # rebuilt batches keep theirs


def test_revoke_queues_the_tail_of_a_started_message_still_in_the_batcher() -> None:
    queue, batcher = BatchQueue(1), Batcher(10)
    fill(queue, batcher, stream([14], [0]))  # 10 rows queued, 4 in the batcher
    fill_later = stream([3], [1])
    batcher.add(fill_later[0][0], fill_later[0][1])
    head = queue.get(0)
    assert head is not None and head.completes == ()
    result = queue.revoke([(TOPIC, 0)], batcher)  # must not block on the full queue
    assert result.unfinished == ((TOPIC, 0, 0),) and result.dropped_rows == 0
    tail = queue.get(0)
    assert tail is not None and tail.completes == ((TOPIC, 0, 0), (TOPIC, 1, 0))
    assert tail.num_rows == 7 and batcher.pending_rows == 0
    assert queue.unfinished() == ()


def test_lost_partitions_lose_started_messages_too() -> None:
    queue, batcher = BatchQueue(10), Batcher(10)
    fill(queue, batcher, stream([14, 3], [0, 0]))
    assert queue.get(0) is not None
    result = queue.revoke([(TOPIC, 0)], batcher, lost=True)
    assert result.unfinished == () and result.dropped_rows == 7
    assert queue.get(0) is None and queue.unfinished() == ()


@settings(max_examples=80, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 30), min_size=1, max_size=30),
    seed=st.integers(0, 2**16),
    batch_rows=st.integers(1, 25),
    fed=st.integers(0, 30),
    taken=st.integers(0, 30),
    revoked=st.sampled_from([[0], [1], [0, 1]]),
)
def test_revocation_protocol_never_splits_a_message_and_keeps_offset_prefixes(
    sizes: list[int], seed: int, batch_rows: int, fed: int, taken: int, revoked: list[int]
) -> None:
    """Feed part of a stream, hand some batches out, revoke, drain the started messages.

    Then every message of a revoked partition was handed out whole or not at all,
    the handed-out ones are an offset prefix (so committing max + 1 loses nothing and
    repeats nothing), and the other partitions still get every row in order.
    """
    parts = [int(p) for p in np.random.default_rng(seed).integers(0, 2, len(sizes))]
    messages = stream(sizes, parts)
    queue, batcher = BatchQueue(1000), Batcher(batch_rows)
    fed = min(fed, len(messages))
    fill(queue, batcher, messages[:fed])
    out: list[TrainBatch] = []
    for _ in range(taken):
        if (b := queue.get(0)) is not None:
            out.append(b)
    gone = [(TOPIC, p) for p in revoked]
    queue.revoke(gone, batcher)
    while queue.unfinished(gone):  # what a revocation hook does before it commits
        b = queue.get(0)
        assert b is not None, "a started message's rest must be queued"
        out.append(b)
    survivors = [(s, m) for s, m in messages[fed:] if (TOPIC, s[1]) not in gone]
    fill(queue, batcher, survivors)
    for chunk in batcher.flush():
        queue.put(chunk)
    while (b := queue.get(0)) is not None:
        out.append(b)
    seen = rows_of(out)
    assert len(seen) == len(set(seen.tolist()))  # no row twice
    completes = [s for b in out for s in b.completes]
    assert len(completes) == len(set(completes))
    for p in (0, 1):
        mine = [(s, m) for s, m in messages if s[1] == p]
        done = {s for s in completes if s[1] == p}
        offsets = sorted(s[2] for s in done)
        assert offsets == list(range(len(offsets)))  # an offset prefix
        for source, rows in mine:
            trained = np.isin(rows.event_times, seen)
            assert trained.all() if source in done else not trained.any()
        if (TOPIC, p) not in gone:
            assert len(done) == len(mine)
    # order within a partition is preserved
    for p in (0, 1):
        tags = np.array([t for s, m in messages if s[1] == p for t in m.event_times])
        got = seen[np.isin(seen, tags)]
        assert np.array_equal(got, np.sort(got))


# -- layout checks ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        (SlotConfig(("user", "item", "extra"), 2), "unknown_slot"),
        (SlotConfig(("user",), 2), "missing_slot"),
        (SlotConfig(("item", "user"), 2), "slot_order"),
        (SlotConfig(("user", "item"), 3), "dense_dim_mismatch"),
    ],
)
def test_a_layout_that_differs_gets_a_specific_reason(config: SlotConfig, reason: str) -> None:
    data = encode_batch(tagged(np.arange(5), config))
    with pytest.raises(CodecError) as err:
        decode_for_training(data, CONFIG)
    assert err.value.reason == reason
    assert decode_for_training(data, config).equals(tagged(np.arange(5), config))
    check_layout(tagged(np.arange(2)), CONFIG)  # the expected layout passes


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        (lambda b: b"not avro at all", "avro_decode"),
        (lambda b: b"", "avro_decode"),
        (lambda b: _nan_label(), "non_finite"),
        (lambda b: _empty(), "empty_batch"),
    ],
)
def test_bad_bytes_are_rejected_with_the_codec_reason(mangle: object, reason: str) -> None:
    data = mangle(encode_batch(tagged(np.arange(3))))  # type: ignore[operator]
    with pytest.raises(CodecError) as err:
        decode_for_training(data, CONFIG)
    assert err.value.reason == reason


def _nan_label() -> bytes:
    b = tagged(np.arange(3))
    labels = b.labels.copy()
    labels[1] = np.nan
    return encode_batch(_replace(b, labels=labels), validate=False)


def _empty() -> bytes:
    return encode_batch(tagged(np.arange(0)), validate=False)


def _replace(b: SampleBatch, **fields: object) -> SampleBatch:
    from dataclasses import replace

    return replace(b, **fields)  # type: ignore[arg-type]


# -- commit requests ---------------------------------------------------------------


def test_commit_requests_are_merged_and_each_waiter_learns_its_outcome() -> None:
    channel = CommitChannel()
    a = channel.request({(TOPIC, 0): 5, (TOPIC, 1): 2})
    b = channel.request({(TOPIC, 0): 7})
    performed: list[dict[tuple[str, int], int]] = []

    def perform(merged: dict[tuple[str, int], int]) -> dict[tuple[str, int], int]:
        performed.append(dict(merged))
        return {tp: off for tp, off in merged.items() if tp != (TOPIC, 1)}  # p1 not owned

    assert channel.pending() and channel.serve(perform) == 2 and not channel.pending()
    assert performed == [{(TOPIC, 0): 7, (TOPIC, 1): 2}]
    assert a.done.is_set() and a.committed == {(TOPIC, 0): 7} and a.error is None
    assert b.committed == {(TOPIC, 0): 7}
    assert channel.serve(perform) == 0 and len(performed) == 1  # nothing queued: no call


def test_a_failed_commit_reaches_its_waiters_and_close_fails_the_rest() -> None:
    channel = CommitChannel()
    a = channel.request({(TOPIC, 0): 1})

    def broken(merged: dict[tuple[str, int], int]) -> dict[tuple[str, int], int]:
        raise PipelineError("coordinator moved")

    with pytest.raises(PipelineError, match="coordinator moved"):
        channel.serve(broken)
    assert a.done.is_set() and "coordinator moved" in str(a.error)
    b = channel.request({(TOPIC, 0): 2})
    channel.close("the dataset is closed")
    assert b.done.is_set() and "closed" in str(b.error)
    with pytest.raises(PipelineError, match="closed"):
        channel.request({(TOPIC, 0): 3})
    with pytest.raises(ValueError, match=">= 0"):
        CommitChannel().request({(TOPIC, 0): -1})


def test_queue_dataset_settings_are_checked_before_anything_connects() -> None:
    kafka = KafkaSettings(bootstrap="127.0.0.1:1")  # nothing listens: nothing may connect
    for overrides in ({"group.id": "other"}, {"enable.auto.commit": True}):
        with pytest.raises(ConfigError, match="consumer_overrides"):
            QueueDataset(kafka, TOPIC, "g", CONFIG, 8, dlq=None, consumer_overrides=overrides)
    with pytest.raises(ConfigError, match="linger_s"):
        QueueDataset(kafka, TOPIC, "g", CONFIG, 8, dlq=None, linger_s=-1)
    with pytest.raises(ConfigError, match="non-empty"):
        QueueDataset(kafka, "", "g", CONFIG, 8, dlq=None)
    with pytest.raises(ValueError, match="batch_rows"):
        QueueDataset(kafka, TOPIC, "g", CONFIG, 0, dlq=None)
    with pytest.raises(ValueError, match="capacity"):
        QueueDataset(kafka, TOPIC, "g", CONFIG, 8, dlq=None, queue_batches=0)
    ds = QueueDataset(kafka, TOPIC, "g", CONFIG, 8, dlq=None)
    with pytest.raises(PipelineError, match="before start"):
        ds.commit({(TOPIC, 0): 1})
    assert ds.get(0.01) is None and ds.stats.batches == 0


# -- InMemoryDataset: global shuffle, shards, epochs --------------------------------


def test_shards_are_disjoint_complete_and_the_same_on_every_trainer() -> None:
    rows = tagged(np.arange(1000))
    ds = InMemoryDataset(rows, CONFIG)
    shards = [ds.shard(rank, 3, seed=11) for rank in range(3)]
    tags = [s.rows.event_times for s in shards]  # type: ignore[union-attr]
    assert [len(t) for t in tags] == [334, 333, 333]
    assert sorted(np.concatenate(tags)) == list(range(1000))  # complete and disjoint
    again = InMemoryDataset(tagged(np.arange(1000)), CONFIG).shard(1, 3, seed=11)
    assert again.rows is not None and again.rows.equals(shards[1].rows)  # type: ignore[arg-type]
    other = ds.shard(1, 3, seed=12).rows
    assert other is not None and not np.array_equal(other.event_times, tags[1])
    assert not np.array_equal(np.sort(tags[0]), tags[0])  # shuffled, not striped in order
    mine = shards[2].rows
    assert mine is not None
    for r in (0, 100, 332):  # ids and dense stay with their rows
        tag = int(mine.event_times[r])
        for slot, ids in mine.row_features(r).items():
            assert np.array_equal(ids, rows.row_features(tag)[slot])
        assert np.array_equal(mine.dense[r], rows.dense[tag])


def test_shard_rejects_a_bad_rank_or_world() -> None:
    ds = InMemoryDataset(tagged(np.arange(10)), CONFIG)
    for rank, world in [(3, 3), (-1, 3), (0, 0)]:
        with pytest.raises(ValueError, match="rank|world"):
            ds.shard(rank, world, seed=0)


def test_epochs_cover_every_row_in_a_new_order_each_when_seeded() -> None:
    ds = InMemoryDataset(tagged(np.arange(250)), CONFIG)
    plain = list(ds.batches(100))
    assert [b.num_rows for b in plain] == [100, 100, 50]
    assert np.array_equal(rows_of(plain), np.arange(250))
    assert all(b.completes == () for b in plain)
    shuffled = list(ds.batches(100, epochs=2, shuffle_seed=5))
    first, second = rows_of(shuffled[:3]), rows_of(shuffled[3:])
    assert sorted(first) == sorted(second) == list(range(250))
    assert not np.array_equal(first, second) and not np.array_equal(first, np.arange(250))
    assert np.array_equal(rows_of(list(ds.batches(100, 2, shuffle_seed=5))), rows_of(shuffled))
    assert not np.array_equal(rows_of(list(ds.batches(100, 1, shuffle_seed=6))), first)
    assert list(ds.batches(100, epochs=0)) == []
    with pytest.raises(ValueError, match="batch_rows"):
        next(ds.batches(0))


def test_an_empty_window_has_no_rows_no_batches_and_empty_shards() -> None:
    ds = InMemoryDataset(None, CONFIG)
    assert (ds.num_rows, ds.nbytes, list(ds.batches(10, 3, 1))) == (0, 0, [])
    assert ds.shard(0, 2, seed=1).num_rows == 0
    small = InMemoryDataset(tagged(np.arange(1)), CONFIG)
    assert small.shard(1, 2, seed=1).num_rows + small.shard(0, 2, seed=1).num_rows == 1
    with pytest.raises(ValueError, match="layout"):
        InMemoryDataset(tagged(np.arange(3)), SlotConfig(("user",), 2))


def test_resize_changes_the_size_of_the_next_batches_and_keeps_every_row() -> None:
    """The trainer's step schedule resizes the batcher between messages (and mid-stream)."""
    batcher = Batcher(4)
    chunks: list[Chunk] = []
    msgs = stream([3, 5, 7, 2, 9, 1], [0, 0, 0, 0, 0, 0])
    for i, (source, rows) in enumerate(msgs):
        if i == 2:
            batcher.resize(2)  # smaller than the open chunk already holds
        if i == 4:
            batcher.resize(6)
        chunks += batcher.add(source, rows)
    chunks += batcher.flush()
    batches = [c.train_batch(0) for c in chunks]
    assert rows_of(batches).tolist() == list(range(27))  # nothing lost, order kept
    # 4-row batches, then 2-row ones (the open row waits for the next message), then
    # 6-row ones and the partial flush
    assert [b.num_rows for b in batches] == [4, 4, 2, 2, 2, 2, 6, 5]
    with pytest.raises(ValueError, match="batch_rows"):
        batcher.resize(0)
