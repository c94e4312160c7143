"""The frozen-batch-norm mechanism (gscfast/frozen.py for the engines, gscfast.nn.freeze_batchnorm
for the reference backend and the studies)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gscfast.compiler import compile_model
from gscfast.frozen import frozen_stats
from gscfast.nn import Residual, freeze_batchnorm
from gscfast.rules.norm import BatchNormRule


def _model(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    body = nn.Sequential(nn.Linear(5, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 5))
    model = nn.Sequential(
        nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), Residual(body, 0.5), nn.Linear(5, 3)
    )
    return model.double()


def _batch_norm_inputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The input of each batch norm of ``model`` on ``x``, in call order (plain torch)."""
    seen: list[torch.Tensor] = []
    hooks = [
        m.register_forward_pre_hook(lambda _, a: seen.append(a[0]))
        for m in model.modules()
        if isinstance(m, nn.BatchNorm1d)
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def test_frozen_stats_are_each_batch_norms_batch_statistics():
    model, x = _model(0), torch.randn(2, 7, 4, dtype=torch.float64)
    program = compile_model(model)
    program.bind(4)  # samples of 4 features (a Problem binds its program so)
    stats, none = frozen_stats(program, x)
    assert none is None
    rules = [op for op in program.ops() if isinstance(op, BatchNormRule)]
    assert len(stats) == len(rules) == 2
    for d in range(2):
        for rule, inp in zip(rules, _batch_norm_inputs(model, x[d])):
            mean, var = stats[rule]
            assert mean.shape == var.shape == (2, 1, 5)
            torch.testing.assert_close(mean[d, 0], inp.mean(0))
            torch.testing.assert_close(var[d, 0], inp.var(0, correction=0))


def test_frozen_stats_are_keyed_by_position_not_identity():
    model, x = _model(0), torch.randn(1, 6, 4, dtype=torch.float64)
    program = compile_model(model)
    program.bind(4)
    stats, _ = frozen_stats(program, x)
    again = [op for op in compile_model(model).ops() if isinstance(op, BatchNormRule)]
    assert all(rule in stats for rule in again)  # other rule objects, same positions
    other = compile_model(model, "elsewhere")
    rule = next(op for op in other.ops() if isinstance(op, BatchNormRule))
    assert rule not in stats
    with pytest.raises(KeyError, match=r"elsewhere\[1\]: no frozen batch statistics"):
        stats[rule]


def test_init_statistics_are_taken_at_the_trained_layer_inputs():
    model, init, x = _model(0), _model(1), torch.randn(1, 6, 4, dtype=torch.float64)
    program, init_program = compile_model(model), compile_model(init, "init_model")
    program.bind(4)
    init_program.bind(4)
    stats, stats0 = frozen_stats(program, x, init_program)
    assert stats0 is not None
    # the initial model's first batch norm sees the trained first layer's input, x itself
    (rule,) = (op for op in compile_model(init, "init_model").ops() if op.path == "init_model[1]")
    torch.testing.assert_close(stats0[rule][0][0, 0], init[0](x[0]).mean(0))
    # its residual body's batch norm sees the trained f_{m+1}: the output of the trained layers
    trained_in = model[2](model[1](model[0](x[0])))  # train mode: the batch's own statistics
    body_in = init[3].body[0](trained_in)
    (rule,) = (
        op for op in compile_model(init, "init_model").ops() if op.path == "init_model[3].body[1]"
    )
    torch.testing.assert_close(stats0[rule][1][0, 0], body_in.var(0, correction=0))
    assert len(stats) == len(stats0) == 2


def test_freeze_batchnorm_equals_the_model_on_its_batch_and_leaves_it_alone():
    model, x = _model(0), torch.randn(9, 4, dtype=torch.float64)
    before = copy.deepcopy(model.state_dict())
    frozen = freeze_batchnorm(model, x)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(m.training for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), model(x))
    assert not any(m.training for m in frozen.modules() if isinstance(m, nn.BatchNorm1d))


def test_freeze_batchnorm_refuses_a_batch_norm_called_twice():
    bn = nn.BatchNorm1d(3)
    model = nn.Sequential(nn.Linear(3, 3), bn, nn.Tanh(), nn.Linear(3, 3), bn)
    with pytest.raises(ValueError, match=r"^1 \(BatchNorm1d\) is called more than once"):
        freeze_batchnorm(model, torch.randn(5, 3))


def test_freeze_batchnorm_refuses_a_batch_norm_it_does_not_reach():
    class Skips(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.Linear(3, 3), nn.BatchNorm1d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    with pytest.raises(ValueError, match=r"^unused \(BatchNorm1d\) is not called"):
        freeze_batchnorm(Skips(), torch.randn(5, 3))


def test_freeze_batchnorm_makes_an_overflowed_variance_nan():
    model = nn.Sequential(nn.BatchNorm1d(2))
    x = torch.tensor([[3e38, 1.0], [-3e38, 2.0]])  # float32: the variance overflows to inf
    frozen = freeze_batchnorm(model, x)
    assert torch.isnan(frozen[0].running_var[0]) and torch.isfinite(frozen[0].running_var[1])
    with torch.no_grad():
        assert torch.isnan(frozen(x)[:, 0]).all()  # not the silent zeros of rsqrt(inf)
