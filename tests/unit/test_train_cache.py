"""Device cache: planning, installing, eviction, staleness, geo deltas; CPU vs CUDA."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pipeline.train.cache import CacheFull, DeviceCache

pytestmark = pytest.mark.unit


def _rows(ids: np.ndarray, dim: int) -> np.ndarray:
    return (ids.astype(np.float64)[:, None] * 0.001 + np.arange(dim)).astype(np.float32)


def _install(cache: DeviceCache, ids: np.ndarray, pass_no: int) -> np.ndarray:
    """Plan and install ``ids`` for ``pass_no`` with rows made from the ids; their slots."""
    plan = cache.plan(ids, pass_no)
    need = plan.need
    return cache.install(plan, _rows(need, cache.dim), np.ones(len(need), bool))


def test_plan_pulls_only_absent_or_stale_rows() -> None:
    cache = DeviceCache("t", 3, 100, max_age_passes=1)
    ids = np.array([5, 9, 11], np.uint64)
    assert cache.plan(ids, 1).need.tolist() == [5, 9, 11]
    slots = _install(cache, ids, 1)
    assert slots.tolist() == cache.slots(ids).tolist()
    assert cache.plan(ids, 1).need.size == 0
    assert cache.plan(ids, 2).need.size == 0  # pulled at pass 1, serves pass 2
    stale = cache.plan(np.array([5, 12], np.uint64), 3)
    assert stale.need.tolist() == [5, 12]  # too old + absent
    assert stale.slots[0] == slots[0] and stale.slots[1] == -1
    got = cache.weight[torch.from_numpy(cache.slots(ids))].numpy()
    np.testing.assert_array_equal(got, _rows(ids, 3))


def test_eviction_is_lru_and_never_evicts_rows_of_the_pass() -> None:
    cache = DeviceCache("t", 2, 4)
    a = np.array([1, 2], np.uint64)
    b = np.array([3, 4], np.uint64)
    _install(cache, a, 1)
    _install(cache, b, 2)
    c = np.array([2, 5, 6], np.uint64)  # needs 2 free rows; 2 is pinned by this pass
    plan = cache.plan(c, 3)
    assert plan.need.tolist() == [2, 5, 6]  # max_age 0: every row is re-pulled each pass
    cache.install(plan, _rows(plan.need, 2), np.ones(3, bool))
    assert cache.stats.evicted == 2  # 1 (pass 1) then 3 (pass 2, before 4 in slot order)
    assert len(cache) == 4
    assert len(cache.slots(np.array([2, 4, 5, 6], np.uint64))) == 4
    for gone in (1, 3):
        with pytest.raises(KeyError):
            cache.slots(np.array([gone], np.uint64))
    d = np.arange(10, 15, dtype=np.uint64)
    with pytest.raises(CacheFull, match="this pass needs 5: raise the cache capacity"):
        _install(cache, d, 4)


def test_eviction_matches_a_full_lru_sort_over_many_passes() -> None:
    """The by-pass recency order evicts exactly what sorting every row by last use would."""
    rng = np.random.default_rng(3)
    cache = DeviceCache("t", 1, 64)
    last_use: dict[int, tuple[int, int]] = {}  # id -> (pass, slot) of its last use
    for p in range(1, 200):
        ids = np.unique(rng.zipf(1.3, 30).astype(np.uint64) % 500)
        resident = {i for i in last_use if cache._slots.lookup(np.array([i], np.uint64))[0] >= 0}
        new = [int(i) for i in ids if int(i) not in resident]
        room = cache.capacity - len(cache)
        candidates = sorted(
            (last_use[i] for i in resident if i not in set(ids.tolist())), key=lambda t: t
        )
        expect_gone = {
            int(cache.ids_of(np.array([slot]))[0])
            for _, slot in candidates[: max(0, len(new) - room)]
        }
        slots = _install(cache, ids, p)
        for i, slot in zip(ids.tolist(), slots.tolist(), strict=True):
            last_use[int(i)] = (p, slot)
        for gone in expect_gone:
            assert cache._slots.lookup(np.array([gone], np.uint64))[0] < 0, (p, gone)
            del last_use[gone]
        assert len(cache) <= cache.capacity
    assert cache.stats.evicted > 500  # the cache was full for most passes


def test_hit_rate_counts_lookups_served_without_pull() -> None:
    cache = DeviceCache("t", 1, 10, max_age_passes=5)
    ids = np.array([1, 2], np.uint64)
    _install(cache, ids, 1)
    for _ in range(4):
        cache.slots(ids)
        cache.stats.lookups += len(ids)  # the trainer counts each batch's unique ids
    assert cache.stats.lookups == 8
    assert cache.stats.hit_rate == pytest.approx(1 - 2 / 8)


def test_geo_local_steps_and_deltas() -> None:
    cache = DeviceCache("t", 2, 10, with_state=True)
    ids = np.array([1, 2], np.uint64)
    base = _rows(ids, 2)
    cache.install(cache.plan(ids, 1), base, np.array([True, False]))
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
    refresh = cache.plan(ids, 2)
    refresh = dataclasses.replace(refresh, pull=np.array([True, False]))  # only id 1 pulled
    cache.install(refresh, base[:1], np.array([True]))
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
            slots = torch.from_numpy(_install(cache, ids, p)).to(device)
            g = torch.from_numpy(rng.standard_normal((len(ids), 4)).astype(np.float32))
            cache.local_step(slots, g.to(device), 0.05)
            cache.take_deltas(cache.slots(ids))
        results.append(cache.weight.cpu().numpy())
    np.testing.assert_allclose(results[0], results[1], rtol=1e-6, atol=1e-7)
