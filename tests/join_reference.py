"""Reference join: the per-event, dict-based join the batch join must agree with.

This is the joiner's original implementation (one event at a time, Python objects per
key), kept unchanged in behaviour as the oracle of ``test_join_batches.py``.

The impression/click join of one input partition, as a pure state machine.

No Kafka here: the engines (``runner.py``, ``app.py``) feed decoded events and the
wall clock in, and route what comes out. Everything is decided by event time:

* an impression opens an attribution window ``[t, t + window_ms]`` for its
  ``(request_id, item_id)``; a click inside it emits a positive at once (or, with
  ``positives_at_close``, when the window closes, so positives and negatives leave
  in the same event-time order and a model never sees a stretch of positives whose
  negatives are still held back);
* the window closes when the watermark passes ``t + window_ms``; then a negative
  is emitted (kept with probability ``negative_rate``, weight ``1/negative_rate``);
* the watermark is ``min`` over the two input streams of their max event time,
  minus ``lateness_ms`` (a two-input operator may only advance as far as its slower
  input). A stream quiet for ``idle_ms`` of wall time (nothing read and, as the
  engine reports with :meth:`PartitionJoiner.mark_busy`, nothing left to read)
  stops holding it back, and when both are quiet it advances with the wall clock,
  so a quiet stream still closes its windows;
* clicks after their window (by event time, or arriving after it closed) are late;
  a click with no impression waits until the watermark passes it, then becomes an
  orphan (dead letter). Repeated impressions and clicks of a key are duplicates.

Closed keys are remembered for ``retention_ms`` after their window so duplicates and
late clicks are recognised; the state round-trips through :meth:`to_state`.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import xxhash

from pipeline.codec.hashing import HASH_SEED, SEPARATOR, hash64
from pipeline.codec.slots import SlotConfig
from pipeline.joiner.records import Click, Impression, JoinKey, Origin
from pipeline.joiner.results import Counters, Kind, join_key_hash, keep_negative


@dataclass(frozen=True)
class Joined:
    """A labelled sample ready for batching."""

    key: JoinKey
    key_hash: int
    user_id: str
    kind: Kind
    label: float
    weight: float
    event_time: int  # the impression's event time
    ids: Mapping[str, int]


@dataclass(frozen=True)
class OrphanClick:
    """A click no impression matched before the watermark passed it (dead letter)."""

    click: Click
    origin: Origin


Output = Joined | OrphanClick


_DROPPED = 3  # a negative removed by downsampling (state only, never emitted)


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
class _Pending:
    user_id: str
    time: int
    ids: dict[str, int]
    late: bool = False  # a click after the window already arrived
    clicked: bool = False  # clicked in the window; the positive waits for the close


@dataclass
class _Done:
    kind: int  # Kind value or _DROPPED
    time: int
    late: bool = False
    user_id: str = ""
    ids: dict[str, int] = field(default_factory=dict)  # kept only for corrections


@dataclass
class _Stream:
    max_time: int | None = None
    last_wall: int = 0


class PartitionJoiner:
    """Join state of one input partition (impressions p with clicks p)."""

    def __init__(self, config: JoinConfig, now_ms: int) -> None:
        self.config = config
        self.counters = Counters()
        self.watermark: int | None = None
        self._streams = {"impression": _Stream(None, now_ms), "click": _Stream(None, now_ms)}
        self._woken = False
        self._prefixes = {s: s.encode("utf-8") + SEPARATOR for s in config.slots.slots}
        self._pending: dict[JoinKey, _Pending] = {}
        self._done: dict[JoinKey, _Done] = {}
        self._orphans: dict[JoinKey, list[tuple[Click, Origin]]] = {}
        self._recovered: dict[int, tuple[set[int], int]] = {}  # hash -> (kinds, expires)
        self._closing: list[tuple[int, JoinKey]] = []  # (window end, key), lazy deletion
        self._expiry: list[tuple[int, JoinKey]] = []
        self._orphan_due: list[tuple[int, JoinKey]] = []

    # -- inputs ----------------------------------------------------------------------

    def impression(self, imp: Impression, now_ms: int) -> list[Output]:
        """Open the window of ``imp`` (or resolve it now if it is already closed)."""
        self.counters.impressions += 1
        self._observe("impression", imp.event_time, now_ms)
        key = (imp.request_id, imp.item_id)
        out: list[Output] = []
        if key in self._pending or key in self._done:
            self.counters.duplicate_impressions += 1
            return self.advance(now_ms)
        pending = _Pending(imp.user_id, imp.event_time, self._hash_features(imp))
        self._pending[key] = pending
        end = imp.event_time + self.config.window_ms
        for click, _origin in self._orphans.pop(key, []):
            if key in self._pending:
                self._click_on_pending(key, pending, click, out)
            else:
                self.counters.duplicate_clicks += 1  # a second click after the positive
        if key in self._pending:
            if self.watermark is not None and end < self.watermark:
                self.counters.late_impressions += 1  # closes in advance() below
            heapq.heappush(self._closing, (end, key))
        return out + self.advance(now_ms)

    def click(self, click: Click, origin: Origin, now_ms: int) -> list[Output]:
        """Match ``click`` with its impression, or hold it until the watermark passes it."""
        self.counters.clicks += 1
        self._observe("click", click.event_time, now_ms)
        key = (click.request_id, click.item_id)
        out: list[Output] = []
        if key in self._pending:
            self._click_on_pending(key, self._pending[key], click, out)
        elif key in self._done:
            done = self._done[key]
            if done.kind == Kind.POSITIVE or done.late:
                self.counters.duplicate_clicks += 1
            else:
                done.late = True
                self.counters.late_clicks += 1
                if self.config.late_corrections:
                    self._emit(key, done.user_id, Kind.CORRECTION, done.time, done.ids, out)
        else:
            self._orphans.setdefault(key, []).append((click, origin))
            heapq.heappush(self._orphan_due, (click.event_time, key))
        return out + self.advance(now_ms)

    def advance(self, now_ms: int) -> list[Output]:
        """Move the watermark (events and idle time) and close what it passed."""
        self._update_watermark(now_ms)
        wm = self.watermark
        out: list[Output] = []
        if wm is None:
            return out
        while self._closing and self._closing[0][0] < wm:
            _, key = heapq.heappop(self._closing)
            pending = self._pending.pop(key, None)
            if pending is not None:
                self._close(key, pending, out)
        while self._orphan_due and self._orphan_due[0][0] < wm:
            _, key = heapq.heappop(self._orphan_due)
            for click, origin in self._orphans.pop(key, []):
                self.counters.orphan_clicks += 1
                out.append(OrphanClick(click, origin))
        while self._expiry and self._expiry[0][0] < wm:
            _, key = heapq.heappop(self._expiry)
            done = self._done.get(key)
            if done is not None and self._expires(done) < wm:
                del self._done[key]
        return out

    def mark_busy(self, stream: str, now_ms: int) -> None:
        """Say ``stream`` (``impression`` or ``click``) has unread input: it is not idle.

        Idle time must mean "nothing to read", not "not read yet": without this a
        joiner that is slow to fetch after a restart would advance the watermark by
        wall time and close windows whose clicks are still waiting in the topic.
        """
        s = self._streams[stream]
        s.last_wall = max(s.last_wall, now_ms)

    def recover_emitted(self, key_hash: int, kind: Kind, event_time: int) -> None:
        """Record that a sample of ``kind`` for ``key_hash`` is already on the topic.

        Used after a crash: re-emitting it while replaying input is suppressed, so
        every key gets one primary sample (the first decision stands) and at most
        one correction. Forgotten once the key would have left the dedup memory.
        """
        kinds, expires = self._recovered.get(key_hash, (set(), 0))
        kinds.add(int(kind))
        expires = max(expires, event_time + self.config.window_ms + self.config.retention_ms)
        self._recovered[key_hash] = (kinds, expires)

    # -- inspection --------------------------------------------------------------------

    @property
    def pending_count(self) -> int:
        """Impressions whose window is open."""
        return len(self._pending)

    @property
    def orphan_count(self) -> int:
        """Keys with clicks waiting for an impression."""
        return len(self._orphans)

    # -- internals ----------------------------------------------------------------------

    def _hash_features(self, imp: Impression) -> dict[str, int]:
        # hash64(slot, value) for str values, with the slot prefixes computed once
        prefixes, digest = self._prefixes, xxhash.xxh64_intdigest
        ids: dict[str, int] = {}
        for slot, value in imp.features.items():
            prefix = prefixes.get(slot)
            if prefix is None:
                self.counters.unknown_features += 1
            else:
                ids[slot] = digest(prefix + value.encode("utf-8"), HASH_SEED)
        for slot, value in (("user_id", imp.user_id), ("item_id", imp.item_id)):
            if slot in prefixes and slot not in ids:
                ids[slot] = hash64(slot, value)
        return ids

    def _click_on_pending(
        self, key: JoinKey, pending: _Pending, click: Click, out: list[Output]
    ) -> None:
        if pending.clicked:
            self.counters.duplicate_clicks += 1
        elif click.event_time <= pending.time + self.config.window_ms:
            if self.config.positives_at_close:
                pending.clicked = True
                return
            del self._pending[key]
            self._emit(key, pending.user_id, Kind.POSITIVE, pending.time, pending.ids, out)
            self._remember(key, _Done(Kind.POSITIVE, pending.time))
        elif pending.late:
            self.counters.duplicate_clicks += 1
        else:
            pending.late = True
            self.counters.late_clicks += 1

    def _close(self, key: JoinKey, pending: _Pending, out: list[Output]) -> None:
        if pending.clicked:
            self._emit(key, pending.user_id, Kind.POSITIVE, pending.time, pending.ids, out)
            self._remember(key, _Done(Kind.POSITIVE, pending.time))
            return
        keep = keep_negative(key, self.config.negative_rate)
        if keep:
            self._emit(key, pending.user_id, Kind.NEGATIVE, pending.time, pending.ids, out)
        else:
            self.counters.negatives_dropped += 1
        done = _Done(Kind.NEGATIVE if keep else _DROPPED, pending.time, pending.late)
        if self.config.late_corrections:
            done.user_id, done.ids = pending.user_id, pending.ids
            if pending.late:
                self._emit(key, pending.user_id, Kind.CORRECTION, pending.time, pending.ids, out)
        self._remember(key, done)

    def _emit(
        self,
        key: JoinKey,
        user_id: str,
        kind: Kind,
        time: int,
        ids: dict[str, int],
        out: list[Output],
    ) -> None:
        key_hash = join_key_hash(key)
        seen = self._recovered.get(key_hash, (set(), 0))[0]
        primary = kind != Kind.CORRECTION
        if (primary and seen & {Kind.NEGATIVE, Kind.POSITIVE}) or (kind in seen):
            self.counters.replay_suppressed += 1
            return
        if kind == Kind.NEGATIVE:
            self.counters.negatives += 1
            label, weight = 0.0, 1.0 / self.config.negative_rate
        else:
            if kind == Kind.POSITIVE:
                self.counters.positives += 1
            else:
                self.counters.corrections += 1
            label, weight = 1.0, 1.0
        out.append(Joined(key, key_hash, user_id, kind, label, weight, time, ids))

    def _remember(self, key: JoinKey, done: _Done) -> None:
        self._done[key] = done
        heapq.heappush(self._expiry, (self._expires(done), key))

    def _expires(self, done: _Done) -> int:
        return done.time + self.config.window_ms + self.config.retention_ms

    def _observe(self, stream: str, event_time: int, now_ms: int) -> None:
        if not self._woken:
            # The first event after a (re)start: the other stream gets idle_ms from now to
            # show up, not from when the partition was assigned (fetches start unevenly).
            self._woken = True
            for other in self._streams.values():
                other.last_wall = now_ms
        s = self._streams[stream]
        s.max_time = event_time if s.max_time is None else max(s.max_time, event_time)
        s.last_wall = now_ms

    def _update_watermark(self, now_ms: int) -> None:
        idle_ms = self.config.idle_ms
        active = [s for s in self._streams.values() if now_ms - s.last_wall < idle_ms]
        if any(s.max_time is None for s in active):
            return  # a live stream has not shown its position yet
        if active:
            candidate = min(s.max_time for s in active if s.max_time is not None)
        else:
            seen = [s for s in self._streams.values() if s.max_time is not None]
            if not seen:
                return
            last = max(s.last_wall for s in seen)
            candidate = max(s.max_time for s in seen if s.max_time is not None)
            candidate += now_ms - last
        candidate -= self.config.lateness_ms
        if self.watermark is None or candidate > self.watermark:
            self.watermark = candidate

    # -- state ---------------------------------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        """JSON-able state; replay records the watermark has passed are dropped here."""
        wm = self.watermark
        if wm is not None:
            self._recovered = {h: r for h, r in self._recovered.items() if r[1] >= wm}
        return {
            "watermark": self.watermark,
            "streams": {n: s.max_time for n, s in self._streams.items()},
            "counters": asdict(self.counters),
            "pending": [
                [*k, p.user_id, p.time, p.ids, p.late, p.clicked] for k, p in self._pending.items()
            ],
            "done": [[*k, d.kind, d.time, d.late, d.user_id, d.ids] for k, d in self._done.items()],
            "orphans": [
                [c.request_id, c.user_id, c.item_id, c.event_time, o.to_json()]
                for clicks in self._orphans.values()
                for c, o in clicks
            ],
            "recovered": [[h, sorted(r[0]), r[1]] for h, r in self._recovered.items()],
        }

    @classmethod
    def from_state(
        cls, config: JoinConfig, state: Mapping[str, Any], now_ms: int
    ) -> PartitionJoiner:
        """Rebuild a joiner (indexes included); streams count as live from ``now_ms``."""
        j = cls(config, now_ms)
        j.watermark = state["watermark"]
        for name, max_time in state["streams"].items():
            j._streams[name].max_time = max_time
        j.counters = Counters(**state["counters"])
        for rid, iid, user, time, ids, late, *clicked in state["pending"]:
            # checkpoints written before positives_at_close have no clicked flag
            j._pending[(rid, iid)] = _Pending(
                user, time, dict(ids), late, bool(clicked and clicked[0])
            )
            heapq.heappush(j._closing, (time + config.window_ms, (rid, iid)))
        for rid, iid, kind, time, late, user, ids in state["done"]:
            j._remember((rid, iid), _Done(kind, time, late, user, dict(ids)))
        for rid, user, iid, time, origin in state["orphans"]:
            j._orphans.setdefault((rid, iid), []).append(
                (Click(rid, user, iid, time), Origin.from_json(origin))
            )
            heapq.heappush(j._orphan_due, (time, (rid, iid)))
        j._recovered = {h: (set(kinds), exp) for h, kinds, exp in state["recovered"]}
        return j
