"""Incremental checkpoints of a partition's join state: deltas of changed rows.

A delta holds the rows (keys) that changed since the previous delta of the partition,
as packed little-endian columns, plus the partition's small scalar state (watermark,
stream positions, counters, input offsets, output positions), and the clicks waiting
on changed rows. Replaying a partition's deltas in order (a key's newest version wins)
and then dropping what the restored watermark has already passed rebuilds the state
exactly: every way a key leaves the state (its window closed, its retention ended,
its waiting clicks dead-lettered) is decided by the watermark, so no tombstones are
needed. A delta of *every* row is a full snapshot (the faust engine stores those).

Layout: ``b"JD1\\n"``, a 4-byte little-endian header length, the JSON header, then the
columns ``key <u8, status u1, flags u1, kind u1, emitted u1, time <i8, user <u8,
has_features u1`` for ``rows`` rows, then ``ids <u8 [m, slots]`` and ``present u1
[m, slots]`` for the ``m`` rows with features.
"""

from __future__ import annotations

import base64
import json
import struct
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.joiner.logic import PartitionJoiner
from pipeline.joiner.records import Click, Origin
from pipeline.joiner.results import Counters, OrphanClick
from pipeline.joiner.table import DONE, NONE, PENDING

__all__ = [
    "MAGIC",
    "Delta",
    "apply_delta",
    "decode_delta",
    "encode_delta",
    "finish_restore",
    "oldest_needed",
    "restore",
    "snapshot",
    "take_changes",
]

MAGIC = b"JD1\n"
_COLUMNS: tuple[tuple[str, str], ...] = (
    ("key", "<u8"),
    ("status", "u1"),
    ("flags", "u1"),
    ("kind", "u1"),
    ("emitted", "u1"),
    ("time", "<i8"),
    ("user", "<u8"),
)


@dataclass
class Delta:
    """A decoded delta: its header and row columns."""

    header: dict[str, Any]
    columns: dict[str, npt.NDArray[Any]]
    ids: npt.NDArray[np.uint64]
    present: npt.NDArray[np.bool_]
    has_features: npt.NDArray[np.bool_]


def encode_delta(
    joiner: PartitionJoiner, rows: npt.NDArray[np.int32], meta: dict[str, Any]
) -> bytes:
    """A delta of ``rows`` of ``joiner`` with its scalar state and ``meta`` (JSON-able;
    ``meta["seq"]`` numbers the delta, see :func:`take_changes`)."""
    t = joiner.table
    slots = list(joiner.config.slots.slots)
    has = t.feat[rows] >= 0
    frows = rows[has]
    waiting = []
    held: list[int] = []
    if joiner.orphans:
        held = np.flatnonzero(np.isin(rows, np.fromiter(joiner.orphans, np.int64))).tolist()
    for j in held:
        for c in joiner.orphans[int(rows[j])]:
            cl, o = c.click, c.origin
            key = None if o.key is None else base64.b64encode(o.key).decode()
            waiting.append(
                [
                    j,
                    cl.request_id,
                    cl.user_id,
                    cl.item_id,
                    cl.event_time,
                    o.topic,
                    o.partition,
                    o.offset,
                    key,
                    base64.b64encode(o.value).decode(),
                ]
            )
    header = {
        **meta,
        "slots": slots,
        "rows": len(rows),
        "features": len(frows),
        "watermark": joiner.watermark,
        "max_time": joiner.max_time,
        "counters": asdict(joiner.counters),
        "waiting": waiting,
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    parts = [MAGIC, struct.pack("<I", len(head)), head]
    for name, dtype in _COLUMNS:
        parts.append(getattr(t, name)[rows].astype(dtype, copy=False).tobytes())
    parts.append(has.astype(np.uint8).tobytes())
    parts.append(t.ids[t.feat[frows]].astype("<u8", copy=False).tobytes())
    parts.append(t.present[t.feat[frows]].astype(np.uint8).tobytes())
    return b"".join(parts)


def decode_delta(blob: bytes) -> Delta:
    """The header and columns of a delta; ValueError when it is not one."""
    if blob[:4] != MAGIC:
        raise ValueError("not a joiner state delta (bad magic)")
    (size,) = struct.unpack_from("<I", blob, 4)
    header = json.loads(blob[8 : 8 + size])
    n, m, s = header["rows"], header["features"], len(header["slots"])
    at = 8 + size
    columns: dict[str, npt.NDArray[Any]] = {}
    for name, dtype in (*_COLUMNS, ("has", "u1")):
        width = np.dtype(dtype).itemsize
        columns[name] = np.frombuffer(blob, dtype=dtype, count=n, offset=at)
        at += width * n
    ids = np.frombuffer(blob, dtype="<u8", count=m * s, offset=at).reshape(m, s)
    at += 8 * m * s
    present = np.frombuffer(blob, dtype=np.uint8, count=m * s, offset=at).reshape(m, s) != 0
    at += m * s
    if at != len(blob):
        raise ValueError(f"state delta has {len(blob) - at} bytes past its columns")
    has = columns.pop("has") != 0
    return Delta(header, columns, ids.astype(np.uint64), present, has)


def apply_delta(joiner: PartitionJoiner, delta: Delta) -> None:
    """Upsert the rows of ``delta`` (apply deltas oldest first) and take its scalar state."""
    h = delta.header
    if list(h["slots"]) != list(joiner.config.slots.slots):
        raise ValueError(f"state has slots {h['slots']}, the joiner {joiner.config.slots.slots}")
    t = joiner.table
    keys = delta.columns["key"].astype(np.uint64)
    rows = t.index.lookup(keys)
    new = rows < 0
    if new.any():
        rows[new] = t.alloc(keys[new])
    for name, _ in _COLUMNS[1:]:
        getattr(t, name)[rows] = delta.columns[name]
    t.written[rows] = int(h.get("seq", 0))
    t.drop_features(rows)
    t.set_features(rows[delta.has_features], delta.ids, delta.present)
    for row in rows.tolist():
        joiner.orphans.pop(row, None)
    for j, rid, user, item, when, topic, part, offset, key, value in h["waiting"]:
        raw_key = None if key is None else base64.b64decode(key)
        origin = Origin(topic, part, offset, raw_key, base64.b64decode(value))
        joiner.orphans.setdefault(int(rows[j]), []).append(
            OrphanClick(Click(rid, user, item, when), origin)
        )
    joiner.watermark = h["watermark"]
    joiner.max_time = list(h["max_time"])
    joiner.counters = Counters(**h["counters"])


def finish_restore(joiner: PartitionJoiner) -> None:
    """Drop what the restored watermark already passed; rebuild the timers."""
    t = joiner.table
    used = np.flatnonzero(t.status != 0).astype(np.int32)
    wm = joiner.watermark
    keep_ms = joiner.config.window_ms + joiner.config.retention_ms
    if wm is not None:
        for row in list(joiner.orphans):
            if min(c.click.event_time for c in joiner.orphans[row]) < wm:
                del joiner.orphans[row]  # dead-lettered before the checkpoint
        status, time = t.status[used], t.time[used]
        old = (time + keep_ms < wm) & ((status == DONE) | (status == NONE))
        t.emitted[used[old & (status == NONE)]] = 0
        gone = old & (status == DONE)
        # an open window the watermark passed was closed, and forgotten before any later
        # delta could record it (a live one would have been written as closed)
        gone |= (status == PENDING) & (time + joiner.config.window_ms < wm)
        held = np.fromiter(joiner.orphans, dtype=np.int64, count=len(joiner.orphans))
        waiting = np.isin(used, held)
        gone |= (status == NONE) & (t.emitted[used] == 0) & ~waiting
        t.release(used[gone])
        used = used[~gone]
    t.dirty[:] = False
    status = t.status[used]
    pending = used[status == PENDING]
    joiner._push(joiner._closing, t.time[pending] + joiner.config.window_ms, pending)
    remembered = used[(status == DONE) | ((status == NONE) & (t.emitted[used] != 0))]
    joiner._push(joiner._expiry, t.time[remembered] + keep_ms, remembered)
    for row, waiting_clicks in joiner.orphans.items():
        times = [c.click.event_time for c in waiting_clicks]
        joiner._push(joiner._orphan_due, times, [row] * len(times))


def take_changes(
    joiner: PartitionJoiner, seq: int, everything: bool = False
) -> npt.NDArray[np.int32]:
    """Rows to write in delta ``seq`` (changed ones, or all), marked as written there."""
    t = joiner.table
    if everything:
        rows = np.flatnonzero(t.status != 0).astype(np.int32)
    else:
        rows = np.flatnonzero(t.dirty).astype(np.int32)
    t.dirty[rows] = False
    t.written[rows] = seq
    return rows


def oldest_needed(joiner: PartitionJoiner, default: int) -> int:
    """The oldest delta a restore still needs: the one that last wrote the oldest live row."""
    t = joiner.table
    used = t.status != 0
    return int(t.written[used].min()) if used.any() else default


def snapshot(joiner: PartitionJoiner, meta: dict[str, Any]) -> bytes:
    """A delta of every row: the whole state on its own."""
    return encode_delta(joiner, take_changes(joiner, 0, everything=True), meta)


def restore(joiner: PartitionJoiner, blobs: list[bytes]) -> dict[str, Any]:
    """Load deltas (oldest first) into an empty ``joiner``; the newest header."""
    header: dict[str, Any] = {}
    for blob in blobs:
        delta = decode_delta(blob)
        apply_delta(joiner, delta)
        header = delta.header
    finish_restore(joiner)
    return header
