"""Never silently wrong (issue 11, item 4): every public function computes what calling the model
computes, or raises an error naming the module, its position and the reason, on every backend.

Refusals happen while the model is compiled, before a backend is chosen, so the numba, triton and
cupy kernels are never compiled or run here: listing every backend costs nothing and shows that
they all refuse alike.
"""

from __future__ import annotations

import contextlib
import copy
import re

import pytest
import torch
from torch import nn
from torch.nn.modules import module as torch_module

import gscfast
import gscfast.autograd as ga
from gscfast.backends import BACKENDS

F64 = torch.float64
ALL_BACKENDS = list(BACKENDS)


def _model() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(4, 5, dtype=F64),
        nn.Tanh(),
        nn.Sequential(nn.Linear(5, 5, dtype=F64), nn.ReLU()),
        gscfast.Residual(nn.Sequential(nn.Linear(5, 5, dtype=F64), nn.Tanh()), 0.5),
        nn.Linear(5, 3, dtype=F64),
    )


def _xy(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 4, generator=g, dtype=F64), torch.randn(6, 3, generator=g, dtype=F64)


def _calls(model: nn.Module, x: torch.Tensor, y: torch.Tensor, backend: str) -> dict:
    """Every public function of gscfast on ``model`` (as ``model`` and as ``init_model``)."""
    plain = _model()
    return {
        "gsc": lambda: gscfast.gsc(model, x, y, backend=backend),
        "gsc_moments": lambda: gscfast.gsc_moments(model, x, y, backend=backend),
        "gsc_matrix": lambda: gscfast.gsc_matrix(model, x, y, backend=backend),
        "preactivation_stats": lambda: gscfast.preactivation_stats(model, x, backend=backend),
        "jacobian": lambda: gscfast.jacobian(model, x, backend=backend),
        "effective_depth": lambda: gscfast.effective_depth(model, plain, x, y, backend=backend),
        "effective_depth(init_model)": lambda: gscfast.effective_depth(
            plain, model, x, y, backend=backend
        ),
        "analyze": lambda: gscfast.analyze(model, x, y, backend=backend),
    }


class _Doubled(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


class _PlainLinear(nn.Linear):
    """A subclass that keeps nn.Linear's forward: compiled with nn.Linear's rule."""


class _ReversedSequential(nn.Sequential):
    def forward(self, x):
        for m in reversed(self):
            x = m(x)
        return x


def _triple(mod, inp, out):
    return out * 3


def _pre_double(mod, args):
    return (args[0] * 2,)


def _halve_grad(mod, grad_in, grad_out):
    return tuple(None if g is None else g / 2 for g in grad_in)


def _halve_grad_out(mod, grad_out):
    return tuple(g / 2 for g in grad_out)


# (case, position in the message, what the message says). Each case changes what calling the
# model computes (checked below), so ignoring it would be a silently wrong number.
MODULE_CASES = {
    "forward hook": ("model[0]", "forward hook", lambda m: m[0].register_forward_hook(_triple)),
    "forward pre-hook on Tanh": (
        "model[1]",
        "forward pre-hook",
        lambda m: m[1].register_forward_pre_hook(_pre_double),
    ),
    "forward hook with kwargs": (
        "model[4]",
        "forward hook",
        lambda m: m[4].register_forward_hook(
            lambda mod, args, kwargs, out: out * 3, with_kwargs=True
        ),
    ),
    "hook on the top Sequential": (
        "model (Sequential)",
        "forward hook",
        lambda m: m.register_forward_hook(_triple),
    ),
    "hook on a nested Sequential": (
        "model[2]",
        "forward pre-hook",
        lambda m: m[2].register_forward_pre_hook(_pre_double),
    ),
    "hook on a Residual": (
        "model[3]",
        "forward hook",
        lambda m: m[3].register_forward_hook(_triple),
    ),
    "hook inside a Residual body": (
        "model[3].body[1] (Tanh)",
        "forward hook",
        lambda m: m[3].body[1].register_forward_hook(_triple),
    ),
    "full backward hook": (
        "model[1]",
        "backward hook",
        lambda m: m[1].register_full_backward_hook(_halve_grad),
    ),
    "full backward pre-hook": (
        "model[1]",
        "backward pre-hook",
        lambda m: m[1].register_full_backward_pre_hook(_halve_grad_out),
    ),
    "old backward hook": (
        "model[4]",
        "backward hook",
        lambda m: m[4].register_backward_hook(_halve_grad),
    ),
    "overridden forward": (
        "model[0]",
        "overrides forward",
        lambda m: m.__setitem__(0, _copy_into(_Doubled(4, 5, dtype=F64), m[0])),
    ),
    "forward set on the instance": (
        "model[1]",
        "overrides forward",
        lambda m: setattr(m[1], "forward", lambda x: torch.tanh(2 * x)),
    ),
    "overridden Sequential.forward": (
        "model[2]",
        "overrides forward",
        lambda m: m.__setitem__(2, _ReversedSequential(nn.Linear(5, 5, dtype=F64), nn.Tanh())),
    ),
}


def _copy_into(new: nn.Linear, old: nn.Linear) -> nn.Linear:
    new.load_state_dict(old.state_dict())
    return new


@contextlib.contextmanager
def _global(kind: str):
    hook = {
        "forward": (torch_module.register_module_forward_hook, _triple),
        "forward_pre": (torch_module.register_module_forward_pre_hook, _pre_double),
        "full_backward": (torch_module.register_module_full_backward_hook, _halve_grad),
        "full_backward_pre": (torch_module.register_module_full_backward_pre_hook, _halve_grad_out),
        "backward": (torch_module.register_module_backward_hook, _halve_grad),
    }[kind]
    # torch remembers which kind of global backward hook was used, even after removal, and then
    # refuses the other kind: restore its flag so the cases stay independent.
    flag = torch_module._global_is_full_backward_hook
    handle = hook[0](hook[1])
    try:
        yield
    finally:
        handle.remove()
        torch_module._global_is_full_backward_hook = flag


GLOBAL_KINDS = {
    "forward": "forward hook",
    "forward_pre": "forward pre-hook",
    "full_backward": "backward hook",
    "full_backward_pre": "backward pre-hook",
    "backward": "backward hook",
}


def _seeded(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return _model()


def _input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad((model(x) * y).sum(), x)
    return g


@pytest.mark.parametrize("case", list(MODULE_CASES))
def test_each_case_changes_what_the_model_computes(case):
    """The cases matter: the model's output or its gradient differs from the plain model's."""
    x, y = _xy()
    plain, hooked = _seeded(), _seeded()
    MODULE_CASES[case][2](hooked)
    changed = not torch.allclose(plain(x), hooked(x)) or not torch.allclose(
        _input_grad(plain, x, y), _input_grad(hooked, x, y)
    )
    assert changed


# Cases the generic rule cannot take, and why: a backward hook (it may change the gradients, and
# torch.func cannot run it), or a hooked/overridden container holding activations (the layer
# boundaries after them would be hidden inside one function). The others are measured: the
# hooked or overridden module is called as is by the generic rule.
REFUSED = {
    "full backward hook": "backward hook",
    "full backward pre-hook": "backward pre-hook",
    "old backward hook": "backward hook",
    "hook on the top Sequential": "would be taken by gscfast's generic rule as one function",
    "hook on a nested Sequential": "would be taken by gscfast's generic rule as one function",
    "hook on a Residual": "would be taken by gscfast's generic rule as one function",
    "overridden Sequential.forward": "would be taken by gscfast's generic rule as one function",
}


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("case", [c for c in MODULE_CASES if c in REFUSED])
def test_what_the_generic_rule_cannot_take_is_refused_everywhere(case, backend):
    where, _, apply = MODULE_CASES[case]
    x, y = _xy()
    model = _seeded()
    apply(model)
    for name, call in _calls(model, x, y, backend).items():
        prefix = "init_" if name.endswith("(init_model)") else ""
        at = prefix + where.removesuffix(" (Sequential)") + " ("
        with pytest.raises(TypeError, match=re.escape(at) + ".*" + REFUSED[case]):
            call()


def _close(got, want, where):
    if isinstance(want, tuple):  # effective_depth: (depth, contributions); analyze's fields
        for g, w in zip(got, want):
            _close(g, w, where)
    elif isinstance(want, torch.Tensor):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, equal_nan=True, msg=where)
    elif hasattr(want, "__dataclass_fields__"):
        for k in want.__dataclass_fields__:
            _close(getattr(got, k), getattr(want, k), f"{where}.{k}")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-9, nan_ok=True), where
    else:
        assert got == want, where


def _outcome(call):
    """``(value, None)`` or ``(None, "ErrorType: message")``."""
    try:
        return call(), None
    except (TypeError, ValueError) as e:
        return None, f"{type(e).__name__}: {e}"


@pytest.mark.parametrize("backend", ["torch", "numba"])
@pytest.mark.parametrize("case", [c for c in MODULE_CASES if c not in REFUSED])
def test_hooks_and_overridden_forward_are_measured_as_called(case, backend):
    """The generic rule calls such a module as the model does: every function equals the
    reference backend's, which runs the modules themselves (hooks included) under autograd."""
    x, y = _xy()
    model = _seeded()
    MODULE_CASES[case][2](model)
    assert gscfast.compile_model(model).generic
    torch.manual_seed(5)  # _calls builds a plain model for effective_depth: the same one twice
    want = {k: _outcome(f) for k, f in _calls(model, x, y, "reference").items()}
    torch.manual_seed(5)
    for k, f in _calls(model, x, y, backend).items():
        got, error = _outcome(f)
        assert error == want[k][1], k  # a subclass is another architecture than its parent's
        if error is None:
            _close(got, want[k][0], f"{case}: {k}")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("kind", list(GLOBAL_KINDS))
def test_global_hooks_are_refused_everywhere(kind, backend):
    x, y = _xy()
    model = _seeded()
    with _global(kind):
        for call in _calls(model, x, y, backend).values():
            with pytest.raises(TypeError, match=f"a global {GLOBAL_KINDS[kind]} .* is registered"):
                call()
    gscfast.gsc(model, x, y, backend="torch")  # works again once the hook is removed


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_subclass_keeping_forward_still_works(backend):
    x, y = _xy()
    plain = _seeded()
    sub = _seeded()
    sub[0] = _copy_into(_PlainLinear(4, 5, dtype=F64), sub[0])
    torch.testing.assert_close(
        gscfast.gsc(sub, x, y, backend=backend), gscfast.gsc(plain, x, y, backend="reference")
    )
    want = torch.func.vmap(torch.func.jacrev(sub))(x)
    torch.testing.assert_close(gscfast.jacobian(sub, x, backend=backend), want)


@pytest.mark.parametrize("case", list(MODULE_CASES))
def test_autograd_jacobian_delegates_to_torch(case):
    """``gscfast.autograd.jacobian`` promises torch's result: such models go to torch."""
    x, _ = _xy()
    model = _seeded()
    MODULE_CASES[case][2](model)
    want = torch.autograd.functional.jacobian(model, x)
    torch.testing.assert_close(ga.jacobian(model, x), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", list(GLOBAL_KINDS))
def test_autograd_jacobian_delegates_global_hooks_to_torch(kind):
    x, _ = _xy()
    model = _seeded()
    with _global(kind):
        want = torch.autograd.functional.jacobian(model, x)
        got = ga.jacobian(model, x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ smaller gaps (issue 11, 4)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_error_none_is_refused_with_the_choices(backend):
    """``error=None`` used to mean "no error layer" inside: an AttributeError, or (gsc_matrix)
    a NaN column returned as if it were a result."""
    x, y = _xy()
    model = _seeded()
    calls = [
        lambda: gscfast.gsc(model, x, y, error=None, backend=backend),
        lambda: gscfast.gsc_matrix(model, x, y, error=None, backend=backend),
        lambda: gscfast.effective_depth(model, model, x, y, error=None, backend=backend),
        lambda: gscfast.analyze(model, x, y, error=None, backend=backend),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"error must be one of \('dot', 'kl'\), got None"):
            call()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_init_model_problems_name_init_model(backend):
    x, y = _xy()
    model, init = _seeded(), _seeded(1)
    with torch.no_grad():
        init[0].weight[1, 2] = float("nan")
    with pytest.raises(
        ValueError, match=r"^init_model\[0\] \(Linear\) weight contains NaN at index \(1, 2\)"
    ):
        gscfast.effective_depth(model, init, x, y, backend=backend)
    with pytest.raises(
        ValueError, match=r"^init_model\[0\] \(Linear\) weight has dtype torch.float32"
    ):
        gscfast.effective_depth(model, _seeded(1).float(), x, y, backend=backend)
    with pytest.raises(
        ValueError, match=r"^init_model\[3\]\.body\[2\] \(Dropout\) is in train mode"
    ):
        bad = _seeded(1)
        bad[3].body.append(nn.Dropout(0.1))
        gscfast.effective_depth(model, bad, x, y, backend=backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_meta_tensors_are_refused(backend):
    x, y = _xy()
    model, meta = _seeded(), _seeded().to("meta")
    no_values = "is a meta tensor .*no values"
    cases = [
        (lambda: gscfast.gsc(meta, x.to("meta"), y.to("meta"), backend=backend), "^x " + no_values),
        (lambda: gscfast.gsc(model, x, y.to("meta"), backend=backend), "^y " + no_values),
        (
            lambda: gscfast.preactivation_stats(meta, x, backend=backend),
            r"^model\[0\] \(Linear\) weight " + no_values,
        ),
        (lambda: gscfast.jacobian(meta, x.to("meta"), backend=backend), "^x " + no_values),
        (
            lambda: gscfast.effective_depth(model, meta, x, y, backend=backend),
            r"^init_model\[0\] \(Linear\) weight " + no_values,
        ),
    ]
    for call, msg in cases:
        with pytest.raises(ValueError, match=msg):
            call()


# ------------------------------------------------------------------ non-finite intermediate values

CPU_BACKENDS = ["reference", "torch", "numba"]


def _f32_case(kind: str):
    """(call(backend), where the values stop being finite); inputs and weights are finite and
    pass the entry checks, the overflow happens inside."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 6, generator=g), torch.randn(16, 6, generator=g)
    if kind in ("batch norm", "frozen batch norm", "layer norm"):
        norm = "layer" if kind == "layer norm" else "batch"
        model = gscfast.mlp(3, 6, act="tanh", norm=norm, seed=0)
        bn = "frozen" if kind.startswith("frozen") else "batch"
        where = rf"layer f_3, the output of model\[1\] \({'LayerNorm' if norm == 'layer' else 'BatchNorm1d'}\) \(the variance of its input overflows\)"
        return model, x * 1e30, y, {"batchnorm": bn}, where
    if kind == "huge weights":
        model = gscfast.mlp(3, 6, act="relu", seed=0)
        with torch.no_grad():
            for m in model:
                if isinstance(m, nn.Linear):
                    m.weight.mul_(1e13)
        # the values overflow at f_1; the squared norm of a layer's output can overflow earlier
        return (
            model,
            x,
            y,
            {},
            r"(layer f_1, the output of model\[4\] \(Linear\)|\|\|f_\d\|\|\^2, the squared norm of layer f_\d's output)",
        )
    assert kind == "huge targets"
    model = gscfast.mlp(3, 6, act="tanh", seed=0)
    return model, x, y * 1e37, {}, r"\|\|f_0\|\|\^2, the square of the error f_0 \(error='dot'\)"


F32_CASES = ["batch norm", "frozen batch norm", "layer norm", "huge weights", "huge targets"]


def _f32_calls(model, x, y, kw, backend):
    calls = {
        "gsc": lambda: gscfast.gsc(model, x, y, backend=backend, **kw),
        "gsc_moments": lambda: gscfast.gsc_moments(model, x, y, backend=backend, **kw),
        "analyze": lambda: gscfast.analyze(model, x, y, backend=backend, **kw),
        "preactivation_stats": lambda: gscfast.preactivation_stats(model, x, backend=backend, **kw),
    }
    if kw.get("batchnorm") != "batch" or not gscfast.compile_model(model).couples_batch:
        calls["jacobian"] = lambda: gscfast.jacobian(
            model, x, backend=backend, **{"batchnorm": "frozen", **kw}
        )
    calls["gsc_matrix"] = lambda: gscfast.gsc_matrix(model, x, y, backend=backend, **kw)
    calls["effective_depth"] = lambda: gscfast.effective_depth(
        model, model, x, y, backend=backend, **kw
    )
    return calls


@pytest.mark.parametrize("case", F32_CASES)
def test_float32_overflow_is_refused_with_the_layer_by_every_backend(case):
    """float32 overflow used to give NaN GSCs and rates with no warning, and with batch norm a
    pre-activation std and sign diversity of 0.0 (float64: about 1 and 0.46)."""
    model, x, y, kw, where = _f32_case(case)
    for name in _f32_calls(model, x, y, kw, "torch"):
        messages = set()
        for backend in CPU_BACKENDS:
            call = _f32_calls(model, x, y, kw, backend)[name]
            if case == "huge targets" and name in ("preactivation_stats", "jacobian"):
                call()  # no error layer, nothing overflows: a result, and a finite one
                continue
            with pytest.raises(ValueError, match=where + ".*float64") as err:
                call()
            messages.add(str(err.value))
        assert len(messages) <= 1, (name, messages)  # every backend: the same message


@pytest.mark.parametrize("case", ["batch norm", "layer norm"])
def test_float64_computes_what_float32_refuses(case):
    model, x, y, kw, _ = _f32_case(case)
    model, x, y = model.double(), x.double(), y.double()
    stats = gscfast.preactivation_stats(model, x, backend="torch", **kw)
    assert torch.isfinite(stats.std[1:]).all() and (stats.std[1:] > 0.5).all()
    assert (stats.sign_diversity[1:] > 0.1).all()
    assert torch.isfinite(gscfast.gsc(model, x, y, backend="torch", **kw)).all()


def test_autograd_jacobian_returns_torchs_result_where_values_overflow():
    """gscfast.autograd.jacobian promises torch's result, NaN and Inf included: where gscfast's
    own functions refuse (values overflow inside), it delegates to torch."""
    model, x, _, _, _ = _f32_case("huge weights")
    want = torch.autograd.functional.jacobian(model, x[:4])
    assert not torch.isfinite(want).all()
    torch.testing.assert_close(ga.jacobian(model, x[:4]), want, equal_nan=True)


def _tiny_mlp(scale: float) -> nn.Sequential:
    """Bias-free ReLU layers scaled by ``scale``: the values shrink by it per layer."""
    model = gscfast.mlp(3, 20, act="relu", seed=0)
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.mul_(scale)
                if m.bias is not None:
                    m.bias.zero_()
    return model


def test_float32_underflow_is_refused_by_every_backend():
    """Values of 1e-36 are normal float32 numbers, but their squares (1e-72) flush to 0: every
    backend returned GSC NaN (0 / 0) and a pre-activation std of 0.0 where float64 gives GSCs of
    about 2, with no error."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 20, generator=g), torch.randn(16, 20, generator=g)
    model = _tiny_mlp(1e-12)  # values 1e-12, 1e-24, 1e-36
    for backend in CPU_BACKENDS:
        for name in ("gsc", "gsc_moments", "analyze", "preactivation_stats"):
            with pytest.raises(
                gscfast.NumericalError,
                match=r"underflow .* at the pre-activation of layer f_2: .*float64",
            ):
                _f32_calls(model, x, y, {}, backend)[name]()
    want = gscfast.gsc(model.double(), x.double(), y.double(), backend="torch")
    assert torch.isfinite(want).all() and (want[1:] > 1).all()
    # a dead ReLU layer's exact zeros are not an underflow: no error
    dead = _tiny_mlp(1.0)
    with torch.no_grad():
        dead[2].weight.fill_(-1.0)  # every pre-activation of layer 2 is negative: f = 0 exactly
    want = gscfast.gsc(
        copy.deepcopy(dead).double(), x.abs().double(), y.double(), backend="reference"
    )
    assert (want[1:].isnan() | (want[1:] == 0)).all()  # 0 / 0 where f_0 = 0: nothing to measure
    for backend in CPU_BACKENDS:
        got = gscfast.gsc(dead, x.abs(), y, backend=backend)
        torch.testing.assert_close(got.double(), want, equal_nan=True)
        std = gscfast.preactivation_stats(dead, x.abs(), backend=backend).std
        assert (std[2:] > 0).all() and std[1] == 0  # fed by the dead layer's zeros: exactly 0


def test_float32_result_below_float32_range_is_refused_and_float64_moments_give_it():
    """Every value is a normal float32, but GSC(2, 0) ~ 1e-40 is not: returned in float32 it
    would be 0 or subnormal. gsc refuses; gsc_moments gives it in float64 (what GradientFlow
    records)."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6, bias=False), nn.Tanh(), nn.Linear(6, 3))
    with torch.no_grad():
        model[0].weight.mul_(1e-20)  # f_2 ~ 1e-20, squares 1e-40 (summed in float64 here)
    x, labels = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    kw = {"error": "kl", "layers": ["1"]}
    with pytest.raises(gscfast.NumericalError, match=r"GSC\(l, 0\) at index \(2,\) is .*e-4\d"):
        gscfast.gsc(model, x, labels, **kw)
    got = gscfast.gsc_moments(model, x, labels, **kw).gsc()
    want = gscfast.gsc(model.double(), x.double(), labels, **kw)
    assert got.dtype == torch.float64 and 0 < got[2] < 1e-38
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


def test_float32_subnormal_boundary_values_are_refused_under_layers():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6, bias=False), nn.Tanh(), nn.Linear(6, 3))
    with torch.no_grad():
        model[0].weight.mul_(1e-40)  # f_2 ~ 1e-40: subnormal float32 entries
    x, labels = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    with pytest.raises(
        gscfast.NumericalError, match=r"underflow .* at layer f_2, the output of '1'"
    ):
        gscfast.gsc_moments(model, x, labels, error="kl", layers=["1"])


def test_float32_underflow_in_jacobian_products_is_refused_by_every_backend():
    """||J_k^l||^2 of two layers scaled by 1e-12 is about 1e-46: float32 summed it to 0 (GSC(k,
    l) = 0) and effective depth's contributions likewise, with no error."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 20, generator=g), torch.randn(8, 20, generator=g)
    model = _tiny_mlp(1e-12)
    for backend in CPU_BACKENDS:
        for name in ("gsc_matrix", "effective_depth"):
            with pytest.raises(gscfast.NumericalError, match=r"underflow .*in float64"):
                _f32_calls(model, x, y, {}, backend)[name]()
    want = gscfast.gsc_matrix(copy.deepcopy(model).double(), x.double(), y.double())
    assert (want[torch.ones_like(want, dtype=torch.bool).tril()] > 0).all()  # float64 holds it


def _moved_batch_tanh(depth: int, move: float) -> tuple[nn.Module, nn.Module]:
    """A float32 batch-tanh MLP (train-mode batch norm) and a copy whose weights moved by
    ``move`` (relative): its order-lambda contributions fall off like ``move ** (2 lambda)``."""
    init = gscfast.mlp(depth, 12, act="tanh", norm="batch", seed=3)
    trained = copy.deepcopy(init)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for m in trained:
            if isinstance(m, nn.Linear):
                m.weight.mul_(1 + move * torch.randn(m.weight.shape, generator=g))
    return trained, init


def test_float32_coupled_contributions_screen_with_float64_squares(monkeypatch):
    """The coupled effective depth sums its squares in float64 and returns them so, so a
    contribution of 1e-31 (its values about 1e-17: normal float32 numbers) is exact enough and is
    not computed again in float64; where the values do underflow float32 (order-24 values of
    about 1e-45, 30 layers moved by 1e-2) the call is still refused. Before, any contribution
    below ``n * tiny / eps`` ran the whole recursion again in float64, which doubled the CIFAR
    study's coupled effective depth."""
    pytest.importorskip("numba")
    from gscfast.backends.numba_backend import NumbaBackend

    dtypes = []
    run = NumbaBackend._contributions_coupled

    def spy(self, pb, init):
        dtypes.append(pb.x.dtype)
        return run(self, pb, init)

    monkeypatch.setattr(NumbaBackend, "_contributions_coupled", spy)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(64, 12, generator=g), torch.randint(0, 12, (64,), generator=g)
    kw = dict(error="kl", batchnorm="batch", backend="numba")
    trained, init = _moved_batch_tanh(10, 1e-2)
    _, got = gscfast.effective_depth(trained, init, x, y, **kw)
    assert dtypes == [torch.float32]  # no float64 rerun
    _, want = gscfast.effective_depth(
        copy.deepcopy(trained).double(), copy.deepcopy(init).double(), x.double(), y, **kw
    )
    fi = torch.finfo(torch.float32)
    defined = ~want.isnan()
    # one datapoint: the profile is the root of the contributions; under the old screen's bound
    # (n = 64 * 12 values), this case used to run twice
    assert want[defined].square().min() < 64 * 12 * fi.tiny / fi.eps
    assert got.dtype == torch.float32
    torch.testing.assert_close(got[defined].double(), want[defined], rtol=1e-4, atol=0)

    dtypes.clear()
    trained, init = _moved_batch_tanh(30, 1e-2)
    with pytest.raises(gscfast.NumericalError, match=r"underflow .*in float64"):
        gscfast.effective_depth(trained, init, x, y, **kw)
    assert dtypes == [torch.float32, torch.float64]


def test_float32_rounding_is_not_refused_as_underflow():
    """effective_depth of a 50-layer layer-tanh network against itself: its lambda >= 1 terms are
    exact zeros, so the screen runs it again in float64, and some lambda = 0 contributions (about
    1e3, chaotic gradients) differ from float64 by more than 1e-3, float32's rounding amplified
    over 50 layers. They were refused as "underflow"; only entries under the screen's bound are
    compared now (the CIFAR study stopped at its first measurement)."""
    m = gscfast.mlp(50, 100, act="tanh", norm="layer", in_features=100, out_features=10, seed=1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 100, generator=g), torch.randint(0, 10, (256,), generator=g)
    m64 = copy.deepcopy(m).double()
    _, want = gscfast.effective_depth(m64, m64, x.double(), y, error="kl")
    for backend in CPU_BACKENDS:
        if backend == "reference":  # autograd per pair of layers: minutes at 50 layers
            continue
        _, prof = gscfast.effective_depth(m, m, x, y, error="kl", backend=backend)
        assert (prof[1:, 1:].nan_to_num() == 0).all()
        torch.testing.assert_close(prof[:, 0].double(), want[:, 0], rtol=1e-2, atol=0)
