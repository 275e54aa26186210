"""Deterministic per-id embedding initialization and per-id random coins.

A row's initial value is a pure function of ``(id, seed, column)``: it is drawn
from a splitmix64 stream keyed by the id, never from a shared RNG. So the value
does not depend on which shard owns the id, the order rows were created in, or
the process, and restarts or re-sharding reproduce the same model.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from pipeline.ps.spec import InitializerSpec

__all__ = ["id_uniform", "initialize", "splitmix64"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)
_TWO_POW_M53 = 2.0**-53


def splitmix64(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """Vectorized splitmix64 (Steele et al.): a bijective, well-avalanched uint64 mix.

    uint64 array arithmetic wraps modulo 2**64 in numpy, which is what we want.
    """
    z = np.asarray(x, dtype=np.uint64) + _GOLDEN  # a new array: the rest works in place
    z ^= z >> _S30
    z *= _MUL1
    z ^= z >> _S27
    z *= _MUL2
    z ^= z >> _S31
    return z


def _key(ids: npt.NDArray[np.uint64], seed: int) -> npt.NDArray[np.uint64]:
    # Mix the seed first so nearby seeds give unrelated streams.
    seed_mix = splitmix64(np.array([seed], dtype=np.uint64))[0]
    return splitmix64(np.asarray(ids, dtype=np.uint64) ^ seed_mix)


def _unit(bits: npt.NDArray[np.uint64]) -> npt.NDArray[np.float64]:
    """Top 53 bits -> float64 uniform in [0, 1)."""
    return (bits >> _S11).astype(np.float64) * _TWO_POW_M53


def id_uniform(ids: npt.NDArray[np.uint64], seed: int) -> npt.NDArray[np.float64]:
    """One float64 uniform in [0, 1) per id, fixed by ``(id, seed)`` (e.g. an admission coin)."""
    return _unit(_key(ids, seed))


def _uniform_matrix(ids: npt.NDArray[np.uint64], seed: int, cols: int) -> npt.NDArray[np.float64]:
    """[k, cols] uniforms in [0, 1); column j is stream j of the id's key."""
    key = _key(ids, seed)
    steps = (np.arange(1, cols + 1, dtype=np.uint64) * _GOLDEN)[None, :]
    return _unit(splitmix64(key[:, None] + steps))


def initialize(
    spec: InitializerSpec, ids: npt.NDArray[np.uint64], dim: int
) -> npt.NDArray[np.float32]:
    """Initial embeddings float32[len(ids), dim] for ``ids`` under ``spec``."""
    ids = np.asarray(ids, dtype=np.uint64)
    k = ids.shape[0]
    if spec.kind == "zeros" or k == 0:
        return np.zeros((k, dim), dtype=np.float32)
    if spec.kind == "uniform":
        u = _uniform_matrix(ids, spec.seed, dim)
        return ((2.0 * u - 1.0) * spec.scale).astype(np.float32)
    if spec.kind == "normal":
        # Box-Muller on two independent streams per column; 1 - u keeps log() finite.
        u = _uniform_matrix(ids, spec.seed, 2 * dim)
        radius = np.sqrt(-2.0 * np.log(1.0 - u[:, :dim]))
        z = radius * np.cos(2.0 * np.pi * u[:, dim:])
        return (z * spec.std).astype(np.float32)
    raise ValueError(f"unknown initializer kind {spec.kind!r}")  # spec validation prevents this
