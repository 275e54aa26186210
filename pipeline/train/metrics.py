"""Progressive-validation metrics as mergeable counts, per window and cumulative.

A trainer scores each batch before training on it and feeds ``(p, label, weight)``
here. Everything is kept as sums and per-bucket histograms, never as lists of
predictions, so the counts of any number of trainers (or windows) add up exactly:
the AUC of merged counts is the AUC over all their rows. Definitions and formulas
are in docs/metrics.md.

Per predicted-probability bucket ``b = min(floor(p * B), B - 1)``:

- ``pos[b]``, ``neg[b]``: unweighted counts of positive / negative rows (AUC);
- ``pred_sum[b]``, ``bucket_weight[b]``, ``bucket_label[b]``: weighted sums of
  predictions, weights and labels (calibration, bucket error).

Plus weighted scalar sums (log loss, errors, CTRs), the row count and the largest
event time seen. Only numpy; no services.
"""

from __future__ import annotations

import math
import operator
import struct
import time
import zlib
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_BUCKETS",
    "PROB_EPS",
    "SUMMARY_KEYS",
    "ClosedWindow",
    "MetricCounts",
    "WindowedMetrics",
    "bucket_index",
    "bucketed_auc",
    "progress_line",
    "unpack_auc_buckets",
]

DEFAULT_BUCKETS = 10_000
#: Predictions are clipped to [PROB_EPS, 1 - PROB_EPS] inside the log loss only.
PROB_EPS = 1e-7
#: Keys of :meth:`MetricCounts.summary`, in display order.
SUMMARY_KEYS = (
    "auc",
    "logloss",
    "predicted_ctr",
    "actual_ctr",
    "copc",
    "bucket_error",
    "mae",
    "rmse",
    "samples",
)
#: Default bound on a group's relative standard error in :meth:`MetricCounts.bucket_error`.
BUCKET_ERROR_MAX_REL_STD = 0.05

_MAGIC = b"PMET"
_VERSION = 1
# magic, version, buckets, stored (non-empty) buckets, max event time (-1 = none),
# then count, weight_sum, label_sum, pred_total, logloss_sum, abs_error_sum, sq_error_sum.
_HEADER = struct.Struct("<4sHIIq7d")
_CRC = struct.Struct("<I")
# Per stored bucket: index u4, pos u8, neg u8, pred_sum f8, bucket_weight f8, bucket_label f8.
_PER_BUCKET = 4 + 5 * 8


def bucket_index(preds: Any, buckets: int = DEFAULT_BUCKETS) -> np.ndarray:
    """Bucket of each probability: ``min(floor(p * buckets), buckets - 1)`` (int64)."""
    p = np.asarray(preds, dtype=np.float64)
    return np.minimum((p * buckets).astype(np.int64), buckets - 1)


def bucketed_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Exact AUC of per-bucket positive/negative counts, ties inside a bucket counted 1/2.

    ``AUC = sum_b pos[b] * (neg[<b] + neg[b] / 2) / (P * N)``, computed in Python
    integers (exact for any count), then one correctly rounded division. NaN when
    one class is absent.
    """
    pos_u = np.asarray(pos, dtype=np.uint64)
    neg_u = np.asarray(neg, dtype=np.uint64)
    total_pos = int(pos_u.sum(dtype=np.uint64))
    total_neg = int(neg_u.sum(dtype=np.uint64))
    if total_pos == 0 or total_neg == 0:
        return math.nan
    below = np.cumsum(neg_u, dtype=np.uint64) - neg_u  # negatives in lower buckets
    # Twice the numerator, so the 1/2 for ties stays an integer.
    twice = [2 * b + n for b, n in zip(below.tolist(), neg_u.tolist(), strict=True)]
    numerator2 = sum(map(operator.mul, pos_u.tolist(), twice))
    return numerator2 / (2 * total_pos * total_neg)


def unpack_auc_buckets(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """``(pos, neg)`` uint64 arrays from the ``auc_buckets`` field ('<u8' [2, B])."""
    if len(data) == 0 or len(data) % 16:
        raise ValueError(f"auc_buckets must be 16*B bytes ('<u8' [2, B]), got {len(data)}")
    arr = np.frombuffer(data, dtype="<u8").reshape(2, -1).astype(np.uint64)
    return arr[0], arr[1]


def _as_1d(name: str, values: Any, n: int | None = None) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).ravel()
    if n is not None and arr.size != n:
        raise ValueError(f"{name} has {arr.size} values, predictions have {n}")
    if not np.isfinite(arr).all():
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        raise ValueError(f"{name} has {bad} non-finite values")
    return arr


@dataclass(frozen=True)
class _Rows:
    """One batch's scored rows, validated once (float64), with their log loss."""

    p: np.ndarray
    y: np.ndarray
    w: np.ndarray | None
    loss: np.ndarray
    max_time: int | None

    @classmethod
    def of(cls, preds: Any, labels: Any, weights: Any, event_times: Any) -> _Rows:
        """Checked rows; ValueError naming what is wrong (nothing is added then)."""
        p = _as_1d("predictions", preds)
        n = p.size
        y = _as_1d("labels", labels, n)
        if n and (p.min() < 0.0 or p.max() > 1.0):
            raise ValueError(
                f"predictions must be probabilities in [0, 1], got [{p.min()}, {p.max()}]"
            )
        if not ((y == 0.0) | (y == 1.0)).all():
            raise ValueError("labels must be 0 or 1")
        w = None if weights is None else _as_1d("weights", weights, n)
        if w is not None and n and w.min() < 0.0:
            raise ValueError(f"weights must be >= 0, got min {w.min()}")
        if w is not None and n and (w == 1.0).all():
            w = None  # unweighted rows: the cheaper sums give the same counts
        max_time = None
        if event_times is not None:
            t = np.asarray(event_times).ravel()
            if t.size:
                max_time = int(t.max())
        clipped = np.clip(p, PROB_EPS, 1.0 - PROB_EPS)
        loss = -np.where(y == 1.0, np.log(clipped), np.log1p(-clipped))
        return cls(p, y, w, loss, max_time)


class MetricCounts:
    """Mergeable sufficient statistics of progressive validation over ``buckets`` buckets."""

    __slots__ = (
        "abs_error_sum",
        "bucket_label",
        "bucket_weight",
        "buckets",
        "count",
        "label_sum",
        "logloss_sum",
        "max_event_time_ms",
        "neg",
        "pos",
        "pred_sum",
        "pred_total",
        "sq_error_sum",
        "weight_sum",
    )

    def __init__(self, buckets: int = DEFAULT_BUCKETS) -> None:
        if not isinstance(buckets, int) or not 1 <= buckets < 2**32:
            raise ValueError(f"buckets must be an int in [1, 2**32), got {buckets!r}")
        self.buckets = buckets
        self.reset()

    def reset(self) -> None:
        """Back to no rows (keeps the bucket count)."""
        b = self.buckets
        self.pos = np.zeros(b, dtype=np.uint64)
        self.neg = np.zeros(b, dtype=np.uint64)
        self.pred_sum = np.zeros(b, dtype=np.float64)
        self.bucket_weight = np.zeros(b, dtype=np.float64)
        self.bucket_label = np.zeros(b, dtype=np.float64)
        self.count = 0.0
        self.weight_sum = 0.0
        self.label_sum = 0.0
        self.pred_total = 0.0
        self.logloss_sum = 0.0
        self.abs_error_sum = 0.0
        self.sq_error_sum = 0.0
        self.max_event_time_ms: int | None = None

    # -- accumulate -------------------------------------------------------------------

    def update(
        self,
        preds: Any,
        labels: Any,
        weights: Any = None,
        event_times: Any = None,
    ) -> None:
        """Add rows: probabilities in [0, 1], labels 0/1, optional weights >= 0 and times (ms)."""
        self.add(_Rows.of(preds, labels, weights, event_times))

    def add(self, rows: _Rows) -> None:
        """Add validated rows (:meth:`_Rows.of`); a window and the cumulative share them."""
        if rows.max_time is not None and (
            self.max_event_time_ms is None or rows.max_time > self.max_event_time_ms
        ):
            self.max_event_time_ms = rows.max_time
        n = rows.p.size
        if n == 0:
            return
        idx, p, y, w = bucket_index(rows.p, self.buckets), rows.p, rows.y, rows.w
        # per-row scatter adds: O(rows), not O(buckets), per batch
        positive = y.astype(np.uint64)
        np.add.at(self.pos, idx, positive)
        np.add.at(self.neg, idx, np.uint64(1) - positive)
        err = p - y
        if w is None:
            np.add.at(self.pred_sum, idx, p)
            np.add.at(self.bucket_weight, idx, 1.0)
            np.add.at(self.bucket_label, idx, y)
            self.weight_sum += float(n)
            self.label_sum += float(y.sum())
            self.pred_total += float(p.sum())
            self.logloss_sum += float(rows.loss.sum())
            self.abs_error_sum += float(np.abs(err).sum())
            self.sq_error_sum += float((err * err).sum())
        else:
            wy = w * y
            wp = w * p
            np.add.at(self.pred_sum, idx, wp)
            np.add.at(self.bucket_weight, idx, w)
            np.add.at(self.bucket_label, idx, wy)
            self.weight_sum += float(w.sum())
            self.label_sum += float(wy.sum())
            self.pred_total += float(wp.sum())
            self.logloss_sum += float((w * rows.loss).sum())
            self.abs_error_sum += float((w * np.abs(err)).sum())
            self.sq_error_sum += float((w * err * err).sum())
        self.count += float(n)

    def merge(self, other: MetricCounts) -> MetricCounts:
        """Add ``other``'s counts into these (in place); returns self."""
        if not isinstance(other, MetricCounts):
            raise TypeError(f"can only merge MetricCounts, got {type(other).__name__}")
        if other.buckets != self.buckets:
            raise ValueError(f"cannot merge counts of {other.buckets} buckets into {self.buckets}")
        self.pos += other.pos
        self.neg += other.neg
        self.pred_sum += other.pred_sum
        self.bucket_weight += other.bucket_weight
        self.bucket_label += other.bucket_label
        self.count += other.count
        self.weight_sum += other.weight_sum
        self.label_sum += other.label_sum
        self.pred_total += other.pred_total
        self.logloss_sum += other.logloss_sum
        self.abs_error_sum += other.abs_error_sum
        self.sq_error_sum += other.sq_error_sum
        if other.max_event_time_ms is not None and (
            self.max_event_time_ms is None or other.max_event_time_ms > self.max_event_time_ms
        ):
            self.max_event_time_ms = other.max_event_time_ms
        return self

    def __add__(self, other: MetricCounts) -> MetricCounts:
        return self.copy().merge(other)

    def __iadd__(self, other: MetricCounts) -> MetricCounts:
        return self.merge(other)

    def copy(self) -> MetricCounts:
        """An independent copy."""
        return MetricCounts(self.buckets).merge(self)

    def __eq__(self, other: object) -> bool:
        """Exact equality of every count and sum (round trips; use tolerances for merges)."""
        if not isinstance(other, MetricCounts):
            return NotImplemented
        return (
            self.buckets == other.buckets
            and self._scalars() == other._scalars()
            and self.max_event_time_ms == other.max_event_time_ms
            and all(
                np.array_equal(a, b) for a, b in zip(self._arrays(), other._arrays(), strict=True)
            )
        )

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"MetricCounts(buckets={self.buckets}, samples={int(self.count)})"

    # -- metrics ----------------------------------------------------------------------

    def auc(self) -> float:
        """AUC of the bucketed scores (unweighted rows); NaN when one class is absent."""
        return bucketed_auc(self.pos, self.neg)

    def logloss(self) -> float:
        """Weighted mean log loss (p clipped to [PROB_EPS, 1 - PROB_EPS])."""
        return _ratio(self.logloss_sum, self.weight_sum)

    def predicted_ctr(self) -> float:
        """Weighted mean prediction."""
        return _ratio(self.pred_total, self.weight_sum)

    def actual_ctr(self) -> float:
        """Weighted mean label."""
        return _ratio(self.label_sum, self.weight_sum)

    def copc(self) -> float:
        """Clicks over predicted clicks (actual CTR / predicted CTR); 1 is calibrated."""
        return _ratio(self.label_sum, self.pred_total)

    def mae(self) -> float:
        """Weighted mean |p - label|."""
        return _ratio(self.abs_error_sum, self.weight_sum)

    def rmse(self) -> float:
        """Square root of the weighted mean (p - label)^2."""
        return math.sqrt(_ratio(self.sq_error_sum, self.weight_sum))

    def bucket_error(
        self, max_rel_std: float = BUCKET_ERROR_MAX_REL_STD, min_rows: int = 1
    ) -> float:
        """Relative calibration error over groups of adjacent buckets (docs/metrics.md).

        Walking the buckets upwards, a group closes once it holds ``min_rows`` rows and
        its CTR estimate is precise enough: ``sqrt((1 - q) / (q * n)) <= max_rel_std``
        with ``q`` its weighted mean prediction and ``n`` its rows (Paddle's rule).
        Rows left over at the top join the last group. Per group,
        ``e = |actual_ctr - predicted_ctr| / predicted_ctr`` (weighted CTRs); the result
        is the mean of ``e`` weighted by the groups' weights. NaN when no group closes.
        ``max_rel_std=inf`` gives fixed groups of ``min_rows`` rows.
        """
        if min_rows < 1:
            raise ValueError(f"min_rows must be >= 1, got {min_rows}")
        if not max_rel_std > 0:
            raise ValueError(f"max_rel_std must be > 0, got {max_rel_std}")
        nonempty = np.flatnonzero(self.pos + self.neg)
        bound2 = max_rel_std * max_rel_std
        groups: list[tuple[float, float, float]] = []  # (weight, pred sum, label sum)
        n = w = p = y = 0.0
        for rows, bw, bp, bl in zip(
            (self.pos[nonempty] + self.neg[nonempty]).tolist(),
            self.bucket_weight[nonempty].tolist(),
            self.pred_sum[nonempty].tolist(),
            self.bucket_label[nonempty].tolist(),
            strict=True,
        ):
            n, w, p, y = n + rows, w + bw, p + bp, y + bl
            # (1 - q) / (q n) <= bound^2, multiplied out (q = p / w > 0).
            if n >= min_rows and w > 0 and p > 0 and (1 - p / w) <= bound2 * (p / w) * n:
                groups.append((w, p, y))
                n = w = p = y = 0.0
        if not groups:
            return math.nan
        if n:  # the top remainder joins the last group
            lw, lp, ly = groups[-1]
            groups[-1] = (lw + w, lp + p, ly + y)
        # |y/w - p/w| / (p/w) = |y - p| / p
        num = sum(gw * abs(gy - gp) / gp for gw, gp, gy in groups)
        return num / sum(gw for gw, _, _ in groups)

    def summary(self) -> dict[str, float]:
        """Every metric by name (:data:`SUMMARY_KEYS`); NaN where undefined."""
        return {
            "auc": self.auc(),
            "logloss": self.logloss(),
            "predicted_ctr": self.predicted_ctr(),
            "actual_ctr": self.actual_ctr(),
            "copc": self.copc(),
            "bucket_error": self.bucket_error(),
            "mae": self.mae(),
            "rmse": self.rmse(),
            "samples": self.count,
        }

    # -- bytes ------------------------------------------------------------------------

    def auc_buckets_bytes(self) -> bytes:
        """Packed little-endian '<u8' [2, B], positives then negatives (Metric.auc_buckets)."""
        return np.stack([self.pos, self.neg]).astype("<u8").tobytes()

    def to_bytes(self) -> bytes:
        """Compact versioned encoding: header, zlib of the non-empty buckets, CRC32."""
        # Per-bucket sums only grow where rows land, so empty buckets are all zero.
        stored = np.flatnonzero(self.pos + self.neg).astype("<u4")
        header = _HEADER.pack(
            _MAGIC,
            _VERSION,
            self.buckets,
            stored.size,
            -1 if self.max_event_time_ms is None else self.max_event_time_ms,
            *self._scalars(),
        )
        body = b"".join(
            [
                stored.tobytes(),
                self.pos[stored].astype("<u8").tobytes(),
                self.neg[stored].astype("<u8").tobytes(),
                self.pred_sum[stored].astype("<f8").tobytes(),
                self.bucket_weight[stored].astype("<f8").tobytes(),
                self.bucket_label[stored].astype("<f8").tobytes(),
            ]
        )
        # Level 1: about 3x smaller for ~1 ms on a full 10k-bucket histogram.
        payload = header + zlib.compress(body, 1)
        return payload + _CRC.pack(zlib.crc32(payload))

    @classmethod
    def from_bytes(cls, data: bytes) -> MetricCounts:
        """Decode :meth:`to_bytes`; ValueError on a wrong magic/version, truncation or CRC."""
        data = bytes(data)
        if len(data) < _HEADER.size + _CRC.size:
            raise ValueError(f"metric counts truncated: {len(data)} bytes")
        magic, version, buckets, stored, max_t, *scalars = _HEADER.unpack_from(data)
        if magic != _MAGIC:
            raise ValueError(f"not metric counts (magic {magic!r})")
        if version != _VERSION:
            raise ValueError(f"metric counts version {version} unsupported (expected {_VERSION})")
        (crc,) = _CRC.unpack_from(data, len(data) - _CRC.size)
        if crc != zlib.crc32(data[: -_CRC.size]):
            raise ValueError("metric counts truncated or corrupted (CRC mismatch)")
        if stored > buckets or buckets < 1:
            raise ValueError(f"metric counts store {stored} of {buckets} buckets")
        expected = stored * _PER_BUCKET
        inflate = zlib.decompressobj()
        try:
            body = inflate.decompress(data[_HEADER.size : -_CRC.size], expected + 1)
        except zlib.error as exc:
            raise ValueError(f"metric counts body unreadable: {exc}") from None
        if len(body) != expected or not inflate.eof or inflate.unconsumed_tail:
            raise ValueError(f"metric counts body is not {stored} buckets ({expected} bytes)")
        off = 0
        idx = np.frombuffer(body, "<u4", stored, off).astype(np.int64)
        if stored and (idx[-1] >= buckets or (np.diff(idx) <= 0).any()):
            raise ValueError("metric counts bucket indexes are out of range or unsorted")
        off += 4 * stored
        out = cls(buckets)
        for name, dtype in (
            ("pos", "<u8"),
            ("neg", "<u8"),
            ("pred_sum", "<f8"),
            ("bucket_weight", "<f8"),
            ("bucket_label", "<f8"),
        ):
            getattr(out, name)[idx] = np.frombuffer(body, dtype, stored, off)
            off += 8 * stored
        (
            out.count,
            out.weight_sum,
            out.label_sum,
            out.pred_total,
            out.logloss_sum,
            out.abs_error_sum,
            out.sq_error_sum,
        ) = scalars
        out.max_event_time_ms = None if max_t < 0 else max_t
        return out

    def _scalars(self) -> tuple[float, ...]:
        return (
            self.count,
            self.weight_sum,
            self.label_sum,
            self.pred_total,
            self.logloss_sum,
            self.abs_error_sum,
            self.sq_error_sum,
        )

    def _arrays(self) -> tuple[np.ndarray, ...]:
        return (self.pos, self.neg, self.pred_sum, self.bucket_weight, self.bucket_label)


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else math.nan


@dataclass(frozen=True)
class ClosedWindow:
    """The counts of one finished window ``[window_start_ms, window_end_ms)`` (wall-clock ms)."""

    window_start_ms: int
    window_end_ms: int
    counts: MetricCounts


class WindowedMetrics:
    """Counts of the current window plus cumulative counts since start (or restore).

    Windows are ``[k * window, (k + 1) * window)`` in wall-clock ms, so windows of
    different trainers line up and can be merged by start time. A window opens at
    the first update in it; idle time opens none. Call :meth:`roll` once per batch:
    it returns the window that closed (oldest first), or None.
    """

    def __init__(
        self,
        window_s: float = 10.0,
        buckets: int = DEFAULT_BUCKETS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        window_ms = round(window_s * 1000)
        if not window_ms >= 1:
            raise ValueError(f"window_s must be at least 1 ms, got {window_s!r}")
        self.window_ms = window_ms
        self.buckets = buckets
        self._clock = clock
        self.cumulative = MetricCounts(buckets)
        self.current = MetricCounts(buckets)
        self._start_ms: int | None = None
        self._closed: deque[ClosedWindow] = deque()

    @property
    def window_start_ms(self) -> int | None:
        """Start of the open window (None while no row arrived since the last close)."""
        return self._start_ms

    def update(self, preds: Any, labels: Any, weights: Any = None, event_times: Any = None) -> None:
        """Add a batch to the current window (opening one if needed) and to the cumulative."""
        rows = _Rows.of(preds, labels, weights, event_times)
        now_ms = self._now_ms(None)
        self._close_if_due(now_ms)
        if self._start_ms is None:
            self._start_ms = now_ms - now_ms % self.window_ms
        self.current.add(rows)
        self.cumulative.add(rows)

    def roll(self, now: float | None = None, force: bool = False) -> ClosedWindow | None:
        """Close the open window if its end has passed; return the oldest closed one.

        ``force`` closes the open window now (at shutdown), keeping its nominal end.
        """
        self._close_if_due(self._now_ms(now), force)
        return self._closed.popleft() if self._closed else None

    def _now_ms(self, now: float | None) -> int:
        return math.floor((self._clock() if now is None else now) * 1000)

    def _close_if_due(self, now_ms: int, force: bool = False) -> None:
        if self._start_ms is not None and (force or now_ms >= self._start_ms + self.window_ms):
            start = self._start_ms
            self._closed.append(ClosedWindow(start, start + self.window_ms, self.current))
            self.current = MetricCounts(self.buckets)
            self._start_ms = None


def _fmt_number(value: float | str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else str(value)
    if float(value).is_integer() or abs(value) >= 1000:
        return f"{round(value):,}"
    return f"{value:.4g}"


def progress_line(summary: Mapping[str, float], extras: Mapping[str, float | str]) -> str:
    """One console line: ``rows 120,000 | 8,512 rows/s | auc 0.7412 | logloss 0.4623 | ...``.

    Rates in ``extras`` (names ending in ``/s``) print value first; other extras print
    ``name value``.
    """
    parts = [f"rows {_fmt_number(summary.get('samples', 0.0))}"]
    parts += [f"{_fmt_number(v)} {k}" for k, v in extras.items() if k.endswith("/s")]
    for key, fmt in (
        ("auc", "{:.4f}"),
        ("logloss", "{:.4f}"),
        ("copc", "{:.3f}"),
        ("predicted_ctr", "{:.4f}"),
        ("actual_ctr", "{:.4f}"),
        ("bucket_error", "{:.4f}"),
    ):
        if key in summary:
            value = summary[key]
            label = {"predicted_ctr": "pctr", "actual_ctr": "ctr"}.get(key, key)
            parts.append(f"{label} {'nan' if math.isnan(value) else fmt.format(value)}")
    parts += [f"{k} {_fmt_number(v)}" for k, v in extras.items() if not k.endswith("/s")]
    return " | ".join(parts)
