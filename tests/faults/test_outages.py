"""Riding out Redis outages: every role keeps going, nothing is lost, nothing is reset.

Each test runs its own ``redis-server`` (no persistence) on its own port, kills it
with SIGKILL mid-run and starts a fresh, empty one on the same port: the worst
Redis restart (all its data gone). The broker is the session's embedded one.

- a push is neither applied twice (a retried entry is recognized) nor lost (the
  client adds again what Redis lost before its shard server applied it);
- a trainer started before its shard server waits for it (and fails clearly when
  it never comes);
- dense parameters after the loss are the snapshot's (a starting trainer) or the
  running trainer's own (written back), never fresh initial values;
- as processes: a trainer, a shard server and a publisher ride out the restart and
  resume by themselves, and a subscriber keeps accepting versions (numbers keep
  increasing, the first after the loss is a base).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from confluent_kafka import Producer

from pipeline.codec.samplebatch import encode_batch
from pipeline.config import KafkaSettings
from pipeline.errors import PipelineError
from pipeline.ingest.generator import SLOTS, TrafficConfig, TrafficGenerator
from pipeline.model.modules import dense_state
from pipeline.model.spec import ModelSpec
from pipeline.ps.client import PSClient, ShardsNotReady
from pipeline.ps.server import ServerOptions, ShardServer
from pipeline.ps.spec import TableSpec
from pipeline.publish.subscriber import Subscriber, VersionEvent
from pipeline.snapshot.coordinator import SnapshotCoordinator
from pipeline.stack import StackError, find_redis_binary, free_port, redis_argv
from pipeline.train.backend import LocalBackend
from pipeline.train.dense_recovery import DenseRecovery
from pipeline.train.metrics_sink import RedisMetricsSink
from pipeline.train.settings import TrainerSettings
from pipeline.train.trainer import Trainer
from tests.e2eutil import wait_for, write_specs
from tests.psservers import catalog_tables

pytestmark = [pytest.mark.faults, pytest.mark.integration]


class RedisProcess:
    """A redis-server without persistence on a fixed port: kill it, start an empty one."""

    def __init__(self, directory: Path) -> None:
        self.binary = find_redis_binary()
        self.directory = directory
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            redis_argv(self.binary, "127.0.0.1", self.port, self.directory),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + 15
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert self.proc.poll() is None, "redis-server exited at start"
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        client.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    try:
        server = RedisProcess(tmp_path)
    except StackError as exc:
        pytest.skip(f"redis-server unavailable: {exc}")
    server.start()
    try:
        yield server
    finally:
        server.kill()


class Procs:
    """``pipeline`` processes of a test, each in its own process group; all killed at the
    end whatever happened (a failed test leaves nothing running)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.running: list[subprocess.Popen[str]] = []

    def cli(self, name: str, *args: str, env: dict[str, str] | None = None) -> Any:
        log = self.directory / f"{name}.log"
        with log.with_suffix(".out").open("w") as out, log.open("w") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "pipeline.cli", "--log-level", "info", *args],
                stdout=out,
                stderr=err,
                text=True,
                start_new_session=True,
                env={**os.environ, "PIPELINE_KAFKA_SESSION_TIMEOUT_MS": "6000", **(env or {})},
            )
        self.running.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.directory / f"{name}.log").read_text()

    def kill_all(self) -> None:
        for proc in self.running:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    owned = Procs(tmp_path)
    try:
        yield owned
    finally:
        owned.kill_all()


class ServerThread:
    """One shard server in a thread of the test (restartable on the same table)."""

    def __init__(self, url: str, specs: list[TableSpec]) -> None:
        self.server = ShardServer(
            redis.Redis.from_url(url), specs, 0, 1, ServerOptions(block_ms=20)
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> ServerThread:
        self._stop = threading.Event()
        self.server.ready.clear()
        self._thread = threading.Thread(target=self.server.run, args=(self._stop,), daemon=True)
        self._thread.start()
        assert self.server.ready.wait(20), "shard server did not start"
        return self

    def pause(self) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(20)
        assert not self._thread.is_alive()


def _model(unique: str) -> ModelSpec:
    return ModelSpec(
        name=f"m_{unique}",
        kind="deepfm",
        slots=SLOTS,
        dense_dim=0,
        wide_table=f"{unique}_wide",
        deep_table=f"{unique}_deep",
        deep_dim=16,
        hidden=(32, 16),
    )


def test_a_push_is_never_applied_twice_nor_lost_when_redis_loses_its_data(
    own_redis: RedisProcess, unique: str
) -> None:
    spec = catalog_tables(unique)[f"{unique}_deep"]
    name = spec.name
    server = ServerThread(own_redis.url, [spec]).start()
    ps = PSClient(redis.Redis.from_url(own_redis.url), trainer_id="t0", max_inflight=8)
    reference = LocalBackend([spec])  # every push applied exactly once
    rng = np.random.default_rng(7)
    ids = np.unique(rng.integers(1, 2**63, 300, dtype=np.uint64))
    # shows high enough that every row is admitted (weights move, not only statistics)
    shows = np.full(len(ids), 3.0, np.float32)

    def push() -> Any:
        grads = rng.normal(0, 1, (len(ids), spec.dim)).astype(np.float32)
        reference.push(name, ids, grads, shows, np.zeros(len(ids), np.float32))
        return ps.push(name, ids, grads, shows, np.zeros(len(ids), np.float32))

    first = push()
    ps.wait_applied(first, 20)
    # a retry of the same push (its reply lost) is recognized: no second entry
    stream = ps.keys(name, 0).stream
    length = ps.redis.xlen(stream)
    entry = first.entries[0]
    ps._add(first, [0])
    assert first.entries[0] == entry
    assert ps.redis.xlen(stream) == length

    server.pause()  # two pushes wait in the stream, unapplied ...
    pending = [push(), push()]
    own_redis.kill()  # ... when Redis dies and comes back empty
    own_redis.start()
    server.start()  # rebuilds from its table (which holds the first push only)
    ps.flush(60)
    for receipt in pending:
        assert ps.is_applied(receipt)
    assert ps.recovered_entries == 2  # the two lost ones, not the applied one

    found, weights = server.server.table(name).lookup(ids)
    want_found, want = reference.tables[name].lookup(ids)
    np.testing.assert_array_equal(found, want_found)
    np.testing.assert_array_equal(weights, want)  # each push applied exactly once
    server.pause()


def test_a_pull_waits_for_a_rebuilt_pull_view_instead_of_reading_zeros(
    own_redis: RedisProcess, unique: str
) -> None:
    spec = catalog_tables(unique)[f"{unique}_deep"]
    name = spec.name
    server = ServerThread(own_redis.url, [spec]).start()
    ps = PSClient(redis.Redis.from_url(own_redis.url), trainer_id="t0", ready_timeout_s=60)
    rng = np.random.default_rng(11)
    ids = np.unique(rng.integers(1, 2**63, 200, dtype=np.uint64))
    grads = rng.normal(0, 1, (len(ids), spec.dim)).astype(np.float32)
    shows = np.full(len(ids), 20.0, np.float32)  # score 2 >= 1: admitted, in the pull view
    ps.wait_applied(ps.push(name, ids, grads, shows, np.zeros(len(ids), np.float32)), 20)
    before, found = ps.pull(name, ids)
    assert found.all() and np.abs(before).sum() > 0

    server.pause()
    own_redis.kill()  # Redis comes back empty: no pull view until the server rebuilds it
    own_redis.start()
    pulled: list[tuple[np.ndarray, np.ndarray]] = []
    puller = threading.Thread(target=lambda: pulled.append(ps.pull(name, ids)), daemon=True)
    puller.start()
    puller.join(1.0)
    # the server is paused: nothing can publish a view, so the pull must still be waiting
    assert puller.is_alive() and not pulled, "pull returned zeros from a lost pull view"
    server.start()  # rebuilds the view from its table
    puller.join(30)
    assert pulled, "pull did not return after the pull view was rebuilt"
    after, found_after = pulled[0]
    assert found_after.all()
    np.testing.assert_array_equal(after, before)
    server.pause()


def test_a_trainer_waits_for_its_shard_servers_then_fails_clearly(
    own_redis: RedisProcess, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    spec = catalog_tables(unique)[f"{unique}_wide"]
    client = redis.Redis.from_url(own_redis.url)
    with pytest.raises(ShardsNotReady, match="no shard server has registered it within"):
        PSClient(client, ready_timeout_s=0.5).route(spec.name)

    started: list[ServerThread] = []
    later = threading.Timer(
        1.0, lambda: started.append(ServerThread(own_redis.url, [spec]).start())
    )
    later.start()
    try:
        with caplog.at_level(logging.WARNING, logger="pipeline.ps.client"):
            route = PSClient(client, ready_timeout_s=60).route(spec.name)
        assert route.shards == 1
        assert "waiting up to 60 s for its shard servers" in caplog.text
    finally:
        later.join()
        for thread in started:
            thread.pause()


def test_dense_parameters_survive_a_redis_loss(
    own_redis: RedisProcess, unique: str, tmp_path: Path
) -> None:
    tables = catalog_tables(unique)
    model = _model(unique)
    server = ServerThread(own_redis.url, list(tables.values())).start()
    settings = TrainerSettings(device="cpu")

    def trainer(trainer_id: str, snapshot_dir: Path | None, wait_s: float) -> Trainer:
        ps = PSClient(
            redis.Redis.from_url(own_redis.url), trainer_id=trainer_id, ready_timeout_s=30
        )
        t = Trainer(model, tables, ps, settings, trainer_id=trainer_id)
        t.dense.recover = DenseRecovery(ps, t, snapshot_dir, wait_s, poll_s=0.1)
        return t

    first = trainer("t1", None, 1.0)
    first.start()  # a new model: initial values
    initial = dense_state(first.model)
    ps: Any = first.backend
    name = first.dense.name
    ids = np.arange(1, 200, dtype=np.uint64)
    ps.wait_applied(ps.push(f"{unique}_wide", ids, np.ones((len(ids), 1), np.float32)), 20)
    trained = {k: v + 0.25 for k, v in initial.items()}  # the model moved on
    ps.push_dense(name, trained, expected_version=first.dense.version)
    snapshots = tmp_path / "snapshots"
    SnapshotCoordinator(ps.redis, snapshots, list(tables), [name], name=f"s{unique}").take()

    own_redis.kill()
    own_redis.start()  # empty: no dense table, no registry until the server rebuilds

    second = trainer("t2", snapshots, 5.0)
    second.start()
    source = getattr(second.dense.recover, "source", None)
    assert source is not None and source.startswith("snapshot"), source
    version, tensors = second.backend.pull_dense(name)
    assert version > 0
    for key, value in trained.items():
        np.testing.assert_array_equal(tensors[key], value)
        np.testing.assert_array_equal(dense_state(second.model)[key], value)

    # the dense table vanishes again: a running trainer writes its own values back
    redis.Redis.from_url(own_redis.url).flushall()
    server.pause()
    server.start()
    mine = {k: v + 1.0 for k, v in dense_state(second.model).items()}
    from pipeline.model.modules import load_dense_state

    load_dense_state(second.model, mine)
    second.dense.sync()
    assert second.dense.reseeds == 1
    _, tensors = second.backend.pull_dense(name)
    for key, value in mine.items():
        np.testing.assert_array_equal(tensors[key], value)

    # a starting trainer without a snapshot never re-initializes a model that exists
    redis.Redis.from_url(own_redis.url).delete(f"dense:{{{name}}}")
    third = trainer("t3", None, 0.5)
    with pytest.raises(PipelineError, match="is gone .* while the model exists"):
        third.start()
    assert second.backend.pull_dense(name)[0] == 0  # nothing was written
    server.pause()


def _produce(bootstrap: str, topic: str, rows: int, seed: int) -> int:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    gen = TrafficGenerator(TrafficConfig(seed=seed))
    total = 0
    for i, (batch, _) in enumerate(gen.samples(rows, 250)):
        producer.produce(topic, encode_batch(batch), partition=i % 2)
        total += batch.num_rows
    assert producer.flush(30) == 0
    return total


@pytest.mark.e2e
@pytest.mark.slow
def test_roles_ride_out_a_redis_restart_and_serving_moves_on(
    own_redis: RedisProcess,
    procs: Procs,
    kafka_bootstrap: str,
    project_topics: dict[str, str],
    topic_prefix: str,
    unique: str,
    tmp_path: Path,
) -> None:
    catalog, model_path = write_specs(tmp_path, unique)
    spec = ModelSpec.from_yaml(str(model_path))
    url = own_redis.url
    kafka = ["--bootstrap", kafka_bootstrap, "--prefix", topic_prefix]
    job = f"j{unique}"
    # the trainer starts before its shard server: it waits
    trainer = procs.cli(
        "train",
        "train",
        "--config",
        str(model_path),
        "--tables",
        str(catalog),
        "--job",
        job,
        "--trainer-id",
        "t0",
        "--json",
        "--redis-url",
        url,
        *kafka,
        env={"PIPELINE_TRAIN_PS_WAIT_S": "120"},
    )
    wait_for("the trainer to wait", lambda: "waiting up to" in procs.log("train"), 60, [trainer])
    server = procs.cli(
        "ps", "ps", "--shard", "0", "--shards", "1", "--tables", str(catalog), "--redis-url", url
    )
    publisher = procs.cli(
        "publish",
        "publish",
        "run",
        "--model",
        str(model_path),
        "--interval",
        "2",
        "--redis-url",
        url,
        *kafka,
    )
    roles = [trainer, server, publisher]

    events: list[VersionEvent] = []
    subscriber = Subscriber.connect(
        KafkaSettings(bootstrap=kafka_bootstrap), project_topics["model.updates"], spec
    )
    stop = threading.Event()

    def follow() -> None:
        while not stop.is_set():
            events.extend(subscriber.poll(0.2))

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    sink = RedisMetricsSink(redis.Redis.from_url(url), job)

    def trained() -> int:
        try:
            return int(sink.global_cumulative()[0].summary()["samples"])
        except redis.ConnectionError:
            return 0

    def applied() -> list[VersionEvent]:
        return [e for e in list(events) if e.status == "applied"]

    try:
        first = _produce(kafka_bootstrap, project_topics["samples"], 3_000, seed=1)
        wait_for(f"{first} samples trained", lambda: trained() >= first, 180, roles)
        wait_for("a version with them", lambda: len(applied()) >= 2, 120, roles)
        before = applied()[-1].version

        own_redis.kill()
        for name in ("train", "publish"):
            wait_for(f"{name} to notice", lambda n=name: "unreachable" in procs.log(n), 60, roles)
        own_redis.start()  # empty

        second = _produce(kafka_bootstrap, project_topics["samples"], 2_000, seed=2)
        wait_for("all samples trained", lambda: trained() >= first + second, 180, roles)
        wait_for(
            "the publisher to number on from the topic",
            lambda: "continuing after version" in procs.log("publish"),
            180,
            roles,
        )
        found = re.search(r"continuing after version (\d+)", procs.log("publish"))
        assert found is not None
        resumed = int(found.group(1))
        assert resumed >= before  # numbering did not start again at 1
        wait_for(
            "a version after the restart",
            lambda: any(e.version > resumed for e in applied()),
            180,
            roles,
        )
    finally:
        stop.set()
        follower.join(10)
        subscriber.close()

    assert all(p.poll() is None for p in roles), "a role exited"
    assert [e for e in events if e.status == "rejected"] == []
    versions = [e.version for e in applied()]
    assert versions == sorted(set(versions))  # strictly increasing
    after = [e for e in applied() if e.version > resumed]
    assert after[0].kind == "base"  # no delta on a parent Redis forgot
    for name in ("train", "publish", "ps"):
        assert "back after" in procs.log(name), name
    assert "writing this trainer's parameters back" in procs.log("train")

    os.killpg(trainer.pid, signal.SIGTERM)
    assert trainer.wait(60) == 0, procs.log("train")[-3000:]
    result = json.loads((tmp_path / "train.out").read_text().strip().splitlines()[-1])
    assert result["rows"] == first + second
