"""``gscfast.autograd.jacobian`` against ``torch.autograd.functional.jacobian``: same results,
nesting, dtype, ``requires_grad`` and errors; the fast path is taken where documented."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gscfast import autograd as ga
from gscfast.nn import Residual

TORCH_JAC = torch.autograd.functional.jacobian
B, N, W, M = 5, 4, 6, 3
F64 = torch.float64


def _seed_model(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.7)
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm1d) and mod.running_mean is not None:
                mod.running_mean.copy_(torch.randn(mod.num_features, generator=g) * 0.3)
                mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
    return model


def _models(dtype=F64) -> dict[str, nn.Module]:
    kw = dict(dtype=dtype)
    eval_bn = nn.Sequential(
        nn.Linear(N, W, **kw), nn.BatchNorm1d(W, **kw), nn.SELU(), nn.Linear(W, M, **kw)
    )
    eval_bn.eval()
    ms = {
        "plain": nn.Sequential(
            nn.Linear(N, W, bias=False, **kw), nn.Tanh(), nn.Linear(W, M, bias=False, **kw)
        ),
        "bias": nn.Sequential(
            nn.Linear(N, W, **kw),
            nn.Softplus(),
            nn.Sequential(nn.Linear(W, W, **kw), nn.ELU()),
            nn.Linear(W, M, **kw),
        ),
        "layernorm": nn.Sequential(
            nn.Linear(N, W, **kw), nn.LayerNorm(W, **kw), nn.GELU(), nn.Linear(W, M, **kw)
        ),
        "eval_bn": eval_bn,
        "train_bn": nn.Sequential(
            nn.Linear(N, W, **kw), nn.BatchNorm1d(W, **kw), nn.Tanh(), nn.Linear(W, M, **kw)
        ),
        "residual": nn.Sequential(
            nn.Linear(N, W, **kw),
            Residual(nn.Sequential(nn.Linear(W, W, **kw), nn.Tanh()), 0.5),
            nn.Linear(W, M, **kw),
        ),
        "linear": nn.Linear(N, M, **kw),
    }
    return {k: _seed_model(v, i) for i, (k, v) in enumerate(ms.items())}


def _x(dtype=F64, shape=(B, N), seed=1) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _assert_same(got, want, tol=1e-10):
    assert type(got) is type(want)
    if isinstance(want, (tuple, list)):  # torch's forward mode nests in a list
        assert len(got) == len(want)
        for g, w in zip(got, want):
            _assert_same(g, w, tol)
        return
    assert got.shape == want.shape
    assert got.dtype == want.dtype and got.device == want.device
    assert got.requires_grad == want.requires_grad
    torch.testing.assert_close(got.detach(), want.detach(), rtol=tol, atol=tol)


def _assert_raises_like(func, inputs, **kw):
    with pytest.raises(Exception) as want:
        TORCH_JAC(func, inputs, **kw)
    with pytest.raises(want.type) as got:
        ga.jacobian(func, inputs, **kw)
    assert str(got.value) == str(want.value)


@pytest.fixture
def no_torch(monkeypatch):
    """Makes any delegation to torch fail, so a passing call proves the fast path answered."""

    def boom(*a, **k):
        raise AssertionError("delegated to torch.autograd.functional.jacobian")

    monkeypatch.setattr(torch.autograd.functional, "jacobian", boom)


@pytest.fixture
def spy(monkeypatch):
    calls = []

    def wrapped(*a, **k):
        calls.append(a)
        return TORCH_JAC(*a, **k)

    monkeypatch.setattr(torch.autograd.functional, "jacobian", wrapped)
    return calls


# --- fast path ---------------------------------------------------------------------------------

OPTIONS = [
    {},
    {"vectorize": True},
    {"strategy": "forward-mode", "vectorize": True},
    {"strict": True},
]


@pytest.mark.parametrize("name", list(_models()))
def test_fast_path_matches_torch(name, spy):
    model, x = _models()[name], _x()
    for opts in OPTIONS:
        for inp in (x, (x,)):
            want = TORCH_JAC(copy.deepcopy(model), inp, **opts)
            spy.clear()
            _assert_same(ga.jacobian(model, inp, **opts), want)
            # forward mode with parameters requiring grad is torch's (its result keeps a graph)
            assert bool(spy) == (opts.get("strategy") == "forward-mode"), opts


@pytest.mark.parametrize("name", list(_models()))
def test_fast_path_taken_and_model_untouched(name, monkeypatch):
    model, x = _models()[name], _x().requires_grad_()
    want = TORCH_JAC(copy.deepcopy(model), x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]

    def boom(*a, **k):
        raise AssertionError("delegated to torch")

    monkeypatch.setattr(torch.autograd.functional, "jacobian", boom)
    got = ga.jacobian(model, x)
    _assert_same(got, want)
    assert not got.requires_grad and x.grad is None
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert [m.training for m in model.modules()] == modes


@pytest.mark.parametrize("name", list(_models()))
def test_forward_mode_fast_where_torch_result_needs_no_grad(name, monkeypatch):
    """torch's forward-mode result keeps a graph to parameters (checked by the parametrized
    comparison above, which falls back); without one to keep, the fast path answers."""
    model, x = _models()[name], _x()
    opts = {"strategy": "forward-mode", "vectorize": True}
    with torch.no_grad():
        want_ng = TORCH_JAC(copy.deepcopy(model), x, **opts)
    frozen = copy.deepcopy(model).requires_grad_(False)
    want_fr = TORCH_JAC(copy.deepcopy(frozen), (x,), **opts)
    monkeypatch.setattr(torch.autograd.functional, "jacobian", None)  # any delegation fails
    with torch.no_grad():
        _assert_same(ga.jacobian(model, x, **opts), want_ng)
    _assert_same(ga.jacobian(frozen, (x,), **opts), want_fr)


def test_per_sample_is_block_diagonal(no_torch):
    J = ga.jacobian(_models()["plain"], _x())
    off = J.clone()
    for i in range(B):
        off[i, :, i, :] = 0
    assert off.abs().max() == 0 and J[0, :, 0, :].abs().max() > 0


def test_train_bn_couples_samples():
    model, x = _models()["train_bn"], _x()
    want = TORCH_JAC(copy.deepcopy(model), x)
    got = ga.jacobian(model, x)
    _assert_same(got, want)
    for i in range(B):
        for j in range(B):
            assert got[i, :, j, :].abs().max() > 1e-6, (i, j)


def test_one_d_input(no_torch):
    x1 = _x(shape=(N,))
    for name in ["plain", "layernorm", "residual", "linear"]:
        model = _models()[name]
        # no_torch has patched the module attribute; the reference is the saved original
        _assert_same(ga.jacobian(model, x1), TORCH_JAC(model, x1))
        _assert_same(
            ga.jacobian(model, (x1,), vectorize=True), TORCH_JAC(model, (x1,), vectorize=True)
        )


def test_float32():
    model, x = _models(torch.float32)["layernorm"], _x(torch.float32)
    want = TORCH_JAC(model, x)
    got = ga.jacobian(model, x)
    assert got.dtype == torch.float32
    _assert_same(got, want, tol=1e-5)
    model = _models(torch.float32)["train_bn"]
    _assert_same(ga.jacobian(model, x), TORCH_JAC(copy.deepcopy(model), x), tol=1e-5)


# --- fallbacks and errors ----------------------------------------------------------------------


def test_forward_mode_without_vectorize_raises_like_torch():
    _assert_raises_like(_models()["plain"], _x(), strategy="forward-mode")
    _assert_raises_like(_models()["plain"], _x(), strategy="forward-mode", create_graph=True)


def test_invalid_strategy_raises_like_torch():
    _assert_raises_like(_models()["plain"], _x(), strategy="backward-mode")


def test_strict_independent_output_raises_like_torch():
    x, y = _x(), _x(seed=2)
    _assert_raises_like(lambda a, b: a * 2, (x, y), strict=True)
    _assert_raises_like(lambda a: torch.ones(3, dtype=F64), x, strict=True)


def test_strict_with_vectorize_raises_like_torch():
    _assert_raises_like(_models()["plain"], _x(), strict=True, vectorize=True)
    _assert_raises_like(
        _models()["plain"], _x(), strict=True, vectorize=True, strategy="forward-mode"
    )


def test_batch_of_one_with_train_bn_raises_like_torch():
    _assert_raises_like(_models()["train_bn"], _x(shape=(1, N)))


def test_bad_inputs_raise_like_torch():
    model = _models()["plain"]
    _assert_raises_like(model, _x(torch.float32))  # dtype mismatch with the model
    _assert_raises_like(model, _x(shape=(B, N + 1)))  # width mismatch
    _assert_raises_like(_models()["eval_bn"], _x(shape=(N,)))  # batch norm rejects 1-D
    _assert_raises_like(model, [_x()])  # a list is not a tuple
    _assert_raises_like(model, (_x(), _x()))  # the module takes one input


def test_create_graph_falls_back(spy):
    model, x = _models()["bias"], _x()
    want = TORCH_JAC(model, x, create_graph=True)
    spy.clear()
    got = ga.jacobian(model, x, create_graph=True)
    assert spy and got.requires_grad
    _assert_same(got, want)


def test_non_module_function_falls_back(spy):
    W = _x(shape=(N, M))
    f = lambda a: torch.tanh(a @ W)  # noqa: E731
    x = _x()
    got = ga.jacobian(f, x)
    assert spy
    _assert_same(got, TORCH_JAC(f, x))
    g = lambda a, b: a.sin() * b  # noqa: E731
    _assert_same(ga.jacobian(g, (x, _x(seed=3))), TORCH_JAC(g, (x, _x(seed=3))))


class _Doubled(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


@pytest.mark.parametrize("kind", ["dropout", "conv1d", "subclass", "hook", "nan", "half", "3d"])
def test_unsupported_falls_back(kind, spy):
    x = _x()
    if kind == "dropout":
        model = nn.Sequential(nn.Linear(N, M, dtype=F64), nn.Dropout(0.0))
    elif kind == "conv1d":
        model, x = nn.Conv1d(2, 3, 3, dtype=F64), _x(shape=(2, 2, 5))
    elif kind == "subclass":
        model = nn.Sequential(_Doubled(N, M, dtype=F64), nn.Tanh())
    elif kind == "hook":
        model = nn.Sequential(nn.Linear(N, M, dtype=F64), nn.Tanh())
        model[0].register_forward_hook(lambda mod, inp, out: out * 3)
    elif kind == "nan":
        model, x = (
            _models()["plain"],
            _x().index_put_(
                (torch.tensor(0), torch.tensor(1)), torch.tensor(float("nan"), dtype=F64)
            ),
        )
    elif kind == "half":
        model, x = _models(torch.bfloat16)["plain"], _x(torch.bfloat16)
    else:
        model, x = _models()["plain"], _x(shape=(2, B, N))
    model = _seed_model(model)
    want = TORCH_JAC(model, x)
    spy.clear()
    got = ga.jacobian(model, x)
    assert spy
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, equal_nan=True)
    assert got.shape == want.shape and got.dtype == want.dtype
