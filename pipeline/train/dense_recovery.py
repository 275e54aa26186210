"""Where a starting trainer gets the dense parameters when Redis lost them.

The dense table lives in Redis; Redis is a cache. Its durable copies are the
trainers that are running (they hold the values and write them back, see
:mod:`pipeline.train.dense_sync`) and the job's snapshots (dense tables and each
trainer's dense optimizer state). A trainer that starts and finds no dense table
initializes one only for a new model: when the shard servers hold rows, the model
exists, and it restores the newest snapshot of ``snapshot_dir`` or waits for a
running trainer to write the values back, and fails with a clear error otherwise.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import PipelineError
from pipeline.ps.client import PSClient
from pipeline.ps.dense import DenseConflict

if TYPE_CHECKING:
    from pipeline.train.trainer import Trainer

__all__ = ["DenseRecovery", "model_rows"]

log = logging.getLogger(__name__)


def model_rows(ps: PSClient, tables: list[str]) -> int:
    """Rows the shard servers hold over ``tables`` (from each shard's meta)."""
    total = 0
    for table in tables:
        route = ps.route(table)
        for shard in range(route.shards):
            meta = ps.keys(table, shard).meta
            raw = ps._call(lambda m=meta: ps.redis.hget(m, b"rows"))
            total += int(raw or 0)
    return total


class DenseRecovery:
    """``DenseSync.recover`` of a trainer role (see the module docstring).

    ``snapshot_dir``: a directory of snapshots (the newest is used) or one snapshot.
    """

    def __init__(
        self,
        ps: PSClient,
        trainer: Trainer,
        snapshot_dir: str | Path | None,
        wait_s: float,
        poll_s: float = 0.5,
    ) -> None:
        self.ps = ps
        self.trainer = trainer
        self.snapshot_dir = Path(snapshot_dir) if snapshot_dir else None
        self.wait_s = wait_s
        self.poll_s = poll_s
        self.source: str | None = None  # what the values came from (tests, logs)

    def __call__(self) -> bool:
        name = self.trainer.dense.name
        rows = model_rows(self.ps, list(self.trainer.dims))
        if rows == 0:
            return False  # a new model: the first trainer initializes it
        if self._from_snapshot(name):
            return True
        log.warning(
            "dense table %s is gone but the model exists (%d rows on the shard servers): "
            "waiting up to %g s for a running trainer to write it back",
            name,
            rows,
            self.wait_s,
        )
        deadline = time.monotonic() + self.wait_s
        while time.monotonic() < deadline:
            if self.ps.dense_version(name) > 0:
                self.source = "trainer"
                log.warning("dense table %s is back (written by a running trainer)", name)
                return True
            time.sleep(self.poll_s)
        where = f"no snapshot in {self.snapshot_dir}" if self.snapshot_dir else "no --snapshot-dir"
        raise PipelineError(
            f"dense table {name!r} is gone (Redis lost its data) while the model exists "
            f"({rows} rows on the shard servers), {where}, and no running trainer wrote it "
            f"back within {self.wait_s:g} s: set PIPELINE_TRAIN_SNAPSHOT_DIR to the job's "
            "snapshots (or resume with --resume SNAPSHOT) rather than starting a new model"
        )

    def _from_snapshot(self, name: str) -> bool:
        if self.snapshot_dir is None or not self.snapshot_dir.is_dir():
            return False
        from pipeline.snapshot.layout import MANIFEST, SnapshotError, latest_snapshot, load_snapshot
        from pipeline.snapshot.restore import restore_trainer

        try:
            if (self.snapshot_dir / MANIFEST).is_file():  # one snapshot (--resume)
                snapshot = load_snapshot(self.snapshot_dir)
            else:
                snapshot = latest_snapshot(self.snapshot_dir)
        except SnapshotError as exc:
            log.warning("no usable snapshot in %s: %s", self.snapshot_dir, exc)
            return False
        saved = snapshot.dense().get(name)
        if saved is None:
            log.warning("snapshot %s has no dense table %s", snapshot.id, name)
            return False
        # a conflict: another trainer restored it first (the same values, or fresher)
        with contextlib.suppress(DenseConflict):
            self.ps.push_dense(name, saved[1], expected_version=0)
        restore_trainer(self.trainer, snapshot)  # the dense optimizer state
        self.source = f"snapshot {snapshot.id}"
        log.warning("dense table %s was gone: restored from snapshot %s", name, snapshot.id)
        return True
