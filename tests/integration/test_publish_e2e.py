"""End to end: training -> publishing -> a late subscriber -> serving, every role a process.

Two ``pipeline ps`` shard servers and two ``pipeline train`` processes (one group) train
DeepFM on a produced synthetic stream until the global metrics count every produced
row; the trainers stop cleanly (SIGTERM) and ``pipeline publish run --once`` publishes a
base. Two more trainers (a second group, started at the first one's committed offsets)
train the rest of the stream, stop, and a second ``publish run --once`` publishes a delta.
Then:

- a subscriber started only now (both versions already on the topic) rebuilds each
  version bit-identical to the PS at its cut: the pull view of every id of the stream
  (same ids found, same float32 bits) and the dense table; it is also rebuilt
  independently from the raw topic records (every chunk's sha256 against its manifest,
  base + delta merged here) and through ``pipeline publish export`` (file checksums
  re-hashed from what the subscriber holds);
- ``pipeline serve`` answers ``POST /predict`` for raw impression features with the
  trainer model's predictions (``Inferencer`` on the PS, over the training batch's own
  ids) to 1e-6.

Serving equals the pull view only where the catalog publishes every admitted row as
float32, so the test catalog sets ``serving: {fp16: false, min_score: 0}``.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from confluent_kafka import Consumer, Producer, TopicPartition

from pipeline.codec import avro
from pipeline.codec.hashing import hash64
from pipeline.codec.samplebatch import SampleBatch, concat, encode_batch, from_rows
from pipeline.config import KafkaSettings
from pipeline.ingest.generator import TrafficConfig, TrafficGenerator
from pipeline.model.spec import ModelSpec
from pipeline.ps.client import PSClient
from pipeline.ps.dense import unpack_tensors
from pipeline.ps.staging.chunks import checksum, unpack_ids, unpack_rows
from pipeline.publish.export import load_export
from pipeline.publish.messages import CHUNK_SCHEMA, MANIFEST_SCHEMA, header_map
from pipeline.publish.subscriber import LiveModel, Subscriber, VersionEvent, merge_rows
from pipeline.stack import free_port
from pipeline.train.infer import Inferencer
from pipeline.train.metrics_sink import RedisMetricsSink
from pipeline.train.resume import seek_group
from tests.e2eutil import wait_for, write_specs
from tests.procgroups import ProcessGroups

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.slow]

ROWS_1 = 6_000  # trained before the base (a whole number of messages per partition)
ROWS_2 = 2_000  # trained between the base and the delta
MESSAGE_ROWS = 500
PARTITIONS = 6
REQUEST_ROWS = 40  # impressions of the stream sent to pipeline serve

Procs = list[subprocess.Popen[str]]
PSState = tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, np.ndarray]]


def _cli(processes: ProcessGroups, *args: str, log: Path) -> subprocess.Popen[str]:
    """``pipeline ARGS`` in its own process group; stdout to ``log``.out, stderr to ``log``."""
    with log.with_suffix(".out").open("w") as out:
        return processes.pipeline(
            *args, log=log, stdout=out, env={"PIPELINE_KAFKA_SESSION_TIMEOUT_MS": "6000"}
        )


def _finish(proc: subprocess.Popen[str], log: Path, timeout: float = 60) -> str:
    """Wait for a process that exits by itself; its stdout, or fail with its log."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    assert proc.returncode == 0, f"{proc.args!r} -> {proc.returncode}\n{log.read_text()[-3000:]}"
    return log.with_suffix(".out").read_text()


def _produce(bootstrap: str, topic: str, batches: list[SampleBatch], first: int) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for i, batch in enumerate(batches, start=first):
        producer.produce(topic, encode_batch(batch), partition=i % PARTITIONS)
    assert producer.flush(30) == 0


def _ps_state(ps: PSClient, spec: ModelSpec, stream_ids: np.ndarray) -> PSState:
    """The PS as a subscriber must see it: the pull view's admitted rows among every id
    of the stream (sorted), and the dense table."""
    tables = {}
    for table in spec.tables():
        weights, found = ps.pull(table, stream_ids)
        tables[table] = (stream_ids[found], weights[found])
    version, dense = ps.pull_dense(spec.dense_table_name())
    assert version > 0
    return tables, dense


def _bits(a: np.ndarray) -> np.ndarray:
    assert a.dtype == np.float32, a.dtype
    return np.ascontiguousarray(a).view(np.uint32)


def _assert_live_is(live: LiveModel, state: PSState) -> None:
    """Same ids and bit-identical float32 rows per table; same dense tensors (and module)."""
    tables, dense = state
    for table, (ids, weights) in tables.items():
        got_ids, got_w = live.tables[table]
        np.testing.assert_array_equal(got_ids, ids)
        np.testing.assert_array_equal(_bits(got_w), _bits(weights))
    assert set(live.dense) == set(dense)
    module_state = live.module.state_dict()
    for name, value in dense.items():
        np.testing.assert_array_equal(_bits(live.dense[name]), _bits(value))
        np.testing.assert_array_equal(_bits(module_state[name].numpy()), _bits(value))


def _rebuild_from_topic(
    bootstrap: str, topic: str, spec: ModelSpec, last: int
) -> tuple[list[dict[str, Any]], list[int], PSState]:
    """Every manifest on the topic up to version ``last``, the sparse rows each carried,
    and version ``last`` rebuilt here from the raw records: each chunk checked against its
    manifest's sha256, base + deltas merged in order."""
    consumer: Any = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "unused", "enable.auto.commit": False}
    )
    consumer.assign([TopicPartition(topic, 0, 0)])
    chunks: dict[int, list[dict[str, Any]]] = {}
    manifests: list[dict[str, Any]] = []
    carried: list[int] = []
    tables: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    dense: dict[str, np.ndarray] = {}
    deadline = time.monotonic() + 30
    try:
        while not manifests or manifests[-1]["version"] < last:
            assert time.monotonic() < deadline, f"version {last} not on {topic}"
            msg = consumer.poll(0.5)
            if msg is None or msg.error() is not None:
                continue
            kind = header_map(msg.headers()).get("type")
            if kind == b"chunk":
                chunk = avro.decode(CHUNK_SCHEMA, msg.value())
                chunks.setdefault(chunk["version"], []).append(chunk)
                continue
            manifest = avro.decode(MANIFEST_SCHEMA, msg.value())
            manifests.append(manifest)
            carried.append(0)
            mine = chunks.pop(manifest["version"])
            by_table: dict[str, list[dict[str, Any]]] = {}
            for chunk in mine:
                by_table.setdefault(chunk["table"], []).append(chunk)
            for table, parts in by_table.items():
                parts.sort(key=lambda c: c["chunk_index"])
                assert [c["chunk_index"] for c in parts] == list(range(len(parts)))
                assert len(parts) == manifest["chunk_counts"][table]
                sums = [checksum(c["payload"]) for c in parts]
                assert sums == list(manifest["checksums"][table]), table
            for table, dim in spec.tables().items():
                rows = [
                    unpack_rows(c["payload"]) for c in by_table[table] if c["kind"] != "tombstone"
                ]
                dead = [
                    unpack_ids(c["payload"]) for c in by_table[table] if c["kind"] == "tombstone"
                ]
                ids = np.concatenate([r[0] for r in rows]) if rows else np.zeros(0, np.uint64)
                w = np.concatenate([r[1] for r in rows]) if rows else np.zeros((0, dim), np.float32)
                gone = np.concatenate(dead) if dead else np.zeros(0, np.uint64)
                carried[-1] += len(ids)
                if manifest["kind"] == "base":
                    assert len(gone) == 0
                    order = np.argsort(ids)
                    tables[table] = (ids[order], w[order])
                else:
                    tables[table] = merge_rows(tables[table], (ids, w), gone)
            blob = b"".join(
                c["payload"]
                for c in sorted(by_table[spec.dense_table_name()], key=lambda c: c["chunk_index"])
            )
            dense = unpack_tensors(blob)
    finally:
        consumer.close()
    return manifests, carried, (tables, dense)


def _npy_sha256(array: np.ndarray) -> str:
    """What ``export_version`` records for an array: sha256 of its ``.npy`` bytes."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return "sha256:" + hashlib.sha256(buf.getvalue()).hexdigest()


def _post(port: int, body: Any) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/predict", body=json.dumps(body).encode())
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def _health(port: int) -> dict[str, Any] | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/health")
        resp = conn.getresponse()
        out: dict[str, Any] = json.loads(resp.read())
        return out
    except OSError:
        return None  # not listening yet
    finally:
        conn.close()


def test_trained_model_is_published_subscribed_and_served_exactly(
    kafka_bootstrap: str,
    redis_url: str,
    project_topics: dict[str, str],
    topic_prefix: str,
    unique: str,
    tmp_path: Path,
    processes: ProcessGroups,
) -> None:
    catalog, model_path = write_specs(tmp_path, unique, serving={"fp16": False, "min_score": 0.0})
    spec = ModelSpec.from_yaml(str(model_path))
    connection = ["--bootstrap", kafka_bootstrap, "--prefix", topic_prefix]
    servers = [
        _cli(
            processes,
            "ps",
            "--shard",
            str(s),
            "--shards",
            "2",
            "--tables",
            str(catalog),
            "--redis-url",
            redis_url,
            log=tmp_path / f"ps{s}.log",
        )
        for s in range(2)
    ]
    client = redis.Redis.from_url(redis_url)
    ps = PSClient(client, trainer_id="test")
    gen = TrafficGenerator(TrafficConfig(seed=5))
    batches = [b for b, _ in gen.samples(ROWS_1 + ROWS_2, MESSAGE_ROWS)]
    stream = concat(batches)
    stream_ids = np.unique(stream.ids)
    first = ROWS_1 // MESSAGE_ROWS
    topic = project_topics["samples"]
    running: Procs = []
    seen: dict[int, LiveModel] = {}
    events: list[VersionEvent] = []

    def trainer(job: str, n: int) -> subprocess.Popen[str]:
        return _cli(
            processes,
            "train",
            "--config",
            str(model_path),
            "--tables",
            str(catalog),
            "--job",
            job,
            "--trainer-id",
            f"t{n}",
            "--mode",
            "async",
            "--batch-rows",
            "256",
            "--json",
            "--redis-url",
            redis_url,
            *connection,
            log=tmp_path / f"t{n}.log",
        )

    def train(job: str, ids: list[int], start: int, stop: int) -> list[dict[str, Any]]:
        """Trainers ``ids`` (group of ``job``) train batches[start:stop]; stopped with
        SIGTERM once the job's global metrics count all of them. Their JSON results."""
        sink = RedisMetricsSink(client, job)

        def trained() -> int:
            counts, _ = sink.global_cumulative()
            return int(counts.summary()["samples"])

        trainers = [trainer(job, n) for n in ids]
        running.extend(trainers)
        _produce(kafka_bootstrap, topic, batches[start:stop], start)
        target = sum(b.num_rows for b in batches[start:stop])
        wait_for(f"{target} samples trained", lambda: trained() >= target, 120, trainers)
        for p in trainers:
            processes.signal(p, signal.SIGTERM)  # a clean stop: push, apply, commit, exit 0
        results = [
            json.loads(_finish(p, tmp_path / f"t{n}.log").strip().splitlines()[-1])
            for p, n in zip(trainers, ids, strict=True)
        ]
        assert trained() == target  # exactly once
        assert sum(r["rows"] for r in results) == target
        return results

    def publish(n: int) -> str:
        log = tmp_path / f"publish{n}.log"
        proc = _cli(
            processes,
            "publish",
            "run",
            "--model",
            str(model_path),
            "--once",
            "--redis-url",
            redis_url,
            *connection,
            log=log,
        )
        return _finish(proc, log)

    try:
        wait_for(
            "shard servers",
            lambda: all(client.exists(f"ps:table:{{{t}}}".encode()) for t in spec.tables()),
            60,
            servers,
        )
        results = train(f"job{unique}", [0, 1], 0, first)
        out_1 = publish(1)
        assert out_1.startswith("version 1 base parent=None"), out_1
        state_1 = _ps_state(ps, spec, stream_ids)

        # Two more trainers train the rest, in a new group that starts where the first
        # stopped. (Rejoining the emptied first group sometimes never got an assignment
        # on the embedded broker: 1 run in 3, 120 s without one.)
        committed = {
            (tp.rsplit(":", 1)[0], int(tp.rsplit(":", 1)[1])): offset
            for r in results
            for tp, offset in r["committed"].items()
        }
        assert committed == {(topic, p): first // PARTITIONS for p in range(PARTITIONS)}
        job_2 = f"job{unique}b"
        settings = KafkaSettings(bootstrap=kafka_bootstrap)
        seek_group(settings, f"{topic_prefix}train.{job_2}", committed)
        train(job_2, [2, 3], first, len(batches))
        out_2 = publish(2)
        assert out_2.startswith("version 2 delta parent=1"), out_2
        state_2 = _ps_state(ps, spec, stream_ids)
        # the second round changed rows and dense parameters, and admitted new ids
        for table in spec.tables():
            assert len(state_2[0][table][0]) > len(state_1[0][table][0]) > 0
        assert any(not np.array_equal(state_1[1][k], v) for k, v in state_2[1].items())

        # a subscriber started after both versions are on the topic
        updates = project_topics["model.updates"]

        def on_version(event: VersionEvent, live: LiveModel | None) -> None:
            events.append(event)
            if live is not None:
                seen[event.version] = live

        sub = Subscriber.connect(settings, updates, spec, on_version=on_version)
        try:
            deadline = time.monotonic() + 60
            while (sub.live is None or sub.live.version < 2) and time.monotonic() < deadline:
                sub.poll(0.5)
        finally:
            sub.close()
        assert [(e.version, e.kind, e.status) for e in events] == [
            (1, "base", "applied"),
            (2, "delta", "applied"),
        ], events
        _assert_live_is(seen[1], state_1)
        _assert_live_is(seen[2], state_2)
        live = seen[2]

        # independently from the raw records, checked against the manifests' sha256
        manifests, carried, rebuilt = _rebuild_from_topic(kafka_bootstrap, updates, spec, 2)
        assert [(m["version"], m["kind"]) for m in manifests] == [(1, "base"), (2, "delta")]
        total = sum(len(ids) for ids, _ in live.tables.values())
        assert carried[0] == sum(len(ids) for ids, _ in seen[1].tables.values())
        assert 0 < carried[1] < total  # the delta carried only what changed
        _assert_live_is(live, rebuilt)

        # pipeline publish export: files whose checksums are those of what the subscriber holds
        export_dir = tmp_path / "v2"
        log = tmp_path / "export.log"
        export = _cli(
            processes,
            "publish",
            "export",
            "--model",
            str(model_path),
            "--version",
            "2",
            "--out",
            str(export_dir),
            *connection,
            log=log,
        )
        port = free_port()
        serve_log = tmp_path / "serve.log"
        serve = _cli(
            processes,
            "serve",
            "--model",
            str(model_path),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *connection,
            log=serve_log,
        )
        running.append(serve)
        _finish(export, log)
        meta, files, dense = load_export(export_dir)  # verifies every file's checksum
        assert meta["version"] == 2 and meta["published"]["kind"] == "delta"
        for table, (ids, weights) in live.tables.items():
            np.testing.assert_array_equal(files[table][0], ids)
            np.testing.assert_array_equal(_bits(files[table][1]), _bits(weights))
            assert meta["files"][f"tables/{table}/ids.npy"]["sha256"] == _npy_sha256(ids)
            assert meta["files"][f"tables/{table}/weights.npy"]["sha256"] == _npy_sha256(weights)
        for name, value in live.dense.items():
            assert meta["files"][f"dense/{name}.npy"]["sha256"] == _npy_sha256(value)
            np.testing.assert_array_equal(_bits(dense[name]), _bits(value))

        # pipeline serve: raw impression features in, the trainer model's predictions out
        wait_for(
            "pipeline serve at version 2",
            lambda: (_health(port) or {}).get("model_version") == 2,
            60,
            [serve],
        )
        impressions = gen.events(REQUEST_ROWS).impressions
        rows: list[dict[str, Any]] = [{"features": imp["features"]} for imp in impressions]
        head = batches[0].slice(0, REQUEST_ROWS)
        for j, imp in enumerate(impressions):  # the raw values of the stream's first rows
            hashed = {s: [hash64(s, v)] for s, v in imp["features"].items()}
            assert hashed == {s: ids.tolist() for s, ids in head.row_features(j).items()}
        extra: list[dict[str, Any]] = [
            {"features": {"user_id": "u-never-seen", "item_id": impressions[0]["item_id"]}},
            {"features": {"device": "mobile", "position": ["0", "1"]}},
            {"features": {}},
        ]
        status, body = _post(port, {"rows": rows + extra})
        assert status == 200, body
        assert body["model_version"] == 2
        got = np.asarray(body["predictions"], np.float64)
        inferencer = Inferencer(spec, ps)
        # the stream's own rows: the ids the trainers trained on, not re-hashed here
        expected = inferencer.score(head)
        extra_batch = from_rows(
            stream.config,
            np.zeros(len(extra)),
            [
                {
                    s: [hash64(s, v) for v in (x if isinstance(x, list) else [x])]
                    for s, x in r["features"].items()
                }
                for r in extra
            ],
            np.zeros(len(extra), np.int64),
        )
        expected = np.concatenate([expected, inferencer.score(extra_batch)])
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
        assert len(np.unique(np.round(expected, 4))) > REQUEST_ROWS // 2  # rows really differ
    finally:
        processes.stop()  # every group, SIGKILL after 30 s (the fixture again at teardown)
