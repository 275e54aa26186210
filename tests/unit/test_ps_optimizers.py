"""Sparse optimizers against independent references: dense torch optimizers and scalar FTRL.

Each torch reference keeps one ``nn.Parameter`` per row; rows not touched in a
step have ``grad = None``, which torch skips, so a row's step count is its own:
exactly the lazy/sparse semantics the PS implements.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.ps.optimizers import aggregate, make_optimizer
from pipeline.ps.spec import OptimizerSpec

pytestmark = pytest.mark.unit

ROWS, DIM, STEPS = 12, 5, 6


def _torch_reference(kind: str, spec: OptimizerSpec, w0: np.ndarray, plan: list) -> tuple:
    params = [torch.nn.Parameter(torch.tensor(row)) for row in w0]
    if kind == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=spec.lr)
    elif kind == "adagrad":
        opt = torch.optim.Adagrad(
            params, lr=spec.lr, eps=spec.eps, initial_accumulator_value=spec.initial_accumulator
        )
    else:
        opt = torch.optim.Adam(params, lr=spec.lr, betas=(spec.beta1, spec.beta2), eps=spec.eps)
    for rows, grads in plan:
        for p in params:
            p.grad = None
        for r, g in zip(rows, grads, strict=True):
            params[r].grad = torch.tensor(g)
        opt.step()
    weights = np.stack([p.detach().numpy() for p in params])
    return weights, [opt.state[p] for p in params]


def _plan(rng: np.random.Generator) -> list:
    plan = []
    for _ in range(STEPS):
        rows = np.sort(rng.choice(ROWS, size=rng.integers(1, ROWS), replace=False))
        plan.append((rows, rng.normal(size=(rows.shape[0], DIM)).astype(np.float32)))
    return plan


@pytest.mark.parametrize("kind", ["sgd", "adagrad", "adam"])
def test_matches_dense_torch_optimizer(kind: str) -> None:
    rng = np.random.default_rng(7)
    spec = OptimizerSpec(kind=kind, lr=0.1, eps=1e-8, initial_accumulator=0.1)
    opt = make_optimizer(spec)
    w0 = rng.normal(size=(ROWS, DIM)).astype(np.float32)
    weights, state = w0.copy(), opt.init_state(ROWS, DIM)
    plan = _plan(rng)
    for rows, grads in plan:
        w, s = weights[rows], state[rows]
        opt.update(w, s, grads)
        weights[rows], state[rows] = w, s
    ref_w, ref_state = _torch_reference(kind, spec, w0, plan)
    np.testing.assert_allclose(weights, ref_w, rtol=1e-5, atol=1e-6)
    for r in range(ROWS):
        if kind == "adagrad":
            np.testing.assert_allclose(state[r], ref_state[r]["sum"].numpy(), rtol=1e-5)
        if kind == "adam" and ref_state[r]:
            np.testing.assert_allclose(state[r, :DIM], ref_state[r]["exp_avg"].numpy(), rtol=1e-5)
            v = ref_state[r]["exp_avg_sq"].numpy()
            np.testing.assert_allclose(state[r, DIM : 2 * DIM], v, rtol=1e-5)
            assert state[r, 2 * DIM] == float(ref_state[r]["step"])


def _ftrl_scalar(spec: OptimizerSpec, w: float, z: float, n: float, g: float) -> tuple:
    """McMahan et al. 2013, Algorithm 1, one coordinate, in float64 Python."""
    sigma = (math.sqrt(n + g * g) - math.sqrt(n)) / spec.ftrl_alpha
    z += g - sigma * w
    n += g * g
    if abs(z) <= spec.l1:
        w = 0.0
    else:
        sign = 1.0 if z > 0 else -1.0
        w = -(z - sign * spec.l1) / ((spec.ftrl_beta + math.sqrt(n)) / spec.ftrl_alpha + spec.l2)
    return w, z, n


@pytest.mark.parametrize("l1", [0.0, 0.3])
def test_ftrl_matches_scalar_reference(l1: float) -> None:
    rng = np.random.default_rng(3)
    spec = OptimizerSpec(kind="ftrl", ftrl_alpha=0.1, ftrl_beta=1.0, l1=l1, l2=0.2)
    opt = make_optimizer(spec)
    weights = rng.normal(scale=0.1, size=(ROWS, DIM)).astype(np.float32)
    state = opt.init_state(ROWS, DIM)
    ref = [[(float(weights[r, c]), 0.0, 0.0) for c in range(DIM)] for r in range(ROWS)]
    for rows, grads in _plan(rng):
        w, s = weights[rows], state[rows]
        opt.update(w, s, grads)
        weights[rows], state[rows] = w, s
        for i, r in enumerate(rows):
            ref[r] = [_ftrl_scalar(spec, *ref[r][c], float(grads[i, c])) for c in range(DIM)]
    ref_arr = np.array(ref)  # [rows, dim, (w, z, n)]
    np.testing.assert_allclose(weights, ref_arr[:, :, 0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state[:, :DIM], ref_arr[:, :, 1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state[:, DIM:], ref_arr[:, :, 2], rtol=1e-5, atol=1e-6)
    if l1:
        assert (weights == 0.0).any()  # L1 yields exact zeros


@pytest.mark.parametrize("kind", ["sgd", "adagrad", "adam", "ftrl"])
def test_weight_clip_and_delta(kind: str) -> None:
    opt = make_optimizer(OptimizerSpec(kind=kind, lr=10.0, ftrl_alpha=10.0, weight_clip=0.5))
    w = np.zeros((3, 4), np.float32)
    s = opt.init_state(3, 4)
    opt.update(w, s, np.full((3, 4), -100.0, np.float32))
    assert np.abs(w).max() <= 0.5
    before = s.copy()
    opt.apply_delta(w, s, np.full((3, 4), -2.0, np.float32))
    np.testing.assert_array_equal(w, -0.5)
    np.testing.assert_array_equal(s, before)  # geo deltas leave optimizer state alone


def test_update_rejects_bad_shapes() -> None:
    opt = make_optimizer(OptimizerSpec(kind="adam"))
    with pytest.raises(ValueError, match="shape"):
        opt.update(
            np.zeros((2, 3), np.float32), np.zeros((2, 6), np.float32), np.zeros((2, 3), np.float32)
        )


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=0, max_size=40), st.integers(0, 2**32))
def test_aggregate_matches_dict_model(ids: list, seed: int) -> None:
    rng = np.random.default_rng(seed)
    arr = np.array(ids, dtype=np.uint64) * np.uint64(2**61)  # large ids, incl. 0
    grads = rng.normal(size=(len(ids), 3)).astype(np.float32)
    shows = rng.integers(0, 3, len(ids)).astype(np.float32)
    clicks = rng.integers(0, 2, len(ids)).astype(np.float32)
    uids, g, s, c = aggregate(arr, grads, shows, clicks)
    model: dict[int, list] = {}
    for i, k in enumerate(arr.tolist()):
        acc = model.setdefault(k, [np.zeros(3, np.float64), 0.0, 0.0])
        acc[0] += grads[i]
        acc[1] += shows[i]
        acc[2] += clicks[i]
    assert uids.tolist() == sorted(model)
    for j, k in enumerate(uids.tolist()):
        np.testing.assert_allclose(g[j], model[k][0], rtol=1e-5, atol=1e-5)
        assert s[j] == model[k][1] and c[j] == model[k][2]


def test_duplicates_equal_one_summed_gradient_step() -> None:
    opt = make_optimizer(OptimizerSpec(kind="adagrad", lr=0.3))
    ids = np.array([5, 9, 5, 5, 9, 1], np.uint64)
    grads = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    uids, g, shows, _ = aggregate(ids, grads)
    w, s = np.zeros((3, 4), np.float32), opt.init_state(3, 4)
    opt.update(w, s, g)
    summed = np.stack([grads[ids == k].sum(axis=0) for k in (1, 5, 9)]).astype(np.float32)
    w_ref, s_ref = np.zeros((3, 4), np.float32), opt.init_state(3, 4)
    opt.update(w_ref, s_ref, summed)
    assert uids.tolist() == [1, 5, 9] and shows.tolist() == [1.0, 3.0, 2.0]
    np.testing.assert_allclose(w, w_ref, rtol=1e-6)
