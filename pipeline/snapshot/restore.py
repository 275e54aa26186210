"""Restoring what lives outside shard servers: dense tables and trainer positions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.ps.dense import push_dense
from pipeline.snapshot.layout import Snapshot, load_snapshot

__all__ = ["restore_dense", "resume_positions"]


def restore_dense(client: Any, snapshot: Snapshot) -> dict[str, int]:
    """Push each saved dense table as a new version; returns ``{name: new version}``."""
    return {
        name: push_dense(client, name, tensors) for name, (_, tensors) in snapshot.dense().items()
    }


def resume_positions(path: str | Path) -> dict[tuple[str, int], int]:
    """``{(topic, partition): next offset}`` a trainer seeks to when resuming from ``path``."""
    return load_snapshot(path).offsets()
