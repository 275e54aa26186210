"""Device cache: planning, installing, eviction, staleness, geo deltas; CPU vs CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.train.cache import CacheFull, DeviceCache

pytestmark = pytest.mark.unit


def _rows(ids: np.ndarray, dim: int) -> np.ndarray:
    return (ids.astype(np.float64)[:, None] * 0.001 + np.arange(dim)).astype(np.float32)


def test_plan_pulls_only_absent_or_stale_rows() -> None:
    cache = DeviceCache("t", 3, 100, max_age_passes=1)
    ids = np.array([5, 9, 11], np.uint64)
    assert cache.plan(ids, 1).tolist() == [5, 9, 11]
    cache.install(ids, _rows(ids, 3), np.ones(3, bool), ids, 1)
    assert cache.plan(ids, 1).size == 0
    assert cache.plan(ids, 2).size == 0  # pulled at pass 1, serves pass 2
    assert cache.plan(np.array([5, 12], np.uint64), 3).tolist() == [5, 12]  # too old + absent
    got = cache.weight[torch.from_numpy(cache.slots(ids))].numpy()
    np.testing.assert_array_equal(got, _rows(ids, 3))


def test_eviction_is_lru_and_never_evicts_rows_of_the_pass() -> None:
    cache = DeviceCache("t", 2, 4)
    a = np.array([1, 2], np.uint64)
    b = np.array([3, 4], np.uint64)
    cache.install(a, _rows(a, 2), np.ones(2, bool), a, 1)
    cache.install(b, _rows(b, 2), np.ones(2, bool), b, 2)
    c = np.array([2, 5, 6], np.uint64)  # needs 2 free rows; 2 is pinned by this pass
    need = cache.plan(c, 3)
    assert need.tolist() == [2, 5, 6]  # max_age 0: every row is re-pulled each pass
    cache.install(need, _rows(need, 2), np.ones(3, bool), c, 3)
    assert cache.stats.evicted == 2  # 1 (pass 1) then 3 (pass 2, before 4 in slot order)
    assert len(cache) == 4
    assert len(cache.slots(np.array([2, 4, 5, 6], np.uint64))) == 4
    for gone in (1, 3):
        with pytest.raises(KeyError):
            cache.slots(np.array([gone], np.uint64))
    d = np.arange(10, 15, dtype=np.uint64)
    with pytest.raises(CacheFull, match="raise the cache capacity"):
        cache.install(d, _rows(d, 2), np.ones(5, bool), d, 4)


def test_hit_rate_counts_lookups_served_without_pull() -> None:
    cache = DeviceCache("t", 1, 10, max_age_passes=5)
    ids = np.array([1, 2], np.uint64)
    cache.install(ids, _rows(ids, 1), np.ones(2, bool), ids, 1)
    for _ in range(4):
        cache.slots(ids)
        cache.stats.lookups += len(ids)  # the trainer counts each batch's unique ids
    assert cache.stats.lookups == 8
    assert cache.stats.hit_rate == pytest.approx(1 - 2 / 8)


def test_geo_local_steps_and_deltas() -> None:
    cache = DeviceCache("t", 2, 10, with_state=True)
    ids = np.array([1, 2], np.uint64)
    base = _rows(ids, 2)
    cache.install(ids, base, np.array([True, False]), ids, 1)
    slots = torch.from_numpy(cache.slots(ids))
    grad = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    cache.local_step(slots, grad, lr=0.1)
    delta = cache.take_deltas(cache.slots(ids))
    # Adagrad from the initial accumulator, admitted rows only
    g0 = grad[0].numpy()
    expected = -0.1 * g0 / (np.sqrt(0.1 + g0 * g0) + 1e-6)
    np.testing.assert_allclose(delta[0], expected, rtol=1e-5)
    np.testing.assert_array_equal(delta[1], 0.0)
    assert np.abs(cache.take_deltas(cache.slots(ids))).max() == 0.0  # base moved
    # a row re-pulled while its last delta was in flight gets that delta back
    cache.take_deltas(cache.slots(ids))
    cache.local_step(slots, grad, lr=0.1)
    sent = cache.take_deltas(cache.slots(ids))
    assert cache.accum is not None
    acc_before = cache.accum[slots[:1]].clone()
    cache.install(ids[:1], base[:1], np.array([True]), ids, 2)
    assert torch.equal(cache.accum[slots[:1]], acc_before)  # a refresh keeps the accumulator
    got = cache.weight[slots[:1]].numpy()
    np.testing.assert_allclose(got[0], base[0] + sent[0], rtol=1e-6)


@pytest.mark.gpu
def test_cuda_cache_matches_cpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device visible to torch")
    results = []
    for device in ("cpu", "cuda"):
        cache = DeviceCache("t", 4, 64, device, with_state=True)
        rng = np.random.default_rng(0)
        for p in range(1, 6):
            ids = np.unique(rng.integers(0, 100, 20).astype(np.uint64))
            need = cache.plan(ids, p)
            cache.install(need, _rows(need, 4), np.ones(len(need), bool), ids, p)
            slots = torch.from_numpy(cache.slots(ids)).to(device)
            g = torch.from_numpy(rng.standard_normal((len(ids), 4)).astype(np.float32))
            cache.local_step(slots, g.to(device), 0.05)
            cache.take_deltas(cache.slots(ids))
        results.append(cache.weight.cpu().numpy())
    np.testing.assert_allclose(results[0], results[1], rtol=1e-6, atol=1e-7)
