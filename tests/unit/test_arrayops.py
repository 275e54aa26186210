"""arrayops.unique against numpy's np.unique."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.arrayops import unique

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("dtype", [np.uint64, np.int64, np.int32, np.intp])
@pytest.mark.parametrize("n", [0, 1, 2, 7, 1000])
def test_equals_np_unique(dtype: type, n: int) -> None:
    rng = np.random.default_rng(n)
    high = 2**63 if dtype == np.uint64 else 50
    values = rng.integers(0, high, n, dtype=np.uint64).astype(dtype)
    got = unique(values)
    want = np.unique(values)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


def test_flattens_and_leaves_the_input_alone() -> None:
    values = np.array([[3, 1], [3, 2]], dtype=np.uint64)
    before = values.copy()
    np.testing.assert_array_equal(unique(values), np.array([1, 2, 3], np.uint64))
    np.testing.assert_array_equal(values, before)
    np.testing.assert_array_equal(unique([5, 5, 5]), np.array([5]))
