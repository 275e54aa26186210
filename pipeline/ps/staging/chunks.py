"""Payloads of ``model.updates`` chunks and their checksums.

Three payload formats, all little-endian, none pickled:

| kind | layout |
| --- | --- |
| base, delta | ``b"PRW1"``, u8 dtype (0 f32, 1 f16), u32 dim, u64 n, u64 ids[n], rows[n, dim] |
| ``tombstone`` | ``b"PTS1"``, u64 n, ids u64[n] |
| ``dense`` | one slice of :func:`pipeline.ps.dense.pack_tensors` bytes; a version's dense
  chunks concatenated in ``chunk_index`` order are the whole blob |

Row chunks are cut on row boundaries so a subscriber can decode each on its own.
A checksum is ``"sha256:<hex>"`` of the payload bytes.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "ChunkError",
    "checksum",
    "pack_ids",
    "pack_rows",
    "rows_per_chunk",
    "split_bytes",
    "split_ids",
    "split_rows",
    "unpack_ids",
    "unpack_rows",
    "verify",
]

U64 = npt.NDArray[np.uint64]
_ROWS_MAGIC = b"PRW1"
_IDS_MAGIC = b"PTS1"
_ROWS_HEAD = struct.Struct("<4sBIQ")  # magic, dtype code, dim, n
_IDS_HEAD = struct.Struct("<4sQ")  # magic, n
_DTYPES: dict[int, np.dtype[Any]] = {0: np.dtype("<f4"), 1: np.dtype("<f2")}
ALGORITHM = "sha256"


class ChunkError(ValueError):
    """A payload or checksum that does not decode or verify; the version is not applied."""


def checksum(payload: bytes) -> str:
    """``"sha256:<hex>"`` of ``payload``."""
    return f"{ALGORITHM}:{hashlib.sha256(payload).hexdigest()}"


def verify(payload: bytes, expected: str) -> None:
    """Raise ChunkError unless ``payload`` hashes to ``expected`` (``"sha256:<hex>"``)."""
    algorithm, _, _ = expected.partition(":")
    if algorithm != ALGORITHM:
        raise ChunkError(f"unsupported checksum algorithm {algorithm!r} (expected {ALGORITHM})")
    actual = checksum(payload)
    if actual != expected:
        raise ChunkError(f"checksum mismatch: payload is {actual}, expected {expected}")


def pack_rows(ids: U64, weights: npt.NDArray[np.floating], *, fp16: bool) -> bytes:
    """One base/delta payload: ``ids`` with their weights (float16 when ``fp16``)."""
    ids = np.ascontiguousarray(ids, dtype="<u8")
    if weights.ndim != 2 or weights.shape[0] != ids.shape[0]:
        raise ValueError(f"weights must be [{ids.shape[0]}, dim], got {weights.shape}")
    code = 1 if fp16 else 0
    body = np.ascontiguousarray(weights, dtype=_DTYPES[code])
    head = _ROWS_HEAD.pack(_ROWS_MAGIC, code, weights.shape[1], ids.shape[0])
    return head + ids.tobytes() + body.tobytes()


def unpack_rows(payload: bytes) -> tuple[U64, npt.NDArray[np.floating]]:
    """Inverse of :func:`pack_rows`: ``(ids, weights)`` read-only views; ChunkError if malformed."""
    if len(payload) < _ROWS_HEAD.size:
        raise ChunkError(f"row payload of {len(payload)} bytes is shorter than its header")
    magic, code, dim, n = _ROWS_HEAD.unpack_from(payload)
    if magic != _ROWS_MAGIC or code not in _DTYPES:
        raise ChunkError(f"not a row payload (magic {magic!r}, dtype code {code})")
    dtype = _DTYPES[code]
    expected = _ROWS_HEAD.size + n * 8 + n * dim * dtype.itemsize
    if len(payload) != expected:
        raise ChunkError(f"row payload has {len(payload)} bytes, header implies {expected}")
    ids = np.frombuffer(payload, dtype="<u8", count=n, offset=_ROWS_HEAD.size)
    weights = np.frombuffer(payload, dtype=dtype, offset=_ROWS_HEAD.size + n * 8)
    return ids.astype(np.uint64, copy=False), weights.reshape(n, dim)


def pack_ids(ids: U64) -> bytes:
    """One tombstone payload: ids deleted since the parent version."""
    ids = np.ascontiguousarray(ids, dtype="<u8")
    return _IDS_HEAD.pack(_IDS_MAGIC, ids.shape[0]) + ids.tobytes()


def unpack_ids(payload: bytes) -> U64:
    """Inverse of :func:`pack_ids`; ChunkError if malformed."""
    if len(payload) < _IDS_HEAD.size:
        raise ChunkError(f"tombstone payload of {len(payload)} bytes is shorter than its header")
    magic, n = _IDS_HEAD.unpack_from(payload)
    if magic != _IDS_MAGIC or len(payload) != _IDS_HEAD.size + 8 * n:
        raise ChunkError(f"not a tombstone payload (magic {magic!r}, {len(payload)} bytes, n {n})")
    return np.frombuffer(payload, dtype="<u8", offset=_IDS_HEAD.size).astype(np.uint64, copy=False)


def rows_per_chunk(dim: int, fp16: bool, max_bytes: int) -> int:
    """How many rows of width ``dim`` fit in a payload of at most ``max_bytes``."""
    per_row = 8 + dim * (2 if fp16 else 4)
    rows = (max_bytes - _ROWS_HEAD.size) // per_row
    if rows < 1:
        raise ValueError(f"max chunk bytes {max_bytes} cannot hold one row of dim {dim}")
    return rows


def split_rows(
    ids: U64, weights: npt.NDArray[np.floating], *, fp16: bool, max_bytes: int
) -> Iterator[bytes]:
    """Row payloads of at most ``max_bytes`` each, covering ``ids`` in order (none if empty)."""
    step = rows_per_chunk(weights.shape[1], fp16, max_bytes)
    for lo in range(0, ids.shape[0], step):
        yield pack_rows(ids[lo : lo + step], weights[lo : lo + step], fp16=fp16)


def split_ids(ids: U64, *, max_bytes: int) -> Iterator[bytes]:
    """Tombstone payloads of at most ``max_bytes`` each (none if ``ids`` is empty)."""
    step = (max_bytes - _IDS_HEAD.size) // 8
    if step < 1:
        raise ValueError(f"max chunk bytes {max_bytes} cannot hold one id")
    for lo in range(0, ids.shape[0], step):
        yield pack_ids(ids[lo : lo + step])


def split_bytes(blob: bytes, max_bytes: int) -> list[bytes]:
    """``blob`` cut into pieces of at most ``max_bytes`` (one empty piece for an empty blob)."""
    if max_bytes < 1:
        raise ValueError("max_bytes must be >= 1")
    return [blob[i : i + max_bytes] for i in range(0, len(blob), max_bytes)] or [b""]
