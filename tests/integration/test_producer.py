"""Producer SDK and ``pipeline produce`` against the real broker: what is read back equals
what was sent, batches form by count and by linger time, keys keep rows together."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from confluent_kafka import KafkaException, Producer

from pipeline.cli.produce import produce
from pipeline.codec import SlotConfig, avro, decode_batch, from_rows, hash64
from pipeline.codec.errors import CodecError
from pipeline.config import KafkaSettings
from pipeline.ingest.producer import EventProducer, SampleProducer, partition_for
from tests.kafkautil import drain

pytestmark = pytest.mark.integration

CONFIG = SlotConfig(("user", "item", "tags"), dense_dim=2)


def sample_rows(msgs: list[Any], config: SlotConfig = CONFIG) -> list[dict[str, Any]]:
    """Decoded rows of SampleBatch messages, each with the partition it arrived in."""
    rows = []
    for msg in msgs:
        batch = decode_batch(msg.value(), config)
        for r in range(batch.num_rows):
            feats = {k: v.tolist() for k, v in batch.row_features(r).items()}
            rows.append(
                {
                    "label": float(batch.labels[r]),
                    "weight": float(batch.weights[r]),
                    "time": int(batch.event_times[r]),
                    "features": feats,
                    "dense": batch.dense[r].tolist(),
                    "partition": msg.partition(),
                }
            )
    return sorted(rows, key=lambda row: row["time"])


@pytest.fixture
def settings(kafka_bootstrap: str) -> KafkaSettings:
    return KafkaSettings(bootstrap=kafka_bootstrap, session_timeout_ms=4000)


def test_events_round_trip_and_clicks_copartition_with_impressions(
    settings: KafkaSettings, project_topics: dict[str, str], kafka_bootstrap: str
) -> None:
    imps_topic, clicks_topic = project_topics["events.impressions"], project_topics["events.clicks"]
    imps = [
        {
            "request_id": f"req-{i}",
            "user_id": f"u{i % 7}",
            "item_id": f"i{i}",
            "event_time": 1_700_000_000_000 + i,
            "features": {"city": "Paris", "n": str(i)},
            "context": None if i % 2 else {"pos": str(i % 5)},
        }
        for i in range(60)
    ]
    clicks = [{k: imp[k] for k in ("request_id", "user_id", "item_id")} for imp in imps[::2]]
    for i, click in enumerate(clicks):
        click["event_time"] = 1_700_000_000_500 + i
    with EventProducer(settings, imps_topic, clicks_topic) as events:
        for imp in imps:
            events.impression(imp)
        for click in clicks:
            events.click(click)
    assert events.stats.delivered == 90 and events.stats.failed == 0
    got_imps = drain(kafka_bootstrap, imps_topic, until=60)
    got_clicks = drain(kafka_bootstrap, clicks_topic, until=30)
    by_id = {avro.decode("Impression", m.value())["request_id"]: m for m in got_imps}
    assert sorted(avro.decode("Impression", m.value())["request_id"] for m in got_imps) == sorted(
        imp["request_id"] for imp in imps
    )
    assert {json.dumps(avro.decode("Impression", m.value()), sort_keys=True) for m in got_imps} == {
        json.dumps({"context": None, **imp}, sort_keys=True) for imp in imps
    }
    by_request = sorted((avro.decode("Click", m.value()) for m in got_clicks), key=str)
    assert by_request == sorted(clicks, key=str)
    for msg in got_clicks:
        click = avro.decode("Click", msg.value())
        assert msg.key() == click["request_id"].encode()
        assert msg.partition() == by_id[click["request_id"]].partition()
    assert len({m.partition() for m in got_imps}) > 1


def test_event_producer_rejects_invalid_records_before_sending(settings: KafkaSettings) -> None:
    with EventProducer(settings, "never.used", "never.used") as events:
        with pytest.raises(CodecError, match="missing field 'item_id'"):
            events.click({"request_id": "r", "user_id": "u", "event_time": 1})
        with pytest.raises(CodecError, match="unknown field 'extra'"):
            events.click(
                {"request_id": "r", "user_id": "u", "item_id": "i", "event_time": 1, "extra": 1}
            )
    assert events.stats.messages == 0


def test_sample_rows_batched_by_count_come_back_equal(
    settings: KafkaSettings, project_topics: dict[str, str], kafka_bootstrap: str
) -> None:
    topic = project_topics["samples"]
    sent = []
    producer = SampleProducer(settings, CONFIG, topic, batch_rows=100, linger_ms=60_000)
    with producer:
        for i in range(250):
            features: dict[str, Any] = {"user": i % 13, "item": [2**64 - 1 - i]}
            if i % 3 == 0:
                features["tags"] = np.array([i, i + 1, i + 2], dtype=np.uint64)
            elif i % 3 == 1:
                features["tags"] = []
            dense = [i / 10, -1.0]
            producer.send(float(i % 2), features, 1_000 + i, weight=0.5 + i % 2, dense=dense)
            expected = {"user": [i % 13], "item": [2**64 - 1 - i], "tags": []}
            expected["tags"] = [i, i + 1, i + 2] if i % 3 == 0 else []
            sent.append((float(i % 2), 0.5 + i % 2, 1_000 + i, expected, dense))
        assert producer.stats.messages == 2 and producer.pending_rows == 50
    assert producer.stats.messages == 3 and producer.stats.delivered_rows == 250
    rows = sample_rows(drain(kafka_bootstrap, topic, until=3))
    assert len(rows) == 250
    for row, (label, weight, ts, features, dense) in zip(rows, sent, strict=True):
        assert (row["label"], row["weight"], row["time"]) == (label, weight, ts)
        assert row["features"] == features
        assert row["dense"] == pytest.approx(dense)


def test_linger_sends_a_partial_batch_without_flush(
    settings: KafkaSettings, project_topics: dict[str, str], kafka_bootstrap: str
) -> None:
    topic = project_topics["samples"]
    producer = SampleProducer(settings, CONFIG, topic, batch_rows=10_000, linger_ms=200)
    try:
        for i in range(5):
            producer.send_raw(1.0, {"user": f"u{i}", "item": ["a", "b"]}, 10 + i, dense=[0, 0])
        started = time.monotonic()
        msgs = drain(kafka_bootstrap, topic, until=1, timeout=10)  # no flush() called
        assert len(msgs) == 1, "the partial batch was not sent after linger_ms"
        assert time.monotonic() - started < 5
        rows = sample_rows(msgs)
        assert [r["features"]["user"] for r in rows] == [
            [hash64("user", f"u{i}")] for i in range(5)
        ]
        assert rows[0]["features"]["item"] == [hash64("item", "a"), hash64("item", "b")]
        assert producer.pending_rows == 0
    finally:
        producer.close()
    assert producer.stats.delivered == 1


def test_keyed_rows_of_one_user_stay_in_one_partition(
    settings: KafkaSettings, project_topics: dict[str, str], kafka_bootstrap: str
) -> None:
    topic = project_topics["samples"]
    users = [f"user-{u}" for u in range(24)]
    with SampleProducer(
        settings, CONFIG, topic, batch_rows=16, linger_ms=60_000, key=lambda raw: raw["user"]
    ) as producer:
        for i in range(240):
            producer.send_raw(0.0, {"user": users[i % 24], "item": i}, i, dense=[1, 2])
    rows = sample_rows(drain(kafka_bootstrap, topic, until=15))
    assert len(rows) == 240
    partition_of: dict[int, set[int]] = {}
    for row in rows:
        partition_of.setdefault(row["features"]["user"][0], set()).add(row["partition"])
    assert all(len(parts) == 1 for parts in partition_of.values())
    probe = Producer({"bootstrap.servers": kafka_bootstrap})
    where: dict[str, int] = {}
    for user in users:  # where librdkafka itself puts a message keyed by the user
        probe.produce(
            project_topics["events.impressions"],
            b"",
            key=user.encode(),
            on_delivery=lambda _e, m: where.__setitem__(m.key().decode(), m.partition()),
        )
    assert probe.flush(10) == 0
    for user in users:
        assert partition_of[hash64("user", user)] == {where[user]} == {partition_for(user, 6)}
    assert len({row["partition"] for row in rows}) > 2


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        ((1.0, {"nope": 1}, 1), "unknown_slot"),
        ((float("nan"), {"user": 1}, 1), "non_finite"),
        ((1.0, {"user": 2**64}, 1), "bad_id"),
        ((1.0, {"user": [True]}, 1), "bad_id"),
        ((1.0, {"user": np.array([-1])}, 1), "bad_id"),
        ((1.0, {"user": "abc"}, 1), "bad_id"),
        ((1.0, {"user": 1}, 1.5), "bad_dtype"),
        ((1.0, {"user": 1}, 2**63), "bad_dtype"),
        ((1.0, [("user", 1)], 1), "schema_mismatch"),
    ],
)
def test_bad_rows_raise_at_send_and_never_reach_a_batch(
    settings: KafkaSettings, args: tuple[Any, ...], reason: str
) -> None:
    producer = SampleProducer(settings, CONFIG, "never.used", linger_ms=60_000)
    with pytest.raises(CodecError) as err:
        producer.send(*args, dense=[0, 0])
    assert err.value.reason == reason
    for kwargs, why in [
        ({"weight": -1.0}, "negative_weight"),
        ({"dense": [1.0]}, "length_mismatch"),
        ({"dense": [1.0, float("inf")]}, "non_finite"),
    ]:
        with pytest.raises(CodecError) as err:
            producer.send(1.0, {"user": 1}, 1, **{"dense": [0, 0], **kwargs})
        assert err.value.reason == why
    with pytest.raises(CodecError, match="slot 'user'.*float"):
        producer.send_raw(1.0, {"user": 1.5}, 1, dense=[0, 0])
    assert producer.pending_rows == 0
    producer.close()
    assert producer.stats.messages == 0


def test_send_batch_checks_the_layout_and_passes_settings_through(
    settings: KafkaSettings, project_topics: dict[str, str], kafka_bootstrap: str
) -> None:
    topic = project_topics["samples"]
    batch = from_rows(CONFIG, [1, 0], [{"user": 5}, {"item": [6, 7]}], [1, 2], dense=[[1, 2]] * 2)
    with SampleProducer(settings, CONFIG, topic, **{"client.id": "sdk-test"}) as producer:
        producer.send_batch(batch, key="k1")
        other = from_rows(SlotConfig(("user",)), [1], [{"user": 1}], [1])
        with pytest.raises(CodecError, match="fingerprint_mismatch|unknown_slot"):
            producer.send_batch(other)
    (msg,) = drain(kafka_bootstrap, topic, until=1)
    assert decode_batch(msg.value(), CONFIG).equals(batch) and msg.key() == b"k1"
    with pytest.raises(KafkaException, match="no.such.property"):
        SampleProducer(settings, CONFIG, topic, **{"no.such.property": "1"})


def _run(args: list[str], stdin: str | None = None) -> Any:
    return CliRunner().invoke(produce, args, input=stdin)


def test_produce_cli_sends_good_lines_and_reports_bad_ones(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, project_topics: dict[str, str]
) -> None:
    good = [
        {
            "request_id": f"r{i}",
            "user_id": "u",
            "item_id": f"i{i}",
            "event_time": i,
            "features": {"a": "b"},
        }
        for i in range(6)
    ]
    lines = [json.dumps(g) for g in good]
    lines.insert(1, '{"request_id": "broken"')  # line 2: malformed JSON
    lines.insert(4, json.dumps({"request_id": "x", "user_id": "u"}))  # line 5: missing fields
    path = tmp_path / "imps.jsonl"
    path.write_text("\n".join(lines) + "\n")
    common = ["--bootstrap", kafka_bootstrap, "--prefix", topic_prefix]
    result = _run([str(path), "--topic", "events.impressions", *common])
    assert result.exit_code == 1, result.output
    assert "line 2: malformed JSON" in result.stderr
    assert "line 5: schema_mismatch: Impression: missing field 'item_id'" in result.stderr
    assert "error: 2 of 8 record(s) failed" in result.stderr
    assert "sent 6 of 8 record(s)" in result.stdout and "2 invalid, 0 undelivered" in result.stdout
    msgs = drain(kafka_bootstrap, project_topics["events.impressions"], until=6)
    got = sorted(
        (avro.decode("Impression", m.value()) for m in msgs), key=lambda r: r["event_time"]
    )
    assert got == [{**g, "context": None} for g in good]

    fast = _run(
        [str(path), "--topic", "events.clicks", "--schema", "Impression", "--fail-fast", *common]
    )
    assert fast.exit_code == 1
    assert "stopped at line 2" in fast.stderr and "line 5" not in fast.stderr
    assert len(drain(kafka_bootstrap, project_topics["events.clicks"])) == 1


def test_produce_cli_csv_samples_become_batches_with_the_seen_slots(
    kafka_bootstrap: str, topic_prefix: str, project_topics: dict[str, str]
) -> None:
    csv_text = "label,event_time,user,ad,dense.0\n1,100,u1,a1,0.5\n0,101,u2,,1.5\n1,oops,u3,a3,1\n"
    args = [
        "-",
        "--topic",
        "samples",
        "--format",
        "csv",
        "--bootstrap",
        kafka_bootstrap,
        "--prefix",
        topic_prefix,
        "--batch-rows",
        "1",
        "--key-slot",
        "user",
    ]
    result = _run(args, stdin=csv_text)
    assert result.exit_code == 1
    assert "line 4: event_time: 'oops' is not a valid long" in result.stderr
    config = SlotConfig(("user", "ad"), 1)
    rows = sample_rows(drain(kafka_bootstrap, project_topics["samples"], until=2), config)
    assert [(r["label"], r["time"], r["dense"]) for r in rows] == [
        (1.0, 100, [0.5]),
        (0.0, 101, [1.5]),
    ]
    assert rows[0]["features"] == {"user": [hash64("user", "u1")], "ad": [hash64("ad", "a1")]}
    assert rows[1]["features"] == {"user": [hash64("user", "u2")], "ad": []}
    assert rows[0]["partition"] == partition_for(hash64("user", "u1"), 6)


def test_produce_cli_rate_limit_and_usage_errors(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str
) -> None:
    path = tmp_path / "clicks.jsonl"
    path.write_text(
        "".join(
            json.dumps({"request_id": f"r{i}", "user_id": "u", "item_id": "i", "event_time": i})
            + "\n"
            for i in range(10)
        )
    )
    common = ["--bootstrap", kafka_bootstrap, "--prefix", topic_prefix]
    started = time.monotonic()
    result = _run([str(path), "--topic", "events.clicks", "--rate", "20", *common])
    assert result.exit_code == 0, result.output
    assert time.monotonic() - started >= 0.45  # 10 records at 20/s
    assert "sent 10 of 10 record(s)" in result.stdout
    unknown = _run([str(path), "--topic", "other", *common])
    assert unknown.exit_code == 2 and "--schema is required" in unknown.output
    assert _run([str(tmp_path / "absent.jsonl"), "--topic", "events.clicks"]).exit_code == 2
    slots_for_events = _run([str(path), "--topic", "events.clicks", "--slots", "a"])
    assert slots_for_events.exit_code == 2
