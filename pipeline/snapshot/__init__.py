"""Consistent snapshots of the parameter server: cut, save, verify, restore, retain."""

from pipeline.snapshot.layout import Snapshot, SnapshotError, latest_snapshot, load_snapshot

__all__ = ["Snapshot", "SnapshotError", "latest_snapshot", "load_snapshot"]
