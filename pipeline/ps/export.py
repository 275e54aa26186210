"""Row export/import of a shard table in a plain, checksummed directory of .npy files.

Layout of an export directory (one file per column, row ``i`` of every file is
the same feature)::

    ids.npy        uint64[n]
    weights.npy    float32[n, dim]     zeros for rows not admitted
    opt_state.npy  float32[n, s]       s = optimizer.state_width(dim)
    show.npy       float32[n]
    click.npy      float32[n]
    last_seen.npy  int64[n]            unix seconds
    admitted.npy   bool[n]
    meta.json      {"format", "version", "table": TableSpec dict, "rows", "dim",
                    "state_width", "files": {name: {"sha256", "dtype", "shape"}}}

A checkpoint delta (:mod:`pipeline.ps.checkpoint`) is the same directory with one
more column, ``deleted.npy`` (uint64 ids to delete, listed in ``files`` and counted
in ``meta["deleted"]``), and its own fields under ``meta["info"]``.

The directory is built under a hidden temp name next to the target and renamed
into place, so a reader sees a complete export or none. Loading verifies every
checksum and never unpickles (``allow_pickle=False``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from pipeline.ps.spec import TableSpec

if TYPE_CHECKING:
    from pipeline.ps.table import ShardTable

__all__ = [
    "FORMAT",
    "VERSION",
    "ExportError",
    "RowBatch",
    "export_table",
    "import_table",
    "read_deleted",
    "read_meta",
    "read_rows",
    "write_rows",
]

FORMAT = "pipeline.ps.rows"
VERSION = 1


@dataclass(frozen=True)
class RowBatch:
    """Rows of one table, column-wise: everything a row owns, as stored in both tiers."""

    ids: npt.NDArray[np.uint64]
    weights: npt.NDArray[np.float32]
    opt_state: npt.NDArray[np.float32]
    show: npt.NDArray[np.float32]
    click: npt.NDArray[np.float32]
    last_seen: npt.NDArray[np.int64]
    admitted: npt.NDArray[np.bool_]

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def validated(self, dim: int, state_width: int) -> RowBatch:
        """Same batch with exact dtypes and checked shapes; raises ValueError otherwise."""
        n = len(self)
        want = {
            "ids": ((n,), np.uint64),
            "weights": ((n, dim), np.float32),
            "opt_state": ((n, state_width), np.float32),
            "show": ((n,), np.float32),
            "click": ((n,), np.float32),
            "last_seen": ((n,), np.int64),
            "admitted": ((n,), np.bool_),
        }
        cols: dict[str, npt.NDArray[Any]] = {}
        for name, (shape, dtype) in want.items():
            arr = np.asarray(getattr(self, name))
            if arr.shape != shape or not np.can_cast(arr.dtype, dtype, "same_kind"):
                raise ValueError(
                    f"RowBatch.{name}: want {np.dtype(dtype)}{shape}, got {arr.dtype}{arr.shape}"
                )
            cols[name] = arr.astype(dtype, copy=False)
        return RowBatch(**cols)


_COLUMNS = ("ids", "weights", "opt_state", "show", "click", "last_seen", "admitted")


class ExportError(ValueError):
    """An export directory is incomplete, corrupt or of another format/table shape."""


class _NpyAppender:
    """Streams rows into a .npy file whose row count is only known at the end.

    numpy pads .npy headers with room for the first axis to grow (that is how
    ``np.lib.format`` supports appending), so the header written for 0 rows is
    rewritten in place for the final count, with the same length.
    """

    def __init__(self, path: Path, dtype: np.dtype[Any], row_shape: tuple[int, ...]) -> None:
        self._f: IO[bytes] = open(path, "wb")  # noqa: SIM115 - closed in finish()
        self._dtype, self._row_shape, self.rows = dtype, row_shape, 0
        self._header_len = len(self._header(0))
        if len(self._header(2**63 - 1)) != self._header_len:
            raise RuntimeError("this numpy does not pad .npy headers for growth")
        self._f.write(self._header(0))

    def _header(self, rows: int) -> bytes:
        buf = io.BytesIO()
        fmt = np.lib.format
        fmt.write_array_header_1_0(
            buf,
            {
                "descr": fmt.dtype_to_descr(self._dtype),
                "fortran_order": False,
                "shape": (rows, *self._row_shape),
            },
        )
        return buf.getvalue()

    def append(self, arr: npt.NDArray[Any]) -> None:
        self._f.write(np.ascontiguousarray(arr, dtype=self._dtype).tobytes())
        self.rows += arr.shape[0]

    def finish(self) -> None:
        self._f.seek(0)
        self._f.write(self._header(self.rows))
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_rows(
    path: str | Path,
    spec: TableSpec,
    state_width: int,
    batches: Iterable[RowBatch],
    *,
    overwrite: bool = False,
    deleted: npt.NDArray[np.uint64] | None = None,
    info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``batches`` as an export directory at ``path`` (atomically); returns meta.json.

    ``deleted`` adds ``deleted.npy`` (ids a checkpoint delta removes); ``info`` is stored
    as ``meta["info"]`` (JSON).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        example = RowBatch(
            *(
                np.zeros((0, *s), d)
                for s, d in (
                    ((), np.uint64),
                    ((spec.dim,), np.float32),
                    ((state_width,), np.float32),
                    ((), np.float32),
                    ((), np.float32),
                    ((), np.int64),
                    ((), np.bool_),
                )
            )
        )
        files = {
            c: _NpyAppender(
                tmp / f"{c}.npy", getattr(example, c).dtype, getattr(example, c).shape[1:]
            )
            for c in _COLUMNS
        }
        for batch in batches:
            checked = batch.validated(spec.dim, state_width)
            for c in _COLUMNS:
                files[c].append(getattr(checked, c))
        for appender in files.values():
            appender.finish()
        extra: dict[str, Any] = {}
        if deleted is not None:
            gone = np.ascontiguousarray(deleted, dtype=np.uint64)
            with open(tmp / "deleted.npy", "wb") as f:
                np.save(f, gone, allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
            extra["deleted"] = int(gone.shape[0])
            extra["deleted.npy"] = {
                "sha256": _sha256(tmp / "deleted.npy"),
                "dtype": gone.dtype.str,
                "shape": [int(gone.shape[0])],
            }
        meta: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "table": spec.to_dict(),
            "rows": files["ids"].rows,
            "dim": spec.dim,
            "state_width": state_width,
            "files": {
                f"{c}.npy": {
                    "sha256": _sha256(tmp / f"{c}.npy"),
                    "dtype": getattr(example, c).dtype.str,
                    "shape": [files[c].rows, *getattr(example, c).shape[1:]],
                }
                for c in _COLUMNS
            },
        }
        if "deleted" in extra:
            meta["deleted"] = extra["deleted"]
            meta["files"]["deleted.npy"] = extra["deleted.npy"]
        if info is not None:
            meta["info"] = info
        with open(tmp / "meta.json", "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():  # overwrite: move the old one aside first (rename is atomic)
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old)
        else:
            os.rename(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
        return meta
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_meta(path: str | Path) -> dict[str, Any]:
    """meta.json of an export directory, after checking its format and version."""
    path = Path(path)
    try:
        meta: dict[str, Any] = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path}: unreadable meta.json ({exc})") from exc
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ExportError(f"{path}: not a {FORMAT} v{VERSION} export")
    return meta


def _load_column(path: Path, meta: dict[str, Any], name: str, mmap: bool) -> npt.NDArray[Any]:
    entry, file = meta["files"][name], path / name
    if not file.is_file() or _sha256(file) != entry["sha256"]:
        raise ExportError(f"{file}: missing or checksum mismatch")
    arr = np.load(file, allow_pickle=False, mmap_mode="r" if mmap else None)
    if arr.dtype.str != entry["dtype"] or list(arr.shape) != entry["shape"]:
        raise ExportError(f"{file}: {arr.dtype}{arr.shape} does not match meta.json")
    return arr


def read_deleted(path: str | Path) -> npt.NDArray[np.uint64]:
    """The ids a delta deletes (verified); empty for a plain export."""
    path = Path(path)
    meta = read_meta(path)
    if "deleted.npy" not in meta["files"]:
        return np.zeros(0, np.uint64)
    return np.asarray(_load_column(path, meta, "deleted.npy", mmap=False), dtype=np.uint64)


def read_rows(path: str | Path, *, mmap: bool = False) -> tuple[TableSpec, int, RowBatch]:
    """Load an export: ``(spec, state_width, rows)`` after verifying format and checksums."""
    path = Path(path)
    meta = read_meta(path)
    spec = TableSpec.from_dict(meta["table"])
    cols: dict[str, npt.NDArray[Any]] = {}
    for c in _COLUMNS:
        cols[c] = _load_column(path, meta, f"{c}.npy", mmap)
    state_width = int(meta["state_width"])
    try:
        rows = RowBatch(**cols).validated(spec.dim, state_width)
    except ValueError as exc:
        raise ExportError(f"{path}: {exc}") from exc
    return spec, state_width, rows


def _chunks(rows: RowBatch, chunk_rows: int) -> Iterator[RowBatch]:
    for s in range(0, len(rows), chunk_rows):
        yield RowBatch(*(np.asarray(getattr(rows, c)[s : s + chunk_rows]) for c in _COLUMNS))


def export_table(
    table: ShardTable, path: str | Path, *, chunk_rows: int = 65_536, overwrite: bool = False
) -> dict[str, Any]:
    """Export every row of ``table`` (both tiers) to ``path``; returns meta.json."""
    return write_rows(
        path, table.spec, table.state_width, table.export_rows(chunk_rows), overwrite=overwrite
    )


def import_table(table: ShardTable, path: str | Path, *, chunk_rows: int = 65_536) -> int:
    """Load an export into ``table`` (same dim and optimizer state width); returns rows read."""
    spec, state_width, rows = read_rows(path, mmap=True)
    if spec.dim != table.dim or state_width != table.state_width:
        raise ExportError(
            f"{path}: dim {spec.dim}/state {state_width} does not fit table "
            f"{table.spec.name} (dim {table.dim}/state {table.state_width})"
        )
    for chunk in _chunks(rows, chunk_rows):
        table.import_rows(chunk)
    return len(rows)
