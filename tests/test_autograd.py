"""``gscfast.autograd.jacobian`` against ``torch.autograd.functional.jacobian``: same results,
nesting, dtype, ``requires_grad`` and errors; the fast path is taken where documented."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import cases
from torch import nn

import gscfast
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


def _assert_same_state(got: nn.Module, want: nn.Module) -> None:
    """Bit for bit the same parameters and buffers (running statistics and
    ``num_batches_tracked`` included), and the same train/eval modes."""
    g, w = got.state_dict(), want.state_dict()
    assert list(g) == list(w)
    for k in w:
        assert torch.equal(g[k], w[k]), k
    assert [m.training for m in got.modules()] == [m.training for m in want.modules()]


@pytest.mark.parametrize("name", list(_models()))
def test_fast_path_taken_and_module_left_as_torch_leaves_it(name, monkeypatch):
    """The fast path answers, and the module ends in torch's state: unchanged, except that a
    train-mode batch norm's running statistics get the one update of torch's ``func(x)``."""
    model, x = _models()[name], _x().requires_grad_()
    ref = copy.deepcopy(model)
    want = TORCH_JAC(ref, x)

    def boom(*a, **k):
        raise AssertionError("delegated to torch")

    monkeypatch.setattr(torch.autograd.functional, "jacobian", boom)
    got = ga.jacobian(model, x)
    _assert_same(got, want)
    assert not got.requires_grad and x.grad is None
    _assert_same_state(model, ref)
    if name == "train_bn":  # the update happened (and was torch's, checked above)
        assert int(model[1].num_batches_tracked) == 1


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


@pytest.mark.parametrize(
    "kind", ["dropout", "unbatched_conv1d", "subclass", "hook", "nan", "half", "3d"]
)
def test_unsupported_falls_back(kind, spy):
    x = _x()
    if kind == "dropout":
        model = nn.Sequential(nn.Linear(N, M, dtype=F64), nn.Dropout(0.5))  # a random mask
    elif kind == "unbatched_conv1d":  # torch's unbatched forms differ by module: torch answers
        model, x = nn.Conv1d(2, 3, 3, dtype=F64), _x(shape=(2, 5))
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
    torch.manual_seed(0)  # dropout: the same mask for torch's call and the one it is handed
    want = TORCH_JAC(model, x)
    spy.clear()
    torch.manual_seed(0)
    got = ga.jacobian(model, x)
    assert spy
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, equal_nan=True)
    assert got.shape == want.shape and got.dtype == want.dtype


# --- conformance: torch as the oracle ----------------------------------------------------------
# Every argument combination of torch's signature, every grad mode, 1-D and 2-D input, a tensor
# or a 1-tuple: the same result (or the same error) as torch, and the module left in the same
# state (a train-mode batch norm's running statistics are updated by torch's one call of func).


def _conformance_models() -> dict[str, nn.Module]:
    ms = _models()
    cumulative = _seed_model(  # momentum=None: a cumulative average over num_batches_tracked
        nn.Sequential(
            nn.Linear(N, W, dtype=F64), nn.BatchNorm1d(W, momentum=None, dtype=F64), nn.ReLU()
        ),
        11,
    )
    untracked = _seed_model(
        nn.Sequential(
            nn.Linear(N, W, dtype=F64),
            nn.BatchNorm1d(W, track_running_stats=False, dtype=F64),
            nn.Tanh(),
            nn.Linear(W, M, dtype=F64),
        ),
        12,
    )
    return {**ms, "train_bn_cumulative": cumulative, "train_bn_untracked": untracked}


_ARGS = [
    dict(create_graph=cg, strict=st, vectorize=v, strategy=sg)
    for cg in (False, True)
    for st in (False, True)
    for v in (False, True)
    for sg in ("reverse-mode", "forward-mode")
]
_GRAD_MODES = ("enabled", "no_grad", "x_requires_grad", "frozen_model")
# torch's forward mode fails on a 1-D input through a bias-free Linear followed by another layer
# (it sets a [1, d] tangent on a [d] tensor); gscfast returns the right Jacobian (its docstring).
_FORWARD_1D = "Trying to set a forward gradient that has a different size"
# torch's vectorized forward mode has no batching rule for some views (nn.Flatten's flatten on
# feature maps); gscfast returns the right Jacobian there too (the docstring).
_NO_BATCHING_RULE = "Batching rule not implemented for aten::flatten"


def _call(fn, model, x, as_tuple, grad_mode, opts):
    """``fn(model, x or (x,), **opts)`` under ``grad_mode``: ``(result, None)`` or
    ``(None, error)``."""
    if grad_mode == "x_requires_grad":
        x = x.clone().requires_grad_()
    if grad_mode == "frozen_model":
        model.requires_grad_(False)
    inp = (x,) if as_tuple else x
    try:
        with torch.no_grad() if grad_mode == "no_grad" else torch.enable_grad():
            return fn(model, inp, **opts), None
    except Exception as e:  # the oracle's error is an expected outcome too
        return None, e


def _check_against_torch(base: nn.Module, x: torch.Tensor, opts, grad_mode, as_tuple) -> None:
    """One paired call: gscfast's result (or error) and the module's state afterwards are
    torch's."""
    ref, mine = copy.deepcopy(base), copy.deepcopy(base)
    want, want_err = _call(TORCH_JAC, ref, x, as_tuple, grad_mode, opts)
    got, got_err = _call(ga.jacobian, mine, x, as_tuple, grad_mode, opts)
    where = (tuple(x.shape), opts, grad_mode, as_tuple)
    torch_fails = want_err is not None and (
        _FORWARD_1D in str(want_err) or _NO_BATCHING_RULE in str(want_err)
    )
    if torch_fails and got is not None:
        # the documented differences: gscfast gives the right answer, torch's reverse mode's,
        # and leaves the module as that (successful) call leaves it
        ref = copy.deepcopy(base)
        want = TORCH_JAC(ref, (x,) if as_tuple else x)
        want = [want[0]] if as_tuple else want
        want_err = None
    if want_err is not None:
        assert got_err is not None, (where, want_err)
        assert type(got_err) is type(want_err), where
        assert str(got_err) == str(want_err), where
    else:
        assert got_err is None, (where, got_err)
        _assert_same(got, want)
    _assert_same_state(mine, ref)


@pytest.mark.parametrize("name", list(_conformance_models()))
def test_conformance_with_torch(name):
    base = _conformance_models()[name]
    for shape in [(B, N), (N,)]:
        x = _x(shape=shape)
        for opts in _ARGS:
            for grad_mode in _GRAD_MODES:
                for as_tuple in (False, True):
                    _check_against_torch(base, x, opts, grad_mode, as_tuple)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    case=cases(max_depth=5, max_width=8, datasets=False, max_batch=4),
    opts=st.sampled_from(_ARGS),
    grad_mode=st.sampled_from(_GRAD_MODES),
    as_tuple=st.booleans(),
    one_d=st.booleans(),
)
def test_conformance_random_models(case, opts, grad_mode, as_tuple, one_d):
    """Random supported MLPs (every activation, both norms, batch norm in both modes,
    residual blocks, nested Sequentials) under a random argument combination and grad mode."""
    x = case.x[0] if one_d else case.x
    _check_against_torch(case.model, x, opts, grad_mode, as_tuple)


def test_forward_mode_1d_difference_is_the_documented_one(no_torch):
    """torch's forward mode raises on this model and input; gscfast answers, right."""
    model, x1 = _models()["plain"], _x(shape=(N,))
    opts = {"strategy": "forward-mode", "vectorize": True}
    with torch.no_grad():
        with pytest.raises(RuntimeError, match=_FORWARD_1D):
            TORCH_JAC(model, x1, **opts)  # the original: no_torch patched the module's
        got = ga.jacobian(model, x1, **opts)
    want = torch.func.jacrev(model)(x1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_conformance_lazy_module_initialized_as_torch_does():
    """An uninitialized lazy module goes to torch, which initializes it while answering: the
    same result and the same initialized module."""
    x = _x()
    results, modules = [], []
    for fn in (TORCH_JAC, ga.jacobian):
        model = nn.Sequential(nn.LazyLinear(M, dtype=F64), nn.Tanh())
        torch.manual_seed(5)  # the lazy initialization draws from the global generator
        results.append(fn(model, x))
        modules.append(model)
    _assert_same(results[1], results[0])
    assert type(modules[1][0]) is nn.Linear
    _assert_same_state(modules[1], modules[0])


def _map_models() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    """Convolutional models (issue 14: the fast path serves every module the compiler takes):
    name -> (model, one sample's shape)."""
    kw = dict(dtype=F64)
    train_bn = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, **kw),
        nn.BatchNorm2d(3, **kw),  # train mode: couples the samples, running stats updated
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(12, M, **kw),
    )
    groups = nn.Sequential(
        nn.Conv1d(2, 4, 3, groups=2, padding_mode="reflect", padding=1, **kw),
        nn.GroupNorm(2, 4, **kw),
        nn.Tanh(),
        nn.AvgPool1d(2),
    )
    eval_bn = nn.Sequential(
        nn.Conv2d(2, 3, 2, stride=2, **kw),
        nn.BatchNorm2d(3, **kw),
        nn.GELU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(3, M, **kw),
    ).eval()
    with torch.no_grad():
        eval_bn[1].running_mean.uniform_(-0.5, 0.5)
        eval_bn[1].running_var.uniform_(0.5, 1.5)
    bare = nn.Conv2d(2, 2, 3, dilation=2, **kw)
    return {
        "train_bn2d": (_seed_model(train_bn, 21), (2, 4, 4)),
        "group_norm_1d": (_seed_model(groups, 22), (2, 7)),
        "eval_bn2d": (_seed_model(eval_bn, 23), (2, 4, 4)),
        "bare_conv": (_seed_model(bare, 24), (2, 5, 5)),
    }


@pytest.mark.parametrize("name", list(_map_models()))
def test_feature_maps_fast_and_like_torch(name, monkeypatch):
    """Batched feature maps take the fast path (torch is never called) and give torch's
    ``[B, *out, B, *in]`` Jacobian; the module is left as torch leaves it."""
    base, shape = _map_models()[name]
    _fast_and_like_torch(base, _x(shape=(3, *shape)), monkeypatch)


def _fast_and_like_torch(base: nn.Module, x: torch.Tensor, monkeypatch) -> nn.Module:
    """The fast path answers for a copy of ``base`` (torch is never called) with torch's
    Jacobian and leaves it as torch leaves its own copy; returns gscfast's copy."""
    ref, mine = copy.deepcopy(base), copy.deepcopy(base)
    want = TORCH_JAC(ref, x)
    with monkeypatch.context() as m:
        m.setattr(torch.autograd.functional, "jacobian", _boom)
        got = ga.jacobian(mine, x)
    _assert_same(got, want)
    assert got.shape == want.shape
    _assert_same_state(mine, ref)
    return mine


def _boom(*a, **k):
    raise AssertionError("delegated to torch.autograd.functional.jacobian")


@pytest.mark.parametrize("name", list(_map_models()))
def test_conformance_feature_maps(name):
    """Every argument combination and grad mode, batched and unbatched feature maps (the
    unbatched ones go to torch), as a tensor or a 1-tuple: torch's result or error and state."""
    base, shape = _map_models()[name]
    _check_every_call(base, shape)


def _check_every_call(base: nn.Module, shape: tuple[int, ...]) -> None:
    """``_check_against_torch`` for every argument combination, grad mode and input form
    (batched and unbatched samples of ``shape``, a tensor or a 1-tuple)."""
    for x in (_x(shape=(2, *shape)), _x(shape=shape)):
        for opts in _ARGS:
            for grad_mode in _GRAD_MODES:
                for as_tuple in (False, True):
                    _check_against_torch(base, x, opts, grad_mode, as_tuple)


# --- generic modules: torch's own module types without a rule --------------------------------


def _generic_models() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    """Models with torch's own modules that take the generic rule (issue 14: the fast path
    serves them too): name -> (model, one sample's shape)."""
    kw = dict(dtype=F64)
    softmax = nn.Sequential(nn.Linear(N, W, **kw), nn.Tanh(), nn.Linear(W, M, **kw), nn.Softmax(1))
    upsample = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, **kw),
        nn.SiLU(),
        nn.Upsample(scale_factor=2),
        nn.Conv2d(3, 2, 3, **kw),
        nn.Flatten(),
        nn.Linear(2 * 6 * 6, M, **kw),
    )
    instance_norm = nn.Sequential(  # train mode, tracked: torch's call updates running stats
        nn.Conv1d(2, 3, 3, **kw),
        nn.InstanceNorm1d(3, affine=True, track_running_stats=True, **kw),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * 5, M, **kw),
    )
    shuffle = nn.Sequential(
        nn.Conv2d(2, 8, 1, **kw),
        nn.PixelShuffle(2),
        nn.ZeroPad2d(1),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * 3 * 3, M, **kw),
    )
    transformer = nn.Sequential(  # its fused inference path differs in the last bits: not random
        nn.Unflatten(1, (3, 4)),
        nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True, **kw).eval(),
        nn.Flatten(),
        nn.Tanh(),
        nn.Linear(12, M, **kw),
    )
    return {
        "softmax": (_seed_model(softmax, 31), (N,)),
        "upsample_silu": (_seed_model(upsample, 32), (2, 4, 4)),
        "instance_norm_train": (_seed_model(instance_norm, 33), (2, 7)),
        "pixel_shuffle_pad": (_seed_model(shuffle, 34), (2, 2, 2)),
        "transformer_layer": (_seed_model(transformer, 35), (12,)),
    }


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # torch's vmap fallback
@pytest.mark.parametrize("name", list(_generic_models()))
def test_generic_torch_modules_fast_and_like_torch(name, monkeypatch):
    """torch's own modules without a rule take the fast path (torch is never called), give
    torch's Jacobian, and leave the module as torch leaves it (an instance norm's running
    statistics get the one update of torch's call)."""
    base, shape = _generic_models()[name]
    assert gscfast.compile_model(base).generic  # the generic rule is what is tested here
    mine = _fast_and_like_torch(base, _x(shape=(3, *shape)), monkeypatch)
    if name == "instance_norm_train":
        assert not torch.equal(mine[1].running_mean, base[1].running_mean)  # updated, as torch


@pytest.mark.filterwarnings("ignore:There is a performance drop")
@pytest.mark.parametrize("name", ["softmax", "instance_norm_train"])
def test_conformance_generic_modules(name):
    """Every argument combination and grad mode, batched and unbatched input (unbatched goes to
    torch: a module's unbatched form may differ, nn.Softmax(1) fails on it), tensor or 1-tuple:
    torch's result or error, and its module state."""
    _check_every_call(*_generic_models()[name])


class _Gate(nn.Module):
    """A module of the caller's own (not torch's): its forward may have side effects."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x * torch.sigmoid(x)


@pytest.mark.parametrize("kind", ["own_module", "hook_inside", "parametrized", "random"])
def test_generic_modules_torch_must_answer(kind, spy):
    """Where the generic rule's several calls could differ from torch's one call (an own module,
    a hook or a parametrization inside a torch module), or the module is random (train-mode
    dropout inside): torch answers, with the result, side effects and random draws of its own
    call alone."""
    kw = dict(dtype=F64)
    x = _x(shape=(3, 12))
    inner = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True, **kw).eval()
    recorded = []
    if kind == "own_module":
        model = nn.Sequential(nn.Linear(12, W, **kw), _Gate(), nn.Linear(W, M, **kw))
    elif kind == "hook_inside":
        inner.linear1.register_forward_hook(lambda mod, inp, out: recorded.append(out.shape))
    elif kind == "parametrized":  # train mode: each read of the weight updates its buffers
        inner = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True, **kw)
        nn.utils.parametrizations.spectral_norm(inner.linear1)
    else:
        inner = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.5, batch_first=True, **kw)
    if kind != "own_module":
        model = nn.Sequential(nn.Unflatten(1, (3, 4)), inner, nn.Flatten(), nn.Linear(12, M, **kw))
    model = _seed_model(model, 36)
    ref = copy.deepcopy(model)
    torch.manual_seed(0)
    want = TORCH_JAC(ref, x)
    n_recorded = len(recorded)
    spy.clear()
    torch.manual_seed(0)  # the same draws for torch's call and for the one it is handed
    got = ga.jacobian(model, x)
    assert spy
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert len(recorded) == 2 * n_recorded  # torch's one call, once more: nothing of gscfast's
    _assert_same_state(model, ref)  # spectral norm's power iteration: torch's one call's
    if kind == "own_module":
        assert model[1].calls == ref[1].calls == 1
