"""From consumed messages to :class:`~pipeline.joiner.logic.EventBatch` columns, in bulk.

All Impression (and all Click) bodies of a poll are decoded together by
:mod:`pipeline.codec.avrocolumns`, then every string the join hashes is hashed in
one vectorized XXH64 pass (:mod:`pipeline.codec.xxh64`): the join key
``request_id 0x1F item_id`` (seed 0, and seed 1 for the downsampling draw), the
route ``hash64("user_id", user_id)`` and ``hash64(slot, value)`` of every configured
feature. Records the bulk reader does not vouch for (broken bytes, non-ASCII text,
repeated map keys) are decoded one by one with fastavro: a :class:`CodecError`
makes them dead letters, anything else is joined like the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.codec.avrocolumns import (
    MapColumn,
    RecordColumns,
    StrColumn,
    decode_columns,
    key_words,
)
from pipeline.codec.avrocolumns import fingerprint as key_fingerprint
from pipeline.codec.errors import CodecError
from pipeline.codec.hashing import SEPARATOR
from pipeline.codec.validation import MAX_FUTURE_SKEW_MS, now_ms
from pipeline.codec.xxh64 import reader as xxh64_reader
from pipeline.codec.xxh64 import xxh64_ranges
from pipeline.joiner.logic import EventBatch, JoinConfig, click_batch, impression_batch
from pipeline.joiner.records import Click, decode_click, decode_impression
from pipeline.joiner.results import NEGATIVE_SEED, OrphanClick, keep_threshold

__all__ = ["Decoded", "Rejected", "decode_events"]

I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]


@dataclass(frozen=True)
class Rejected:
    """A message that cannot be joined: its position and why (a dead letter)."""

    index: int  # position in the input sequence
    reason: str
    error: str


@dataclass
class Decoded:
    """The valid events of a poll as one batch in input order, and the rejected ones."""

    events: EventBatch
    index: I64  # input position of each event
    rejected: list[Rejected]


class _Builder:
    """Hash inputs made of pieces: ranges of the message buffer and constant strings."""

    def __init__(self, buf: npt.NDArray[np.uint8], constants: Sequence[bytes]) -> None:
        self.consts: dict[bytes, tuple[int, int]] = {}
        extra = bytearray()
        base = len(buf)
        for c in dict.fromkeys(constants):
            self.consts[c] = (base + len(extra), len(c))
            extra += c
        self.buf = np.concatenate([buf, np.frombuffer(bytes(extra), dtype=np.uint8)])
        self.groups: list[tuple[StrColumn, ...]] = []
        self.size = 0
        self._joined: tuple[npt.NDArray[np.uint8], I64, I64, Any] | None = None

    def const(self, c: bytes, n: int) -> StrColumn:
        s, length = self.consts[c]
        return StrColumn(np.full(n, s, dtype=np.int64), np.full(n, length, dtype=np.int64))

    def add(self, *pieces: StrColumn) -> slice:
        """Queue strings made of ``pieces`` (equal-length columns); their slice of the hashes."""
        n = len(pieces[0].start)
        self.groups.append(pieces)
        out = slice(self.size, self.size + n)
        self.size += n
        return out

    def hash(self, seed: int = 0, only: slice | None = None) -> U64:
        """XXH64 of every queued string (or of ``only``)."""
        if not self.size:
            return np.zeros(0, dtype=np.uint64)
        joined, starts, lengths, words = self._join()
        if only is not None:
            starts, lengths = starts[only], lengths[only]
        return xxh64_ranges(joined, starts, lengths, seed, words)

    def _join(self) -> tuple[npt.NDArray[np.uint8], I64, I64, Any]:
        """Every queued string's pieces copied next to each other into one buffer."""
        if self._joined is None:
            st = np.concatenate([np.stack([p.start for p in g], 1).ravel() for g in self.groups])
            ln = np.concatenate([np.stack([p.length for p in g], 1).ravel() for g in self.groups])
            total = int(ln.sum())
            dest = np.cumsum(ln) - ln
            src = np.repeat(st - dest, ln) + np.arange(total, dtype=np.int64)
            joined = self.buf[src]
            lengths = np.concatenate([sum(p.length for p in g) for g in self.groups])
            starts = np.cumsum(lengths) - lengths
            self._joined = (joined, starts, lengths, xxh64_reader(joined))
        return self._joined


def _select(col: StrColumn, idx: I64) -> StrColumn:
    return StrColumn(col.start[idx], col.length[idx])


def decode_events(
    config: JoinConfig,
    is_click: Sequence[bool],
    values: Sequence[bytes],
    origin: Any,
) -> Decoded:
    """Decode and hash a poll's messages (impressions and clicks, in consumed order).

    ``origin(i)`` gives the :class:`Origin` of message ``i`` (asked only for clicks
    that wait for their impression).
    """
    flags = np.fromiter(is_click, dtype=bool, count=len(values))
    imp_at = np.flatnonzero(~flags)
    clk_at = np.flatnonzero(flags)
    rejected: list[Rejected] = []
    imps = _impressions(config, [values[i] for i in imp_at.tolist()], imp_at, rejected)
    clks = _clicks([values[i] for i in clk_at.tolist()], clk_at, rejected, origin)
    parts = [p for p in (imps, clks) if p is not None]
    if not parts:
        batch = click_batch([], [])
        return Decoded(batch, np.zeros(0, dtype=np.int64), rejected)
    index = np.concatenate([p[1] for p in parts])
    order = np.argsort(index, kind="stable")
    s = len(config.slots.slots)
    batches = [p[0] for p in parts]

    def cat(name: str) -> Any:
        return np.concatenate([getattr(b, name) for b in batches])[order]

    def mat(name: str) -> Any:
        cols = [getattr(b, name) for b in batches]
        cols = [c if c.shape[1] == s else np.zeros((len(c), s), c.dtype) for c in cols]
        return np.concatenate(cols)[order]

    click_of = clks[0].orphan if clks is not None else None
    n_imp = len(imps[1]) if imps is not None else 0
    click_pos = np.full(len(index), -1, dtype=np.int64)
    if clks is not None:
        click_pos[np.arange(n_imp, len(index))] = np.arange(len(clks[1]))
    click_pos = click_pos[order]

    def orphan(i: int) -> OrphanClick:
        assert click_of is not None
        return click_of(int(click_pos[i]))

    events = EventBatch(
        click=cat("click"),
        time=cat("time"),
        key=cat("key"),
        user=cat("user"),
        keep=cat("keep"),
        ids=mat("ids"),
        present=mat("present"),
        unknown=cat("unknown"),
        orphan=orphan,
    )
    return Decoded(events, index[order], rejected)


def _valid(cols: RecordColumns, kind: str) -> npt.NDArray[np.bool_]:
    f = cols.fields
    ok = cols.ok.copy()
    for name in ("request_id", "user_id", "item_id"):
        ok &= f[name].length > 0
    latest = now_ms() + MAX_FUTURE_SKEW_MS  # others are judged one by one: dead letters
    return ok & (f["event_time"] >= 0) & (f["event_time"] <= latest)


def _fallback(
    values: Sequence[bytes], at: I64, bad: I64, decode: Any, rejected: list[Rejected]
) -> tuple[list[Any], list[int]]:
    """Records the bulk reader left: decoded one by one (dead letters or records)."""
    recs, where = [], []
    for j in bad.tolist():
        try:
            recs.append(decode(values[j]))
            where.append(j)
        except CodecError as exc:
            rejected.append(Rejected(int(at[j]), exc.reason, exc.message))
    return recs, where


def _impressions(
    config: JoinConfig, values: list[bytes], at: I64, rejected: list[Rejected]
) -> tuple[EventBatch, I64] | None:
    if not values:
        return None
    cols = decode_columns("Impression", values)
    good = _valid(cols, "Impression")
    recs, where = _fallback(values, at, np.flatnonzero(~good), decode_impression, rejected)
    batch = _hash_impressions(config, cols, np.flatnonzero(good))
    if recs:
        extra = impression_batch(recs, config)
        batch = _merge(batch, extra)
        idx = np.concatenate([np.flatnonzero(good), np.asarray(where, dtype=np.int64)])
    else:
        idx = np.flatnonzero(good)
    order = np.argsort(idx, kind="stable")
    return _take(batch, order), at[idx[order]]


def _clicks(
    values: list[bytes], at: I64, rejected: list[Rejected], origin: Any
) -> tuple[EventBatch, I64] | None:
    if not values:
        return None
    cols = decode_columns("Click", values)
    good = _valid(cols, "Click")
    recs, where = _fallback(values, at, np.flatnonzero(~good), decode_click, rejected)
    ok = np.flatnonzero(good)
    f = cols.fields
    b = _Builder(cols.buf, [SEPARATOR])
    keys = b.add(
        _select(f["request_id"], ok), b.const(SEPARATOR, len(ok)), _select(f["item_id"], ok)
    )
    key = b.hash(0)[keys]
    idx = np.concatenate([ok, np.asarray(where, dtype=np.int64)])
    times = np.concatenate([f["event_time"][ok], [r.event_time for r in recs]]).astype(np.int64)
    if recs:
        key = np.concatenate([key, click_batch(recs, [None] * len(recs)).key])  # type: ignore[list-item]
    order = np.argsort(idx, kind="stable")
    idx = idx[order]
    n = len(idx)
    pos_of = {int(j): r for r, j in enumerate(where)}

    def orphan(i: int) -> OrphanClick:
        j = int(idx[i])
        if j in pos_of:
            c = recs[pos_of[j]]
        else:
            c = Click(
                cols.text(f["request_id"], j),
                cols.text(f["user_id"], j),
                cols.text(f["item_id"], j),
                int(f["event_time"][j]),
            )
        return OrphanClick(c, origin(int(at[j])))

    batch = EventBatch(
        click=np.ones(n, dtype=bool),
        time=times[order],
        key=key[order],
        user=np.zeros(n, dtype=np.uint64),
        keep=np.zeros(n, dtype=bool),
        ids=np.zeros((n, 0), dtype=np.uint64),
        present=np.zeros((n, 0), dtype=bool),
        unknown=np.zeros(n, dtype=np.int64),
        orphan=orphan,
    )
    return batch, at[idx]


def _hash_impressions(config: JoinConfig, cols: RecordColumns, ok: I64) -> EventBatch:
    """Keys, route, draw and feature ids of the records ``ok``, all hashed at once."""
    slots = config.slots.slots
    s = len(slots)
    n = len(ok)
    f = cols.fields
    prefixes = [name.encode("utf-8") + SEPARATOR for name in slots]
    b = _Builder(cols.buf, [SEPARATOR, b"user_id" + SEPARATOR, *prefixes])
    rid, item, user = (_select(f[c], ok) for c in ("request_id", "item_id", "user_id"))
    keys = b.add(rid, b.const(SEPARATOR, n), item)
    route = b.add(b.const(b"user_id" + SEPARATOR, n), user)
    # map entries of the ok records that name a configured slot
    fmap: MapColumn = f["features"]
    pos = np.full(len(cols.ok), -1, dtype=np.int64)
    pos[ok] = np.arange(n)
    entry_rec = pos[fmap.record]
    live = entry_rec >= 0
    slot_of = _slot_of(cols, fmap, slots)
    unknown = np.bincount(entry_rec[live & (slot_of < 0)], minlength=n).astype(np.int64)
    use = np.flatnonzero(live & (slot_of >= 0))
    e_rec, e_slot = entry_rec[use], slot_of[use]
    pieces_start = np.array([b.consts[p][0] for p in prefixes], dtype=np.int64)
    pieces_len = np.array([len(p) for p in prefixes], dtype=np.int64)
    feats = b.add(StrColumn(pieces_start[e_slot], pieces_len[e_slot]), _select(fmap.value, use))
    present = np.zeros((n, s), dtype=bool)
    present[e_rec, e_slot] = True
    fills = []  # user_id / item_id slots not in the map come from the record fields
    for name, col in (("user_id", user), ("item_id", item)):
        if name in slots:
            j = slots.index(name)
            need = np.flatnonzero(~present[:, j])
            if len(need):
                piece = b.const(prefixes[j], len(need))
                fills.append((need, j, b.add(piece, _select(col, need))))
    hashes = b.hash(0)
    ids = np.zeros((n, s), dtype=np.uint64)
    ids[e_rec, e_slot] = hashes[feats]
    for need, j, sl in fills:
        ids[need, j] = hashes[sl]
        present[need, j] = True
    rate = config.negative_rate
    if rate >= 1.0:
        keep = np.ones(n, dtype=bool)
    else:
        keep = b.hash(NEGATIVE_SEED, keys) < np.uint64(keep_threshold(rate))

    def no_orphan(i: int) -> OrphanClick:
        raise AssertionError("impressions are never orphans")

    return EventBatch(
        click=np.zeros(n, dtype=bool),
        time=f["event_time"][ok].astype(np.int64),
        key=hashes[keys],
        user=hashes[route],
        keep=keep,
        ids=ids,
        present=present,
        unknown=unknown,
        orphan=no_orphan,
    )


def _slot_of(cols: RecordColumns, fmap: MapColumn, slots: tuple[str, ...]) -> I64:
    """Index of the configured slot each map key names, -1 for other keys.

    A fingerprint lookup finds the candidate; its bytes are then compared exactly
    (as two words for names up to 16 bytes, byte by byte for longer ones).
    """
    names = [s.encode("utf-8") for s in slots]
    lengths = np.array([len(x) for x in names], dtype=np.int64)
    width = max(16, int(lengths.max()))
    table = np.zeros((len(names), width), dtype=np.uint8)
    for j, x in enumerate(names):
        table[j, : len(x)] = np.frombuffer(x, dtype=np.uint8)
    tbuf = np.concatenate([table.ravel(), np.zeros(64, dtype=np.uint8)])
    tstart = np.arange(len(names), dtype=np.int64) * width
    fps = key_fingerprint(tbuf, tstart, lengths)
    n0, n1 = key_words(tbuf, tstart, lengths)
    if len(set(fps.tolist())) < len(fps):  # two names share a fingerprint: compare all bytes
        return _slot_of_bytes(cols, fmap, table, lengths)
    order = np.argsort(fps)
    at = np.minimum(np.searchsorted(fps[order], fmap.key_hash), len(names) - 1)
    cand = order[at]
    hit = (fps[cand] == fmap.key_hash) & (fmap.key.length == lengths[cand])
    sel = np.flatnonzero(hit)
    if len(sel):
        e0, e1 = key_words(cols.buf, fmap.key.start[sel], fmap.key.length[sel], cols.words)
        same = (e0 == n0[cand[sel]]) & (e1 == n1[cand[sel]])
        long = lengths[cand[sel]] > 16
        if long.any():
            same[long] = (
                _slot_of_bytes(cols, _subset(fmap, sel[long]), table, lengths) == cand[sel[long]]
            )
        hit[sel[~same]] = False
    return np.where(hit, cand, -1)


def _subset(fmap: MapColumn, idx: I64) -> MapColumn:
    return MapColumn(fmap.record[idx], _select(fmap.key, idx), None, fmap.key_hash[idx])


def _slot_of_bytes(
    cols: RecordColumns, fmap: MapColumn, table: npt.NDArray[np.uint8], lengths: I64
) -> I64:
    """Byte-by-byte matching of map keys against slot names (the exact, slow way)."""
    out = np.full(len(fmap.record), -1, dtype=np.int64)
    width = table.shape[1]
    grab = np.minimum(fmap.key.start[:, None] + np.arange(width), len(cols.buf) - 1)
    got = cols.buf[grab]
    inside = np.arange(width)[None, :] < fmap.key.length[:, None]
    got = np.where(inside, got, 0)
    for j in range(len(lengths)):
        match = (fmap.key.length == lengths[j]) & (got == table[j]).all(axis=1)
        out[match] = j
    return out


def _merge(a: EventBatch, b: EventBatch) -> EventBatch:
    s = max(a.ids.shape[1], b.ids.shape[1])

    def mat(x: Any) -> Any:
        return x if x.shape[1] == s else np.zeros((len(x), s), x.dtype)

    return EventBatch(
        click=np.concatenate([a.click, b.click]),
        time=np.concatenate([a.time, b.time]),
        key=np.concatenate([a.key, b.key]),
        user=np.concatenate([a.user, b.user]),
        keep=np.concatenate([a.keep, b.keep]),
        ids=np.concatenate([mat(a.ids), mat(b.ids)]),
        present=np.concatenate([mat(a.present), mat(b.present)]),
        unknown=np.concatenate([a.unknown, b.unknown]),
        orphan=a.orphan,
    )


def _take(b: EventBatch, idx: I64) -> EventBatch:
    return EventBatch(
        click=b.click[idx],
        time=b.time[idx],
        key=b.key[idx],
        user=b.user[idx],
        keep=b.keep[idx],
        ids=b.ids[idx],
        present=b.present[idx],
        unknown=b.unknown[idx],
        orphan=b.orphan,
    )
