"""Entries of a shard's grad stream: what a trainer pushes, as packed arrays.

One stream entry per (push, shard) with these fields (all little-endian):

| field | content |
| --- | --- |
| ``h`` | JSON header: kind, trainer, seq, n, dim, max_event_time, offsets, barrier |
| ``i`` | ids, uint64[n] |
| ``v`` | gradients (kind ``grad``) or parameter deltas (kind ``delta``), float32[n*dim] |
| ``s`` | shows, float32[n] |
| ``c`` | clicks, float32[n] |

A ``barrier`` entry carries no arrays: it marks a consistent cut for snapshots.
Decoding checks every length so a corrupted entry is rejected whole.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["KINDS", "Push", "StreamEntryError", "decode_push", "encode_push", "stream_id_tuple"]

KINDS = ("grad", "delta", "barrier")


class StreamEntryError(ValueError):
    """A stream entry that cannot be applied; ``reason`` is a stable code for metrics."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass(frozen=True)
class Push:
    """One trainer's contribution to one shard of one table."""

    kind: str
    trainer: str
    seq: int
    ids: np.ndarray
    values: np.ndarray  # [n, dim] float32
    shows: np.ndarray
    clicks: np.ndarray
    max_event_time: int = 0
    offsets: dict[str, dict[str, int]] = field(default_factory=dict)
    barrier: str | None = None

    @property
    def n(self) -> int:
        return len(self.ids)


def encode_push(push: Push) -> dict[bytes, bytes]:
    """Stream fields of ``push`` (validates shapes first: never writes a bad entry)."""
    if push.kind not in KINDS:
        raise StreamEntryError("bad_kind", f"kind must be one of {KINDS}, got {push.kind!r}")
    n = push.n
    values = np.ascontiguousarray(push.values, dtype="<f4")
    dim = values.shape[1] if values.ndim == 2 else 0
    if push.kind != "barrier" and (
        values.ndim != 2 or values.shape[0] != n or len(push.shows) != n or len(push.clicks) != n
    ):
        raise StreamEntryError(
            "length_mismatch",
            f"ids {n}, values {values.shape}, shows {len(push.shows)}, clicks {len(push.clicks)}",
        )
    header = {
        "kind": push.kind,
        "trainer": push.trainer,
        "seq": push.seq,
        "n": n,
        "dim": dim,
        "max_event_time": int(push.max_event_time),
        "offsets": push.offsets,
        "barrier": push.barrier,
    }
    return {
        b"h": json.dumps(header, separators=(",", ":")).encode(),
        b"i": np.ascontiguousarray(push.ids, dtype="<u8").tobytes(),
        b"v": values.tobytes(),
        b"s": np.ascontiguousarray(push.shows, dtype="<f4").tobytes(),
        b"c": np.ascontiguousarray(push.clicks, dtype="<f4").tobytes(),
    }


def _array(fields: dict[bytes, bytes], name: bytes, dtype: str, count: int) -> np.ndarray:
    raw = fields.get(name, b"")
    size = np.dtype(dtype).itemsize
    if len(raw) != count * size:
        raise StreamEntryError(
            "length_mismatch", f"field {name.decode()}: {len(raw)} bytes, expected {count * size}"
        )
    return np.frombuffer(raw, dtype=dtype)


def decode_push(fields: dict[bytes, bytes], expected_dim: int) -> Push:
    """Parse and validate a stream entry for a table of ``expected_dim``."""
    try:
        header: dict[str, Any] = json.loads(fields[b"h"])
        kind, n, dim = header["kind"], int(header["n"]), int(header["dim"])
    except (KeyError, ValueError, TypeError) as exc:
        raise StreamEntryError("bad_header", f"unreadable header: {exc}") from None
    if kind not in KINDS:
        raise StreamEntryError("bad_kind", f"unknown kind {kind!r}")
    if kind != "barrier" and dim != expected_dim:
        raise StreamEntryError("wrong_dim", f"entry dim {dim}, table dim {expected_dim}")
    if n < 0:
        raise StreamEntryError("length_mismatch", f"negative n {n}")
    ids = _array(fields, b"i", "<u8", n)
    values = _array(fields, b"v", "<f4", n * dim).reshape(n, dim)
    shows = _array(fields, b"s", "<f4", n)
    clicks = _array(fields, b"c", "<f4", n)
    if kind != "barrier":
        for name, arr in (("values", values), ("shows", shows), ("clicks", clicks)):
            if not np.isfinite(arr).all():
                raise StreamEntryError("non_finite", f"{name} contain NaN or inf")
        if (shows < 0).any() or (clicks < 0).any():
            raise StreamEntryError("negative_counts", "shows and clicks must be >= 0")
    return Push(
        kind=kind,
        trainer=str(header.get("trainer", "")),
        seq=int(header.get("seq", 0)),
        ids=ids,
        values=values,
        shows=shows,
        clicks=clicks,
        max_event_time=int(header.get("max_event_time", 0)),
        offsets=header.get("offsets") or {},
        barrier=header.get("barrier"),
    )


def stream_id_tuple(entry_id: bytes | str) -> tuple[int, int]:
    """``b"1700000000000-3"`` -> (1700000000000, 3), for ordering stream ids."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)
