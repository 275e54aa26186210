"""Progressive-validation metrics against sklearn / numpy references, merging, bytes, windows."""

from __future__ import annotations

import math
import struct
import zlib
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import log_loss, mean_absolute_error, mean_squared_error, roc_auc_score

from pipeline.train.metrics import (
    SUMMARY_KEYS,
    MetricCounts,
    WindowedMetrics,
    bucket_index,
    bucketed_auc,
    progress_line,
    unpack_auc_buckets,
)

pytestmark = pytest.mark.unit


def _data(
    seed: int, n: int, buckets_skew: float = 1.0, weighted: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    rng = np.random.default_rng(seed)
    p = rng.beta(buckets_skew, 4.0, n)
    y = (rng.random(n) < p).astype(np.float32)
    w = rng.uniform(0.1, 3.0, n) if weighted else None
    return p, y, w


def _assert_counts_close(a: MetricCounts, b: MetricCounts) -> None:
    assert a.buckets == b.buckets
    np.testing.assert_array_equal(a.pos, b.pos)
    np.testing.assert_array_equal(a.neg, b.neg)
    for arr_a, arr_b in zip(a._arrays()[2:], b._arrays()[2:], strict=True):
        np.testing.assert_allclose(arr_a, arr_b, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(a._scalars(), b._scalars(), rtol=1e-12)
    assert a.max_event_time_ms == b.max_event_time_ms


# -- AUC ---------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(
        st.tuples(st.floats(0.0, 1.0), st.booleans()),
        min_size=1,
        max_size=300,
    ),
    buckets=st.sampled_from([1, 2, 3, 10, 97, 10_000]),
)
def test_auc_equals_sklearn_on_bucketed_scores(
    rows: list[tuple[float, bool]], buckets: int
) -> None:
    p = np.array([r[0] for r in rows])
    y = np.array([r[1] for r in rows], dtype=np.float64)
    counts = MetricCounts(buckets)
    counts.update(p, y)
    if y.min() == y.max():
        assert math.isnan(counts.auc())
    else:
        expected = roc_auc_score(y, bucket_index(p, buckets))
        assert counts.auc() == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("seed", range(5))
def test_auc_equals_sklearn_on_large_random_samples(seed: int) -> None:
    p, y, _ = _data(seed, 50_000, buckets_skew=0.5 + seed)
    counts = MetricCounts()
    for part in np.array_split(np.arange(p.size), 7):  # batches must not matter
        counts.update(p[part], y[part])
    assert counts.auc() == pytest.approx(roc_auc_score(y, bucket_index(p)), abs=1e-9)


def test_auc_special_cases() -> None:
    same = MetricCounts()
    same.update([0.31, 0.31001, 0.31002, 0.31003], [1, 0, 1, 0])  # all in bucket 3100
    assert same.auc() == 0.5
    perfect = MetricCounts()
    perfect.update([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1])
    assert perfect.auc() == 1.0
    reversed_ = MetricCounts()
    reversed_.update([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0])
    assert reversed_.auc() == 0.0
    only_pos = MetricCounts()
    only_pos.update([0.1, 0.9], [1, 1])
    assert math.isnan(only_pos.auc())
    assert math.isnan(MetricCounts().auc())


def test_auc_is_exact_past_a_billion_rows() -> None:
    """Counts far beyond float64's exact integers: compare with exact rational arithmetic."""
    rng = np.random.default_rng(3)
    buckets = 1000
    pos = rng.integers(0, 10**12, buckets, dtype=np.uint64)
    neg = rng.integers(0, 10**12, buckets, dtype=np.uint64)
    pos_i, neg_i = [int(v) for v in pos], [int(v) for v in neg]
    below, num = 0, Fraction(0)
    for pc, nc in zip(pos_i, neg_i, strict=True):
        num += pc * below + Fraction(pc * nc, 2)
        below += nc
    exact = num / (sum(pos_i) * sum(neg_i))
    assert bucketed_auc(pos, neg) == float(exact)


# -- merging -----------------------------------------------------------------------------


@pytest.mark.parametrize("weighted", [False, True])
def test_merge_equals_counts_over_concatenated_data(weighted: bool) -> None:
    p, y, w = _data(1, 20_000, weighted=weighted)
    t = np.arange(p.size, dtype=np.int64) * 7
    cut = 6_000
    a, b, whole = MetricCounts(), MetricCounts(), MetricCounts()
    a.update(p[:cut], y[:cut], None if w is None else w[:cut], t[:cut])
    b.update(p[cut:], y[cut:], None if w is None else w[cut:], t[cut:])
    whole.update(p, y, w, t)
    merged = a + b
    _assert_counts_close(merged, whole)
    assert merged.auc() == whole.auc()
    assert merged.summary() == pytest.approx(whole.summary(), rel=1e-12, nan_ok=True)
    # __add__ left its operands alone; merge is in place and returns self.
    assert a.count == cut and b.count == p.size - cut
    assert a.merge(b) is a
    _assert_counts_close(a, whole)


def test_merge_rejects_other_bucket_counts_and_copy_is_independent() -> None:
    with pytest.raises(ValueError, match="buckets"):
        MetricCounts(100).merge(MetricCounts(10))
    with pytest.raises(TypeError):
        MetricCounts().merge("nope")  # type: ignore[arg-type]
    a = MetricCounts(10)
    a.update([0.5], [1])
    c = a.copy()
    c.update([0.1], [0])
    assert a.count == 1 and c.count == 2 and a.neg.sum() == 0
    c.reset()
    assert c == MetricCounts(10)


# -- other metrics -----------------------------------------------------------------------


@pytest.mark.parametrize("weighted", [False, True])
def test_losses_and_ctrs_match_references(weighted: bool) -> None:
    p, y, w = _data(2, 10_000, weighted=weighted)
    p = np.clip(p, 0.01, 0.99)  # no clipping inside either log loss
    counts = MetricCounts()
    counts.update(p, y, w)
    ref_w = np.ones_like(p) if w is None else w
    s = counts.summary()
    assert set(s) == set(SUMMARY_KEYS)
    assert s["logloss"] == pytest.approx(log_loss(y, p, sample_weight=ref_w), rel=1e-12)
    assert s["mae"] == pytest.approx(mean_absolute_error(y, p, sample_weight=ref_w), rel=1e-12)
    rmse = math.sqrt(mean_squared_error(y, p, sample_weight=ref_w))
    assert s["rmse"] == pytest.approx(rmse, rel=1e-12)
    assert s["predicted_ctr"] == pytest.approx(np.average(p, weights=ref_w), rel=1e-12)
    assert s["actual_ctr"] == pytest.approx(np.average(y, weights=ref_w), rel=1e-12)
    assert s["copc"] == pytest.approx((ref_w * y).sum() / (ref_w * p).sum(), rel=1e-12)
    assert s["samples"] == p.size


def test_logloss_clips_extreme_predictions() -> None:
    counts = MetricCounts()
    counts.update([0.0, 1.0], [1, 0])  # maximally wrong, would be infinite unclipped
    assert counts.logloss() == pytest.approx(-math.log(1e-7), rel=1e-6)
    assert counts.mae() == 1.0 and counts.rmse() == 1.0


def test_zero_weights_count_rows_but_not_means() -> None:
    counts = MetricCounts()
    counts.update([0.2, 0.9], [0, 1], [0.0, 0.0])
    assert counts.count == 2 and counts.auc() == 1.0
    assert math.isnan(counts.logloss()) and math.isnan(counts.copc())


def test_empty_summary_is_nan_with_zero_samples() -> None:
    s = MetricCounts().summary()
    assert s["samples"] == 0
    assert all(math.isnan(v) for k, v in s.items() if k != "samples")


def _bucket_error_reference(
    p: np.ndarray, y: np.ndarray, w: np.ndarray, buckets: int, max_rel_std: float, min_rows: int
) -> float:
    """Row-level loop over buckets: close a group at a bucket end once it has min_rows rows
    and sqrt((1 - q) / (q n)) <= max_rel_std; the top remainder joins the last group."""
    b = bucket_index(p, buckets)
    groups: list[np.ndarray] = []
    current = np.zeros(0, dtype=np.int64)
    for bucket in range(buckets):
        current = np.concatenate([current, np.flatnonzero(b == bucket)])
        if current.size < min_rows:
            continue
        q = np.average(p[current], weights=w[current])
        if math.sqrt((1 - q) / (q * current.size)) <= max_rel_std:
            groups.append(current)
            current = np.zeros(0, dtype=np.int64)
    if not groups:
        return math.nan
    groups[-1] = np.concatenate([groups[-1], current])
    errors = []
    weights = []
    for g in groups:
        pred = np.average(p[g], weights=w[g])
        act = np.average(y[g], weights=w[g])
        errors.append(abs(act - pred) / pred)
        weights.append(w[g].sum())
    return float(np.average(errors, weights=weights))


@pytest.mark.parametrize(
    ("buckets", "max_rel_std", "min_rows"),
    [(50, 0.05, 1), (1000, 0.1, 1), (1000, math.inf, 300), (10_000, 0.05, 200)],
)
def test_bucket_error_matches_row_level_reference(
    buckets: int, max_rel_std: float, min_rows: int
) -> None:
    p, y, w = _data(4, 8_000)
    assert w is not None
    counts = MetricCounts(buckets)
    counts.update(p, y, w)
    expected = _bucket_error_reference(p, y, w, buckets, max_rel_std, min_rows)
    assert not math.isnan(expected)
    assert counts.bucket_error(max_rel_std, min_rows) == pytest.approx(expected, rel=1e-9)


def test_bucket_error_known_answers() -> None:
    rng = np.random.default_rng(5)
    true_p = rng.uniform(0.02, 0.3, 400_000)
    y = (rng.random(true_p.size) < true_p).astype(np.float64)
    calibrated = MetricCounts()
    calibrated.update(true_p, y)
    # Groups close at a 5 % relative standard error: the noise floor is about 0.04.
    assert calibrated.bucket_error() < 0.05
    doubled = MetricCounts()
    doubled.update(2 * true_p, y)  # predicts twice the real rate everywhere
    assert doubled.bucket_error() == pytest.approx(0.5, abs=0.03)
    shrunk = MetricCounts()
    shrunk.update(0.75 * true_p, y)  # |1 / 0.75 - 1| = 1/3
    assert shrunk.bucket_error() == pytest.approx(1 / 3, abs=0.03)
    small = MetricCounts()
    small.update(true_p[:50], y[:50])
    assert math.isnan(small.bucket_error())  # never precise enough to close a group
    with pytest.raises(ValueError):
        small.bucket_error(min_rows=0)
    with pytest.raises(ValueError):
        small.bucket_error(max_rel_std=0.0)


@pytest.mark.parametrize(
    ("preds", "labels", "weights", "match"),
    [
        ([0.5, 1.2], [0, 1], None, r"\[0, 1\]"),
        ([0.5, -0.1], [0, 1], None, r"\[0, 1\]"),
        ([0.5, math.nan], [0, 1], None, "non-finite"),
        ([0.5, 0.5], [0, 2], None, "0 or 1"),
        ([0.5, 0.5], [0, 0.5], None, "0 or 1"),
        ([0.5, 0.5], [0], None, "labels has 1 values"),
        ([0.5, 0.5], [0, 1], [1.0, -1.0], ">= 0"),
        ([0.5, 0.5], [0, 1], [1.0], "weights has 1 values"),
        ([0.5, 0.5], [0, 1], [1.0, math.inf], "non-finite"),
    ],
)
def test_bad_input_is_rejected_and_counts_stay_unchanged(
    preds: list[float], labels: list[float], weights: list[float] | None, match: str
) -> None:
    counts = MetricCounts(10)
    counts.update([0.3], [1])
    before = counts.copy()
    with pytest.raises(ValueError, match=match):
        counts.update(preds, labels, weights)
    assert counts == before


def test_bucket_count_is_validated() -> None:
    for bad in (0, -1, 2**32):
        with pytest.raises(ValueError, match="buckets"):
            MetricCounts(bad)


# -- bytes -------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(0, 500),
    buckets=st.sampled_from([1, 7, 10_000]),
    weighted=st.booleans(),
    times=st.booleans(),
)
def test_bytes_round_trip(seed: int, n: int, buckets: int, weighted: bool, times: bool) -> None:
    p, y, w = _data(seed, n, weighted=weighted)
    counts = MetricCounts(buckets)
    counts.update(p, y, w, np.arange(n) + 1_700_000_000_000 if times else None)
    back = MetricCounts.from_bytes(counts.to_bytes())
    assert back == counts
    assert back.summary() == pytest.approx(counts.summary(), nan_ok=True)


def test_corrupted_or_truncated_bytes_are_rejected() -> None:
    p, y, w = _data(6, 3_000)
    data = _counts(p, y, w).to_bytes()
    for cut in (0, 1, 10, 60, len(data) // 2, len(data) - 1):
        with pytest.raises(ValueError):
            MetricCounts.from_bytes(data[:cut])
    rng = np.random.default_rng(0)
    for pos in rng.integers(0, len(data), 50):
        bad = bytearray(data)
        bad[pos] ^= 0x5A
        with pytest.raises(ValueError):
            MetricCounts.from_bytes(bytes(bad))
    with pytest.raises(ValueError):
        MetricCounts.from_bytes(data + b"\0")
    with pytest.raises(ValueError, match="magic"):
        MetricCounts.from_bytes(_recrc(b"XXXX" + data[4:-4]))
    with pytest.raises(ValueError, match="version 9"):
        MetricCounts.from_bytes(_recrc(data[:4] + struct.pack("<H", 9) + data[6:-4]))


def _counts(p: np.ndarray, y: np.ndarray, w: np.ndarray | None) -> MetricCounts:
    counts = MetricCounts()
    counts.update(p, y, w)
    return counts


def _recrc(payload: bytes) -> bytes:
    return payload + struct.pack("<I", zlib.crc32(payload))


def test_auc_buckets_layout() -> None:
    counts = MetricCounts(5)
    counts.update([0.05, 0.05, 0.5, 0.99, 0.99, 0.99], [1, 0, 0, 1, 1, 0])
    blob = counts.auc_buckets_bytes()
    assert len(blob) == 2 * 5 * 8
    arr = np.frombuffer(blob, dtype="<u8").reshape(2, 5)
    assert arr.tolist() == [[1, 0, 0, 0, 2], [1, 0, 1, 0, 1]]
    pos, neg = unpack_auc_buckets(blob)
    assert bucketed_auc(pos, neg) == counts.auc()
    with pytest.raises(ValueError):
        unpack_auc_buckets(blob[:-3])


# -- windows -----------------------------------------------------------------------------


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_windows_align_to_wall_clock_and_roll() -> None:
    clock = FakeClock(1_000.7)
    wm = WindowedMetrics(window_s=10.0, buckets=100, clock=clock)
    assert wm.roll() is None and wm.window_start_ms is None  # nothing seen, no window
    wm.update([0.2, 0.7], [0, 1])
    assert wm.window_start_ms == 1_000_000  # floor to a multiple of 10 s
    clock.now = 1_009.9
    wm.update([0.4], [1])
    assert wm.roll() is None  # end (1_010_000) not reached
    closed = wm.roll(now=1_010.0)
    assert closed is not None
    assert (closed.window_start_ms, closed.window_end_ms) == (1_000_000, 1_010_000)
    assert closed.counts.count == 3
    assert wm.current.count == 0 and wm.cumulative.count == 3
    assert wm.roll(now=1_030.0) is None  # idle time opens no window

    clock.now = 1_041.0
    wm.update([0.9], [1])
    clock.now = 1_055.0
    wm.update([0.1], [0])  # past the end: the previous window closes by itself
    first = wm.roll()
    assert first is not None and first.window_start_ms == 1_040_000 and first.counts.count == 1
    assert wm.roll() is None
    last = wm.roll(force=True)
    assert last is not None and last.window_start_ms == 1_050_000
    assert last.window_end_ms == 1_060_000 and last.counts.count == 1
    assert wm.cumulative.count == 5
    expected = MetricCounts(100)
    expected.update([0.2, 0.7, 0.4, 0.9, 0.1], [0, 1, 1, 1, 0])
    _assert_counts_close(wm.cumulative, expected)


def test_windows_of_different_trainers_line_up() -> None:
    a = WindowedMetrics(5.0, 10, clock=FakeClock(100.2))
    b = WindowedMetrics(5.0, 10, clock=FakeClock(103.9))
    a.update([0.1], [0])
    b.update([0.8], [1])
    wa, wb = a.roll(now=105.0), b.roll(now=105.0)
    assert wa is not None and wb is not None
    assert (wa.window_start_ms, wa.window_end_ms) == (wb.window_start_ms, wb.window_end_ms)
    assert (wa.counts + wb.counts).auc() == 1.0


def test_window_length_is_validated() -> None:
    for bad in (0.0, -1.0, 0.0001):
        with pytest.raises(ValueError, match="window_s"):
            WindowedMetrics(bad)


# -- console line ------------------------------------------------------------------------


def test_progress_line() -> None:
    summary = {
        "samples": 120_000.0,
        "auc": 0.74123,
        "logloss": 0.46231,
        "copc": 1.0213,
        "predicted_ctr": 0.1,
        "actual_ctr": math.nan,
    }
    line = progress_line(summary, {"rows/s": 8512.4, "hit": 0.93, "limit": "io"})
    assert line.startswith("rows 120,000 | 8,512 rows/s | auc 0.7412 | logloss 0.4623 | ")
    assert "copc 1.021" in line and "ctr nan" in line
    assert line.endswith("hit 0.93 | limit io")
