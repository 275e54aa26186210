"""Per-id initialization is a pure function of (id, seed): independent of shard, order, process."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from pipeline.ps.initializers import id_uniform, initialize, splitmix64
from pipeline.ps.spec import InitializerSpec

pytestmark = pytest.mark.unit


def test_splitmix64_known_answers() -> None:
    # Reference values of splitmix64's output function for x = 0, 1 (seed state + golden step).
    out = splitmix64(np.array([0, 1], dtype=np.uint64))
    assert out.tolist() == [0xE220A8397B1DCDAF, 0x910A2DEC89025CC1]


@pytest.mark.parametrize("kind", ["uniform", "normal"])
def test_rows_do_not_depend_on_batch_order_or_company(kind: str) -> None:
    spec = InitializerSpec(kind=kind, scale=0.1, std=0.1, seed=42)
    ids = np.array([0, 7, 2**64 - 1, 123456789], dtype=np.uint64)
    full = initialize(spec, ids, 8)
    alone = np.concatenate([initialize(spec, ids[i : i + 1], 8) for i in range(4)])
    shuffled = initialize(spec, ids[::-1], 8)[::-1]
    np.testing.assert_array_equal(full, alone)
    np.testing.assert_array_equal(full, shuffled)
    assert full.dtype == np.float32 and full.shape == (4, 8)
    other_seed = initialize(InitializerSpec(kind=kind, seed=43, scale=0.1, std=0.1), ids, 8)
    assert not np.array_equal(full, other_seed)


def test_same_values_in_a_fresh_process() -> None:
    code = (
        "import numpy as np;from pipeline.ps.initializers import initialize;"
        "from pipeline.ps.spec import InitializerSpec as S;"
        "print(initialize(S(kind='normal', std=1.0, seed=5), np.array([3, 99], np.uint64), 4)"
        ".tobytes().hex())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    here = initialize(
        InitializerSpec(kind="normal", std=1.0, seed=5), np.array([3, 99], np.uint64), 4
    )
    assert out.stdout.strip() == here.tobytes().hex()


def test_distributions() -> None:
    ids = np.arange(20_000, dtype=np.uint64)
    u = initialize(InitializerSpec(kind="uniform", scale=0.5), ids, 4)
    assert u.min() >= -0.5 and u.max() <= 0.5 and abs(u.mean()) < 0.01
    assert abs(u.var() - 0.25 / 3) < 0.005  # var of U(-a, a) is a^2 / 3
    n = initialize(InitializerSpec(kind="normal", std=2.0), ids, 4)
    assert abs(n.mean()) < 0.05 and abs(n.std() - 2.0) < 0.05
    # Columns come from independent streams: no correlation between them.
    assert abs(np.corrcoef(n[:, 0], n[:, 1])[0, 1]) < 0.03
    assert not initialize(InitializerSpec(kind="zeros"), ids, 4).any()


def test_id_uniform_is_a_fixed_fair_coin() -> None:
    ids = np.arange(50_000, dtype=np.uint64)
    u = id_uniform(ids, 9)
    np.testing.assert_array_equal(u, id_uniform(ids, 9))
    assert u.min() >= 0.0 and u.max() < 1.0
    assert abs((u < 0.3).mean() - 0.3) < 0.01
