"""The authoritative table of one PS shard: a hot in-memory tier over an optional cold tier.

Hot rows live in contiguous numpy blocks indexed by slot (weights, optimizer
state, show, click, last_seen, admitted) behind a vectorized hash index. A push
is validated as a whole, duplicate ids are merged, missing rows are promoted from
the cold tier or created (statistics only), statistics are updated, rows whose
score reaches the admission threshold get their deterministic initial value, and
the optimizer runs on admitted rows only. Under a hot budget the least recently
seen rows are demoted in bulk to the cold tier; tiers hold disjoint ids.

Once checkpoints start tracking (``start_change_tracking``), every change is
recorded at a cost in the changed rows (:mod:`pipeline.ps.dirty`), and
``cut_changes`` hands over the rows changed since the previous cut.

Single writer: the shard server calls this from one thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.arrayops import unique
from pipeline.ps.accessor import Clock, CtrAccessor, system_clock
from pipeline.ps.dirty import Changes, DirtyRows, last_occurrence
from pipeline.ps.export import RowBatch
from pipeline.ps.index import SlotMap, grow_rows
from pipeline.ps.initializers import initialize
from pipeline.ps.optimizers import aggregate, make_optimizer
from pipeline.ps.spec import TableSpec
from pipeline.ps.tiers.base import ColdTier

__all__ = ["ApplyResult", "PushRejected", "RejectReason", "ShardTable"]

U64 = npt.NDArray[np.uint64]
F32 = npt.NDArray[np.float32]
_LS_SPLIT = 1 << 24  # last_seen is stored in a cold row as two exact float32 halves
_MAX_NOW = 1 << 47  # keeps both halves below 2**24, i.e. exact in float32


class RejectReason(str, Enum):
    """Why a push was rejected (stable codes for metrics and the DLQ)."""

    BAD_IDS = "bad_ids"  # not a 1-D array of uint64 / int64 ids
    BAD_SHAPE = "bad_shape"  # values not [n, dim], counts not [n]
    LENGTH_MISMATCH = "length_mismatch"  # ids, values, shows, clicks differ in length
    BAD_DTYPE = "bad_dtype"  # values / counts not real numbers
    NON_FINITE = "non_finite"  # NaN or inf (also after the cast to float32)
    NEGATIVE_COUNT = "negative_count"  # show or click < 0
    BAD_TIME = "bad_time"  # now not an integer in [0, 2**47)


class PushRejected(ValueError):
    """A push (or lookup) failed validation; nothing was changed. ``reason`` says why."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason


def coerce_ids(ids: Any) -> U64:
    """1-D uint64 ids; int64 is reinterpreted as two's complement (how Avro longs carry them)."""
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise PushRejected(RejectReason.BAD_IDS, f"ids must be 1-D, got shape {arr.shape}")
    if arr.dtype == np.uint64:
        return arr
    if arr.dtype == np.int64:
        return arr.view(np.uint64)
    if arr.shape[0] == 0:
        return np.zeros(0, dtype=np.uint64)
    raise PushRejected(RejectReason.BAD_IDS, f"ids must be uint64 or int64, got {arr.dtype}")


def _floats(name: str, values: Any, shape: tuple[int, ...]) -> F32:
    arr = np.asarray(values)
    if arr.dtype.kind not in "fiu" or arr.dtype == np.bool_:
        raise PushRejected(RejectReason.BAD_DTYPE, f"{name} must be real numbers, got {arr.dtype}")
    if arr.ndim != len(shape) or arr.shape[1:] != shape[1:]:
        raise PushRejected(
            RejectReason.BAD_SHAPE, f"{name} must have shape {shape}, got {arr.shape}"
        )
    if arr.shape[0] != shape[0]:
        raise PushRejected(
            RejectReason.LENGTH_MISMATCH, f"{name} has {arr.shape[0]} rows for {shape[0]} ids"
        )
    with np.errstate(over="ignore"):  # overflow to inf is caught just below
        out = arr.astype(np.float32, copy=False)  # never written to: no copy needed
    if not np.isfinite(out).all():
        raise PushRejected(RejectReason.NON_FINITE, f"{name} has NaN/inf (after float32 cast)")
    return out


def check_push(
    ids: Any, values: Any, shows: Any, clicks: Any, dim: int
) -> tuple[U64, F32, F32 | None, F32 | None]:
    """Validate a whole push up front, so a rejected push changes nothing."""
    uids = coerce_ids(ids)
    n = uids.shape[0]
    vals = _floats("values", values, (n, dim))
    counts = []
    for name, c in (("shows", shows), ("clicks", clicks)):
        arr = None if c is None else _floats(name, c, (n,))
        if arr is not None and (arr < 0).any():
            raise PushRejected(RejectReason.NEGATIVE_COUNT, f"{name} must be >= 0")
        counts.append(arr)
    return uids, vals, counts[0], counts[1]


def check_now(now: Any) -> int:
    if isinstance(now, bool) or not isinstance(now, int | np.integer) or not 0 <= now < _MAX_NOW:
        raise PushRejected(RejectReason.BAD_TIME, f"now must be an int in [0, 2**47), got {now!r}")
    return int(now)


@dataclass(frozen=True)
class ApplyResult:
    """What one push changed. ``changed_*`` are the admitted rows to write to the pull view."""

    changed_ids: U64  # sorted; admitted rows whose weights changed
    changed_weights: F32  # [len(changed_ids), dim]
    admitted_ids: U64  # rows that got an embedding in this push (subset of changed_ids)
    created: int  # rows seen for the first time
    promoted: int  # rows read back from the cold tier
    demoted: int  # rows moved to the cold tier after the update


def cold_width(spec: TableSpec) -> int:
    """Floats per cold-tier row of ``spec``.

    Layout: [weights | opt state | show | click | last_seen hi | last_seen lo | admitted].
    """
    return spec.dim + make_optimizer(spec.optimizer).state_width(spec.dim) + 5


class ShardTable:
    """Hot table (+ optional cold tier) of one shard of one sparse table.

    ``hot_budget_rows`` caps the hot rows: after each apply, rows beyond it are
    demoted to ``cold_tier`` least-recently-seen first, down to
    ``(1 - demote_fraction) * budget`` so demotion happens in bulk, not per push.
    """

    def __init__(
        self,
        spec: TableSpec,
        cold_tier: ColdTier | None = None,
        hot_budget_rows: int | None = None,
        clock: Clock = system_clock,
        *,
        demote_fraction: float = 0.02,
        initial_capacity: int = 1024,
    ) -> None:
        self.spec = spec
        self.dim = spec.dim
        self.optimizer = make_optimizer(spec.optimizer)
        self.accessor = CtrAccessor(spec.accessor, seed=spec.initializer.seed)
        self.state_width = self.optimizer.state_width(self.dim)
        self.cold_width = cold_width(spec)
        if hot_budget_rows is not None and (hot_budget_rows < 1 or cold_tier is None):
            raise ValueError("hot_budget_rows must be >= 1 and needs a cold_tier to demote to")
        if cold_tier is not None and cold_tier.width != self.cold_width:
            raise ValueError(f"cold tier width {cold_tier.width} != {self.cold_width} needed")
        if not 0.0 <= demote_fraction < 1.0:
            raise ValueError(f"demote_fraction must be in [0, 1), got {demote_fraction}")
        self._cold = cold_tier
        self.hot_budget_rows = hot_budget_rows
        self._demote_fraction = demote_fraction
        self._clock = clock
        cap = max(16, initial_capacity)
        self._slots = SlotMap(cap)
        self._w = np.zeros((cap, self.dim), dtype=np.float32)
        self._st = np.zeros((cap, self.state_width), dtype=np.float32)
        self._show = np.zeros(cap, dtype=np.float32)
        self._click = np.zeros(cap, dtype=np.float32)
        self._seen = np.zeros(cap, dtype=np.int64)
        self._admitted = np.zeros(cap, dtype=bool)
        self._dirty = DirtyRows()
        self._dirty.reserve(cap)

    # ----------------------------------------------------------------- sizes
    def __len__(self) -> int:
        return self.hot_rows + (self._cold.count() if self._cold is not None else 0)

    @property
    def hot_rows(self) -> int:
        return len(self._slots)

    @property
    def cold_tier(self) -> ColdTier | None:
        return self._cold

    def hot_nbytes(self) -> int:
        """Bytes allocated by the hot tier (row blocks with their slack, index, free list)."""
        blocks = (self._w, self._st, self._show, self._click, self._seen, self._admitted)
        return sum(int(a.nbytes) for a in blocks) + self._slots.nbytes + self._dirty.nbytes

    def bytes_per_row(self) -> float:
        """Allocated hot bytes per hot row (includes growth slack and index load factor)."""
        return self.hot_nbytes() / max(1, self.hot_rows)

    # ----------------------------------------------------------------- writes
    def apply_push(
        self,
        ids: U64,
        grads: F32,
        shows: F32 | None = None,
        clicks: F32 | None = None,
        now: int | None = None,
    ) -> ApplyResult:
        """Apply one push of gradients (async/sync mode). Raises PushRejected before any change.

        ``shows`` defaults to one show per occurrence, ``clicks`` to zero. A row
        admitted by this push gets its deterministic initial value and then this
        push's gradient (as Paddle's accessor creates the embedding before updating
        it), so the first signal that crossed the threshold is not thrown away.
        """
        return self._apply(ids, grads, shows, clicks, now, delta=False)

    def apply_delta(
        self,
        ids: U64,
        deltas: F32,
        shows: F32 | None = None,
        clicks: F32 | None = None,
        now: int | None = None,
    ) -> ApplyResult:
        """Geo mode: add parameter deltas (summed over duplicates) to admitted rows."""
        return self._apply(ids, deltas, shows, clicks, now, delta=True)

    def _apply(
        self,
        ids: U64,
        values: F32,
        shows: F32 | None,
        clicks: F32 | None,
        now: int | None,
        *,
        delta: bool,
    ) -> ApplyResult:
        ids, values, shows, clicks = check_push(ids, values, shows, clicks, self.dim)
        now = check_now(self._clock() if now is None else now)
        uids, vals, show, click = aggregate(ids, values, shows, clicks)
        slots, created, promoted = self._locate(uids)
        self._dirty.mark(slots)
        self._show[slots] += show
        self._click[slots] += click
        self._seen[slots] = np.maximum(self._seen[slots], now)
        admitted = self._admitted[slots]
        newly = np.zeros_like(admitted)
        pending = np.flatnonzero(~admitted)
        if pending.shape[0]:
            ps = slots[pending]
            newly[pending] = self.accessor.admit(uids[pending], self._show[ps], self._click[ps])
            fresh = slots[newly]
            self._w[fresh] = initialize(self.spec.initializer, uids[newly], self.dim)
            self._st[fresh] = self.optimizer.init_state(fresh.shape[0], self.dim)
            self._admitted[fresh] = True
            admitted |= newly
        rows = slots[admitted]
        weights, state = self._w[rows], self._st[rows]  # gathered copies
        if delta:
            self.optimizer.apply_delta(weights, state, vals[admitted])
        else:
            self.optimizer.update(weights, state, vals[admitted])
        self._w[rows], self._st[rows] = weights, state
        demoted = self._enforce_budget()
        return ApplyResult(uids[admitted], weights, uids[newly], created, promoted, demoted)

    def _locate(self, uids: U64) -> tuple[npt.NDArray[np.int64], int, int]:
        """Hot slots for unique ``uids``: promote cold rows, create the rest (stats only)."""
        slots = self._slots.lookup(uids)
        miss = np.flatnonzero(slots < 0)
        promoted = 0
        if miss.shape[0] and self._cold is not None:
            found, rows = self._cold.pop(uids[miss])
            if found.any():
                hit = miss[found]
                slots[hit] = self._new_slots(uids[hit])
                self._store(slots[hit], self._unpack(uids[hit], rows[found]))
                promoted = int(hit.shape[0])
                miss = miss[~found]
        if miss.shape[0]:
            new = self._new_slots(uids[miss])
            self._w[new], self._st[new] = 0.0, 0.0
            self._show[new], self._click[new], self._seen[new] = 0.0, 0.0, 0
            self._admitted[new] = False
            slots[miss] = new
        return slots, int(miss.shape[0]), promoted

    def _new_slots(self, ids: U64) -> npt.NDArray[np.int64]:
        need, cap = self._slots.slots_needed(ids.shape[0]), self._w.shape[0]
        if need > cap:
            rows = max(need, cap * 5 // 4)  # modest slack: row blocks dominate memory
            if self.hot_budget_rows is not None:  # don't overshoot a budgeted table by 50 %
                rows = min(rows, max(need, self.hot_budget_rows + self.hot_budget_rows // 16))
            self._w, self._st = grow_rows(self._w, rows), grow_rows(self._st, rows)
            self._show, self._click = grow_rows(self._show, rows), grow_rows(self._click, rows)
            self._seen, self._admitted = (
                grow_rows(self._seen, rows),
                grow_rows(self._admitted, rows),
            )
            self._slots.reserve(rows)
            self._dirty.reserve(rows)
        return self._slots.assign(ids)

    def _enforce_budget(self) -> int:
        budget = self.hot_budget_rows
        if budget is None or self._cold is None or self.hot_rows <= budget:
            return 0
        excess = self.hot_rows - (budget - int(budget * self._demote_fraction))
        live = self._slots.live_slots()
        if excess < live.shape[0]:
            live = live[np.argpartition(self._seen[live], excess - 1)[:excess]]
        ids, rows = self._slots.ids[live], self._pack(live)
        self._cold.put(ids, rows)  # write first: never lose rows
        self._dirty.moved(live, ids, rows)
        self._slots.release(live)
        return int(live.shape[0])

    # ------------------------------------------------------------------ reads
    def lookup(self, ids: U64) -> tuple[npt.NDArray[np.bool_], F32]:
        """``(found, weights)`` of admitted rows in either tier; others read as zeros.

        Does not promote, so serving-side reads do not disturb the hot set.
        """
        ids = coerce_ids(ids)
        slots = self._slots.lookup(ids)
        found = slots >= 0
        found[found] = self._admitted[slots[found]]
        weights = np.zeros((ids.shape[0], self.dim), dtype=np.float32)
        weights[found] = self._w[slots[found]]
        cold_ids = np.flatnonzero(slots < 0)
        if cold_ids.shape[0] and self._cold is not None:
            in_cold, rows = self._cold.get(ids[cold_ids])
            batch = self._unpack(ids[cold_ids], rows)
            ok = in_cold & batch.admitted
            found[cold_ids[ok]] = True
            weights[cold_ids[ok]] = batch.weights[ok]
        return found, weights

    def rows_of(self, ids: U64) -> RowBatch:
        """The stored rows of ``ids`` from either tier (copies, hot first); ids stored in
        neither are left out. Does not promote: a cost in the ids asked for, not the table.
        """
        ids = coerce_ids(ids)
        slots = self._slots.lookup(ids)
        hot = slots >= 0
        parts = [self._hot_rows(slots[hot])]
        cold_ids = ids[~hot]
        if cold_ids.shape[0] and self._cold is not None:
            found, rows = self._cold.get(cold_ids)
            parts.append(self._unpack(cold_ids[found], rows[found]))
        if len(parts) == 1:
            return parts[0]
        fields = RowBatch.__dataclass_fields__
        return RowBatch(*(np.concatenate([getattr(b, f) for b in parts]) for f in fields))

    # ----------------------------------------------------------- maintenance
    def shrink(self, now: int | None = None, chunk_rows: int = 65_536) -> U64:
        """Decay statistics in both tiers and delete expired rows; returns deleted ids (sorted)."""
        now = check_now(self._clock() if now is None else now)
        live = self._slots.live_slots()
        show, click = self._show[live], self._click[live]
        dead = self.accessor.shrink(show, click, self._seen[live], now)
        decayed = (show != self._show[live]) | (click != self._click[live])
        self._show[live], self._click[live] = show, click
        self._dirty.mark(live[decayed & ~dead])
        deleted = [self._slots.ids[live[dead]]]
        self._dirty.deleted(live[dead], deleted[0])
        self._slots.release(live[dead])
        if self._cold is not None:
            c = self.dim + self.state_width
            for ids, rows in self._cold.iter_chunks(chunk_rows):
                batch = self._unpack(ids, rows)
                dead = self.accessor.shrink(batch.show, batch.click, batch.last_seen, now)
                decayed = (rows[:, c] != batch.show) | (rows[:, c + 1] != batch.click)
                if decayed[~dead].any():
                    self._dirty.lose()  # decay rewrites the cold tier: too many rows to track
                rows[:, c], rows[:, c + 1] = batch.show, batch.click
                if (~dead).any():
                    self._cold.put(ids[~dead], rows[~dead])
                if dead.any():
                    self._cold.delete(ids[dead])
                    self._dirty.deleted_cold(ids[dead])
                    deleted.append(ids[dead])
        return np.sort(np.concatenate(deleted))

    def export_rows(self, chunk_rows: int = 65_536) -> Iterator[RowBatch]:
        """Every row of both tiers, hot first, in chunks (copies). Do not push meanwhile."""
        live = self._slots.live_slots()
        for start in range(0, live.shape[0], chunk_rows):
            yield self._hot_rows(live[start : start + chunk_rows])
        if self._cold is not None:
            for ids, rows in self._cold.iter_chunks(chunk_rows):
                yield self._unpack(ids, rows)

    def import_rows(self, batch: RowBatch) -> None:
        """Upsert exported rows (restore); later duplicates win. Demotes if over budget."""
        batch = batch.validated(self.dim, self.state_width)
        budget = self.hot_budget_rows
        if budget is not None and len(batch) > max(1, budget // 16):
            # Feed a budgeted table in slices so the hot blocks never outgrow the budget.
            step = max(1, budget // 16)
            for lo in range(0, len(batch), step):
                self.import_rows(_slice(batch, slice(lo, lo + step)))
            return
        _, last_rev = np.unique(batch.ids[::-1], return_index=True)
        if last_rev.shape[0] != len(batch):  # duplicate ids: keep the last occurrence
            keep = np.sort(len(batch) - 1 - last_rev)
            batch = _slice(batch, keep)
        slots = self._slots.lookup(batch.ids)
        new = np.flatnonzero(slots < 0)
        if new.shape[0]:
            if self._cold is not None and self._cold.count():
                self._cold.delete(batch.ids[new])  # keep the tiers disjoint
            slots[new] = self._new_slots(batch.ids[new])
        self._store(slots, batch)
        self._dirty.mark(slots)
        self._enforce_budget()

    def remove(self, ids: U64) -> None:
        """Delete rows from both tiers (missing ids are ignored): replays a delta's deletions."""
        ids = unique(coerce_ids(ids))
        slots = self._slots.lookup(ids)
        hot = slots >= 0
        self._dirty.deleted(slots[hot], ids[hot])
        self._slots.release(slots[hot])
        if self._cold is not None and not hot.all():
            self._cold.delete(ids[~hot])
            self._dirty.deleted_cold(ids[~hot])

    # ------------------------------------------------- checkpoint support
    def start_change_tracking(self, limit: int | None = None) -> None:
        """Record changes from now on, taking the table as equal to its last checkpoint.

        Past ``limit`` pending rows tracking gives up and ``cut_changes`` returns None:
        a full checkpoint is cheaper than a delta that large.
        """
        self._dirty.start(limit)

    def stop_change_tracking(self) -> None:
        """Forget pending changes; the next ``cut_changes`` returns None (a base is needed)."""
        self._dirty.lose()

    @property
    def tracking_changes(self) -> bool:
        return self._dirty.tracking

    @property
    def changed_rows(self) -> int:
        """Upper bound of the rows (upserts + deletions) the next cut returns."""
        return self._dirty.pending

    def cut_changes(self) -> Changes | None:
        """Rows changed since the previous cut (every column, as stored now, from either
        tier) and ids deleted meanwhile; tracking restarts from here.

        None when tracking was lost or never started: only a full export describes the
        table then. Costs the changed rows (gathers from the hot blocks and the demotion
        log), never a cold-tier read.
        """
        taken = self._dirty.take(self.cold_width)
        if taken is None:
            return None
        parts = [self._hot_rows(taken.slots)]
        deleted = np.zeros(0, np.uint64)
        if taken.gone_ids.shape[0]:
            last = last_occurrence(taken.gone_ids)
            ids, dead = taken.gone_ids[last], taken.gone_deleted[last]
            back = self._slots.lookup(ids) >= 0  # hot again, so marked: the hot row is newer
            row_of = np.cumsum(~taken.gone_deleted) - 1
            moved = ~dead & ~back
            parts.append(self._unpack(ids[moved], taken.gone_rows[row_of[last[moved]]]))
            deleted = ids[dead & ~back]  # sorted: last_occurrence is in id order
        fields = RowBatch.__dataclass_fields__
        rows = RowBatch(*(np.concatenate([getattr(b, f) for b in parts]) for f in fields))
        return Changes(rows, deleted)

    @property
    def hot_slot_end(self) -> int:
        """One past the highest hot slot in use: a scan of the hot tier reads ``[0, end)``."""
        return self._slots.high_water

    def hot_rows_between(self, lo: int, hi: int) -> RowBatch:
        """Copies of the hot rows at live slots in ``[lo, hi)``.

        A fuzzy checkpoint base reads the hot tier in such slices between pushes. A row
        present at the start of the scan and unchanged until its end is read at least
        once: rows change slots only by leaving the hot tier (then the cold tier, read
        after the hot scan, holds them); changed rows come from the deltas after the base.
        """
        live = lo + np.flatnonzero(self._slots.live[lo:hi])
        return self._hot_rows(live)

    # ------------------------------------------------------- cold row layout
    def _store(self, slots: npt.NDArray[np.int64], batch: RowBatch) -> None:
        self._w[slots], self._st[slots] = batch.weights, batch.opt_state
        self._show[slots], self._click[slots] = batch.show, batch.click
        self._seen[slots], self._admitted[slots] = batch.last_seen, batch.admitted

    def _hot_rows(self, slots: npt.NDArray[np.int64]) -> RowBatch:
        """The hot rows at ``slots`` as a RowBatch (copies)."""
        return RowBatch(
            self._slots.ids[slots],
            self._w[slots],
            self._st[slots],
            self._show[slots],
            self._click[slots],
            self._seen[slots],
            self._admitted[slots],
        )

    def _pack(self, slots: npt.NDArray[np.int64]) -> F32:
        d, c = self.dim, self.dim + self.state_width
        out = np.empty((slots.shape[0], self.cold_width), dtype=np.float32)
        out[:, :d], out[:, d:c] = self._w[slots], self._st[slots]
        out[:, c], out[:, c + 1] = self._show[slots], self._click[slots]
        seen = self._seen[slots]
        out[:, c + 2], out[:, c + 3] = seen // _LS_SPLIT, seen % _LS_SPLIT
        out[:, c + 4] = self._admitted[slots]
        return out

    def _unpack(self, ids: U64, rows: F32) -> RowBatch:
        d, c = self.dim, self.dim + self.state_width
        seen = rows[:, c + 2].astype(np.int64) * _LS_SPLIT + rows[:, c + 3].astype(np.int64)
        return RowBatch(
            ids,
            rows[:, :d].copy(),
            rows[:, d:c].copy(),
            rows[:, c].copy(),
            rows[:, c + 1].copy(),
            seen,
            rows[:, c + 4] != 0,
        )


def _slice(batch: RowBatch, index: slice | npt.NDArray[np.int64]) -> RowBatch:
    return RowBatch(*(getattr(batch, f)[index] for f in RowBatch.__dataclass_fields__))
