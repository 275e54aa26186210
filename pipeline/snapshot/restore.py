"""Restoring what lives outside shard servers: dense tables and trainer positions."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.ps.dense import push_dense
from pipeline.snapshot.layout import Snapshot, load_snapshot

if TYPE_CHECKING:
    from pipeline.train.trainer import Trainer

__all__ = ["restore_dense", "restore_trainer", "resume_positions"]

log = logging.getLogger(__name__)


def restore_dense(client: Any, snapshot: Snapshot) -> dict[str, int]:
    """Push each saved dense table as a new version; returns ``{name: new version}``."""
    return {
        name: push_dense(client, name, tensors) for name, (_, tensors) in snapshot.dense().items()
    }


def resume_positions(path: str | Path) -> dict[tuple[str, int], int]:
    """``{(topic, partition): next offset}`` a trainer seeks to when resuming from ``path``."""
    return load_snapshot(path).offsets()


def restore_trainer(trainer: Trainer, snapshot: Snapshot, trainer_id: str | None = None) -> bool:
    """Load the dense parameters and optimizer state a trainer saved at the cut.

    Uses ``trainer_id``'s state (default: the trainer's id), or the only trainer's
    when the snapshot has one (ids such as host-pid change across restarts). Returns
    False, leaving the trainer as built, when there is no state to use: the dense
    parameters then come from the restored dense table, the optimizer starts fresh.
    """
    from pipeline.snapshot.participant import load_trainer_state

    saved = snapshot.trainers()
    wanted = trainer_id or trainer.trainer_id
    if wanted not in saved:
        if len(saved) != 1:
            log.warning(
                "snapshot %s has no state of trainer %r (has %s): optimizer starts fresh",
                snapshot.id,
                wanted,
                saved,
            )
            return False
        wanted = saved[0]
    load_trainer_state(trainer, snapshot.trainer_state(wanted))
    return True
