"""Dense parameters shared by trainers through the PS dense table (delta merging).

Each trainer steps its dense parameters locally with its own torch optimizer.
Every ``every_steps`` steps, and at most every ``min_interval_s`` seconds, it merges:
``global <- global + (local - base)``, where ``base`` is the value it last
synchronized, written with a compare-and-set on the table's version (retried on
conflict), then ``local <- base <- global``. With one trainer this is exactly local
training; with several it adds up their progress like geo-SGD does for dense
parameters. The first trainer to start writes the initial parameters (version 1);
later ones load them, so every trainer starts from the same values.

Losing the table (Redis restarted without persistence, or flushed) never resets the
model: a running trainer that finds it gone writes its own current values back
(the freshest copy there is; others merge onto it as usual), and a starting trainer
that finds no table calls :attr:`DenseSync.recover` (set by the trainer role: the
newest snapshot, or wait for a running trainer) before it would initialize one.

Traffic follows what changed: a sync reads the table's version first and the blob
only when another trainer wrote since our last sync, writes nothing when no step
changed a parameter, and the time bound keeps small steps (the young stages of
the step schedule) from syncing hundreds of times a second.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import numpy as np

from pipeline.model.modules import CTRModel, dense_state, load_dense_state
from pipeline.ps.dense import DenseConflict
from pipeline.train.backend import SparseBackend

__all__ = ["DenseSync"]

log = logging.getLogger(__name__)


class DenseSync:
    """Merge a model's dense parameters through the dense table ``name``."""

    def __init__(
        self,
        backend: SparseBackend,
        name: str,
        model: CTRModel,
        every_steps: int = 10,
        min_interval_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backend = backend
        self.name = name
        self.model = model
        self.every_steps = every_steps
        self.min_interval_s = min_interval_s
        self._clock = clock
        self.base: dict[str, np.ndarray] = {}
        self.version = 0
        self.merges = 0
        self.conflicts = 0
        self.blob_reads = 0  # syncs that had to read the shared values (another writer)
        self.skipped = 0  # syncs with nothing to write
        self._last_step = 0
        self._last_time = -math.inf
        self.reseeds = 0  # times the table was gone and we wrote ours back
        #: called when the table does not exist at start: returns True when it restored
        #: the table (and the trainer's state) from a durable copy, False when this is a
        #: new model that may be initialized; raises when a model exists but no copy does
        self.recover: Callable[[], bool] | None = None

    def start(self) -> bool:
        """Load the shared parameters, or publish ours when none exist. True if we initialized."""
        version, tensors = self.backend.pull_dense(self.name)
        if version == 0 and self.recover is not None and self.recover():
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
        """Sync when ``every_steps`` steps and ``min_interval_s`` passed since the last."""
        if step - self._last_step < self.every_steps:
            return
        if self._clock() - self._last_time < self.min_interval_s:
            return
        self._last_step = step
        self.sync()

    def sync(self) -> None:
        """Add our progress since the last sync to the shared values and adopt the result."""
        self._last_time = self._clock()
        local = dense_state(self.model)
        delta = {k: local[k] - self.base[k] for k in local}
        version = self.backend.dense_version(self.name)
        if version == self.version and not any(d.any() for d in delta.values()):
            self.skipped += 1
            return
        while True:
            if version == self.version:  # nobody else wrote since our last sync
                merged = local
            else:
                version, shared = self.backend.pull_dense(self.name)
                self.blob_reads += 1
                if version == 0 and self.version > 0:
                    # gone (Redis lost its data): our values are the freshest copy
                    log.warning(
                        "dense table %s is gone (Redis lost its data?): writing this "
                        "trainer's parameters back (version %d before)",
                        self.name,
                        self.version,
                    )
                    self.reseeds += 1
                    merged = local
                else:
                    merged = {k: shared[k] + delta[k] for k in delta}
            try:
                new_version = self.backend.push_dense(self.name, merged, expected_version=version)
            except DenseConflict:
                self.conflicts += 1
                version = -1  # another writer: read the shared values
                continue
            break
        self.merges += 1
        if merged is not local:
            load_dense_state(self.model, merged)
        self.base = {k: np.array(v, np.float32) for k, v in merged.items()}
        self.version = new_version
