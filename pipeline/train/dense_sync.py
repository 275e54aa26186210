"""Dense parameters shared by trainers through the PS dense table (delta merging).

Each trainer steps its dense parameters locally with its own torch optimizer.
Every ``every_steps`` steps it merges: ``global <- global + (local - base)``,
where ``base`` is the value it last synchronized, written with a compare-and-set
on the table's version (retried on conflict), then ``local <- base <- global``.
With one trainer this is exactly local training; with several it adds up their
progress like geo-SGD does for dense parameters. The first trainer to start
writes the initial parameters (version 1); later ones load them, so every
trainer starts from the same values.
"""

from __future__ import annotations

import numpy as np

from pipeline.model.modules import CTRModel, dense_state, load_dense_state
from pipeline.ps.dense import DenseConflict
from pipeline.train.backend import SparseBackend

__all__ = ["DenseSync"]


class DenseSync:
    """Merge a model's dense parameters through the dense table ``name``."""

    def __init__(
        self, backend: SparseBackend, name: str, model: CTRModel, every_steps: int = 10
    ) -> None:
        self.backend = backend
        self.name = name
        self.model = model
        self.every_steps = every_steps
        self.base: dict[str, np.ndarray] = {}
        self.version = 0
        self.merges = 0
        self.conflicts = 0

    def start(self) -> bool:
        """Load the shared parameters, or publish ours when none exist. True if we initialized."""
        version, tensors = self.backend.pull_dense(self.name)
        if version == 0:
            state = dense_state(self.model)
            try:
                self.version = self.backend.push_dense(self.name, state, expected_version=0)
                self.base = state
                return True
            except DenseConflict:
                version, tensors = self.backend.pull_dense(self.name)
        self._load(version, tensors)
        return False

    def _load(self, version: int, tensors: dict[str, np.ndarray]) -> None:
        load_dense_state(self.model, tensors)
        self.base = {k: np.array(v, np.float32) for k, v in tensors.items()}
        self.version = version

    def maybe_sync(self, step: int) -> None:
        if step % self.every_steps == 0:
            self.sync()

    def sync(self) -> None:
        """Add our progress since the last sync to the shared values and adopt the result."""
        local = dense_state(self.model)
        delta = {k: local[k] - self.base[k] for k in local}
        while True:
            version, shared = self.backend.pull_dense(self.name)
            # when nobody else wrote since our last sync, our values are the merge
            merged = local if version == self.version else {k: shared[k] + delta[k] for k in delta}
            try:
                new_version = self.backend.push_dense(self.name, merged, expected_version=version)
            except DenseConflict:
                self.conflicts += 1
                continue
            break
        self.merges += 1
        if merged is not local:
            load_dense_state(self.model, merged)
        self.base = {k: np.array(v, np.float32) for k, v in merged.items()}
        self.version = new_version
