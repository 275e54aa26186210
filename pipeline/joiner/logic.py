"""The impression/click join of one input partition, as a state machine over batches.

No Kafka here: the engines feed batches of decoded events (:class:`EventBatch`, in
arrival order) and the wall clock in, and route what comes out. Everything is decided
by event time:

* an impression opens an attribution window ``[t, t + window_ms]`` for its
  ``(request_id, item_id)``; a click inside it emits a positive at once (or, with
  ``positives_at_close``, when the window closes, so positives and negatives leave
  in the same event-time order);
* the window closes when the watermark passes ``t + window_ms``; then a negative
  is emitted (kept with probability ``negative_rate``, weight ``1/negative_rate``);
* the watermark is ``min`` over the two input streams of their max event time,
  minus ``lateness_ms``; a stream quiet for ``idle_ms`` of wall time (nothing read
  and, as the engine reports with :meth:`PartitionJoiner.mark_busy`, nothing left to
  read) stops holding it back, and when both are quiet it advances with the wall
  clock;
* clicks after their window (by event time, or arriving after it closed) are late;
  a click with no impression waits until the watermark passes it, then becomes an
  orphan (dead letter). Repeated impressions and clicks of a key are duplicates.

A batch gives exactly the decisions of feeding its events one by one: the watermark
after every event is computed for the whole batch at once (it depends only on event
times and stream activity, not on join decisions), and each key's events depend only
on that key's state and those watermarks. So the common cases (a new impression; the
first click of an open window) are decided for all their keys in a few numpy passes,
and only keys with several events in one batch or unusual state (duplicates, late
clicks, clicks waiting for their impression, replay marks) go through a per-key path.

State lives in numpy columns (:mod:`pipeline.joiner.table`): keys are identified by
their 64-bit join key hash (``XXH64(request_id 0x1F item_id)``, the same hash the
``samples`` headers carry). Closed keys are remembered for ``retention_ms`` after their
window so duplicates and late clicks are recognised.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.arrayops import unique
from pipeline.codec.hashing import hash64
from pipeline.codec.slots import SlotConfig
from pipeline.joiner.records import Click, Impression, Origin
from pipeline.joiner.results import (
    Counters,
    Joined,
    Kind,
    OrphanClick,
    Output,
    Samples,
    join_key_hash,
    keep_negative,
)
from pipeline.joiner.table import DONE, FREE, NONE, PENDING, RowTable
from pipeline.joiner.timers import TimerQueue

__all__ = [
    "Counters",
    "EventBatch",
    "JoinConfig",
    "JoinResult",
    "Joined",
    "Kind",
    "OrphanClick",
    "Output",
    "PartitionJoiner",
    "Samples",
    "join_key_hash",
    "keep_negative",
]

I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]
BOOL = npt.NDArray[np.bool_]

# row flags
LATE, CLICKED, KEEP = 1, 2, 4
DROPPED = 3  # kind of a closed key whose negative was downsampled away (never emitted)
NEG, POS, CORR = int(Kind.NEGATIVE), int(Kind.POSITIVE), int(Kind.CORRECTION)
_PRIMARY = (1 << NEG) | (1 << POS)
_NO_WM = np.iinfo(np.int64).min  # "no watermark yet": nothing is before it
IMP, CLK = 0, 1


@dataclass(frozen=True)
class JoinConfig:
    """How the join decides; all times are milliseconds."""

    slots: SlotConfig
    window_ms: int
    lateness_ms: int = 0
    idle_ms: int = 30_000
    retention_ms: int = 600_000
    negative_rate: float = 1.0
    late_corrections: bool = False
    positives_at_close: bool = False

    def __post_init__(self) -> None:
        if self.window_ms < 0 or self.lateness_ms < 0 or self.retention_ms < 0:
            raise ValueError("window_ms, lateness_ms and retention_ms must be >= 0")
        if self.idle_ms <= 0:
            raise ValueError("idle_ms must be > 0")
        if not 0.0 < self.negative_rate <= 1.0:
            raise ValueError(f"negative_rate must be in (0, 1], got {self.negative_rate}")


@dataclass
class EventBatch:
    """Valid, hashed events of one input partition, in arrival order.

    Impression columns (``user``, ``keep``, ``ids``, ``present``, ``unknown``) are
    ignored for clicks; ``orphan(i)`` describes click ``i`` for a dead letter, and is
    called only for clicks that wait for their impression.
    """

    click: BOOL
    time: I64
    key: U64
    user: U64  # hash64("user_id", user_id): the output partition
    keep: BOOL  # the downsampling draw of the key
    ids: U64  # [n, slots]
    present: BOOL  # [n, slots]
    unknown: I64  # feature values of slots not configured
    orphan: Callable[[int], OrphanClick]

    def __len__(self) -> int:
        return len(self.time)


@dataclass
class JoinResult:
    """What one call decided: samples in emission order, and orphan clicks."""

    samples: Samples
    orphans: list[OrphanClick] = field(default_factory=list)


class _Collector:
    """Samples of one call, gathered in emission order."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.parts: list[Samples] = []
        self.orphans: list[OrphanClick] = []

    def result(self) -> JoinResult:
        return JoinResult(Samples.concat(self.parts, self.num_slots), self.orphans)


class PartitionJoiner:
    """Join state of one input partition (impressions p with clicks p)."""

    def __init__(self, config: JoinConfig, now_ms: int) -> None:
        self.config = config
        self.counters = Counters()
        self.watermark: int | None = None
        self.max_time: list[int | None] = [None, None]  # per stream (IMP, CLK)
        self.last_wall = [now_ms, now_ms]
        self._woken = False
        self.num_slots = len(config.slots.slots)
        self.table = RowTable(self.num_slots)
        self.orphans: dict[int, list[OrphanClick]] = {}  # row -> clicks waiting for it
        self._closing = TimerQueue()
        self._orphan_due = TimerQueue()
        self._expiry = TimerQueue()
        self._out = _Collector(self.num_slots)

    # -- inputs ----------------------------------------------------------------------

    def process(self, batch: EventBatch, now_ms: int) -> JoinResult:
        """Join a batch of events (in arrival order), then close what the watermark passed."""
        self._out = _Collector(self.num_slots)
        n = len(batch)
        if n:
            nclick = int(batch.click.sum())
            self.counters.clicks += nclick
            self.counters.impressions += n - nclick
            before = self._watermarks(batch, now_ms)
            self._join(batch, before)
        self._update_watermark(now_ms)
        self._fire()
        return self._out.result()

    def advance(self, now_ms: int) -> JoinResult:
        """Move the watermark (idle time) and close what it passed."""
        return self.process(_EMPTY_BATCH, now_ms)

    def mark_busy(self, stream: str, now_ms: int) -> None:
        """Say ``stream`` (``impression`` or ``click``) has unread input: it is not idle.

        Idle time must mean "nothing to read", not "not read yet": without this a
        joiner that is slow to fetch after a restart would advance the watermark by
        wall time and close windows whose clicks are still waiting in the topic.
        """
        s = IMP if stream == "impression" else CLK
        self.last_wall[s] = max(self.last_wall[s], now_ms)

    def recover_emitted(self, key_hashes: U64, kinds: npt.ArrayLike, times: npt.ArrayLike) -> None:
        """Record that samples of ``kinds`` for ``key_hashes`` are already on the topic.

        Used after a crash: re-emitting them while replaying input is suppressed, so
        every key gets one primary sample (the first decision stands) and at most one
        correction. Forgotten once the key would have left the dedup memory.
        """
        keys = np.asarray(key_hashes, dtype=np.uint64)
        if not len(keys):
            return
        bits = (np.uint8(1) << np.asarray(kinds, dtype=np.uint8)).astype(np.uint8)
        times = np.asarray(times, dtype=np.int64)
        uniq, inverse = np.unique(keys, return_inverse=True)
        ubits = np.zeros(len(uniq), dtype=np.uint8)
        np.bitwise_or.at(ubits, inverse, bits)
        utimes = np.full(len(uniq), np.iinfo(np.int64).min, dtype=np.int64)
        np.maximum.at(utimes, inverse, times)
        t = self.table
        rows = t.index.lookup(uniq)
        new = rows < 0
        if new.any():
            fresh = t.alloc(uniq[new])
            t.status[fresh] = NONE
            t.time[fresh] = np.iinfo(np.int64).min
            rows[new] = fresh
        bump = (t.status[rows] == NONE) & (utimes > t.time[rows])
        if bump.any():
            t.time[rows[bump]] = utimes[bump]
            self._push(self._expiry, utimes[bump] + self._keep_ms, rows[bump])
        t.emitted[rows] |= ubits
        t.dirty[rows] = True

    # -- per-event helpers (tests, small tools) ------------------------------------------

    def impression(self, imp: Impression, now_ms: int) -> list[Output]:
        """Join one impression; the outputs as objects."""
        return self.outputs(self.process(impression_batch([imp], self.config), now_ms))

    def click(self, click: Click, origin: Origin, now_ms: int) -> list[Output]:
        """Join one click; the outputs as objects."""
        return self.outputs(self.process(click_batch([click], [origin]), now_ms))

    def tick(self, now_ms: int) -> list[Output]:
        """:meth:`advance`, the outputs as objects."""
        return self.outputs(self.advance(now_ms))

    def outputs(self, result: JoinResult) -> list[Output]:
        """Samples of ``result`` as :class:`Joined` objects, then its orphan clicks."""
        s = result.samples
        labels, weights = s.labels_weights(self.config.negative_rate)
        slots = self.config.slots.slots
        out: list[Output] = []
        for r in range(len(s)):
            ids = {slots[c]: int(s.ids[r, c]) for c in range(self.num_slots) if s.present[r, c]}
            kind = Kind(int(s.kind[r]))
            out.append(
                Joined(
                    int(s.key[r]),
                    int(s.user[r]),
                    kind,
                    float(labels[r]),
                    float(weights[r]),
                    int(s.time[r]),
                    ids,
                )
            )
        return [*out, *result.orphans]

    # -- inspection --------------------------------------------------------------------

    @property
    def pending_count(self) -> int:
        """Impressions whose window is open."""
        return int((self.table.status == PENDING).sum())

    @property
    def orphan_count(self) -> int:
        """Keys with clicks waiting for an impression."""
        return len(self.orphans)

    @property
    def remembered_count(self) -> int:
        """Rows held: open windows, closed keys, waiting clicks, replay marks."""
        return self.table.rows_used

    @property
    def _keep_ms(self) -> int:
        return self.config.window_ms + self.config.retention_ms

    # -- the watermark -------------------------------------------------------------------

    def _watermarks(self, b: EventBatch, now: int) -> I64:
        """The watermark before each event (``_NO_WM`` for none); updates stream state."""
        n = len(b)
        idle = self.config.idle_ms
        if not self._woken:
            # The first event after a (re)start: the other stream gets idle_ms from now to
            # show up, not from when the partition was assigned (fetches start unevenly).
            self._woken = True
            self.last_wall = [now, now]
        runs, seen, active = [], [], []
        for s, mine in ((IMP, ~b.click), (CLK, b.click)):
            start = self.max_time[s]
            t = np.where(mine, b.time, _NO_WM)
            if start is not None:
                t[0] = max(int(t[0]), start)
            run = np.maximum.accumulate(t)
            runs.append(run)
            seen.append(run != _NO_WM)
            act = np.logical_or.accumulate(mine)
            if now - self.last_wall[s] < idle:
                act = np.ones(n, dtype=bool)
            active.append(act)
            if mine.any():
                self.max_time[s] = int(run[-1])
                self.last_wall[s] = now
        both = active[IMP] & active[CLK]
        cand = np.where(both, np.minimum(runs[IMP], runs[CLK]), _NO_WM)
        valid = np.where(both, seen[IMP] & seen[CLK], False)
        for s in (IMP, CLK):
            alone = active[s] & ~active[1 - s]
            cand = np.where(alone, runs[s], cand)
            valid |= alone & seen[s]
        cand = np.where(valid, cand - self.config.lateness_ms, _NO_WM)
        start = _NO_WM if self.watermark is None else self.watermark
        after = np.maximum.accumulate(np.concatenate([[start], cand]))
        last = int(after[-1])
        self.watermark = None if last == _NO_WM else last
        return after[:-1]

    def _update_watermark(self, now_ms: int) -> None:
        """The watermark from stream state and the wall clock alone (idle advance)."""
        idle_ms = self.config.idle_ms
        active = [s for s in (IMP, CLK) if now_ms - self.last_wall[s] < idle_ms]
        if any(self.max_time[s] is None for s in active):
            return  # a live stream has not shown its position yet
        if active:
            candidate = min(int(self.max_time[s] or 0) for s in active)
        else:
            seen = [s for s in (IMP, CLK) if self.max_time[s] is not None]
            if not seen:
                return
            last = max(self.last_wall[s] for s in seen)
            candidate = max(int(self.max_time[s] or 0) for s in seen) + now_ms - last
        candidate -= self.config.lateness_ms
        if self.watermark is None or candidate > self.watermark:
            self.watermark = candidate

    # -- joining --------------------------------------------------------------------------

    def _join(self, b: EventBatch, before: I64) -> None:
        """Each key's events in rounds: round r takes every key's r-th event of the batch.

        Keys are independent, so a round (at most one event per key) is decided in a
        few vectorized steps per kind of situation; what fits none of them goes through
        the per-key path one event at a time.
        """
        n = len(b)
        order = np.argsort(b.key, kind="stable")
        sk = b.key[order]
        first = np.ones(n, dtype=bool)
        first[1:] = sk[1:] != sk[:-1]
        starts = np.flatnonzero(first)
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.arange(n) - np.repeat(starts, np.diff(np.append(starts, n)))
        if len(starts) == n:
            self._round(b, before, np.arange(n))
            return
        by_rank = np.argsort(rank, kind="stable")
        bounds = np.searchsorted(rank[by_rank], np.arange(int(rank.max()) + 2))
        for r in range(len(bounds) - 1):
            self._round(b, before, by_rank[bounds[r] : bounds[r + 1]])

    def _round(self, b: EventBatch, before: I64, ev: I64) -> None:
        """Events ``ev`` of distinct keys, each after the key's earlier events."""
        t, w, c = self.table, self.config.window_ms, self.counters
        row = t.index.lookup(b.key[ev])
        safe = np.maximum(row, 0)
        status = np.where(row >= 0, t.status[safe], FREE)
        wmb = before[ev]
        when = t.time[safe]
        open_now = (status == PENDING) & ~(when + w < wmb)
        kept_now = (status == DONE) & ~(when + self._keep_ms < wmb)
        click = b.click[ev]
        imp = ~click
        dup = imp & (open_now | kept_now)
        c.duplicate_impressions += int(dup.sum())
        opening = imp & (row < 0)
        on_open = click & open_now
        on_done = click & kept_now
        orphan = click & (row < 0)
        meets = imp & (status == NONE) & self._ready(row, wmb)
        slow = ~(dup | opening | on_open | on_done | orphan | meets)
        if on_open.any():
            self._clicks_on_open(row[on_open], b.time[ev[on_open]])
        if on_done.any():
            self._clicks_on_closed(row[on_done])
        if opening.any():
            self._open(b, ev[opening], before)
        if orphan.any():
            self._wait(b, ev[orphan])
        if meets.any():
            self._meet(b, ev[meets], row[meets], before)
        if slow.any():
            self._slow(b, before, ev[slow])

    def _clicks_on_closed(self, rows: npt.NDArray[np.int32]) -> None:
        """Clicks on closed keys still remembered: late (once), else duplicates."""
        t, c = self.table, self.counters
        dup = (t.kind[rows] == POS) | ((t.flags[rows] & LATE) != 0)
        c.duplicate_clicks += int(dup.sum())
        late = rows[~dup]
        if not len(late):
            return
        t.flags[late] |= LATE
        t.dirty[late] = True
        c.late_clicks += len(late)
        if self.config.late_corrections:
            self._emit(late, np.full(len(late), CORR, dtype=np.uint8))

    def _ready(self, row: npt.NDArray[np.int32], wmb: I64) -> BOOL:
        """Rows without an impression that the watermark has not touched before each event
        (their waiting clicks not due, their replay marks not expired)."""
        t = self.table
        ok = np.ones(len(row), dtype=bool)
        candidates = np.flatnonzero((row >= 0) & (t.status[np.maximum(row, 0)] == NONE))
        for j in candidates.tolist():
            r, wm = int(row[j]), int(wmb[j])
            waiting = self.orphans.get(r)
            if (waiting and min(c.click.event_time for c in waiting) < wm) or (
                t.emitted[r] and t.time[r] + self._keep_ms < wm
            ):
                ok[j] = False
        return ok

    def _meet(self, b: EventBatch, ev: I64, rows: npt.NDArray[np.int32], before: I64) -> None:
        """Impressions of keys whose clicks arrived first: open, then apply the clicks."""
        t, c, w = self.table, self.counters, self.config.window_ms
        self._set_pending(rows, b, ev)
        ends = b.time[ev] + w
        c.late_impressions += int((ends < before[ev]).sum())
        flags = t.flags[rows].tolist()
        hit = np.zeros(len(rows), dtype=bool)
        at_close = self.config.positives_at_close
        for j, (row, end) in enumerate(zip(rows.tolist(), ends.tolist(), strict=True)):
            f = flags[j]
            for waiting in self.orphans.pop(row, []):
                if hit[j] or f & CLICKED:
                    c.duplicate_clicks += 1  # a second click after the positive
                elif waiting.click.event_time <= end:
                    if at_close:
                        f |= CLICKED
                    else:
                        hit[j] = True
                elif f & LATE:
                    c.duplicate_clicks += 1
                else:
                    f |= LATE
                    c.late_clicks += 1
            flags[j] = f
        t.flags[rows] = np.asarray(flags, dtype=np.uint8)
        if hit.any():
            pos = np.full(int(hit.sum()), POS, dtype=np.uint8)
            self._emit(rows[hit], pos)
            self._finish(rows[hit], pos)
        self._push(self._closing, ends[~hit], rows[~hit])

    def _wait(self, b: EventBatch, ev: I64) -> None:
        """Clicks of keys with no state: they wait for their impression."""
        t = self.table
        rows = t.alloc(b.key[ev])
        t.status[rows] = NONE
        t.dirty[rows] = True
        for row, i in zip(rows.tolist(), ev.tolist(), strict=True):
            self.orphans[row] = [b.orphan(i)]
        self._push(self._orphan_due, b.time[ev], rows)

    def _open(self, b: EventBatch, ev: I64, before: I64) -> None:
        """New impressions of keys with no state: open their windows."""
        t, w = self.table, self.config.window_ms
        rows = t.alloc(b.key[ev])
        self._set_pending(rows, b, ev)
        ends = b.time[ev] + w
        self.counters.late_impressions += int((ends < before[ev]).sum())
        self._push(self._closing, ends, rows)

    def _set_pending(self, rows: npt.NDArray[np.int32], b: EventBatch, ev: I64) -> None:
        t = self.table
        t.status[rows] = PENDING
        t.time[rows] = b.time[ev]
        t.user[rows] = b.user[ev]
        t.flags[rows] = np.where(b.keep[ev], KEEP, 0).astype(np.uint8)
        t.set_features(rows, b.ids[ev], b.present[ev])
        t.dirty[rows] = True
        self.counters.unknown_features += int(b.unknown[ev].sum())

    def _clicks_on_open(self, rows: npt.NDArray[np.int32], times: I64) -> None:
        """Clicks on open windows (one per key)."""
        t, w = self.table, self.config.window_ms
        clicked = (t.flags[rows] & CLICKED) != 0
        if clicked.any():
            self.counters.duplicate_clicks += int(clicked.sum())
            rows, times = rows[~clicked], times[~clicked]
        inside = times <= t.time[rows] + w
        outside = rows[~inside]
        if len(outside):
            late = (t.flags[outside] & LATE) != 0
            self.counters.duplicate_clicks += int(late.sum())
            self.counters.late_clicks += int((~late).sum())
            t.flags[outside] |= LATE
            t.dirty[outside] = True
        hits = rows[inside]
        if not len(hits):
            return
        if self.config.positives_at_close:
            t.flags[hits] |= CLICKED
            t.dirty[hits] = True
            return
        self._emit(hits, np.full(len(hits), POS, dtype=np.uint8))
        self._finish(hits, np.full(len(hits), POS, dtype=np.uint8))

    def _emit(self, rows: npt.NDArray[np.int32], kinds: npt.NDArray[np.uint8]) -> None:
        """Emit samples of ``kinds`` for ``rows``, except those already on the topic."""
        t = self.table
        em = t.emitted[rows]
        primary = kinds != CORR
        done_before = np.where(primary, (em & _PRIMARY) != 0, (em & (1 << CORR)) != 0)
        c = self.counters
        c.replay_suppressed += int(done_before.sum())
        rows, kinds = rows[~done_before], kinds[~done_before]
        if not len(rows):
            return
        c.negatives += int((kinds == NEG).sum())
        c.positives += int((kinds == POS).sum())
        c.corrections += int((kinds == CORR).sum())
        ids, present = t.features(rows)
        self._out.parts.append(
            Samples(t.key[rows], kinds, t.time[rows], t.user[rows], ids, present)
        )

    def _finish(self, rows: npt.NDArray[np.int32], kinds: npt.NDArray[np.uint8]) -> None:
        """Rows whose window is decided: remembered as closed until retention ends."""
        t = self.table
        t.status[rows] = DONE
        t.kind[rows] = kinds
        t.dirty[rows] = True
        if self.config.late_corrections:
            # only an unclicked key can still get a correction: it keeps its features
            t.drop_features(rows[kinds == POS])
        else:
            t.drop_features(rows)
        self._push(self._expiry, t.time[rows] + self._keep_ms, rows)

    def _close(self, rows: npt.NDArray[np.int32]) -> None:
        """Close open windows (in the given order): positives held for the close or
        negatives (downsampled), then corrections of late clicks."""
        if not len(rows):
            return
        t = self.table
        flags = t.flags[rows]
        clicked = (flags & CLICKED) != 0
        keep = (flags & KEEP) != 0
        kinds = np.where(clicked, POS, np.where(keep, NEG, DROPPED))
        kinds = kinds.astype(np.uint8)
        self.counters.negatives_dropped += int((kinds == DROPPED).sum())
        emit = kinds != DROPPED
        self._emit(rows[emit], kinds[emit])
        if self.config.late_corrections:
            late = rows[~clicked & ((flags & LATE) != 0)]
            self._emit(late, np.full(len(late), CORR, dtype=np.uint8))
        self._finish(rows, kinds)

    def _push(self, queue: TimerQueue, due: Any, rows: Any) -> None:
        rows32 = np.asarray(rows, dtype=np.int32)
        queue.push(np.asarray(due, dtype=np.int64), rows32, self.table.gen[rows32])

    # -- the per-key path ------------------------------------------------------------------

    def _slow(self, b: EventBatch, before: I64, events: I64) -> None:
        """Events of keys that need a look one event at a time (grouped by key, in order)."""
        t = self.table
        keys = b.key[events]
        rows = t.index.lookup(keys)
        wm = before[events].tolist()
        row = -1
        last_key = None
        for j, i in enumerate(events.tolist()):
            k = int(keys[j])
            if k != last_key:
                last_key, row = k, int(rows[j])
            row = self._catch_up(row, wm[j])
            if b.click[i]:
                row = self._slow_click(b, i, k, row)
            else:
                row = self._slow_impression(b, i, k, row, wm[j])

    def _catch_up(self, row: int, wm: int) -> int:
        """Apply to ``row`` what the watermark ``wm`` has done to it; -1 once freed."""
        if row < 0:
            return row
        t = self.table
        r = np.array([row], dtype=np.int32)
        if t.status[row] == PENDING and t.time[row] + self.config.window_ms < wm:
            self._close(r)
        waiting = self.orphans.get(row)
        if waiting and min(c.click.event_time for c in waiting) < wm:
            self._dead_letter(row)
            if t.status[row] == FREE:
                return -1
        if t.status[row] in (DONE, NONE) and t.time[row] + self._keep_ms < wm:
            t.emitted[row] = 0
            if t.status[row] == DONE or row not in self.orphans:
                t.release(r)
                return -1
        if t.status[row] == NONE and not t.emitted[row] and row not in self.orphans:
            t.release(r)
            return -1
        return row

    def _slow_impression(self, b: EventBatch, i: int, k: int, row: int, wm: int) -> int:
        t, c = self.table, self.counters
        if row >= 0 and t.status[row] in (PENDING, DONE):
            c.duplicate_impressions += 1
            return row
        if row < 0:
            row = int(t.alloc(np.array([k], dtype=np.uint64))[0])
        r = np.array([row], dtype=np.int32)
        self._set_pending(r, b, np.array([i]))
        end = int(b.time[i]) + self.config.window_ms
        if end < wm:
            c.late_impressions += 1
        for waiting in self.orphans.pop(row, []):
            if t.status[row] == PENDING:
                self._click_on_pending(row, waiting.click.event_time)
            else:
                c.duplicate_clicks += 1  # a second click after the positive
        if t.status[row] == PENDING:
            self._push(self._closing, [end], [row])
        return row

    def _slow_click(self, b: EventBatch, i: int, k: int, row: int) -> int:
        t, c = self.table, self.counters
        status = t.status[row] if row >= 0 else FREE
        if status == PENDING:
            self._click_on_pending(row, int(b.time[i]))
        elif status == DONE:
            if t.kind[row] == POS or t.flags[row] & LATE:
                c.duplicate_clicks += 1
            else:
                t.flags[row] |= LATE
                t.dirty[row] = True
                c.late_clicks += 1
                if self.config.late_corrections:
                    self._emit(np.array([row], np.int32), np.array([CORR], np.uint8))
        else:
            if row < 0:
                row = int(t.alloc(np.array([k], dtype=np.uint64))[0])
                t.status[row] = NONE
            self.orphans.setdefault(row, []).append(b.orphan(i))
            t.dirty[row] = True
            self._push(self._orphan_due, [int(b.time[i])], [row])
        return row

    def _click_on_pending(self, row: int, when: int) -> None:
        t, c = self.table, self.counters
        flags = int(t.flags[row])
        if flags & CLICKED:
            c.duplicate_clicks += 1
        elif when <= t.time[row] + self.config.window_ms:
            r = np.array([row], dtype=np.int32)
            if self.config.positives_at_close:
                t.flags[row] |= CLICKED
                t.dirty[row] = True
                return
            pos = np.array([POS], dtype=np.uint8)
            self._emit(r, pos)
            self._finish(r, pos)
        elif flags & LATE:
            c.duplicate_clicks += 1
        else:
            t.flags[row] |= LATE
            t.dirty[row] = True
            c.late_clicks += 1

    def _dead_letter(self, row: int) -> None:
        """Every click waiting on ``row`` becomes an orphan; the row goes if nothing holds it."""
        t = self.table
        for waiting in self.orphans.pop(row, []):
            self.counters.orphan_clicks += 1
            self._out.orphans.append(waiting)
        t.dirty[row] = True
        if t.status[row] == NONE and not t.emitted[row]:
            t.release(np.array([row], dtype=np.int32))

    # -- timers ---------------------------------------------------------------------------

    def _fire(self) -> None:
        """Close windows, dead-letter orphans and forget keys the watermark passed."""
        if self.watermark is None:
            return
        wm, t, w = self.watermark, self.table, self.config.window_ms
        due, rows, gens = self._closing.pop(wm)
        ok = (t.gen[rows] == gens) & (t.status[rows] == PENDING) & (t.time[rows] + w == due)
        due, rows = due[ok], rows[ok]
        if len(rows):
            order = np.lexsort((t.key[rows], due))  # window-end order, ties by key
            self._close(rows[order])
        due, rows, gens = self._orphan_due.pop(wm)
        ok = (t.gen[rows] == gens) & (t.status[rows] == NONE)
        for row in dict.fromkeys(rows[ok].tolist()):
            if row in self.orphans:
                self._dead_letter(row)
        due, rows, gens = self._expiry.pop(wm)
        status = t.status[rows]
        ok = (t.gen[rows] == gens) & ((status == DONE) | (status == NONE))
        ok &= t.time[rows] + self._keep_ms == due
        rows = rows[ok]
        if len(rows):
            rows = unique(rows)
            waiting = np.zeros(len(rows), dtype=bool)
            if self.orphans:  # only rows without an impression can have clicks waiting
                held = np.fromiter(self.orphans, dtype=np.int64, count=len(self.orphans))
                waiting = np.isin(rows, held)
            if waiting.any():  # marks expire, the clicks still wait for their impression
                t.emitted[rows[waiting]] = 0
                t.dirty[rows[waiting]] = True
            t.release(rows[~waiting])


def impression_batch(imps: Sequence[Impression], config: JoinConfig) -> EventBatch:
    """An :class:`EventBatch` of impression objects (hashing in Python: for tests and tools)."""
    slots = config.slots.slots
    n, s = len(imps), len(slots)
    ids = np.zeros((n, s), dtype=np.uint64)
    present = np.zeros((n, s), dtype=bool)
    unknown = np.zeros(n, dtype=np.int64)
    index = {name: j for j, name in enumerate(slots)}
    for r, imp in enumerate(imps):
        for slot, value in imp.features.items():
            j = index.get(slot)
            if j is None:
                unknown[r] += 1
            else:
                ids[r, j], present[r, j] = hash64(slot, value), True
        for slot, value in (("user_id", imp.user_id), ("item_id", imp.item_id)):
            j = index.get(slot)
            if j is not None and not present[r, j]:
                ids[r, j], present[r, j] = hash64(slot, value), True
    keys = [(imp.request_id, imp.item_id) for imp in imps]

    def no_orphan(i: int) -> OrphanClick:
        raise AssertionError("impressions are never orphans")

    return EventBatch(
        click=np.zeros(n, dtype=bool),
        time=np.array([imp.event_time for imp in imps], dtype=np.int64),
        key=np.array([join_key_hash(k) for k in keys], dtype=np.uint64),
        user=np.array([hash64("user_id", imp.user_id) for imp in imps], dtype=np.uint64),
        keep=np.array([keep_negative(k, config.negative_rate) for k in keys], dtype=bool),
        ids=ids,
        present=present,
        unknown=unknown,
        orphan=no_orphan,
    )


def click_batch(clicks: Sequence[Click], origins: Sequence[Origin]) -> EventBatch:
    """An :class:`EventBatch` of click objects with their origins (for tests and tools)."""
    n = len(clicks)
    return EventBatch(
        click=np.ones(n, dtype=bool),
        time=np.array([c.event_time for c in clicks], dtype=np.int64),
        key=np.array([join_key_hash((c.request_id, c.item_id)) for c in clicks], np.uint64),
        user=np.zeros(n, dtype=np.uint64),
        keep=np.zeros(n, dtype=bool),
        ids=np.zeros((n, 0), dtype=np.uint64),
        present=np.zeros((n, 0), dtype=bool),
        unknown=np.zeros(n, dtype=np.int64),
        orphan=lambda i: OrphanClick(clicks[i], origins[i]),
    )


def _no_orphan(i: int) -> OrphanClick:
    raise AssertionError("an empty batch has no clicks")


_EMPTY_BATCH = EventBatch(
    click=np.zeros(0, dtype=bool),
    time=np.zeros(0, dtype=np.int64),
    key=np.zeros(0, dtype=np.uint64),
    user=np.zeros(0, dtype=np.uint64),
    keep=np.zeros(0, dtype=bool),
    ids=np.zeros((0, 0), dtype=np.uint64),
    present=np.zeros((0, 0), dtype=bool),
    unknown=np.zeros(0, dtype=np.int64),
    orphan=_no_orphan,
)
