"""Dense parameters merged through the dense table: deltas add up, traffic follows change."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.model.modules import build_model, dense_state
from pipeline.model.spec import ModelSpec
from pipeline.ps.dense import DenseConflict
from pipeline.train.backend import LocalBackend
from pipeline.train.dense_sync import DenseSync

pytestmark = pytest.mark.unit

SPEC = ModelSpec(kind="lr", slots=("a",), dense_dim=2, wide_table="w", name="m")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _nudge(sync: DenseSync, by: float) -> None:
    with torch.no_grad():
        for p in sync.model.parameters():
            p.add_(by)


def test_two_writers_add_their_deltas_and_a_lone_writer_never_reads_the_blob() -> None:
    backend = LocalBackend([])
    a = DenseSync(backend, "d", build_model(SPEC, seed=0))
    b = DenseSync(backend, "d", build_model(SPEC, seed=1))
    assert a.start() and not b.start()  # b adopts a's initial values
    start = dense_state(a.model)
    _nudge(a, 1.0)
    a.sync()
    assert a.blob_reads == 0  # nobody else wrote: our values are the merge
    _nudge(a, 1.0)
    a.sync()
    _nudge(b, 10.0)
    b.sync()  # a wrote twice since b's last sync: b reads and adds its delta
    assert b.blob_reads == 1
    for name, value in dense_state(b.model).items():
        np.testing.assert_allclose(value, start[name] + 12.0, rtol=1e-6)
    version = backend.dense_version("d")
    b.sync()  # no step since: nothing written, nothing read
    assert b.skipped == 1 and backend.dense_version("d") == version


def test_syncs_wait_for_steps_and_for_the_minimum_interval() -> None:
    clock = Clock()
    backend = LocalBackend([])
    sync = DenseSync(
        backend, "d", build_model(SPEC), every_steps=2, min_interval_s=0.5, clock=clock
    )
    sync.start()
    for step in range(1, 7):
        _nudge(sync, 1.0)
        sync.maybe_sync(step)
    assert backend.dense_version("d") == 2  # step 2 synced; steps 4 and 6 within 0.5 s
    clock.now = 1.0
    _nudge(sync, 1.0)
    sync.maybe_sync(7)
    assert backend.dense_version("d") == 3


def test_a_conflicting_write_is_retried_on_the_shared_values() -> None:
    backend = LocalBackend([])
    sync = DenseSync(backend, "d", build_model(SPEC))
    sync.start()
    real_push = backend.push_dense
    calls = {"n": 0}

    def racing_push(
        name: str, tensors: dict[str, np.ndarray], expected_version: int | None = None
    ) -> int:
        calls["n"] += 1
        if calls["n"] == 1:  # another trainer writes between our version read and our write
            version, shared = backend.pull_dense(name)
            real_push(name, {k: v + 5.0 for k, v in shared.items()}, expected_version=version)
            raise DenseConflict("moved")
        return real_push(name, tensors, expected_version)

    backend.push_dense = racing_push  # type: ignore[method-assign]
    base = dense_state(sync.model)
    _nudge(sync, 1.0)
    sync.sync()
    assert sync.conflicts == 1 and sync.blob_reads == 1
    for name, value in dense_state(sync.model).items():
        np.testing.assert_allclose(value, base[name] + 6.0, rtol=1e-6)
