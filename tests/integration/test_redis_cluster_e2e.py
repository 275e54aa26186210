"""End to end on a local 3-master Redis Cluster: every role a process, none on one node.

Two ``pipeline ps`` shard servers, two ``pipeline train`` processes (one job), a
``pipeline snapshot run --once --job`` taken while the trainers run (they place the
barriers), ``pipeline publish run --once``, ``pipeline metrics show`` and a
subscriber, all with ``PIPELINE_REDIS_CLUSTER=1`` and ``--redis-url`` pointing at one
node of the cluster (tests/rediscluster.py). Checked: the trainers trained every
produced row exactly once (their results, the job's merged metrics, ``metrics show``);
the snapshot is complete (every checksum, both trainers, every shard of every table,
the dense table, offsets at the end of the stream, rows as the shard servers hold);
the published base, applied by the subscriber, is bit-identical to the pull view and
the dense table; and the keys really are spread over the three nodes.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from confluent_kafka import Producer
from redis.cluster import RedisCluster

from pipeline.codec.samplebatch import concat, encode_batch
from pipeline.config import KafkaSettings
from pipeline.ingest.generator import TrafficConfig, TrafficGenerator
from pipeline.model.spec import ModelSpec
from pipeline.ps.client import PSClient
from pipeline.ps.keys import ShardKeys
from pipeline.publish.subscriber import LiveModel, Subscriber, VersionEvent
from pipeline.snapshot.layout import list_snapshots, load_snapshot
from pipeline.train.metrics_sink import RedisMetricsSink
from tests.e2eutil import finish, role, stop_all, wait_for, write_specs

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.slow]

ROWS = 6_000
MESSAGE_ROWS = 500
PARTITIONS = 6
CLUSTER_ENV = {"PIPELINE_REDIS_CLUSTER": "1"}


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def test_every_role_on_a_redis_cluster(
    kafka_bootstrap: str,
    redis_cluster_url: str,
    project_topics: dict[str, str],
    topic_prefix: str,
    unique: str,
    tmp_path: Path,
) -> None:
    catalog, model_path = write_specs(tmp_path, unique, serving={"fp16": False, "min_score": 0.0})
    spec = ModelSpec.from_yaml(str(model_path))
    job = f"job{unique}"
    kafka = ["--bootstrap", kafka_bootstrap, "--prefix", topic_prefix]
    on_cluster = ["--redis-url", redis_cluster_url]
    client: Any = RedisCluster.from_url(redis_cluster_url)
    ps = PSClient(client, trainer_id="test")
    sink = RedisMetricsSink(client, job)
    gen = TrafficGenerator(TrafficConfig(seed=11))
    batches = [b for b, _ in gen.samples(ROWS, MESSAGE_ROWS)]
    stream_ids = np.unique(concat(batches).ids)
    topic = project_topics["samples"]
    snaps = tmp_path / "snapshots"
    procs: list[subprocess.Popen[str]] = []

    def start(name: str, *args: str) -> subprocess.Popen[str]:
        proc = role(*args, log=tmp_path / f"{name}.log", env=CLUSTER_ENV)
        procs.append(proc)
        return proc

    def once(name: str, *args: str) -> str:
        return finish(start(name, *args), tmp_path / f"{name}.log", timeout=120)

    def trained() -> int:
        return int(sink.global_cumulative()[0].count)

    try:
        servers = [
            start(
                f"ps{s}",
                *("ps", "--shard", str(s), "--shards", "2", "--tables", str(catalog)),
                *on_cluster,
            )
            for s in range(2)
        ]
        wait_for(
            "shard servers",
            lambda: all(
                client.hexists(ShardKeys(t, s).meta, b"applied")
                for t in spec.tables()
                for s in range(2)
            ),
            60,
            servers,
        )
        trainers = [
            start(
                f"t{n}",
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
                "--json",
                *on_cluster,
                *kafka,
            )
            for n in range(2)
        ]
        producer = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 5})
        for i, batch in enumerate(batches):
            producer.produce(topic, encode_batch(batch), partition=i % PARTITIONS)
        assert producer.flush(30) == 0
        wait_for(f"{ROWS} samples trained", lambda: trained() >= ROWS, 180, trainers + servers)

        # a snapshot cut at the live trainers' barriers
        out = once(
            "snapshot",
            "snapshot",
            "run",
            "--once",
            "--dir",
            str(snaps),
            "--tables",
            str(catalog),
            "--dense",
            spec.dense_table_name(),
            "--job",
            job,
            "--timeout",
            "90",
            *on_cluster,
        )
        assert out.startswith("snapshot "), out

        for proc in trainers:  # a clean stop: push, wait applied, commit, exit 0
            proc.send_signal(signal.SIGTERM)
        results = [
            json.loads(finish(p, tmp_path / f"t{n}.log").strip().splitlines()[-1])
            for n, p in enumerate(trainers)
        ]
        assert sum(r["rows"] for r in results) == ROWS
        assert trained() == ROWS  # exactly once

        # pipeline metrics show, from the cluster
        report = json.loads(once("metrics", "metrics", "show", "--job", job, "--json", *on_cluster))
        assert report["global"]["samples"] == ROWS
        assert sorted(report["trainers"]) == ["t0", "t1"]
        assert sum(t["samples"] for t in report["trainers"].values()) == ROWS

        # the snapshot: complete, verified, cut after every trained row
        [snap_info] = list_snapshots(snaps)
        snap = load_snapshot(snap_info.path, full=True)  # every checksum
        assert snap.trainers() == ["t0", "t1"]
        assert set(snap.manifest["dense"]) == {spec.dense_table_name()}
        per_partition = ROWS // MESSAGE_ROWS // PARTITIONS
        assert snap.offsets() == {(topic, p): per_partition for p in range(PARTITIONS)}
        for table in spec.tables():
            info = snap.manifest["tables"][table]
            assert info["shards"] == 2 and sorted(info["parts"]) == ["0", "1"]
            held = sum(int(client.hget(ShardKeys(table, s).meta, b"rows")) for s in range(2))
            saved = sum(part["rows"] for part in info["parts"].values())
            assert saved == held > 0, table

        # a published base, applied by a subscriber, equal to the PS
        out = once(
            "publish", "publish", "run", "--model", str(model_path), "--once", *on_cluster, *kafka
        )
        assert out.startswith("version 1 base parent=None"), out
        seen: dict[int, LiveModel] = {}
        events: list[VersionEvent] = []

        def on_version(event: VersionEvent, live: LiveModel | None) -> None:
            events.append(event)
            if live is not None:
                seen[event.version] = live

        settings = KafkaSettings(bootstrap=kafka_bootstrap)
        sub = Subscriber.connect(
            settings, project_topics["model.updates"], spec, on_version=on_version
        )
        try:
            deadline = time.monotonic() + 60
            while 1 not in seen and time.monotonic() < deadline:
                sub.poll(0.5)
        finally:
            sub.close()
        assert [(e.version, e.kind, e.status) for e in events] == [(1, "base", "applied")]
        live = seen[1]
        for table in spec.tables():
            weights, found = ps.pull(table, stream_ids)
            assert found.sum() > 0
            got_ids, got_w = live.tables[table]
            np.testing.assert_array_equal(got_ids, stream_ids[found])
            np.testing.assert_array_equal(_bits(got_w), _bits(weights[found]))
        version, dense = ps.pull_dense(spec.dense_table_name())
        assert version > 0 and set(live.dense) == set(dense)
        for name, value in dense.items():
            np.testing.assert_array_equal(_bits(live.dense[name]), _bits(value))

        # the roles' keys live on every node, not on one
        nodes = [redis.Redis(host=n.host, port=n.port) for n in client.get_primaries()]
        assert len(nodes) == 3
        assert all(node.dbsize() > 0 for node in nodes)
    finally:
        stop_all(procs)
        client.close()
