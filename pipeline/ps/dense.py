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
    "dense_version",
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


def dense_version(client: Any, name: str) -> int:
    """The table's version alone (0 when it does not exist): one small read."""
    raw = client.hget(dense_key(name), b"v")
    return 0 if raw is None else int(raw)


def pull_dense(client: Any, name: str) -> tuple[int, dict[str, np.ndarray]]:
    """(version, tensors); version 0 and no tensors when the table does not exist yet."""
    version, blob = client.hmget(dense_key(name), [b"v", b"blob"])
    if version is None or blob is None:
        return 0, {}
    return int(version), unpack_tensors(blob)


# Atomic compare-and-bump of one key: works on a single node and on Redis Cluster
# (unlike WATCH/MULTI, which cluster pipelines do not support).
_PUSH_SCRIPT = """
local v = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')
if ARGV[2] ~= '' and tonumber(ARGV[2]) ~= v then return -1 - v end
redis.call('HSET', KEYS[1], 'v', v + 1, 'blob', ARGV[1])
return v + 1
"""


def push_dense(
    client: Any, name: str, tensors: Mapping[str, np.ndarray], expected_version: int | None = None
) -> int:
    """Write a new version (previous + 1); with ``expected_version``, only if still current."""
    expected = "" if expected_version is None else str(expected_version)
    result = int(client.eval(_PUSH_SCRIPT, 1, dense_key(name), pack_tensors(tensors), expected))
    if result < 0:
        raise DenseConflict(f"dense {name}: version {-1 - result}, expected {expected_version}")
    return result
