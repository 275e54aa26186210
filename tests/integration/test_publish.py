"""Publishing against real shard servers, Redis and the broker: a late subscriber rebuilds
every version bit-identical to what the PS serves; corrupt, missing or out-of-order
versions are reported and never applied."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from pipeline.config import KafkaSettings
from pipeline.kafka import consumer, producer
from pipeline.model.modules import build_model, dense_state
from pipeline.model.spec import ModelSpec
from pipeline.ps.client import PSClient, TableRoute
from pipeline.ps.dense import push_dense
from pipeline.ps.server import ShardServer
from pipeline.ps.spec import TableSpec
from pipeline.ps.staging.chunks import checksum
from pipeline.ps.staging.tracker import serving_rows
from pipeline.publish.export import export_version, load_export
from pipeline.publish.publisher import Publisher, PublishError
from pipeline.publish.subscriber import LiveModel, Subscriber
from tests.psservers import shard_servers

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SHARDS = 2
T0 = 1_700_000_000


def _spec(name: str, dim: int, fp16: bool) -> TableSpec:
    return TableSpec.from_dict(
        {
            "name": name,
            "dim": dim,
            "initializer": {"kind": "normal", "std": 0.01, "seed": 3},
            "optimizer": {"kind": "adagrad", "lr": 0.05},
            "accessor": {
                "admit_threshold": 0.15,  # a second show admits a row
                "delete_after_unseen_days": 1.0,
                "delete_threshold": 0.0,
            },
            "serving": {"fp16": fp16},
        }
    )


Expected = dict[str, tuple[np.ndarray, np.ndarray]]


def _expected(running: list[ShardServer], model: ModelSpec, fp16: dict[str, bool]) -> Expected:
    """What a subscriber must hold: every shard's serving rows, sorted, as published."""
    out: Expected = {}
    for table in model.tables():
        parts = [serving_rows(s.table(table)) for s in running]
        ids = np.concatenate([p[0] for p in parts])
        weights = np.concatenate([p[1] for p in parts])
        order = np.argsort(ids)
        w = weights[order]
        out[table] = (ids[order], w.astype(np.float16) if fp16[table] else w)
    return out


def _scenario(
    redis_url: str, kafka_bootstrap: str, topic: str, unique: str, max_chunk_bytes: int = 700
) -> tuple[ModelSpec, list[Any], list[Expected], list[dict[str, np.ndarray]]]:
    """Publish v1 base, v2 delta, v3 delta with evictions, v4 base; return what each held."""
    wide, deep = _spec(f"w{unique}", 1, False), _spec(f"d{unique}", 4, True)
    fp16 = {wide.name: False, deep.name: True}
    model = ModelSpec(
        name=f"m{unique}",
        kind="wide_deep",
        slots=("a", "b"),
        dense_dim=2,
        wide_table=wide.name,
        deep_table=deep.name,
        deep_dim=4,
        hidden=(8,),
    )
    r = redis.Redis.from_url(redis_url)
    now = [T0]
    routes = {wide.name: TableRoute(1, SHARDS), deep.name: TableRoute(4, SHARDS)}
    ps = PSClient(r, routes, trainer_id="t0")
    rng = np.random.default_rng(0)
    prod = producer(KafkaSettings(bootstrap=kafka_bootstrap))
    publisher = Publisher(r, prod, topic, model, base_every=3, max_chunk_bytes=max_chunk_bytes)
    published, expected, dense = [], [], []

    def push(ids: np.ndarray, step: int) -> None:
        for table in (wide, deep):
            grads = rng.normal(size=(len(ids), table.dim)).astype(np.float32)
            offsets = {"samples": {"0": 100 * step, "1": 50 * step}}
            ps.push(table.name, ids, grads, max_event_time=(now[0] - 5) * 1000, offsets=offsets)
        ps.flush()

    def dense_version(seed: int) -> None:
        tensors = dense_state(build_model(model, seed=seed))
        push_dense(r, model.dense_table_name(), tensors)
        dense.append(tensors)

    with shard_servers(redis_url, [wide, deep], SHARDS, lambda: now[0]) as running:
        old = np.arange(1, 400, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        push(old, 1)
        push(old[:300], 2)  # a second show admits these
        dense_version(1)
        published.append(publisher.publish())
        expected.append(_expected(running, model, fp16))
        push(old[250:350], 3)  # updates, and admissions of 300..349
        dense_version(2)
        published.append(publisher.publish())
        expected.append(_expected(running, model, fp16))
        now[0] += 2 * 86_400
        fresh = old[:100]
        push(fresh, 4)
        push(fresh, 5)
        assert sum(s.shrink() for s in running) > 0  # everything unseen for 2 days goes
        published.append(publisher.publish())
        expected.append(_expected(running, model, fp16))
        dense.append(dense[-1])
        push(np.arange(5000, 5100, dtype=np.uint64), 6)
        push(np.arange(5000, 5100, dtype=np.uint64), 7)
        dense_version(4)
        published.append(publisher.publish())
        expected.append(_expected(running, model, fp16))
    publisher.release()
    return model, published, expected, dense


def _assert_same(live: LiveModel, expected: Expected, dense: dict[str, np.ndarray]) -> None:
    for table, (ids, weights) in expected.items():
        got_ids, got_w = live.tables[table]
        np.testing.assert_array_equal(got_ids, ids)
        assert got_w.dtype == weights.dtype
        assert checksum(got_w.tobytes()) == checksum(weights.tobytes())  # bit-identical
    assert set(live.dense) == set(dense)
    state = live.module.state_dict()
    for name, value in dense.items():
        np.testing.assert_array_equal(live.dense[name], value)
        np.testing.assert_array_equal(state[name].numpy(), value)


def _poll_until(sub: Subscriber, version: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (sub.live is None or sub.live.version < version) and time.monotonic() < deadline:
        sub.poll(0.5)
    assert sub.live is not None and sub.live.version == version, sub.events


def test_late_subscriber_rebuilds_every_version_bit_identical(
    redis_url: str,
    kafka_bootstrap: str,
    project_topics: dict[str, str],
    unique: str,
    tmp_path: Path,
) -> None:
    topic = project_topics["model.updates"]
    model, published, expected, dense = _scenario(redis_url, kafka_bootstrap, topic, unique)
    assert [p.kind for p in published] == ["base", "delta", "delta", "base"]
    assert [p.parent for p in published] == [None, 1, 2, None]
    assert published[2].tombstones[model.wide_table] > 0  # evictions went out as tombstones
    assert max(published[0].chunk_counts.values()) > 1  # rows were split under the byte cap
    assert published[0].max_event_time == (T0 - 5) * 1000
    seen: list[tuple[int, LiveModel]] = []
    sub = Subscriber.connect(
        KafkaSettings(bootstrap=kafka_bootstrap),
        topic,
        model,
        from_latest_base=False,  # every version, from the topic's beginning
        on_version=lambda e, live: seen.append((e.version, live)) if live else None,
    )
    try:
        _poll_until(sub, 4)
    finally:
        sub.close()
    assert [(e.version, e.kind, e.status) for e in sub.events] == [
        (1, "base", "applied"),
        (2, "delta", "applied"),
        (3, "delta", "applied"),
        (4, "base", "applied"),
    ]
    for (version, live), exp, dns in zip(seen, expected, dense, strict=True):
        assert live.version == version
        _assert_same(live, exp, dns)
    v3 = seen[2][1]
    assert len(v3.tables[model.wide_table][0]) == 100  # only the fresh rows survive
    assert v3.manifest["offsets"] == [
        {"topic": "samples", "partition": 0, "offset": 500},
        {"topic": "samples", "partition": 1, "offset": 250},
    ]
    assert sub.events[-1].freshness_ms is not None and sub.events[-1].freshness_ms > 0
    found, rows = v3.lookup(model.deep_table or "", np.array([1, 2], np.uint64))
    assert not found.any() and not rows.any()

    out = export_version(seen[-1][1], tmp_path / "v4")
    meta, tables, dense_files = load_export(out)
    assert meta["version"] == 4 and meta["published"]["kind"] == "base"
    for table, (ids, weights) in expected[-1].items():
        np.testing.assert_array_equal(tables[table][0], ids)
        assert tables[table][1].dtype == weights.dtype
        np.testing.assert_array_equal(tables[table][1], weights)
    for name, value in dense[-1].items():
        np.testing.assert_array_equal(dense_files[name], value)
    bad = out / f"tables/{model.wide_table}/weights.npy"
    bad.write_bytes(bad.read_bytes()[:-1] + b"\x00")
    with pytest.raises(ValueError, match="checksum"):
        load_export(out)


def test_new_subscriber_starts_at_the_latest_base(
    redis_url: str, kafka_bootstrap: str, project_topics: dict[str, str], unique: str
) -> None:
    topic = project_topics["model.updates"]
    model, published, expected, dense = _scenario(redis_url, kafka_bootstrap, topic, unique)
    # every manifest names where its base starts: a base its own first chunk (the topic
    # is this test's own, so v1 starts at 0), a delta its base's
    offsets = [p.base_offset for p in published]
    assert offsets[0] == 0 and offsets[1] == offsets[2] == 0
    assert offsets[3] is not None and offsets[3] > 0
    msgs = _messages(kafka_bootstrap, topic, 4)
    assert _version_of(msgs[offsets[3]]) == 4 and _version_of(msgs[offsets[3] - 1]) == 3
    settings = KafkaSettings(bootstrap=kafka_bootstrap)
    # another model's traffic after ours: the backward search must widen past it
    prod = producer(settings)
    for _ in range(40):
        prod.produce(topic, b"x", headers=[("type", b"chunk"), ("model", b"other")])
    assert prod.flush(10) == 0
    sub = Subscriber.connect(settings, topic, model)  # from the latest base by default
    try:
        _poll_until(sub, 4)
    finally:
        sub.close()
    assert [(e.version, e.kind, e.status) for e in sub.events] == [(4, "base", "applied")]
    assert sub.live is not None
    _assert_same(sub.live, expected[-1], dense[-1])


def _messages(kafka_bootstrap: str, topic: str, count_manifests: int) -> list[Any]:
    c = consumer(KafkaSettings(bootstrap=kafka_bootstrap), f"raw-{time.monotonic_ns()}")
    from confluent_kafka import OFFSET_BEGINNING, TopicPartition

    c.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    out: list[Any] = []
    deadline = time.monotonic() + 30
    while sum(dict(m.headers())["type"] == b"manifest" for m in out) < count_manifests:
        assert time.monotonic() < deadline
        out.extend(m for m in c.consume(100, 0.5) if m.error() is None)
    c.close()
    return [(m.headers(), m.value()) for m in out]


def _feed(model: ModelSpec, messages: list[Any]) -> Subscriber:
    sub = Subscriber(model)
    for headers, value in messages:
        sub.handle(headers, value)
    return sub


def _version_of(message: tuple[Any, bytes]) -> int:
    from pipeline.codec import avro

    headers, value = message
    schema = "ModelUpdateChunk" if dict(headers)["type"] == b"chunk" else "ModelManifest"
    return int(avro.decode(schema, value)["version"])


def test_corrupt_missing_and_out_of_order_versions_are_never_applied(
    redis_url: str, kafka_bootstrap: str, project_topics: dict[str, str], unique: str
) -> None:
    topic = project_topics["model.updates"]
    model, _, expected, dense = _scenario(redis_url, kafka_bootstrap, topic, unique)
    msgs = _messages(kafka_bootstrap, topic, 4)
    clean = _feed(model, msgs)
    assert clean.live is not None and clean.live.version == 4
    v2_chunks = [
        i for i, m in enumerate(msgs) if _version_of(m) == 2 and dict(m[0])["type"] == b"chunk"
    ]

    # A flipped byte in a v2 payload: v2 rejected, v3 skipped (gap), v4 (a base) re-syncs.
    from pipeline.codec import avro

    corrupt = list(msgs)
    headers, value = corrupt[v2_chunks[0]]
    record = avro.decode("ModelUpdateChunk", value)
    payload = bytearray(record["payload"])
    payload[-1] ^= 0xFF
    record["payload"] = bytes(payload)
    corrupt[v2_chunks[0]] = (headers, avro.encode("ModelUpdateChunk", record))
    states: list[int | None] = []
    sub = Subscriber(
        model, on_version=lambda e, live: states.append(live.version if live else None)
    )
    for h, v in corrupt:
        sub.handle(h, v)
    assert [(e.version, e.status) for e in sub.events] == [
        (1, "applied"),
        (2, "rejected"),
        (3, "skipped"),
        (4, "applied"),
    ]
    assert "checksum mismatch" in sub.events[1].reason and "gap" in sub.events[2].reason
    assert states == [1, 1, 1, 4]  # the live model never held a damaged version
    assert sub.live is not None
    _assert_same(sub.live, expected[3], dense[3])

    # A lost chunk: v2 rejected as incomplete.
    lost = _feed(model, [m for i, m in enumerate(msgs) if i != v2_chunks[-1]])
    assert lost.events[1].status == "rejected" and "missing" in lost.events[1].reason

    # Versions replayed out of order: a second copy of v1 after v2 is rejected.
    v1 = [m for m in msgs if _version_of(m) == 1]
    first_v2_manifest = next(
        i for i, m in enumerate(msgs) if _version_of(m) == 2 and dict(m[0])["type"] == b"manifest"
    )
    replayed = msgs[: first_v2_manifest + 1] + v1
    late = _feed(model, replayed)
    assert [(e.version, e.status) for e in late.events][-1] == (1, "rejected")
    assert late.live is not None and late.live.version == 2
    _assert_same(late.live, expected[1], dense[1])


def test_second_publisher_is_locked_out(
    redis_url: str, kafka_bootstrap: str, project_topics: dict[str, str], unique: str
) -> None:
    model = ModelSpec(name=f"m{unique}", kind="lr", slots=("a",), dense_dim=0)
    r = redis.Redis.from_url(redis_url)
    prod = producer(KafkaSettings(bootstrap=kafka_bootstrap))
    topic = project_topics["model.updates"]
    first, second = Publisher(r, prod, topic, model), Publisher(r, prod, topic, model)
    assert first.acquire()
    with pytest.raises(PublishError, match="another publisher holds the lock"):
        second.publish()
    first.release()
    assert second.acquire()
    second.release()
