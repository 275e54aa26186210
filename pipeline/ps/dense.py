"""Dense tables in Redis: named float32 tensors with a version number.

Key ``dense:{name}`` is a hash with ``v`` (version) and ``blob`` (packed
tensors: a 4-byte little-endian header length, a JSON header listing
name/shape in order, then the raw little-endian float32 data). Writers use
optimistic concurrency (WATCH) so a version is never overwritten by a stale one.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "DenseConflict",
    "dense_key",
    "pack_tensors",
    "pull_dense",
    "push_dense",
    "unpack_tensors",
]


class DenseConflict(RuntimeError):
    """The dense table moved to another version while we were writing it."""


def dense_key(name: str) -> bytes:
    return f"dense:{{{name}}}".encode()


def pack_tensors(tensors: Mapping[str, np.ndarray]) -> bytes:
    """Named arrays -> bytes (float32 little-endian; no pickle)."""
    header = [{"name": k, "shape": list(np.shape(v))} for k, v in tensors.items()]
    head = json.dumps(header, separators=(",", ":")).encode()
    body = b"".join(np.ascontiguousarray(v, dtype="<f4").tobytes() for v in tensors.values())
    return struct.pack("<I", len(head)) + head + body


def unpack_tensors(blob: bytes) -> dict[str, np.ndarray]:
    """Inverse of :func:`pack_tensors`; raises ValueError on any size mismatch."""
    if len(blob) < 4:
        raise ValueError("dense blob shorter than its header length")
    (hlen,) = struct.unpack_from("<I", blob)
    header = json.loads(blob[4 : 4 + hlen])
    out: dict[str, np.ndarray] = {}
    pos = 4 + hlen
    for item in header:
        count = int(np.prod(item["shape"], dtype=np.int64))
        end = pos + 4 * count
        if end > len(blob):
            raise ValueError(f"dense blob truncated at tensor {item['name']!r}")
        out[item["name"]] = np.frombuffer(blob[pos:end], dtype="<f4").reshape(item["shape"]).copy()
        pos = end
    if pos != len(blob):
        raise ValueError(f"dense blob has {len(blob) - pos} trailing bytes")
    return out


def pull_dense(client: Any, name: str) -> tuple[int, dict[str, np.ndarray]]:
    """(version, tensors); version 0 and no tensors when the table does not exist yet."""
    version, blob = client.hmget(dense_key(name), [b"v", b"blob"])
    if version is None or blob is None:
        return 0, {}
    return int(version), unpack_tensors(blob)


def push_dense(
    client: Any, name: str, tensors: Mapping[str, np.ndarray], expected_version: int | None = None
) -> int:
    """Write a new version (previous + 1); with ``expected_version``, only if still current."""
    import redis

    key = dense_key(name)
    blob = pack_tensors(tensors)
    with client.pipeline(transaction=True) as pipe:
        try:
            pipe.watch(key)
            current = int(pipe.hget(key, b"v") or 0)
            if expected_version is not None and current != expected_version:
                raise DenseConflict(f"dense {name}: version {current}, expected {expected_version}")
            pipe.multi()
            pipe.hset(key, mapping={b"v": current + 1, b"blob": blob})
            pipe.execute()
        except redis.WatchError:
            raise DenseConflict(f"dense {name}: changed concurrently") from None
    return current + 1
