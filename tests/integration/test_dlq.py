"""Dead letters through the real broker: write, read back, inspect, replay byte for byte."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from confluent_kafka import Producer

from pipeline.cli.dlq import dlq
from pipeline.codec import decode_batch
from pipeline.codec.errors import CodecError
from pipeline.config import KafkaSettings
from pipeline.errors import PipelineError
from pipeline.ingest.dlq import (
    REPLAY_HEADER,
    UNREADABLE,
    DeadLetterWriter,
    read_dead_letters,
    replay_dead_letters,
)
from tests.kafkautil import drain

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(kafka_bootstrap: str) -> KafkaSettings:
    return KafkaSettings(bootstrap=kafka_bootstrap)


@pytest.fixture
def letters(settings: KafkaSettings, project_topics: dict[str, str]) -> list[dict[str, Any]]:
    """Five dead letters on this test's samples.dlq, from two source topics."""
    sent = []
    with DeadLetterWriter(settings, project_topics["samples.dlq"]) as writer:
        for i in range(5):
            source = project_topics["samples"] if i < 3 else project_topics["events.clicks"]
            letter = {
                "value": bytes([i, 0, 255, 10]) * (i + 1),
                "key": None if i == 0 else f"key-{i}".encode(),
                "source_topic": source,
                "source_partition": i % 2,
                "source_offset": 100 + i,
                "reason": "avro_decode" if i % 2 == 0 else "non_finite",
                "error": f"problem number {i}\nsecond line",
            }
            writer.send(**letter)
            sent.append(letter)
    assert writer.stats.delivered == 5
    return sent


def test_written_dead_letters_read_back_with_their_origin(
    settings: KafkaSettings, project_topics: dict[str, str], letters: list[dict[str, Any]]
) -> None:
    before = int(time.time() * 1000)
    got = list(read_dead_letters(settings, project_topics["samples.dlq"]))
    assert len(got) == 5
    for letter, sent in zip(got, letters, strict=True):
        assert {k: getattr(letter, k) for k in sent} == sent
        assert letter.size == len(sent["value"]) and abs(letter.failed_at - before) < 60_000
    assert [g.offset for g in got] == [0, 1, 2, 3, 4]
    only = list(read_dead_letters(settings, project_topics["samples.dlq"], reasons={"non_finite"}))
    assert [g.source_offset for g in only] == [101, 103]
    assert len(list(read_dead_letters(settings, project_topics["samples.dlq"], limit=2))) == 2
    tail = list(read_dead_letters(settings, project_topics["samples.dlq"], from_offset=3))
    assert [g.offset for g in tail] == [3, 4]


def test_writer_routes_a_consumed_message_with_its_codec_error(
    settings: KafkaSettings, project_topics: dict[str, str], kafka_bootstrap: str
) -> None:
    samples, dead = project_topics["samples"], project_topics["samples.dlq"]
    prod = Producer({"bootstrap.servers": kafka_bootstrap})
    prod.produce(samples, b"\x02garbage", key=b"k", partition=2)
    assert prod.flush(10) == 0
    (msg,) = drain(kafka_bootstrap, samples, until=1)
    writer = DeadLetterWriter(prod, dead)  # shares the caller's producer
    with pytest.raises(CodecError) as err:
        decode_batch(msg.value())
    writer.send_error(msg, err.value)
    writer.flush()
    (letter,) = read_dead_letters(settings, dead)
    assert (letter.value, letter.key) == (b"\x02garbage", b"k")
    assert (letter.source_topic, letter.source_partition, letter.source_offset) == (samples, 2, 0)
    assert letter.reason == "avro_decode" and letter.error == err.value.message
    (raw,) = drain(kafka_bootstrap, dead, until=1)
    assert dict(raw.headers())["reason"] == b"avro_decode"


def test_inspect_lists_filters_and_prints_json(
    kafka_bootstrap: str, topic_prefix: str, letters: list[dict[str, Any]]
) -> None:
    common = ["--bootstrap", kafka_bootstrap, "--prefix", topic_prefix]
    table = CliRunner().invoke(dlq, ["inspect", *common])
    assert table.exit_code == 0, table.output
    rows = table.stdout.splitlines()
    assert rows[0].split() == ["offset", "source", "reason", "size", "error"]
    assert len(rows) == 6
    assert f"{topic_prefix}samples[1]@101" in rows[2] and "non_finite" in rows[2]
    assert rows[2].rstrip().endswith("problem number 1 second line")
    assert rows[2].split()[3] == str(len(letters[1]["value"]))
    assert "5 dead letter(s)" in table.stderr and "avro_decode=3, non_finite=2" in table.stderr

    as_json = CliRunner().invoke(
        dlq, ["inspect", *common, "--json", "--reason", "avro_decode", "--limit", "2"]
    )
    docs = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [d["source_offset"] for d in docs] == [100, 102]
    assert base64.b64decode(docs[1]["value"]) == letters[2]["value"]
    assert docs[0]["key"] is None and base64.b64decode(docs[1]["key"]) == b"key-2"


def test_replay_resubmits_identical_bytes_to_the_source_or_elsewhere(
    settings: KafkaSettings,
    kafka_bootstrap: str,
    topic_prefix: str,
    project_topics: dict[str, str],
    letters: list[dict[str, Any]],
) -> None:
    common = ["--bootstrap", kafka_bootstrap, "--prefix", topic_prefix]
    result = CliRunner().invoke(dlq, ["replay", *common, "--reason", "avro_decode"])
    assert result.exit_code == 0, result.output
    assert f"replayed 2 to {project_topics['samples']}" in result.stdout
    assert f"replayed 1 to {project_topics['events.clicks']}" in result.stdout
    assert "3 replayed, 0 failed" in result.stderr
    back = drain(kafka_bootstrap, project_topics["samples"], until=2)
    assert sorted((m.value(), m.key()) for m in back) == sorted(
        (letters[i]["value"], letters[i]["key"]) for i in (0, 2)
    )
    origins = sorted(dict(m.headers())[REPLAY_HEADER] for m in back)
    assert origins == [f"{project_topics['samples.dlq']}/0/{i}".encode() for i in (0, 2)]
    (click_back,) = drain(kafka_bootstrap, project_topics["events.clicks"], until=1)
    assert click_back.value() == letters[4]["value"]

    summary = replay_dead_letters(
        settings, project_topics["samples.dlq"], to=project_topics["metrics"]
    )
    assert summary.total == 5 and summary.failed == 0
    assert summary.by_reason == {"avro_decode": 3, "non_finite": 2}
    moved = drain(kafka_bootstrap, project_topics["metrics"], until=5)
    assert [m.value() for m in moved] == [letter["value"] for letter in letters]
    with pytest.raises(PipelineError, match="into itself"):
        replay_dead_letters(
            settings, project_topics["samples.dlq"], to=project_topics["samples.dlq"]
        )


def test_replay_with_a_fix_script_and_unreadable_entries(
    tmp_path: Path,
    kafka_bootstrap: str,
    topic_prefix: str,
    project_topics: dict[str, str],
    letters: list[dict[str, Any]],
) -> None:
    prod = Producer({"bootstrap.servers": kafka_bootstrap})
    prod.produce(project_topics["samples.dlq"], b"not a dead letter")
    assert prod.flush(10) == 0
    script = tmp_path / "fix.py"
    script.write_text(
        "def fix(letter):\n"
        "    if letter.reason == 'non_finite':\n"
        "        return None\n"
        "    return b'fixed:' + letter.value\n"
    )
    common = ["--bootstrap", kafka_bootstrap, "--prefix", topic_prefix]
    args = ["replay", *common, "--to", "metrics", "--fix-script", str(script)]
    result = CliRunner().invoke(dlq, args)
    assert result.exit_code == 0, result.output
    assert "skipped 2 (fix returned None)" in result.stdout
    assert "skipped 1 (unreadable)" in result.stdout
    moved = drain(kafka_bootstrap, project_topics["metrics"], until=3)
    assert [m.value() for m in moved] == [b"fixed:" + letters[i]["value"] for i in (0, 2, 4)]
    inspect = CliRunner().invoke(dlq, ["inspect", *common, "--reason", UNREADABLE])
    assert "1 dead letter(s)" in inspect.stderr and UNREADABLE in inspect.stdout
    bad = tmp_path / "nofix.py"
    bad.write_text("x = 1\n")
    broken = CliRunner().invoke(dlq, ["replay", *common, "--fix-script", str(bad)])
    assert broken.exit_code == 1 and "must define fix(letter)" in str(broken.exception)
