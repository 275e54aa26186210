"""Vectorized sparse optimizers over blocks of rows, plus duplicate-id aggregation.

Each row's optimizer state lives next to its weights in a float32 state matrix
of width ``state_width(dim)``, so a row (weights + state) moves between tiers
as one unit and an update touches only the rows in the push. ``update`` works in
place on gathered row blocks ``weights[k, dim]``, ``state[k, s]``, ``grads[k, dim]``;
the caller scatters them back. Formulas follow torch (SGD, Adagrad, Adam) and
McMahan et al. 2013 (FTRL-Proximal), so they can be checked against those.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import numpy.typing as npt

from pipeline.ps.spec import OptimizerSpec

__all__ = [
    "Adagrad",
    "Adam",
    "Ftrl",
    "Sgd",
    "SparseOptimizer",
    "aggregate",
    "make_optimizer",
]

F32 = npt.NDArray[np.float32]


class SparseOptimizer(ABC):
    """Row-wise optimizer: state per row, in-place updates on row blocks."""

    def __init__(self, spec: OptimizerSpec) -> None:
        self.spec = spec

    @abstractmethod
    def state_width(self, dim: int) -> int:
        """Number of float32 state values stored per row for embeddings of ``dim``."""

    def init_state(self, rows: int, dim: int) -> F32:
        """State of freshly admitted rows (zeros unless the optimizer says otherwise)."""
        return np.zeros((rows, self.state_width(dim)), dtype=np.float32)

    @abstractmethod
    def _step(self, weights: F32, state: F32, grads: F32) -> None:
        """Apply one gradient step in place (shapes already checked)."""

    def update(self, weights: F32, state: F32, grads: F32) -> None:
        """One optimizer step per row, in place: ``weights`` and ``state`` are modified."""
        self._check(weights, state, grads)
        if weights.shape[0]:
            self._step(weights, state, grads)
            self._clip(weights)

    def apply_delta(self, weights: F32, state: F32, deltas: F32) -> None:
        """Geo mode: add trainer-computed parameter deltas; optimizer state is untouched."""
        self._check(weights, state, deltas)
        weights += deltas
        self._clip(weights)

    def _clip(self, weights: F32) -> None:
        bound = self.spec.weight_clip
        if bound is not None:
            np.clip(weights, -bound, bound, out=weights)

    def _check(self, weights: F32, state: F32, grads: F32) -> None:
        k, dim = weights.shape
        if grads.shape != (k, dim) or state.shape != (k, self.state_width(dim)):
            raise ValueError(
                f"shape mismatch: weights {weights.shape}, state {state.shape} "
                f"(want ({k}, {self.state_width(dim)})), grads {grads.shape}"
            )
        for name, arr in (("weights", weights), ("state", state), ("grads", grads)):
            if arr.dtype != np.float32:
                raise ValueError(f"{name} must be float32, got {arr.dtype}")


class Sgd(SparseOptimizer):
    """w -= lr * g (torch.optim.SGD without momentum); no state."""

    def state_width(self, dim: int) -> int:
        return 0

    def _step(self, weights: F32, state: F32, grads: F32) -> None:
        weights -= np.float32(self.spec.lr) * grads


class Adagrad(SparseOptimizer):
    """torch.optim.Adagrad (lr_decay=0): acc += g^2; w -= lr * g / (sqrt(acc) + eps)."""

    def state_width(self, dim: int) -> int:
        return dim

    def init_state(self, rows: int, dim: int) -> F32:
        return np.full((rows, dim), self.spec.initial_accumulator, dtype=np.float32)

    def _step(self, weights: F32, state: F32, grads: F32) -> None:
        state += grads * grads
        denom = np.sqrt(state)
        denom += np.float32(self.spec.eps)
        weights -= np.float32(self.spec.lr) * (grads / denom)


class Adam(SparseOptimizer):
    """Lazy (sparse) Adam: moments and the step count are per row.

    State layout ``[m (dim) | v (dim) | t (1)]``. Bias correction uses the row's own
    step count ``t``, i.e. each row behaves like torch.optim.Adam run only on the
    steps that touched it. ``t`` is a float32 and exact up to 2**24 updates per row;
    beyond that the correction factors are 1.0 anyway.
    """

    def state_width(self, dim: int) -> int:
        return 2 * dim + 1

    def _step(self, weights: F32, state: F32, grads: F32) -> None:
        dim = weights.shape[1]
        b1, b2 = self.spec.beta1, self.spec.beta2
        m, v, t = state[:, :dim], state[:, dim : 2 * dim], state[:, 2 * dim]
        t += np.float32(1.0)
        m += np.float32(1.0 - b1) * (grads - m)  # torch: exp_avg.lerp_(grad, 1 - beta1)
        v *= np.float32(b2)
        v += np.float32(1.0 - b2) * grads * grads
        steps = t.astype(np.float64)
        bc1 = 1.0 - b1**steps
        bc2_sqrt = np.sqrt(1.0 - b2**steps)
        step_size = (self.spec.lr / bc1).astype(np.float32)[:, None]
        denom = np.sqrt(v) / bc2_sqrt.astype(np.float32)[:, None]
        denom += np.float32(self.spec.eps)
        weights -= step_size * (m / denom)


class Ftrl(SparseOptimizer):
    """FTRL-Proximal, per coordinate (McMahan et al. 2013, Algorithm 1).

    State layout ``[z (dim) | n (dim)]``. After updating z and n the weight is the
    closed-form solution, so L1 produces exact zeros.
    """

    def state_width(self, dim: int) -> int:
        return 2 * dim

    def _step(self, weights: F32, state: F32, grads: F32) -> None:
        dim = weights.shape[1]
        alpha = np.float32(self.spec.ftrl_alpha)
        beta, l1, l2 = (np.float32(x) for x in (self.spec.ftrl_beta, self.spec.l1, self.spec.l2))
        z, n = state[:, :dim], state[:, dim:]
        n_new = n + grads * grads
        sqrt_n_new = np.sqrt(n_new)
        sigma = (sqrt_n_new - np.sqrt(n)) / alpha
        z += grads - sigma * weights
        n[...] = n_new
        shrunk = z - np.sign(z) * l1
        w = -shrunk / ((beta + sqrt_n_new) / alpha + l2)
        weights[...] = np.where(np.abs(z) <= l1, np.float32(0.0), w)


_KINDS: dict[str, type[SparseOptimizer]] = {
    "sgd": Sgd,
    "adagrad": Adagrad,
    "adam": Adam,
    "ftrl": Ftrl,
}


def make_optimizer(spec: OptimizerSpec) -> SparseOptimizer:
    """The optimizer for ``spec.kind``."""
    return _KINDS[spec.kind](spec)


def aggregate(
    ids: npt.NDArray[np.uint64],
    grads: F32,
    shows: F32 | None = None,
    clicks: F32 | None = None,
) -> tuple[npt.NDArray[np.uint64], F32, F32, F32]:
    """Merge duplicate ids of one push: ``(unique_ids, summed_grads, summed_shows, summed_clicks)``.

    ``unique_ids`` come out sorted. Summation is a stable sort followed by
    ``np.add.reduceat`` (vectorized, deterministic order). Missing ``shows`` count
    one show per occurrence; missing ``clicks`` count zero.
    """
    ids = np.asarray(ids, dtype=np.uint64)
    n = ids.shape[0]
    grads = np.asarray(grads, dtype=np.float32)
    shows = np.ones(n, np.float32) if shows is None else np.asarray(shows, np.float32)
    clicks = np.zeros(n, np.float32) if clicks is None else np.asarray(clicks, np.float32)
    if n == 0:
        return ids.copy(), grads.copy(), shows.copy(), clicks.copy()
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    starts = np.flatnonzero(np.concatenate(([True], sorted_ids[1:] != sorted_ids[:-1])))
    if starts.shape[0] == n:  # no duplicates: a permutation is enough
        return sorted_ids, grads[order], shows[order], clicks[order]
    return (
        sorted_ids[starts],
        np.add.reduceat(grads[order], starts, axis=0),
        np.add.reduceat(shows[order], starts),
        np.add.reduceat(clicks[order], starts),
    )
