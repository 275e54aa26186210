"""End to end: real broker + Redis + 2 shard-server processes + trainer processes.

Two trainers in one group train DeepFM from a produced stream; a third joins
mid-run (a rebalance). Every produced sample must be trained exactly once (the
global metrics count and the trainers' own counts), every offset committed, and
the global AUC merged through Redis must equal scikit-learn's AUC over all the
trainers' predictions on the same buckets.
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
from confluent_kafka import Consumer, Producer, TopicPartition
from sklearn.metrics import roc_auc_score

from pipeline.codec.samplebatch import encode_batch
from pipeline.ingest.generator import TrafficConfig, TrafficGenerator
from pipeline.train.metrics import bucket_index
from pipeline.train.metrics_sink import RedisMetricsSink
from tests.e2eutil import wait_for, write_specs
from tests.procgroups import ProcessGroups

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.slow]

ROWS = 24_000
MESSAGE_ROWS = 500


def _cli(processes: ProcessGroups, *args: str, log: Path) -> subprocess.Popen[str]:
    return processes.pipeline(
        *args,
        log=log,
        stdout=subprocess.PIPE,
        env={"PIPELINE_KAFKA_SESSION_TIMEOUT_MS": "6000"},
    )


def _produce(bootstrap: str, topic: str, batches: list[Any], partitions: int = 6) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for i, batch in enumerate(batches):
        producer.produce(topic, encode_batch(batch), partition=i % partitions)
    assert producer.flush(30) == 0


def test_three_trainers_train_every_sample_once_and_agree_with_sklearn(
    kafka_bootstrap: str,
    redis_url: str,
    project_topics: dict[str, str],
    topic_prefix: str,
    unique: str,
    tmp_path: Path,
    processes: ProcessGroups,
) -> None:
    catalog, model = write_specs(tmp_path, unique)
    job = f"job{unique}"
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
    trainers: list[subprocess.Popen[str]] = []
    wait_for(
        "shard servers",
        lambda: client.exists(f"ps:table:{{{unique}_deep}}".encode()),
        30,
        servers,
    )

    def trainer(n: int) -> subprocess.Popen[str]:
        return _cli(
            processes,
            "train",
            "--config",
            str(model),
            "--tables",
            str(catalog),
            "--job",
            job,
            "--trainer-id",
            f"t{n}",
            "--batch-rows",
            "256",
            "--json",
            "--predictions-out",
            str(tmp_path / f"t{n}.npz"),
            "--bootstrap",
            kafka_bootstrap,
            "--prefix",
            topic_prefix,
            "--redis-url",
            redis_url,
            log=tmp_path / f"t{n}.log",
        )

    trainers = [trainer(0), trainer(1)]
    gen = TrafficGenerator(TrafficConfig(seed=11))
    batches = [b for b, _ in gen.samples(ROWS, MESSAGE_ROWS)]
    half = len(batches) // 2
    topic = project_topics["samples"]
    _produce(kafka_bootstrap, topic, batches[:half])
    sink = RedisMetricsSink(client, job)

    def trained() -> int:
        counts, _ = sink.global_cumulative()
        return int(counts.summary()["samples"])

    wait_for("first samples trained", lambda: trained() > 0, 60, trainers)
    trainers.append(trainer(2))  # joins mid-run: a rebalance
    joined = tmp_path / "t2.log"
    wait_for(
        "the third trainer's assignment", lambda: "assigned" in joined.read_text(), 60, trainers
    )
    _produce(kafka_bootstrap, topic, batches[half:])
    wait_for("every sample trained", lambda: trained() >= ROWS, 300, trainers)
    time.sleep(2.0)  # would reveal samples trained twice
    results = []
    for p in trainers:
        processes.signal(p, signal.SIGTERM)  # a clean stop: push, apply, commit, exit 0
    for n, p in enumerate(trainers):
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0, (tmp_path / f"t{n}.log").read_text()[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    processes.stop(*servers)
    rows = [r["rows"] for r in results]
    assert sum(rows) == ROWS, rows  # exactly once: no sample lost, none trained twice
    assert all(r > 0 for r in rows), rows  # the late joiner got partitions
    counts, members = sink.global_cumulative()
    assert sorted(members) == ["t0", "t1", "t2"]
    assert int(counts.summary()["samples"]) == ROWS
    # every offset committed by the group
    consumer = Consumer(
        {"bootstrap.servers": kafka_bootstrap, "group.id": f"{topic_prefix}train.{job}"}
    )
    committed = consumer.committed([TopicPartition(topic, p) for p in range(6)], timeout=10)
    consumer.close()
    per_partition = [sum(1 for i in range(len(batches)) if i % 6 == p) for p in range(6)]
    assert [tp.offset for tp in committed] == per_partition
    # global AUC (merged through Redis) == sklearn over every prediction, same buckets
    preds, labels = [], []
    for n in range(3):
        data = np.load(tmp_path / f"t{n}.npz")
        preds.append(data["predictions"])
        labels.append(data["labels"])
    p_all, y_all = np.concatenate(preds), np.concatenate(labels)
    assert len(p_all) == ROWS
    expected = roc_auc_score(y_all, bucket_index(p_all, counts.buckets))
    assert abs(counts.auc() - expected) < 1e-6
    assert expected > 0.6
