"""The trainer against real shard servers (Redis streams, pull view) vs the in-process reference."""

from __future__ import annotations

import dataclasses
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from sklearn.metrics import roc_auc_score

from pipeline.ingest.adapters import open_dataset
from pipeline.ingest.generator import SLOTS, TrafficConfig, TrafficGenerator
from pipeline.model.spec import ModelSpec
from pipeline.ps.client import PSClient
from pipeline.ps.server import ServerOptions, ShardServer
from pipeline.ps.spec import TableSpec
from pipeline.train.backend import LocalBackend
from pipeline.train.batching import TrainBatch
from pipeline.train.settings import TrainerSettings
from pipeline.train.trainer import IterSource, Trainer
from tests.psservers import catalog_tables, shard_servers

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _spec(unique: str, kind: str = "deepfm") -> ModelSpec:
    return ModelSpec(
        name=f"m_{unique}",
        kind=kind,
        slots=SLOTS,
        dense_dim=0,
        wide_table=f"{unique}_wide",
        deep_table=f"{unique}_deep",
        deep_dim=16,
        hidden=(32, 16),
    )


def _servers(url: str, specs: list[TableSpec]) -> AbstractContextManager[list[ShardServer]]:
    return shard_servers(url, specs, options=ServerOptions(block_ms=5))


def _batches(rows: int, batch_rows: int) -> list[TrainBatch]:
    gen = TrafficGenerator(TrafficConfig(seed=3))
    return [TrainBatch(b, (), 0) for b, _ in gen.samples(rows, batch_rows)]


def _train(backend: Any, tables: dict[str, TableSpec], spec: ModelSpec, **kw: Any) -> Trainer:
    settings = TrainerSettings(device="cpu", **kw)
    trainer = Trainer(spec, tables, backend, settings, keep_predictions=True)
    trainer.run(IterSource(_batches(4000, kw.get("batch_rows", 128))))
    trainer.close()
    return trainer


def _preds(trainer: Trainer) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate(trainer.result.predictions), np.concatenate(trainer.result.labels)


def test_sync_mode_on_two_shards_equals_the_in_process_reference(
    redis_url: str, unique: str
) -> None:
    tables = catalog_tables(unique)
    spec = _spec(unique)
    reference = _train(LocalBackend(list(tables.values())), tables, spec, mode="sync")
    with _servers(redis_url, list(tables.values())):
        client = PSClient(redis.Redis.from_url(redis_url), trainer_id="t0")
        trained = _train(client, tables, spec, mode="sync")
    p_ref, y_ref = _preds(reference)
    p, y = _preds(trained)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_allclose(p, p_ref, rtol=1e-5, atol=1e-6)
    assert trained.result.rows == 4000
    assert trained.metrics.cumulative.summary()["samples"] == 4000
    # the pull view now holds what the reference table holds
    wide = f"{unique}_wide"
    ids = np.unique(np.concatenate([b.batch.ids for b in _batches(4000, 128) if b.batch]))[:500]
    got, found = client.pull(wide, ids)
    ref_found, ref_w = reference.backend.tables[wide].lookup(ids)  # type: ignore[attr-defined]
    np.testing.assert_array_equal(found, ref_found)
    np.testing.assert_allclose(got[found], ref_w[ref_found], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ["async", "geo"])
def test_async_and_geo_modes_learn_close_to_the_reference(
    redis_url: str, unique: str, mode: str
) -> None:
    tables = catalog_tables(unique)
    spec = _spec(unique)
    reference = _train(LocalBackend(list(tables.values())), tables, spec, mode="sync")
    with _servers(redis_url, list(tables.values())):
        client = PSClient(redis.Redis.from_url(redis_url), trainer_id="t0", max_inflight=2)
        trained = _train(client, tables, spec, mode=mode, pass_batches=1)
    p_ref, y_ref = _preds(reference)
    p, y = _preds(trained)
    auc_ref, auc = roc_auc_score(y_ref, p_ref), roc_auc_score(y, p)
    assert auc > 0.6  # it learns (the generator's Bayes AUC is about 0.8)
    # staleness (async: rows pulled one pass ahead) and geo's local Adagrad steps, which
    # differ from the servers' FTRL on the wide table, cost some AUC on 4k young rows
    tolerance = {"async": 0.03, "geo": 0.05}[mode]
    assert abs(auc - auc_ref) < tolerance, (auc, auc_ref)
    hit = [c.stats.hit_rate for c in trained.caches.values()]
    assert all(0.0 <= h < 1.0 for h in hit)


def test_missing_table_fails_at_start(unique: str) -> None:
    tables = catalog_tables(unique)
    spec = dataclasses.replace(_spec(unique), deep_table=f"{unique}_nope")
    with pytest.raises(Exception, match="nope"):
        Trainer(spec, tables, LocalBackend(list(tables.values())), TrainerSettings(device="cpu"))


def _criteo_spec(unique: str) -> ModelSpec:
    base = ModelSpec.from_yaml(Path(__file__).parents[2] / "deploy" / "models" / "deepfm.yaml")
    return dataclasses.replace(
        base, name=f"m_{unique}", wide_table=f"{unique}_wide", deep_table=f"{unique}_deep"
    )


@pytest.mark.parametrize("stream", ["criteo", "synthetic"])
def test_ps_trained_deepfm_matches_in_process_auc_within_0_005(
    redis_url: str, unique: str, stream: str, request: pytest.FixtureRequest
) -> None:
    """The issue's quality bar: same model, same order, PS (2 shards) vs in-process."""
    tables = catalog_tables(unique)
    if stream == "criteo":
        data = request.getfixturevalue("shared_data")
        spec = _criteo_spec(unique)
        source = open_dataset(data / "criteo" / "train.tsv")
        batches = [TrainBatch(b, (), 0) for b in source.batches(64)]
    else:
        spec = _spec(unique)
        gen = TrafficGenerator(TrafficConfig(seed=5))
        batches = [TrainBatch(b, (), 0) for b, _ in gen.samples(20_000, 64)]
    settings = TrainerSettings(device="cpu", mode="sync", batch_rows=64)

    def auc(backend: Any) -> float:
        trainer = Trainer(spec, tables, backend, settings, keep_predictions=True)
        trainer.run(IterSource(batches))
        trainer.close()
        p, y = _preds(trainer)
        return float(roc_auc_score(y, p))

    in_process = auc(LocalBackend(list(tables.values())))
    with _servers(redis_url, list(tables.values())):
        on_ps = auc(PSClient(redis.Redis.from_url(redis_url), trainer_id="t0"))
    assert on_ps > 0.6
    assert abs(on_ps - in_process) <= 0.005, (on_ps, in_process)
