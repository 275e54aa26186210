"""A published version as plain files (no pickle), for offline serving and audits.

Layout of an export directory::

    manifest.json                {"format", "model": ModelSpec dict, "version",
                                  "published": the version's ModelManifest,
                                  "tables": {name: {"rows", "dim", "dtype"}},
                                  "files": {relative path: {"sha256", "dtype", "shape"}}}
    tables/<table>/ids.npy       uint64[n], sorted
    tables/<table>/weights.npy   float32[n, dim] (float16 when the table is published fp16)
    dense/<parameter>.npy        float32, named as in the model's state_dict

The directory is written under a temp name and renamed into place; loading
verifies every file's checksum and loads with ``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.publish.subscriber import LiveModel

__all__ = ["FORMAT", "export_version", "load_export"]

FORMAT = "pipeline.publish.version/1"


def _sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def export_version(live: LiveModel, out: Path | str, *, overwrite: bool = False) -> Path:
    """Write ``live`` to ``out`` in the documented layout; returns ``out``."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass overwrite=True to replace it)")
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    files: dict[str, dict[str, Any]] = {}
    tables: dict[str, dict[str, Any]] = {}

    def save(rel: str, array: npt.NDArray[Any]) -> None:
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, array, allow_pickle=False)
        files[rel] = {
            "sha256": _sha256(path),
            "dtype": str(array.dtype),
            "shape": list(array.shape),
        }

    try:
        for name, (ids, weights) in live.tables.items():
            save(f"tables/{name}/ids.npy", np.ascontiguousarray(ids, dtype=np.uint64))
            save(f"tables/{name}/weights.npy", np.ascontiguousarray(weights))
            tables[name] = {
                "rows": len(ids),
                "dim": int(weights.shape[1]),
                "dtype": str(weights.dtype),
            }
        for param, array in live.dense.items():
            if "/" in param or param.startswith("."):
                raise ValueError(f"dense parameter name {param!r} is not a safe file name")
            save(f"dense/{param}.npy", np.ascontiguousarray(array, dtype=np.float32))
        meta = {
            "format": FORMAT,
            "version": live.version,
            "model": live.module.spec.to_dict(),
            "published": live.manifest,
            "tables": tables,
            "files": files,
        }
        (tmp / "manifest.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_export(
    directory: Path | str,
) -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, np.ndarray]], dict[str, np.ndarray]]:
    """``(manifest, tables, dense)`` of an export; ValueError on a checksum mismatch."""
    directory = Path(directory)
    meta = json.loads((directory / "manifest.json").read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{directory}: format {meta.get('format')!r}, expected {FORMAT!r}")
    for rel, info in meta["files"].items():
        actual = _sha256(directory / rel)
        if actual != info["sha256"]:
            raise ValueError(
                f"{directory / rel}: checksum {actual}, manifest says {info['sha256']}"
            )

    def load(rel: str) -> np.ndarray:
        return np.load(directory / rel, allow_pickle=False)

    tables = {
        name: (load(f"tables/{name}/ids.npy"), load(f"tables/{name}/weights.npy"))
        for name in meta["tables"]
    }
    dense = {
        rel[len("dense/") : -len(".npy")]: load(rel)
        for rel in meta["files"]
        if rel.startswith("dense/")
    }
    return meta, tables, dense
