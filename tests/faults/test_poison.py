"""Poison pills: one bad message between good ones never crashes a role or stalls a partition.

Each case writes good, bad, good to one partition of the real broker, runs the trainer
role in this process (the code ``pipeline train`` runs) against a real shard server on
redis-server, and checks: the role returns, the bad message is on the dead-letter
topic with its reason, the good rows around it are trained, and the committed offset
is past it. The producers' side: invalid records and messages above a topic's
declared ``max.message.bytes`` never reach the topic (batches are split to fit).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from confluent_kafka import Consumer, Producer, TopicPartition

from pipeline.cli.dlq import dlq
from pipeline.cli.produce import produce
from pipeline.cli.train import train
from pipeline.codec.errors import CodecError
from pipeline.codec.samplebatch import SampleBatch, decode_batch, encode_batch
from pipeline.codec.slots import SlotConfig
from pipeline.config import KafkaSettings, RedisSettings
from pipeline.ingest.dlq import PREFIX_BYTES, DeadLetter, read_dead_letters
from pipeline.ingest.generator import SLOTS, TrafficConfig, TrafficGenerator
from pipeline.ingest.producer import EventProducer, SampleProducer
from pipeline.model.spec import ModelSpec
from pipeline.ps.catalog import load_catalog
from pipeline.ps.spec import TableSpec
from pipeline.train.runner import TrainerRole
from pipeline.train.settings import TrainerSettings
from pipeline.train.trainer import TrainResult
from tests.kafkautil import drain
from tests.psservers import shard_servers

pytestmark = [pytest.mark.faults, pytest.mark.integration]

DENSE = 2
CONFIG = SlotConfig(SLOTS, DENSE)
ROWS = 200  # rows of each good message
IDLE_EXIT_S = 8.0  # the group's first assignment must come before the trainer gives up
BIG = 20 << 20  # 20 MiB of garbage: above the samples topic's 8 MiB and the DLQ's


@dataclasses.dataclass
class World:
    """This test's topics, model files and consumer group, with a shard server running."""

    kafka: KafkaSettings
    bootstrap: str
    redis_url: str
    prefix: str
    topics: dict[str, str]
    catalog: Path
    model: Path
    job: str

    @property
    def group(self) -> str:
        return f"{self.prefix}train.{self.job}"

    def role(self) -> TrainerRole:
        settings = TrainerSettings(
            job=self.job,
            trainer_id="t0",
            tables=str(self.catalog),
            model=str(self.model),
            device="cpu",
            batch_rows=128,
        )
        return TrainerRole(
            settings=settings,
            kafka=self.kafka,
            redis=RedisSettings(url=self.redis_url),
            prefix=self.prefix,
            spec=ModelSpec.from_yaml(self.model),
        )

    def train(self) -> TrainResult:
        """The trainer role until it is idle; it must return, not raise."""
        return self.role().run(idle_exit_s=IDLE_EXIT_S, progress=None)

    def committed(self) -> dict[int, int]:
        """The group's committed offsets on the samples topic, by partition."""
        topic = self.topics["samples"]
        cons = Consumer({"bootstrap.servers": self.bootstrap, "group.id": self.group})
        try:
            parts = [TopicPartition(topic, p) for p in range(6)]
            got = cons.committed(parts, timeout=10)
        finally:
            cons.close()
        return {tp.partition: tp.offset for tp in got if tp.offset >= 0}

    def letters(self) -> list[DeadLetter]:
        return list(read_dead_letters(self.kafka, self.topics["samples.dlq"]))


@pytest.fixture
def world(
    tmp_path: Path,
    unique: str,
    kafka_bootstrap: str,
    redis_url: str,
    topic_prefix: str,
    project_topics: dict[str, str],
) -> Iterator[World]:
    wide = next(spec for spec in load_catalog() if spec.name == "wide").to_dict()
    wide["name"] = f"{unique}_wide"
    catalog = tmp_path / "tables.yaml"
    catalog.write_text(yaml.safe_dump({"tables": [wide]}))
    model = tmp_path / "model.yaml"
    model.write_text(
        yaml.safe_dump(
            {
                "name": f"m{unique}",
                "kind": "lr",
                "slots": list(SLOTS),
                "dense_dim": DENSE,
                "wide_table": wide["name"],
            }
        )
    )
    with shard_servers(redis_url, [TableSpec.from_dict(wide)], shards=1, wait_ready=True):
        yield World(
            kafka=KafkaSettings(bootstrap=kafka_bootstrap),
            bootstrap=kafka_bootstrap,
            redis_url=redis_url,
            prefix=topic_prefix,
            topics=project_topics,
            catalog=catalog,
            model=model,
            job=f"job{unique}",
        )


def _good(messages: int, seed: int = 5) -> list[SampleBatch]:
    """Generator traffic with two dense features per row, ``ROWS`` rows per message."""
    rng = np.random.default_rng(seed)
    out = []
    for batch, _ in TrafficGenerator(TrafficConfig(seed=seed)).samples(messages * ROWS, ROWS):
        dense = rng.normal(size=(batch.num_rows, DENSE)).astype(np.float32)
        out.append(dataclasses.replace(batch, dense=dense, fingerprint=CONFIG.fingerprint))
    return out


def _spoil(batch: SampleBatch, case: str) -> bytes:
    """The bytes of one bad message: a valid SampleBatch but for one row, or garbage."""
    if case == "undecodable":
        return b"\x02not a sample batch"
    if case == "garbage_20mb":
        return random.Random(0).randbytes(BIG)
    labels, times, dense = batch.labels.copy(), batch.event_times.copy(), batch.dense.copy()
    if case == "label_2":
        labels[7] = 2.0
    elif case == "label_-1":
        labels[7] = -1.0
    elif case == "event_time_-99":
        times[7] = -99
    elif case == "nan_dense":
        dense[7, 1] = math.nan
        return encode_batch(dataclasses.replace(batch, dense=dense), validate=False)
    return encode_batch(dataclasses.replace(batch, labels=labels, event_times=times))


def _produce_raw(world: World, values: list[bytes], partition: int = 0) -> None:
    """Straight onto the topic, as a foreign or broken producer would (no checks)."""
    producer = Producer({"bootstrap.servers": world.bootstrap, "message.max.bytes": 64 << 20})
    for value in values:
        producer.produce(world.topics["samples"], value, partition=partition)
    assert producer.flush(30) == 0


CASES = {
    "label_2": "bad_label",
    "label_-1": "bad_label",
    "event_time_-99": "bad_event_time",
    "nan_dense": "non_finite",
    "undecodable": "avro_decode",
    "garbage_20mb": "avro_decode",
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_poison_pill_is_dead_lettered_and_the_partition_moves_on(world: World, case: str) -> None:
    first, poison_of, last = _good(3)
    poison = _spoil(poison_of, case)
    _produce_raw(world, [encode_batch(first), poison, encode_batch(last)])

    result = world.train()

    reason = CASES[case]
    assert result.rows == 2 * ROWS, "the good messages around the bad one are trained"
    assert result.dead_letter_reasons == {reason: 1}
    (letter,) = world.letters()
    assert (letter.source_topic, letter.source_partition, letter.source_offset) == (
        world.topics["samples"],
        0,
        1,
    )
    assert letter.reason == reason and letter.error
    assert letter.size == len(poison)
    if case == "garbage_20mb":  # too large to dead-letter whole: a prefix and the size
        assert letter.truncated and letter.value == poison[:PREFIX_BYTES]
    else:
        assert not letter.truncated and letter.value == poison
    assert world.committed() == {0: 3}, "the committed offset is past the bad message"


def test_after_a_restart_the_dead_lettered_message_is_not_read_again(world: World) -> None:
    first, bad, last = _good(3)
    _produce_raw(world, [encode_batch(first), _spoil(bad, "label_2"), encode_batch(last)])
    assert world.train().rows == 2 * ROWS
    again = world.train()  # what used to crash on the same message at every restart
    assert (again.rows, again.dead_letter_reasons) == (0, {})
    assert len(world.letters()) == 1 and world.committed() == {0: 3}


def test_a_truncated_dead_letter_is_listed_but_never_replayed(world: World) -> None:
    (good,) = _good(1)
    _produce_raw(world, [random.Random(1).randbytes(BIG), encode_batch(good)])
    assert world.train().rows == ROWS
    common = ["--bootstrap", world.bootstrap, "--prefix", world.prefix]
    listed = CliRunner().invoke(dlq, ["inspect", *common])
    assert listed.exit_code == 0, listed.output
    assert f"{BIG}" in listed.stdout and "truncated: first 1,024 bytes kept" in listed.stdout
    replay = CliRunner().invoke(dlq, ["replay", *common])
    assert replay.exit_code == 1
    assert "1 dead letter(s) not replayed" in replay.stderr and "too large" in replay.stderr
    assert [m.offset() for m in drain(world.bootstrap, world.topics["samples"])] == [0, 1]


def test_train_exits_non_zero_naming_the_reasons_when_everything_was_dead_lettered(
    world: World,
) -> None:
    a, b = _good(2)
    _produce_raw(world, [_spoil(a, "label_2"), _spoil(b, "event_time_-99"), b"junk"])
    args = [
        *("--config", str(world.model), "--tables", str(world.catalog), "--job", world.job),
        *("--trainer-id", "t0", "--device", "cpu", "--idle-exit", str(IDLE_EXIT_S), "--json"),
        *("--bootstrap", world.bootstrap, "--prefix", world.prefix),
        *("--redis-url", world.redis_url),
    ]
    result = CliRunner().invoke(train, args)
    assert result.exit_code == 1, result.output
    assert "every message read was dead-lettered" in result.stderr
    assert "avro_decode=1, bad_event_time=1, bad_label=1" in result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["rows"] == 0 and summary["dead_letters"] == 3
    assert world.committed() == {0: 3}


def test_an_oversize_valid_batch_is_split_by_the_producer_and_every_row_trained(
    world: World,
) -> None:
    (big,) = (b for b in _good(1, seed=9))
    limit = 16 << 10  # 200 rows are about 20 KiB
    with SampleProducer(
        world.kafka, CONFIG, world.topics["samples"], max_message_bytes=limit
    ) as producer:
        producer.send_batch(big, key="k")  # one key: one partition, in order
    messages = drain(world.bootstrap, world.topics["samples"])
    assert len(messages) > 1 and all(len(m.value()) <= limit for m in messages)
    rows = [decode_batch(m.value()) for m in messages]
    assert np.concatenate([r.labels for r in rows]).tolist() == big.labels.tolist()

    result = world.train()

    assert result.rows == ROWS and result.dead_letter_reasons == {}
    ((partition, offset),) = world.committed().items()
    assert offset == len(messages) and {m.partition() for m in messages} == {partition}


def test_producers_refuse_what_is_above_the_declared_limit_or_invalid(world: World) -> None:
    samples, clicks = world.topics["samples"], world.topics["events.clicks"]
    with SampleProducer(world.kafka, CONFIG, samples) as producer:
        assert producer.max_message_bytes == 8 << 20  # topics/samples.yaml
        with pytest.raises(CodecError) as err:  # one row of 1.1 M ids cannot be split
            producer.send(1, {"user_id": list(range(1_100_000))}, 1_700_000_000_000, 1.0, [0, 0])
        assert err.value.reason == "too_large"
        assert samples in err.value.message and "8,388,608" in err.value.message
        for label, when in ((2, 1_700_000_000_000), (-1, 1_700_000_000_000), (1, -99)):
            with pytest.raises(CodecError):
                producer.send(label, {"user_id": 1}, when, 1.0, [0, 0])
    huge_click = {"request_id": "r" * 2_000_000, "user_id": "u", "item_id": "i", "event_time": 1}
    events = EventProducer(world.kafka, clicks, clicks)
    with pytest.raises(CodecError, match="too_large"):
        events.click(huge_click)
    events.close()
    assert drain(world.bootstrap, samples) == [] and drain(world.bootstrap, clicks) == []


def test_produce_reports_every_bad_record_by_line_and_sends_the_good_ones(
    world: World, tmp_path: Path
) -> None:
    good = {
        "label": 1,
        "event_time": 1_700_000_000_000,
        "features": [{"slot": "user_id", "ids": [7]}],
        "dense": [0.5, 0.25],
    }
    lines = [
        good,
        {**good, "label": 2},
        {**good, "label": -1},
        {**good, "event_time": -99},
        {**good, "dense": [float("nan"), 0.0]},
        {**good, "label": 0},
    ]
    source = tmp_path / "samples.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    args = [str(source), "--topic", "samples", "--slots", ",".join(SLOTS), "--dense-dim", "2"]
    result = CliRunner().invoke(
        produce, [*args, "--bootstrap", world.bootstrap, "--prefix", world.prefix]
    )
    assert result.exit_code == 1, result.output
    for line, reason in ((2, "bad_label"), (3, "bad_label"), (4, "bad_event_time")):
        assert f"line {line}: {reason}:" in result.stderr
    assert "line 5: non_finite:" in result.stderr
    assert "4 of 6 record(s) failed" in result.stderr
    assert "sent 2 of 6 record(s)" in result.stdout
    (message,) = drain(world.bootstrap, world.topics["samples"], until=1)
    assert decode_batch(message.value()).labels.tolist() == [1.0, 0.0]


def test_the_joiner_dead_letters_bad_events_and_joins_the_good_ones(
    world: World, unique: str
) -> None:
    import threading
    import time

    from pipeline.codec import avro
    from pipeline.joiner.runner import JoinRunner
    from pipeline.joiner.settings import JoinerSettings

    now = int(time.time() * 1000)
    impressions = world.topics["events.impressions"]

    def impression(rid: str, when: int) -> bytes:
        record = {"request_id": rid, "user_id": "u", "item_id": "i", "event_time": when}
        return avro.encode("Impression", {**record, "features": {}})

    values = [
        impression("a", now - 60_000),
        random.Random(2).randbytes(BIG),
        impression("neg", -99),
        impression("future", now + 10 * 24 * 3600 * 1000),
        impression("b", now - 50_000),  # its time closes the window of "a"
    ]
    producer = Producer({"bootstrap.servers": world.bootstrap, "message.max.bytes": 64 << 20})
    for value in values:
        producer.produce(impressions, value, partition=0)
    assert producer.flush(30) == 0
    settings = JoinerSettings(
        app_id=f"joiner-{unique}",
        window_ms=1000,
        lateness_ms=0,
        idle_ms=200,
        checkpoint_interval_s=0.5,
        linger_ms=20,
    )
    runner = JoinRunner(settings, world.kafka, prefix=world.prefix)
    stop = threading.Event()
    failures: list[BaseException] = []

    def run() -> None:
        try:
            runner.run(stop)
        except BaseException as exc:  # the test fails on it below
            failures.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while len(world.letters()) < 3 or not drain(world.bootstrap, world.topics["samples"]):
            assert not failures and thread.is_alive(), f"the joiner stopped: {failures}"
            assert time.monotonic() < deadline, "timed out waiting for the joiner"
            time.sleep(0.5)
    finally:
        stop.set()
        thread.join(60)
    assert not failures and not thread.is_alive()

    letters = {letter.source_offset: letter for letter in world.letters()}
    assert sorted(letters) == [1, 2, 3]
    assert letters[1].reason == "avro_decode" and letters[1].truncated
    assert letters[1].size == BIG and letters[1].value == values[1][:PREFIX_BYTES]
    assert letters[2].reason == letters[3].reason == "invalid_event"
    assert "negative event_time" in letters[2].error and "past now" in letters[3].error
    assert {letter.source_topic for letter in letters.values()} == {impressions}
    rows = [decode_batch(m.value()) for m in drain(world.bootstrap, world.topics["samples"])]
    times = sorted(t for batch in rows for t in batch.event_times.tolist())
    assert times[0] == now - 60_000 and set(times) <= {now - 60_000, now - 50_000}
    assert {label for batch in rows for label in batch.labels.tolist()} == {0.0}  # no clicks
    cons = Consumer({"bootstrap.servers": world.bootstrap, "group.id": runner.group_id})
    try:
        (committed,) = cons.committed([TopicPartition(impressions, 0)], timeout=10)
    finally:
        cons.close()
    assert committed.offset >= 4, "the joiner's committed position is past the bad events"
