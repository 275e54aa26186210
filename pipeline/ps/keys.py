"""Sharding and the Redis key layout of the parameter server.

``shard = splitmix64(id) mod S`` (the SplitMix64 finalizer spreads sequential
and hashed ids alike). Every key of a shard carries the hash tag
``{table:shard}``, so a Redis Cluster keeps a whole shard on one node and a
multi-key command (MGET, a pipeline of one shard) never crosses slots.

| key | type | holds |
| --- | --- | --- |
| ``pv:{t:s}:<8-byte big-endian id>`` | string | the row's weights, float32 little-endian |
| ``gs:{t:s}`` | stream | pushes from trainers (gradstream.py) |
| ``ps:{t:s}:meta`` | hash | server state: applied stream id, epoch, counters |
| ``dense:{name}`` | hash | a dense table: version + packed tensors (dense.py) |
"""

from __future__ import annotations

from typing import cast

import numpy as np

__all__ = ["ShardKeys", "row_bytes", "shard_of", "split_by_shard"]

_C1 = np.uint64(0xBF58476D1CE4E5B9)
_C2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(ids: np.ndarray) -> np.ndarray:
    z = ids.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        z += np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * _C1
        z = (z ^ (z >> np.uint64(27))) * _C2
    return z ^ (z >> np.uint64(31))


def shard_of(ids: np.ndarray, shards: int) -> np.ndarray:
    """Shard index of each uint64 id (stable across processes and platforms)."""
    if shards < 1:
        raise ValueError("shards must be >= 1")
    return (_splitmix64(np.asarray(ids, dtype=np.uint64)) % np.uint64(shards)).astype(np.int64)


def split_by_shard(ids: np.ndarray, shards: int) -> list[np.ndarray]:
    """Positions of ``ids`` belonging to each shard (a list of index arrays, one per shard)."""
    owner = shard_of(ids, shards)
    order = np.argsort(owner, kind="stable")
    bounds = np.searchsorted(owner[order], np.arange(shards + 1))
    return [order[bounds[s] : bounds[s + 1]] for s in range(shards)]


def row_bytes(rows: np.ndarray) -> list[bytes]:
    """Each row of a 2-D array as its own little-endian bytes (no Python loop per byte)."""
    rows = np.ascontiguousarray(rows, dtype="<f4")
    if rows.ndim != 2:
        raise ValueError(f"expected a 2-D array, got shape {rows.shape}")
    width = rows.shape[1] * 4
    out = rows.view(np.dtype((np.void, width))).ravel().tolist()
    return cast("list[bytes]", out)


class ShardKeys:
    """Redis key names of one (table, shard)."""

    def __init__(self, table: str, shard: int) -> None:
        if not table or any(c in table for c in "{}: "):
            raise ValueError(
                f"table name {table!r} must be non-empty without '{{', '}}', ':' or spaces"
            )
        self.table = table
        self.shard = shard
        self.tag = f"{{{table}:{shard}}}"
        self.pull_prefix = f"pv:{self.tag}:".encode()
        self.stream = f"gs:{self.tag}".encode()
        self.meta = f"ps:{self.tag}:meta".encode()
        self._key_dtype = np.dtype((np.void, len(self.pull_prefix) + 8))
        self._prefix_view = np.frombuffer(self.pull_prefix, dtype=np.uint8)

    def pull_keys(self, ids: np.ndarray) -> list[bytes]:
        """Pull-view keys of ``ids``, built with array ops rather than a Python loop per id."""
        ids = np.ascontiguousarray(ids, dtype=">u8")  # big-endian: keys sort by id
        n, plen = len(ids), len(self.pull_prefix)
        buf = np.empty((n, plen + 8), dtype=np.uint8)
        buf[:, :plen] = self._prefix_view
        buf[:, plen:] = ids.view(np.uint8).reshape(n, 8)
        keys = buf.view(self._key_dtype).ravel().tolist()  # void keeps trailing NUL bytes
        return cast("list[bytes]", keys)

    def mget_command(self, ids: np.ndarray) -> bytes:
        """The RESP-encoded ``MGET`` of the pull keys of ``ids``, built with array ops.

        Keys have a fixed width, so the whole command is one byte matrix: this skips
        redis-py's per-argument encoding, the largest client-side cost of a pull.
        """
        ids = np.ascontiguousarray(ids, dtype=">u8")
        n, plen = len(ids), len(self.pull_prefix)
        head = f"${plen + 8}\r\n".encode()
        h = len(head)
        buf = np.empty((n, h + plen + 8 + 2), dtype=np.uint8)
        buf[:, :h] = np.frombuffer(head, dtype=np.uint8)
        buf[:, h : h + plen] = self._prefix_view
        buf[:, h + plen : h + plen + 8] = ids.view(np.uint8).reshape(n, 8)
        buf[:, -2:] = np.frombuffer(b"\r\n", dtype=np.uint8)
        return f"*{n + 1}\r\n$4\r\nMGET\r\n".encode() + buf.tobytes()

    def mset_command(self, ids: np.ndarray, rows: np.ndarray) -> bytes:
        """The RESP-encoded ``MSET`` of the pull keys of ``ids`` to ``rows`` (float32 LE).

        Keys and values both have a fixed width, so, as for :meth:`mget_command`, the
        whole command is one byte matrix instead of 2n arguments encoded by redis-py
        (the largest client-side cost of a shard server's apply round).
        """
        ids = np.ascontiguousarray(ids, dtype=">u8")
        values = np.ascontiguousarray(rows, dtype="<f4")
        n, plen = len(ids), len(self.pull_prefix)
        width = values.shape[1] * 4 if values.ndim == 2 else 0
        if values.shape[0] != n:
            raise ValueError(f"{n} ids but {values.shape[0]} rows")
        khead = np.frombuffer(f"${plen + 8}\r\n".encode(), dtype=np.uint8)
        vhead = np.frombuffer(f"${width}\r\n".encode(), dtype=np.uint8)
        crlf = np.frombuffer(b"\r\n", dtype=np.uint8)
        parts = [
            (khead, khead.shape[0]),
            (self._prefix_view, plen),
            (ids.view(np.uint8).reshape(n, 8), 8),
            (crlf, 2),
            (vhead, vhead.shape[0]),
            (values.view(np.uint8).reshape(n, width), width),
            (crlf, 2),
        ]
        buf = np.empty((n, sum(w for _, w in parts)), dtype=np.uint8)
        at = 0
        for piece, w in parts:
            buf[:, at : at + w] = piece
            at += w
        return f"*{2 * n + 1}\r\n$4\r\nMSET\r\n".encode() + buf.tobytes()

    def id_of_key(self, key: bytes) -> int:
        """The id encoded in a pull-view key."""
        return int.from_bytes(key[len(self.pull_prefix) :], "big")
