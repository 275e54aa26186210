"""On-disk layout of a snapshot, its manifest, verification and retention.

A snapshot directory ``DIR/<id>`` holds::

    shards/<table>/shard-<i>-of-<S>/   an export directory (pipeline.ps.export):
                                       ids, weights, optimizer state, statistics,
                                       admission flags of both tiers, checksummed
    dense/<name>.bin                   packed dense tensors (pipeline.ps.dense)
    manifest.json                      written last: tables, parts, checksums,
                                       stream ids, trainer offsets

It is assembled in ``DIR/<id>.tmp`` and renamed to ``DIR/<id>`` only when every
part is there, so a directory without ``.tmp`` and with a manifest is complete;
anything else is ignored by :func:`list_snapshots` and refused by
:func:`load_snapshot`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import PipelineError
from pipeline.ps.dense import unpack_tensors
from pipeline.ps.export import ExportError, read_rows

__all__ = [
    "FORMAT",
    "MANIFEST",
    "TMP_SUFFIX",
    "Snapshot",
    "SnapshotError",
    "latest_snapshot",
    "list_snapshots",
    "load_snapshot",
    "retained",
    "sha256_file",
    "shard_dir",
]

FORMAT = "pipeline.snapshot"
VERSION = 1
MANIFEST = "manifest.json"
TMP_SUFFIX = ".tmp"


class SnapshotError(PipelineError):
    """A snapshot could not be taken, or one on disk is incomplete, tampered or mismatched."""


def shard_dir(table: str, shard: int, shards: int) -> str:
    """Path of one shard's export inside a snapshot (relative)."""
    return f"shards/{table}/shard-{shard}-of-{shards}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Snapshot:
    """A complete snapshot on disk whose manifest (and part checksums) was verified."""

    path: Path
    manifest: dict[str, Any]

    @property
    def id(self) -> str:
        return str(self.manifest["id"])

    @property
    def created_ms(self) -> int:
        return int(self.manifest["created_ms"])

    def offsets(self) -> dict[tuple[str, int], int]:
        """``{(topic, partition): next offset}`` a trainer seeks to for resuming."""
        return {
            (o["topic"], int(o["partition"])): int(o["offset"]) for o in self.manifest["offsets"]
        }

    def part(self, table: str, shard: int, shards: int) -> Path:
        """The export directory of (table, shard); SnapshotError when it has none."""
        info = self.manifest["tables"].get(table)
        if info is None:
            raise SnapshotError(
                f"snapshot {self.path} has no table {table!r} "
                f"(it has {sorted(self.manifest['tables'])})"
            )
        if int(info["shards"]) != shards:
            raise SnapshotError(
                f"snapshot {self.path}: table {table!r} was saved with {info['shards']} shards, "
                f"this server runs {shards}"
            )
        return self.path / shard_dir(table, shard, shards)

    def trainers(self) -> list[str]:
        """Ids of the trainers that took part in the cut (empty: coordinator barriers)."""
        return sorted(self.manifest.get("trainers", {}))

    def trainer_state(self, trainer_id: str) -> dict[str, np.ndarray]:
        """Dense parameters and optimizer state ``trainer_id`` had at its barrier."""
        info = self.manifest.get("trainers", {}).get(trainer_id)
        if info is None:
            raise SnapshotError(
                f"snapshot {self.path} has no state of trainer {trainer_id!r} "
                f"(it has {self.trainers()})"
            )
        return unpack_tensors((self.path / info["path"]).read_bytes())

    def dense(self) -> dict[str, tuple[int, dict[str, np.ndarray]]]:
        """``{name: (version, tensors)}`` of the dense tables saved with the snapshot."""
        out: dict[str, tuple[int, dict[str, np.ndarray]]] = {}
        for name, info in self.manifest["dense"].items():
            blob = (self.path / info["path"]).read_bytes()
            out[name] = (int(info["version"]), unpack_tensors(blob))
        return out


def _read_manifest(path: Path) -> dict[str, Any]:
    if path.name.endswith(TMP_SUFFIX):
        raise SnapshotError(f"{path} is an unfinished snapshot (a {TMP_SUFFIX} directory)")
    if not path.is_dir():
        raise SnapshotError(f"{path}: no such snapshot directory")
    try:
        manifest: dict[str, Any] = json.loads((path / MANIFEST).read_text())
    except OSError:
        raise SnapshotError(f"{path}: no {MANIFEST} (incomplete snapshot)") from None
    except ValueError as exc:
        raise SnapshotError(f"{path}: unreadable {MANIFEST} ({exc})") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise SnapshotError(f"{path}: not a {FORMAT} v{VERSION} snapshot")
    return manifest


def load_snapshot(path: str | Path, *, full: bool = False) -> Snapshot:
    """Open a snapshot after checking every part's checksum.

    Always checked: the manifest, each shard export's ``meta.json`` (whose own
    checksums cover every column file) and each dense file. With ``full`` every
    column file is read and hashed too (importing a shard does that for its own
    part anyway). Raises :class:`SnapshotError` naming the bad file.
    """
    path = Path(path)
    manifest = _read_manifest(path)
    snap = Snapshot(path, manifest)
    for table, info in manifest["tables"].items():
        for shard, part in info["parts"].items():
            meta = path / part["path"] / "meta.json"
            if not meta.is_file():
                raise SnapshotError(f"{path}: part {table}:{shard} is missing ({meta})")
            if sha256_file(meta) != part["meta_sha256"]:
                raise SnapshotError(f"{meta}: checksum mismatch (tampered or corrupt snapshot)")
            if full:
                try:
                    read_rows(path / part["path"], mmap=True)
                except ExportError as exc:
                    raise SnapshotError(f"snapshot part {table}:{shard}: {exc}") from None
    for name, info in manifest["dense"].items():
        file = path / info["path"]
        if not file.is_file() or sha256_file(file) != info["sha256"]:
            raise SnapshotError(f"{file}: dense table {name!r} missing or checksum mismatch")
    for trainer_id, info in manifest.get("trainers", {}).items():
        file = path / info["path"]
        if not file.is_file() or sha256_file(file) != info["sha256"]:
            raise SnapshotError(f"{file}: state of trainer {trainer_id!r} missing or corrupt")
    return snap


def list_snapshots(directory: str | Path) -> list[Snapshot]:
    """Complete snapshots under ``directory``, oldest first (unfinished ones are skipped)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for child in directory.iterdir():
        if child.name.endswith(TMP_SUFFIX) or not (child / MANIFEST).is_file():
            continue
        try:
            found.append(Snapshot(child, _read_manifest(child)))
        except SnapshotError:
            continue
    return sorted(found, key=lambda s: (s.created_ms, s.id))


def latest_snapshot(directory: str | Path) -> Snapshot:
    """The newest complete snapshot under ``directory``, verified."""
    snaps = list_snapshots(directory)
    if not snaps:
        raise SnapshotError(f"no complete snapshot under {directory}")
    return load_snapshot(snaps[-1].path)


def retained(snapshots: Iterable[tuple[str, int]], keep: int, keep_daily: int) -> set[str]:
    """Ids to keep among ``(id, created_ms)``: the ``keep`` newest, plus the newest of
    each of the ``keep_daily`` most recent UTC days that have a snapshot."""
    if keep < 1 or keep_daily < 0:
        raise ValueError(f"keep must be >= 1 and keep_daily >= 0, got {keep}, {keep_daily}")
    ordered = sorted(snapshots, key=lambda s: (s[1], s[0]), reverse=True)
    kept = {sid for sid, _ in ordered[:keep]}
    days: dict[dt.date, str] = {}
    for sid, created in ordered:
        day = dt.datetime.fromtimestamp(created / 1000, dt.timezone.utc).date()
        days.setdefault(day, sid)  # newest first: the first seen is the day's newest
    for day in sorted(days, reverse=True)[:keep_daily]:
        kept.add(days[day])
    return kept
