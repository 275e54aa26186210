"""CTR accessor: score formula, threshold/probability admission, decay and expiry."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.ps.accessor import SECONDS_PER_DAY, CtrAccessor
from pipeline.ps.spec import AccessorSpec

pytestmark = pytest.mark.unit


def f32(*xs: float) -> np.ndarray:
    return np.array(xs, dtype=np.float32)


def test_score_is_paddle_formula() -> None:
    acc = CtrAccessor(AccessorSpec(nonclk_coeff=0.1, clk_coeff=2.0))
    # (show - click) * 0.1 + click * 2
    np.testing.assert_allclose(acc.score(f32(10, 4, 0), f32(0, 3, 0)), [1.0, 6.1, 0.0], rtol=1e-6)


def test_admission_by_threshold() -> None:
    acc = CtrAccessor(AccessorSpec(admit_threshold=1.5))
    ids = np.arange(3, dtype=np.uint64)
    # 15 non-click shows (1.5) or 2 clicks admit; 14 shows do not.
    assert acc.admit(ids, f32(15, 14, 2), f32(0, 0, 2)).tolist() == [True, False, True]


def test_probabilistic_admission_is_deterministic_per_id() -> None:
    spec = AccessorSpec(admit_threshold=0.0, admit_probability=0.25)
    ids = np.arange(40_000, dtype=np.uint64)
    ones = np.ones(ids.shape[0], np.float32)
    first = CtrAccessor(spec, seed=3).admit(ids, ones, ones)
    again = CtrAccessor(spec, seed=3).admit(ids, ones * 9, ones)  # other stats, same coin
    np.testing.assert_array_equal(first, again)
    assert abs(first.mean() - 0.25) < 0.01
    assert not np.array_equal(first, CtrAccessor(spec, seed=4).admit(ids, ones, ones))


def test_shrink_decays_then_expires() -> None:
    spec = AccessorSpec(show_click_decay_rate=0.5, delete_threshold=1.0, delete_after_unseen_days=2)
    acc = CtrAccessor(spec)
    now = 10 * SECONDS_PER_DAY
    show, click = f32(100, 3, 100), f32(0, 0, 0)
    seen = np.array([now, now, now - 2 * SECONDS_PER_DAY - 1], dtype=np.int64)
    dead = acc.shrink(show, click, seen, now)
    np.testing.assert_allclose(show, [50, 1.5, 50])
    # row 1: score 0.15 < 1 after decay; row 2: unseen for more than 2 days
    assert dead.tolist() == [False, True, True]
