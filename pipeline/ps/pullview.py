"""The pull view: current weights of admitted rows, one Redis string per row.

Layout chosen after measuring (benchmarks/ps.py): one key per row read with one
MGET per shard beats bucketed hashes (HMGET per bucket) on pull throughput and
keeps every read a single command per shard; keys are hash-tagged so MGET stays
within one Redis Cluster slot. A missing key means "not admitted": the trainer
uses zeros, as production PS accessors do.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.ps.keys import ShardKeys, row_bytes

__all__ = ["decode_rows", "delete_rows", "read_rows", "write_commands", "write_rows"]

WRITE_CHUNK = 4096  # keys per MSET: bounded command size, no long Redis stalls


def decode_rows(values: list[bytes | None], dim: int) -> tuple[np.ndarray, np.ndarray]:
    """MGET replies -> (weights float32[n, dim] with zeros for misses, found mask)."""
    n = len(values)
    # map/filter with builtins: no Python-level loop body per row (values are never b"").
    found = np.fromiter(map(bool, values), dtype=bool, count=n)
    weights = np.zeros((n, dim), dtype=np.float32)
    hits = int(found.sum())
    if hits:
        joined = b"".join(filter(None, values))
        if len(joined) != hits * dim * 4:
            bad = next(i for i, v in enumerate(values) if v is not None and len(v) != dim * 4)
            raise ValueError(
                f"pull view value {bad} has {len(values[bad] or b'')} bytes, expected {dim * 4}"
            )
        weights[found] = np.frombuffer(joined, dtype="<f4").reshape(-1, dim)
    return weights, found


def read_rows(
    client: Any, keys: ShardKeys, ids: np.ndarray, dim: int
) -> tuple[np.ndarray, np.ndarray]:
    """Weights of ``ids`` (all in this shard) with one MGET."""
    if len(ids) == 0:
        return np.zeros((0, dim), dtype=np.float32), np.zeros(0, dtype=bool)
    return decode_rows(client.mget(keys.pull_keys(ids)), dim)


def write_rows(pipe: Any, keys: ShardKeys, ids: np.ndarray, weights: np.ndarray) -> None:
    """Queue MSETs of ``weights`` for ``ids`` on a pipeline (caller executes)."""
    names = keys.pull_keys(ids)
    values = row_bytes(weights)
    for start in range(0, len(names), WRITE_CHUNK):
        args: list[bytes] = [b""] * (2 * len(names[start : start + WRITE_CHUNK]))
        args[0::2] = names[start : start + WRITE_CHUNK]
        args[1::2] = values[start : start + WRITE_CHUNK]
        pipe.execute_command("MSET", *args)


def write_commands(keys: ShardKeys, ids: np.ndarray, weights: np.ndarray) -> list[bytes]:
    """Pre-encoded MSETs of ``weights`` for ``ids`` (what :func:`write_rows` queues)."""
    return [
        keys.mset_command(ids[start : start + WRITE_CHUNK], weights[start : start + WRITE_CHUNK])
        for start in range(0, len(ids), WRITE_CHUNK)
    ]


def delete_rows(pipe: Any, keys: ShardKeys, ids: np.ndarray) -> None:
    """Queue DELs of ``ids`` (rows evicted or no longer served)."""
    names = keys.pull_keys(ids)
    for start in range(0, len(names), WRITE_CHUNK):
        pipe.execute_command("DEL", *names[start : start + WRITE_CHUNK])
