"""Dense optimizers stepped through their fused kernels directly equal torch's own step."""

from __future__ import annotations

import pytest
import torch

from pipeline.train.dense_opt import DenseOptimizer, _make

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("kind", ["adam", "adagrad", "sgd"])
def test_direct_fused_steps_equal_torch_steps_to_the_bit(kind: str) -> None:
    gen = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (5,), (1,)]
    start = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(6)]
    results = []
    for direct in (False, True):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        opt = _make(kind, params, 0.05)
        wrapped = DenseOptimizer([opt])
        for step in grads:
            for p, g in zip(params, step, strict=True):
                p.grad = g.clone()
            if direct:
                wrapped.step()
            else:
                opt.step()
        results.append(([p.detach().clone() for p in params], opt.state_dict()["state"]))
    for a, b in zip(results[0][0], results[1][0], strict=True):
        assert torch.equal(a, b)
    for index, state in results[0][1].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(results[1][1][index][key]))


def test_a_parameter_without_gradient_falls_back_to_the_torch_step() -> None:
    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))]
    opt = _make("adam", params, 0.1)
    wrapped = DenseOptimizer([opt])
    params[0].grad = torch.ones(3)
    wrapped.step()  # creates state for params[0] only
    params[0].grad = torch.ones(3)
    params[1].grad = None
    wrapped.step()
    assert float(params[1].detach()[0]) == 1.0 and float(params[0].detach()[0]) < 1.0
