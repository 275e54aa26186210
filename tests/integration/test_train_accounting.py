"""Exact accounting of a trainer role (Kafka + shard servers + Redis metrics, in process).

An idle trainer commits every pass once its pushes are applied, so the group's lag
reaches 0 after the data ends (it used to keep the last pass uncommitted until more
data came). A trainer restarted with the same id continues its cumulative metrics
instead of overwriting them with its new counts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from confluent_kafka import Consumer, Producer, TopicPartition

from pipeline.codec.samplebatch import encode_batch
from pipeline.config import KafkaSettings, RedisSettings
from pipeline.ingest.generator import TrafficConfig, TrafficGenerator
from pipeline.model.spec import ModelSpec
from pipeline.ps.catalog import load_catalog
from pipeline.ps.server import ServerOptions
from pipeline.train.metrics_sink import RedisMetricsSink
from pipeline.train.runner import TrainerRole
from pipeline.train.settings import TrainerSettings
from pipeline.train.trainer import TrainResult
from tests.e2eutil import write_specs
from tests.psservers import shard_servers

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MESSAGE_ROWS = 300  # not a multiple of the step: the last step of a burst is partial


def _produce(bootstrap: str, topic: str, batches: list[Any], start: int = 0) -> None:
    """Message ``start + i`` to partition ``(start + i) % 2``."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for i, batch in enumerate(batches, start):
        producer.produce(topic, encode_batch(batch), partition=i % 2)
    assert producer.flush(30) == 0


def _committed(bootstrap: str, group: str, topic: str) -> list[int]:
    """The group's committed offset of partitions 0 and 1 of ``topic`` (0: none yet)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        tps = consumer.committed([TopicPartition(topic, p) for p in range(2)], timeout=10)
        return [max(tp.offset, 0) for tp in tps]
    finally:
        consumer.close()


@contextmanager
def _running(role: TrainerRole) -> Iterator[tuple[threading.Event, list[TrainResult]]]:
    """The role in a thread until the block ends (then stopped: push, apply, commit)."""
    stop, results, errors = threading.Event(), list[TrainResult](), list[BaseException]()

    def run() -> None:
        try:
            results.append(role.run(stop=stop, progress=None))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield stop, results
    finally:
        stop.set()
        thread.join(60)
    assert not thread.is_alive(), "the trainer did not stop within 60 s"
    assert not errors, errors


def _wait_committed(bootstrap: str, group: str, topic: str, messages: int) -> None:
    """Poll until the group committed all ``messages`` produced by :func:`_produce`."""
    want = [len(range(p, messages, 2)) for p in range(2)]
    deadline = time.monotonic() + 90
    while (got := _committed(bootstrap, group, topic)) != want:
        assert time.monotonic() < deadline, f"committed {got}, produced {want}: lag stays"
        time.sleep(0.5)


def test_idle_trainer_commits_everything_and_a_restart_resumes_its_metrics(
    kafka_bootstrap: str,
    redis_url: str,
    project_topics: dict[str, str],
    topic_prefix: str,
    unique: str,
    tmp_path: Path,
) -> None:
    catalog, model = write_specs(tmp_path, unique)
    job = f"job{unique}"
    # async steps from the first row (the young, synchronous steps commit as they go)
    settings = TrainerSettings(
        job=job,
        tables=str(catalog),
        trainer_id="t0",
        device="cpu",
        batch_rows=256,
        young_batch_rows=256,
        sync_below_rows=0,
    )
    role = TrainerRole(
        settings=settings,
        kafka=KafkaSettings(bootstrap=kafka_bootstrap),
        redis=RedisSettings(url=redis_url),
        prefix=topic_prefix,
        spec=ModelSpec.from_yaml(model),
    )
    topic, group = project_topics["samples"], f"{topic_prefix}train.{job}"
    gen = TrafficGenerator(TrafficConfig(seed=5))
    batches = [b for b, _ in gen.samples(6000, MESSAGE_ROWS)]
    first, second = batches[:7], batches[7:]
    sink = RedisMetricsSink(redis.Redis.from_url(redis_url), job)
    with shard_servers(redis_url, load_catalog(catalog), options=ServerOptions(block_ms=5)):
        with _running(role) as (_, results):
            _produce(kafka_bootstrap, topic, first)
            _wait_committed(kafka_bootstrap, group, topic, len(first))  # idle: all committed
        rows_before = results[0].rows
        assert rows_before == len(first) * MESSAGE_ROWS
        assert sink.load("t0").count == rows_before  # type: ignore[union-attr]
        with _running(role) as (_, results):  # restarted with the same id
            _produce(kafka_bootstrap, topic, second, start=len(first))
            _wait_committed(kafka_bootstrap, group, topic, len(batches))
        assert results[0].rows == len(second) * MESSAGE_ROWS  # nothing trained twice
    counts = sink.load("t0")
    assert counts is not None
    assert int(counts.count) == len(batches) * MESSAGE_ROWS  # resumed, not overwritten
    total, members = sink.global_cumulative()
    assert members == ["t0"] and int(total.count) == len(batches) * MESSAGE_ROWS
