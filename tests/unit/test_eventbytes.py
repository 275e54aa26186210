"""Precomputed Avro bodies of generated events against fastavro and the record path."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import fastavro
import pytest

from pipeline.codec import avro
from pipeline.ingest.delivery import partition_for
from pipeline.ingest.eventbytes import EventBytesError, EventEncoder, avro_long, avro_string
from pipeline.ingest.generator import TrafficConfig, TrafficGenerator

pytestmark = pytest.mark.unit


def _encoded(gen: TrafficGenerator, n: int, shift_ms: int = 0) -> tuple[list[bytes], ...]:
    enc = EventEncoder(gen)
    imps: list[bytes] = []
    imp_keys: list[bytes] = []
    clicks: list[bytes] = []
    click_keys: list[bytes] = []
    for block in gen.event_blocks(n):
        i, c = enc.impressions(block, shift_ms), enc.clicks(block, shift_ms)
        assert i.times.tolist() == (block.time + shift_ms).tolist()
        assert c.times.tolist() == (block.click_time + shift_ms).tolist()
        imps += i.values
        imp_keys += i.keys
        clicks += c.values
        click_keys += c.keys
    return imps, imp_keys, clicks, click_keys


@pytest.mark.parametrize(
    ("config", "n"),
    [
        (TrafficConfig(seed=0), 5000),  # several blocks, the last one cut
        (TrafficConfig(seed=3, items_per_request=4, duplicate_clicks=9), 7000),
        (TrafficConfig(seed=12, late_click_fraction=0.3, base_ctr=0.3), 1),
        (TrafficConfig(seed=5, num_users=70_000, num_items=300, rate=50_000.0), 2000),
        (TrafficConfig(seed=21, devices=("tv", "phône")), 1600),  # non-ASCII values
    ],
)
def test_bodies_equal_fastavro_of_the_records(config: TrafficConfig, n: int) -> None:
    gen = TrafficGenerator(config)
    log = gen.events(n)
    imps, imp_keys, clicks, click_keys = _encoded(gen, n)
    assert imps == [avro.encode("Impression", r) for r in log.impressions]
    assert clicks == [avro.encode("Click", r) for r in log.clicks]
    assert [avro.decode("Impression", b) for b in imps] == log.impressions
    assert [avro.decode("Click", b) for b in clicks] == log.clicks
    # keyed by request id as EventProducer keys them: clicks land beside their impression
    assert imp_keys == [r["request_id"].encode() for r in log.impressions]
    assert click_keys == [r["request_id"].encode() for r in log.clicks]
    partition = {k: partition_for(k, 6) for k in imp_keys}
    assert all(partition[k] == partition_for(k, 6) for k in click_keys)


def test_shifted_times_equal_shifted_records() -> None:
    gen = TrafficGenerator(seed=4)
    log = gen.events(3000)
    imps, _, clicks, _ = _encoded(gen, 3000, shift_ms=123_456)
    for body, rec in zip(imps, log.impressions, strict=True):
        assert avro.decode("Impression", body) == {**rec, "event_time": rec["event_time"] + 123_456}
    for body, rec in zip(clicks, log.clicks, strict=True):
        assert body == avro.encode("Click", {**rec, "event_time": rec["event_time"] + 123_456})


def _fastavro(schema: str, value: object) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schema, value)
    return buf.getvalue()


@pytest.mark.parametrize(
    "value", [0, 1, -1, 63, 64, -64, -65, 1_700_000_000_000, 2**63 - 1, -(2**63)]
)
def test_avro_long_matches_fastavro(value: int) -> None:
    assert avro_long(value) == _fastavro("long", value)


@pytest.mark.parametrize("text", ["", "u17", "é€😀", "x" * 200])
def test_avro_string_matches_fastavro(text: str) -> None:
    assert avro_string(text) == _fastavro("string", text)


def test_a_changed_schema_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    schemas = tmp_path / "schemas"
    shutil.copytree(avro.schemas_dir(), schemas)
    spec = json.loads((schemas / "Impression.avsc").read_text())
    spec["fields"].insert(3, {"name": "page", "type": "string", "default": "home"})
    (schemas / "Impression.avsc").write_text(json.dumps(spec))
    monkeypatch.setenv("PIPELINE_SCHEMAS_DIR", str(schemas))
    with pytest.raises(EventBytesError, match=r"Impression encoding differs"):
        EventEncoder(TrafficGenerator())
