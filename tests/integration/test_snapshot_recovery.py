"""Recovery from a trainer-cut snapshot: train part of a Kafka stream (sync mode, one
trainer, two shard servers), snapshot with the trainer placing the barriers, train on,
lose the servers and the trainer, restore the shards, resume the trainer at the
snapshot's offsets, train to the end: the model equals an uninterrupted run, and the
rows trained around the cut add up to the stream exactly (nothing skipped or repeated)."""

from __future__ import annotations

import functools
import threading
import time
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import pytest
import redis
from confluent_kafka import Producer

from pipeline.codec.samplebatch import encode_batch
from pipeline.codec.slots import SlotConfig
from pipeline.config import KafkaSettings
from pipeline.ingest.generator import SLOTS, TrafficConfig, TrafficGenerator
from pipeline.model.modules import dense_state
from pipeline.model.spec import ModelSpec
from pipeline.ps.client import PSClient
from pipeline.ps.dense import pull_dense
from pipeline.ps.export import RowBatch
from pipeline.ps.server import ServerOptions, ShardServer
from pipeline.ps.spec import TableSpec
from pipeline.snapshot.coordinator import SnapshotCoordinator
from pipeline.snapshot.layout import SnapshotError, list_snapshots, load_snapshot
from pipeline.snapshot.participant import SnapshotParticipant
from pipeline.snapshot.protocol import live_key, open_key, request_key
from pipeline.snapshot.restore import restore_dense, restore_trainer
from pipeline.train.dataset import QueueDataset
from pipeline.train.resume import seek_group
from pipeline.train.settings import TrainerSettings
from pipeline.train.trainer import Trainer
from tests.psservers import catalog_tables, shard_servers

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SHARDS = 2
MESSAGE_ROWS = 128  # two training batches per message: the trainer must wait for a boundary
BATCH_ROWS = 64
MESSAGES = 16
TOTAL = MESSAGE_ROWS * MESSAGES
# every column but last_seen (wall-clock time of the push)
COLUMNS = ("ids", "weights", "opt_state", "show", "click", "admitted")


def _servers(
    url: str, specs: list[TableSpec], restore: Path | None = None
) -> AbstractContextManager[list[ShardServer]]:
    options = ServerOptions(block_ms=5, restore=restore)
    return shard_servers(url, specs, SHARDS, options=options, wait_ready=True)


def _model(tag: str) -> ModelSpec:
    return ModelSpec(
        name=f"m_{tag}",
        kind="deepfm",
        slots=SLOTS,
        dense_dim=0,
        wide_table=f"{tag}_wide",
        deep_table=f"{tag}_deep",
        deep_dim=16,
        hidden=(16,),
        linear_lr=0.05,  # two dense optimizers (Adagrad + Adam): both states must survive
    )


def _state(running: list[ShardServer], table: str) -> list[dict[str, np.ndarray]]:
    out = []
    for server in running:
        batches: list[RowBatch] = list(server.table(table).export_rows())
        cols = {c: np.concatenate([getattr(b, c) for b in batches]) for c in COLUMNS}
        order = np.argsort(cols["ids"])
        out.append({c: v[order] for c, v in cols.items()})
    return out


class _Job:
    """One training job over the shared topic: its tables, model, consumer group."""

    def __init__(self, url: str, kafka: KafkaSettings, topic: str, tag: str) -> None:
        self.url, self.kafka, self.topic = url, kafka, topic
        self.tables = catalog_tables(tag)
        self.spec = _model(tag)
        self.group = f"g_{tag}"
        self.r = redis.Redis.from_url(url)

    def dataset(self) -> QueueDataset:
        ds = QueueDataset(
            self.kafka, self.topic, self.group, SlotConfig(SLOTS), BATCH_ROWS, dlq=None
        )
        ds.start()
        return ds

    def trainer(self, ds: QueueDataset, trainer_id: str = "t1") -> Trainer:
        settings = TrainerSettings(
            device="cpu", mode="sync", batch_rows=BATCH_ROWS, dense_sync_steps=5
        )
        ps = PSClient(redis.Redis.from_url(self.url), trainer_id=trainer_id)
        return Trainer(
            self.spec,
            self.tables,
            ps,
            settings,
            trainer_id=trainer_id,
            commit=functools.partial(ds.commit, wait=False),
        )

    def final(
        self, running: list[ShardServer], trainer: Trainer
    ) -> tuple[dict[str, list[dict[str, np.ndarray]]], dict[str, np.ndarray]]:
        return {name: _state(running, name) for name in self.tables}, dense_state(trainer.model)


def _produce(bootstrap: str, topic: str) -> None:
    gen = TrafficGenerator(TrafficConfig(seed=11))
    producer = Producer({"bootstrap.servers": bootstrap})
    for batch, _ in gen.samples(TOTAL, MESSAGE_ROWS):
        assert batch.num_rows == MESSAGE_ROWS
        producer.produce(topic, encode_batch(batch), partition=0)
    assert producer.flush(30) == 0


def test_resume_from_a_trainer_cut_equals_the_uninterrupted_run(
    kafka_bootstrap: str,
    redis_url: str,
    project_topics: dict[str, str],
    unique: str,
    tmp_path: Path,
) -> None:
    topic = project_topics["samples"]
    _produce(kafka_bootstrap, topic)
    kafka = KafkaSettings(bootstrap=kafka_bootstrap)

    # the uninterrupted run
    ref = _Job(redis_url, kafka, topic, f"r{unique}")
    with _servers(redis_url, list(ref.tables.values())) as running:
        ds = ref.dataset()
        trainer = ref.trainer(ds)
        try:
            got = trainer.run(ds, max_rows=TOTAL, idle_timeout_s=30)
        finally:
            trainer.close()
            ds.close()
        assert got.rows == TOTAL
        ref_tables, ref_dense = ref.final(running, trainer)

    # train part of the stream; snapshot while the trainer runs; train on; lose it all
    job = _Job(redis_url, kafka, topic, f"j{unique}")
    job_name = f"job{unique}"
    snaps = tmp_path / "snaps"
    with _servers(redis_url, list(job.tables.values())):
        ds = job.dataset()
        trainer = job.trainer(ds)
        participant = SnapshotParticipant(job.r, job_name, "t1")
        trainer.participant = participant
        stop_at = TOTAL * 3 // 4
        done = threading.Thread(
            target=trainer.run, args=(ds,), kwargs={"max_rows": stop_at, "idle_timeout_s": 30}
        )
        done.start()
        deadline = time.monotonic() + 60
        while trainer.result.rows < TOTAL // 4:
            assert time.monotonic() < deadline and done.is_alive(), "trainer made no progress"
            time.sleep(0.01)
        coordinator = SnapshotCoordinator(
            job.r,
            snaps,
            list(job.tables),
            [job.spec.dense_table_name()],
            job=job_name,
            ack_timeout_s=30,
        )
        assert coordinator.live_trainers() == ["t1"]
        taken = coordinator.take()
        coordinator.release()
        done.join(60)
        assert not done.is_alive()
        assert trainer.result.rows == stop_at  # trained past the cut: that work is lost
        participant.leave()
        assert job.r.zscore(live_key(job_name), "t1") is None
        trainer.close()
        ds.close()
    assert participant.joined == [taken.id]

    snap = load_snapshot(taken.path, full=True)
    cut = snap.offsets()
    assert list(cut) == [(topic, 0)]
    messages_before = cut[(topic, 0)]
    info = snap.manifest["trainers"]["t1"]
    # the cut is at a message boundary and holds exactly the rows of the messages before it
    assert info["rows"] == messages_before * MESSAGE_ROWS
    assert 0 < info["rows"] < stop_at
    for table in job.tables:
        for part in snap.manifest["tables"][table]["parts"].values():
            assert part["offsets"] == {topic: {"0": messages_before}}

    # restore the shards and the dense table, resume the trainer at the snapshot offsets
    restore_dense(job.r, snap)
    seek_group(kafka, job.group, cut)
    with _servers(redis_url, list(job.tables.values()), restore=snap.path) as running:
        ds = job.dataset()
        trainer = job.trainer(ds)
        assert restore_trainer(trainer, snap)
        try:
            got = trainer.run(ds, max_rows=TOTAL - info["rows"], idle_timeout_s=30)
        finally:
            trainer.close()
            ds.close()
        # every row after the cut trained once: none skipped, none repeated
        assert got.rows == TOTAL - info["rows"]
        assert trainer.committed == {(topic, 0): MESSAGES}
        tables, dense = job.final(running, trainer)
        _, shared = pull_dense(job.r, job.spec.dense_table_name())

    for (name, parts), ref_parts in zip(tables.items(), ref_tables.values(), strict=True):
        for got_part, want_part in zip(parts, ref_parts, strict=True):
            assert len(got_part["ids"]) > 0
            for column in COLUMNS:
                # sync mode, one trainer: bit for bit
                np.testing.assert_array_equal(
                    got_part[column], want_part[column], err_msg=name + column
                )
    assert dense.keys() == ref_dense.keys()
    for key, value in ref_dense.items():
        np.testing.assert_array_equal(dense[key], value, err_msg=key)
        np.testing.assert_array_equal(shared[key], dense[key])


def test_a_live_trainer_that_never_joins_aborts_the_cut(
    redis_url: str, unique: str, tmp_path: Path
) -> None:
    tables = catalog_tables(f"a{unique}")
    r = redis.Redis.from_url(redis_url)
    job_name = f"job{unique}"
    SnapshotParticipant(r, job_name, "stuck").heartbeat()  # live, but never polls
    with _servers(redis_url, list(tables.values())):
        coordinator = SnapshotCoordinator(
            r, tmp_path / "snaps", list(tables), job=job_name, ack_timeout_s=1.0
        )
        assert coordinator.live_trainers() == ["stuck"]
        with pytest.raises(SnapshotError, match=r"trainers \['stuck'\] did not join"):
            coordinator.take()
        coordinator.release()
    assert list_snapshots(tmp_path / "snaps") == []
    assert not list((tmp_path / "snaps").iterdir())
    assert r.get(open_key(job_name)) is None
    assert not r.keys(request_key("*"))
    # an expired heartbeat is not live: the coordinator alone cuts then
    r.zadd(live_key(job_name), {"stuck": 1})
    assert coordinator.live_trainers() == []
