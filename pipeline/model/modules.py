"""Torch CTR models (LR, Wide&Deep, DeepFM) over sparse rows handed in per batch.

The module owns only the dense parameters (output bias, dense linear, MLP); sparse
rows arrive as :class:`~pipeline.model.features.SparseInput` leaves, one per table.
Dense parameters are initialised from a seeded generator so every trainer builds
the same model, and move through the PS dense table as named float32 arrays
(:func:`dense_state` / :func:`load_dense_state`), never as pickles.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from pipeline.model.features import SparseInput, pooled
from pipeline.model.spec import ModelSpec

__all__ = [
    "CTRModel",
    "build_model",
    "dense_state",
    "fm_interaction",
    "load_dense_state",
    "set_output_bias",
]


def fm_interaction(emb: torch.Tensor) -> torch.Tensor:
    """FM second-order term ``sum_{i<j} <v_i, v_j>`` of field embeddings ``[N, S, d]`` -> ``[N]``.

    Computed as ``0.5 * ((sum_i v_i)^2 - sum_i v_i^2)`` summed over d: O(S d), not O(S^2 d).
    """
    total = emb.sum(dim=1)
    return 0.5 * (total * total - (emb * emb).sum(dim=1)).sum(dim=1)


def _glorot_(weight: torch.Tensor, generator: torch.Generator) -> None:
    """Glorot-uniform init drawn from ``generator`` (on CPU), so it is device-independent."""
    fan_out, fan_in = weight.shape
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    values = torch.rand(weight.shape, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        weight.copy_((values * 2.0 - 1.0) * bound)


class CTRModel(nn.Module):
    """``logit = bias + wide + dense linear [+ FM] [+ MLP(deep embeddings, dense)]``.

    ``forward(sparse, dense)`` takes one :class:`SparseInput` per table named in the
    spec (wide rows [U, 1], deep rows [U, deep_dim]) and dense features ``[N, D]``.
    """

    def __init__(self, spec: ModelSpec, *, seed: int = 0) -> None:
        super().__init__()
        self.spec = spec
        generator = torch.Generator().manual_seed(seed)
        self.bias = nn.Parameter(torch.zeros(1))
        if spec.bias_init is not None:
            with torch.no_grad():
                self.bias.fill_(spec.bias_init)
        self.dense_linear: nn.Linear | None = None
        if spec.dense_dim:
            self.dense_linear = nn.Linear(spec.dense_dim, 1, bias=False)
            # zero: a random linear term on unnormalized features would swamp the bias
            # the trainer sets to the running CTR, and progressive AUC pays for it
            nn.init.zeros_(self.dense_linear.weight)
        self.mlp: nn.Sequential | None = None
        if spec.has_deep:
            layers: list[nn.Module] = []
            width = len(spec.slots) * spec.deep_dim + spec.dense_dim
            for out in spec.hidden:
                linear = nn.Linear(width, out)
                _glorot_(linear.weight, generator)
                nn.init.zeros_(linear.bias)
                layers += [linear, nn.ReLU()]
                if spec.dropout:
                    layers.append(nn.Dropout(spec.dropout))
                width = out
            # No output bias: the model's single `bias` is the one the trainer calibrates.
            head = nn.Linear(width, 1, bias=False)
            _glorot_(head.weight, generator)
            layers.append(head)
            self.mlp = nn.Sequential(*layers)

    def _input(
        self, sparse: Mapping[str, SparseInput], table: str, dim: int, n: int
    ) -> SparseInput:
        """The input of ``table``, checked against the batch's rows, the slots and ``dim``."""
        inp = sparse.get(table)
        if inp is None:
            raise KeyError(
                f"model {self.spec.name!r}: no SparseInput for table {table!r} "
                f"(got: {', '.join(sparse) or 'none'})"
            )
        want = (n, len(self.spec.slots), dim)
        got = (inp.num_rows, inp.num_slots, inp.weight.shape[-1])
        if got != want:
            raise ValueError(
                f"model {self.spec.name!r}: table {table!r} input has (rows, slots, dim) "
                f"{got}, expected {want}"
            )
        return inp

    def forward(self, sparse: Mapping[str, SparseInput], dense: torch.Tensor) -> torch.Tensor:
        """Logits ``[N]`` of a batch."""
        spec = self.spec
        if dense.dim() != 2 or dense.shape[1] != spec.dense_dim:
            raise ValueError(
                f"model {spec.name!r}: dense must be [N, {spec.dense_dim}], got {list(dense.shape)}"
            )
        n = dense.shape[0]
        wide = pooled(self._input(sparse, spec.wide_table, 1, n))
        logit = self.bias + wide.sum(dim=(1, 2))
        if self.dense_linear is not None:
            logit = logit + self.dense_linear(dense).squeeze(-1)
        if self.mlp is None or spec.deep_table is None:
            return logit
        emb = pooled(self._input(sparse, spec.deep_table, spec.deep_dim, n))  # [N, S, d]
        if spec.kind == "deepfm":
            logit = logit + fm_interaction(emb)
        deep_in = torch.cat([emb.flatten(1), dense], dim=1)
        return logit + self.mlp(deep_in).squeeze(-1)


def build_model(
    spec: ModelSpec, *, seed: int = 0, device: torch.device | str | None = None
) -> CTRModel:
    """The model ``spec`` describes, dense params drawn from ``seed``, on ``device``."""
    model = CTRModel(spec, seed=seed)
    return model.to(device) if device is not None else model


def dense_state(model: nn.Module) -> dict[str, npt.NDArray[np.float32]]:
    """Dense parameters as float32 numpy copies keyed by ``state_dict`` names."""
    return {
        name: tensor.detach().to("cpu", torch.float32).numpy().copy()
        for name, tensor in model.state_dict().items()
    }


def load_dense_state(model: nn.Module, state: Mapping[str, npt.ArrayLike]) -> None:
    """Overwrite the dense parameters from :func:`dense_state` output (names and shapes must
    match exactly; values are cast to each parameter's dtype and device)."""
    current = model.state_dict()
    missing = sorted(set(current) - set(state))
    unexpected = sorted(set(state) - set(current))
    if missing or unexpected:
        raise ValueError(
            f"dense state does not match the model: missing {missing}, unexpected {unexpected}"
        )
    tensors: dict[str, torch.Tensor] = {}
    for name, target in current.items():
        value = np.asarray(state[name], dtype=np.float32)
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(
                f"dense state {name!r}: shape {list(value.shape)}, "
                f"model expects {list(target.shape)}"
            )
        tensors[name] = torch.from_numpy(value.copy())
    model.load_state_dict(tensors, strict=True)


def set_output_bias(model: CTRModel, value: float) -> None:
    """Set the output bias, e.g. to logit(CTR) so training starts calibrated."""
    if not math.isfinite(value):
        raise ValueError(f"output bias must be finite, got {value!r}")
    with torch.no_grad():
        model.bias.fill_(float(value))
