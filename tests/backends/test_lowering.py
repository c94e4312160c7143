"""The one lowering of compiled models to the fused kernels (``gscfast.backends.lowering``): the
plans, the activation table, the batch-norm fold, what is refused, and the one dispatcher."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gscfast
from gscfast.backends.base import Sweep
from gscfast.backends.lowering import (
    ACTIVATIONS,
    Act,
    FusedBackend,
    Norm,
    Unsupported,
    fused_or_fallback,
    lower,
    programs_fused,
)
from gscfast.backends.torch_engine import TorchBackend
from gscfast.compiler import supported
from gscfast.frozen import FrozenStats
from gscfast.rules import RULES, ForwardCtx
from gscfast.rules.norm import BatchNormRule
from gscfast.validation import make_problem


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(6)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 2)
    return nn.Sequential(
        nn.Linear(5, 7),
        nn.LayerNorm(7),
        nn.LeakyReLU(0.07),
        nn.Linear(7, 6),
        bn,
        nn.ELU(0.8),
        nn.Linear(6, 6, bias=False),
        nn.Softplus(1.5, 3.0),
        nn.Linear(6, 4),
        nn.GELU(approximate="tanh"),
        nn.Linear(4, 3),
    ).eval()


def test_plans_of_each_layer():
    model = _model()
    plans = lower(gscfast.compile_model(model))
    assert [p.index for p in plans] == [5, 4, 3, 2, 1]
    assert [p.norm for p in plans] == [Norm.LAYER, Norm.DIAG, Norm.NONE, Norm.NONE, Norm.NONE]
    assert [p.act for p in plans] == [Act.LEAKY, Act.ELU, Act.SOFTPLUS, Act.GELU_TANH, Act.NONE]
    assert [(p.p0, p.p1) for p in plans[:3]] == [(0.07, 0.0), (0.8, 0.0), (1.5, 3.0)]
    assert [(p.din, p.dout) for p in plans] == [(5, 7), (7, 6), (6, 6), (6, 4), (4, 3)]
    assert plans[0].eps == model[1].eps and plans[1].eps == 0.0  # the fold takes eps in
    assert plans[2].bias is None and plans[0].weight is not None
    assert [p.has_pre for p in plans] == [True] * 4 + [False]
    assert [p.has_ds for p in plans] == [True] * 4 + [False]


def test_batch_norm_fold_is_the_rules_own():
    """The plan's diagonal scale is, bit for bit, what ``BatchNormRule.forward`` saves."""
    model = _model()
    program = gscfast.compile_model(model)
    program.bind(5)  # samples of 5 features (the rules' shapes)
    plan = lower(program)[1]
    rule = program.layers[1].ops[1]
    x = torch.randn(1, 3, 6)
    _, saved = rule.forward(x, ForwardCtx(coupled=False, samples=3))
    assert torch.equal(plan.gamma, saved.reshape(-1, 6)[:1])
    assert torch.equal(plan.mean, model[4].running_mean.reshape(1, 6))


def test_batch_statistics_need_constants_or_batch_datapoints():
    model = _model().train()
    program = gscfast.compile_model(model)
    with pytest.raises(Unsupported, match="couples the samples"):
        lower(program)
    assert lower(program, coupled=True)[1].norm == Norm.BATCH
    mean, var = torch.zeros(2, 1, 6), torch.full((2, 1, 6), 4.0)
    frozen = FrozenStats()
    (bn,) = [op for layer in program.layers for op in layer.ops if isinstance(op, BatchNormRule)]
    frozen.record(bn, mean, var)
    plan = lower(program, frozen)[1]
    assert plan.norm == Norm.DIAG and plan.mean.shape == (2, 6)  # one row per dataset
    torch.testing.assert_close(
        plan.gamma, model[4].weight.detach().expand(2, 6) / 2, rtol=1e-5, atol=0
    )


def test_every_fused_activation_is_a_registered_activation():
    registered = set(RULES.values())
    for rule in ACTIVATIONS:
        assert rule in registered and rule.is_activation, rule
    reached = {Act.NONE} | {
        ACTIVATIONS[type(op)](op.module)[0]
        for m in (
            nn.ReLU(), nn.LeakyReLU(), nn.Tanh(), nn.Sigmoid(), nn.ELU(), nn.SELU(),
            nn.Softplus(), nn.GELU(), nn.GELU(approximate="tanh"), nn.Identity(),
        )
        for op in gscfast.compile_model(nn.Sequential(nn.Linear(2, 2), m)).layers[0].ops[1:]
    }  # fmt: skip
    assert reached == set(Act)  # every code has an activation that lowers to it


@pytest.mark.parametrize(
    "model, why",
    [
        (
            nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Tanh()),
            r"\['linear', 'linear', 'tanh'\]",
        ),
        (nn.Sequential(nn.Tanh(), nn.Linear(2, 2)), "does not start with nn.Linear"),
        (nn.Sequential(nn.Linear(2, 2), nn.GELU()), None),
    ],
)
def test_what_is_not_fused(model, why):
    program = gscfast.compile_model(model)
    if why is None:
        model[1].approximate = "sigmoid"  # a form the kernels lack (set after compiling)
        why = "GELU"
    with pytest.raises(Unsupported, match=why):
        lower(program)
    assert not programs_fused(program)


def _zeros(pb) -> Sweep:
    return Sweep(pb.x.new_zeros(pb.D * pb.B, pb.L + 1), None, None)


class _Recorder(FusedBackend):
    """Fused for everything it ``takes``; records which path ran."""

    name = "recorder"

    def __init__(self, takes: bool) -> None:
        self._takes = takes
        self.ran: list[str] = []

    def takes(self, pb, method: str) -> bool:
        return self._takes

    @fused_or_fallback
    def sweep(self, pb, *, grads: bool, stats: bool) -> Sweep:
        self.ran.append("fused")
        return _zeros(pb)


@pytest.mark.parametrize(
    "takes, error, grads, path",
    [
        (True, "dot", True, "fused"),
        (False, "dot", True, "torch"),
        (True, None, True, "torch"),  # a gradient from the error needs an error layer
        (True, None, False, "fused"),
    ],
)
def test_one_dispatcher(monkeypatch, takes, error, grads, path):
    ran_torch = []

    def torch_sweep(self, pb, **kw):
        ran_torch.append(kw)
        return _zeros(pb)

    monkeypatch.setattr(TorchBackend, "sweep", torch_sweep)
    model = gscfast.mlp(2, 3, act="tanh", seed=0, dtype=torch.float64)
    x = torch.randn(4, 3, dtype=torch.float64)
    pb, _ = make_problem(model, x, torch.randn(4, 3, dtype=torch.float64), error=error)
    be = _Recorder(takes)
    assert be.fused(pb, "sweep") == takes
    be.sweep(pb, grads=grads, stats=False)
    assert be.ran == (["fused"] if path == "fused" else [])
    assert ran_torch == ([] if path == "fused" else [dict(grads=grads, stats=False)])


def test_supported_lists_the_registry():
    text = supported()
    for t in RULES:
        assert t.__name__ in text, t
    assert "nn.Flatten (start_dim >= 1: dimension 0 is the batch)" in text
    assert text.endswith("and gscfast.nn.Residual")
