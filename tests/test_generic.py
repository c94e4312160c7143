"""The generic rule (any module, called as is, its VJPs by ``torch.func``) and the pass-through
rules (``Flatten``, eval-mode dropout), issue 14 item 2.

Every public function on models with generic modules (custom forwards, hooks, modules without an
analytic rule, in residual bodies, with a train-mode batch norm) equals the reference backend,
which runs the modules themselves under autograd (hooks included), in float64; what the generic
rule cannot measure is refused, naming the module.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import assert_results_close, cases, seed_parameters
from torch import nn

import gscfast
from gscfast.backends import get_backend
from gscfast.validation import make_problem

F64 = torch.float64
BACKENDS = ["torch", "numba"]  # numba runs such programs on the torch engine (checked below)


class Swish(nn.Module):
    """A custom elementwise function (not an activation gscfast knows: no layer boundary)."""

    def forward(self, x):
        return x * torch.sigmoid(1.3 * x)


class Mix(nn.Module):
    """Per-sample, mixing the features; counts its calls in a buffer (state gscfast must not
    touch)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, d, dtype=F64))
        self.register_buffer("calls", torch.zeros((), dtype=F64))

    def forward(self, x):
        self.calls += 1
        return x * self.w + 0.1 * x.pow(2).sum(-1, keepdim=True)


class Widen(nn.Module):
    """Changes the width: ``d -> d + 2``."""

    def forward(self, x):
        return torch.cat([x, torch.sin(x[:, :2])], dim=-1)


class Center(nn.Module):
    """Couples the samples of a batch."""

    def forward(self, x):
        return x - x.mean(0)


class Total(nn.Module):
    """Not per sample: one number for the whole batch."""

    def forward(self, x):
        return x.sum()


class Noisy(nn.Module):
    def forward(self, x):
        return x * (1 + 0.1 * torch.rand_like(x))


class DoubledLinear(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 4, dtype=F64)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.lin(x))


def _seed(model: nn.Module, seed: int) -> nn.Module:
    return seed_parameters(model, seed, 0.6)


def _models() -> dict[str, nn.Module]:
    kw = dict(dtype=F64)
    mlp = nn.Sequential(
        nn.Linear(5, 7, **kw),
        Swish(),
        nn.Tanh(),
        nn.Linear(7, 7, **kw),  # hooked below
        Mix(7),
        nn.ReLU(),
        nn.Dropout(0.3),  # eval mode below: the identity
        DoubledLinear(7, 6, **kw),
        Widen(),
        nn.Tanh(),  # pre-hooked below: still ends its layer
        nn.Flatten(),
        nn.Linear(8, 3, **kw),
    ).eval()
    mlp[3].register_forward_hook(lambda mod, inp, out: out * 1.5)
    mlp[9].register_forward_pre_hook(lambda mod, args: (args[0] * 0.8,))
    residual = nn.Sequential(
        nn.Linear(5, 6, **kw),
        gscfast.Residual(nn.Sequential(nn.Linear(6, 6, **kw), Swish(), nn.Tanh()), 0.5),
        Mix(6),
        nn.Linear(6, 3, **kw),
    )
    batchnorm = nn.Sequential(  # train-mode batch norm: datapoints are whole batches
        nn.Linear(5, 6, **kw),
        nn.BatchNorm1d(6, **kw),
        Swish(),
        nn.Tanh(),
        Center(),  # couples the samples: measurable when datapoints are batches
        Mix(6),
        nn.Linear(6, 3, **kw),
    )
    frozen = nn.Sequential(  # batchnorm="frozen": per-sample datapoints again
        nn.Linear(5, 6, **kw), nn.BatchNorm1d(6, **kw), Swish(), nn.Tanh(), Mix(6)
    )
    frozen.append(nn.Linear(6, 3, **kw))
    # spectral norm as a pre-hook (generic) and as a parametrization (analytic), weight norm as a
    # parametrization; in train mode spectral norm's power iteration updates its buffers on every
    # call: measured as of one call. (torch.nn.utils.weight_norm, the pre-hook form, works too,
    # but torch cannot deep-copy it once it has run, which the reference backend and these tests
    # need.)
    normed = nn.Sequential(
        nn.utils.spectral_norm(nn.Linear(5, 6, **kw)),
        nn.Tanh(),
        nn.utils.parametrizations.spectral_norm(nn.Linear(6, 6, **kw)),
        nn.ReLU(),
        nn.utils.parametrizations.weight_norm(nn.Linear(6, 3, **kw)),
    )
    return {
        "mlp": mlp,
        "residual": residual,
        "batchnorm": batchnorm,
        "frozen": frozen,
        "normed": normed,
    }


MODES = {"batchnorm": "batch", "frozen": "frozen"}


def _data(D: int | None = 2, B: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    lead = (B,) if D is None else (D, B)
    return torch.randn(*lead, 5, generator=g, dtype=F64), torch.randn(
        *lead, 3, generator=g, dtype=F64
    )


def _results(model: nn.Module, init: nn.Module, backend: str, **kw) -> dict[str, object]:
    x, y = _data()
    x1, y1 = x[0], y[0]
    pre = gscfast.preactivation_stats(model, x, backend=backend, **kw)
    out = {
        "gsc": gscfast.gsc(model, x, y, backend=backend, **kw),
        "gsc_matrix": gscfast.gsc_matrix(model, x1, y1, backend=backend, **kw),
        "preact_std": pre.std,
        "sign_diversity": pre.sign_diversity,
        "effective_depth": gscfast.effective_depth(model, init, x1, y1, backend=backend, **kw),
    }
    if kw.get("batchnorm") != "batch":  # per-sample Jacobians (undefined for batch datapoints)
        out["jacobian"] = gscfast.jacobian(model, x1, backend=backend, **kw)
    return out


def _init(model: nn.Module) -> nn.Module:
    init = copy.deepcopy(model)
    _seed(init, 7)
    return init


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(_models()))
def test_every_function_equals_the_reference(name, backend):
    model = _seed(_models()[name], 3)
    init = _init(model)
    kw = {"batchnorm": MODES[name]} if name in MODES else {}
    want = _results(model, init, "reference", **kw)
    got = _results(model, init, backend, **kw)
    for k in want:
        assert_results_close(got[k], want[k], f"{name} {k}")


def test_fused_backend_runs_generic_programs_on_the_torch_engine():
    model = _seed(_models()["mlp"], 3)
    x, y = _data(None)
    pb, _ = make_problem(model, x, y, error="dot")
    assert not get_backend("numba", "cpu").fused(pb, "sweep")
    # pass-through rules keep an MLP on the fused kernels
    mlp = nn.Sequential(nn.Linear(5, 4, dtype=F64), nn.Tanh(), nn.Dropout(0.2), nn.Flatten())
    mlp.append(nn.Linear(4, 3, dtype=F64)).eval()
    pb, _ = make_problem(mlp, x, y, error="dot")
    assert get_backend("numba", "cpu").fused(pb, "sweep")
    assert not gscfast.compile_model(mlp).generic


@pytest.mark.parametrize("name", ["residual", "normed"])
def test_model_is_never_modified(name):
    model = _seed(_models()[name], 3)
    before = copy.deepcopy(model.state_dict())
    _results(model, _init(model), "torch")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # Mix's call counter, spectral norm's u and v
    hooked = _models()["mlp"]
    _results(hooked, _init(hooked), "torch")
    assert len(hooked[3]._forward_hooks) == 1 and len(hooked[9]._forward_pre_hooks) == 1


def test_compile_model_reports_the_generic_modules():
    program = gscfast.compile_model(_models()["mlp"])
    got = [(op.path, type(op.module).__name__, op.why) for op in program.generic]
    assert got == [
        ("model[1]", "Swish", "no analytic rule"),
        ("model[3]", "Linear", "has a forward hook"),
        ("model[4]", "Mix", "no analytic rule"),
        ("model[7]", "DoubledLinear", "overrides forward() of Linear"),
        ("model[8]", "Widen", "no analytic rule"),
        ("model[9]", "Tanh", "has a forward pre-hook"),
    ]
    assert "generic: model[1] (Swish, no analytic rule)" in repr(program)
    # the hooked Tanh still ends a layer: f_1 is [Flatten, Linear]
    assert [op.kind for op in program.layer(1).ops] == ["pass", "linear"]
    assert program.L == 4


def test_refusals_name_the_module():
    x, y = _data(None)
    kw = dict(dtype=F64)
    cases = [
        (
            nn.Sequential(nn.Linear(5, 3, **kw), Center()),
            ValueError,
            r"model\[1\] \(Center, no analytic rule: gscfast's generic rule\) couples the samples",
        ),
        (
            nn.Sequential(nn.Linear(5, 3, **kw), Noisy()),
            ValueError,
            r"model\[1\] \(Noisy.*gives different outputs for the same input",
        ),
        (
            nn.Sequential(nn.Linear(5, 3, **kw), nn.Dropout(0.1)),
            ValueError,
            r"model\[1\] \(Dropout\) is in train mode",
        ),
        (
            nn.Sequential(Block(), nn.Linear(4, 3, **kw)),
            TypeError,
            r"model\[0\] \(Block, no analytic rule\) would be taken .* contains model\[0\]\.act",
        ),
        (
            nn.Sequential(nn.Linear(5, 3, **kw), Total()),
            TypeError,
            r"model\[1\] \(Total.* the generic rule takes modules mapping a \[batch, \.\.\.\]",
        ),
        (
            nn.Sequential(nn.Flatten(0), nn.Linear(5, 3, **kw)),
            ValueError,
            r"model\[0\] \(Flatten\(start_dim=0, end_dim=-1\)\) has start_dim=0, which on a "
            r"batch of samples of shape \[5\] is the batch dimension",
        ),
        (
            nn.Sequential(nn.Linear(5, 4, **kw), Swish(), nn.Linear(5, 3, **kw)),
            ValueError,
            r"model\[2\] \(Linear\) expects 5 features but receives 4",
        ),
    ]
    for model, error, match in cases:
        with pytest.raises(error, match=match):
            gscfast.gsc(model, x, y, backend="torch")


def test_a_coupling_module_is_exact_where_datapoints_are_batches():
    """``Center`` couples the samples: refused per sample (above), exact in a batch datapoint."""
    model = _seed(_models()["batchnorm"], 4)
    x, y = _data()
    want = gscfast.gsc_matrix(model, x, y, backend="reference")
    got = gscfast.gsc_matrix(model, x, y, backend="torch")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, equal_nan=True)


def _genericize(model: nn.Module, picks: list[int]) -> nn.Module:
    """A copy of ``model`` whose leaf modules number ``picks`` (mod their count) take the generic
    rule: forward hooks on linear layers and norms, pre-hooks on activations, and a ``Swish``
    after the first picked linear layer."""
    model = copy.deepcopy(model)
    leaves = [m for m in model.modules() if not list(m.children())]
    for k, i in enumerate(picks):
        m = leaves[i % len(leaves)]
        if isinstance(m, nn.Linear) and k == 0:
            m.register_forward_hook(lambda mod, inp, out: Swish()(out))
        elif isinstance(m, (nn.Linear, nn.LayerNorm, nn.BatchNorm1d)):
            m.register_forward_hook(lambda mod, inp, out: 1.1 * out)
        else:
            m.register_forward_pre_hook(lambda mod, args: (0.9 * args[0],))
    return model


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    case=cases(max_depth=5, max_width=8, max_batch=4),
    picks=st.lists(st.integers(0, 99), min_size=1, max_size=4),
)
def test_random_models_with_generic_modules_equal_the_reference(case, picks):
    """Random MLPs (every activation, both norms in both modes, residual blocks) with random
    modules moved onto the generic rule: the torch engine's GSC, GSC matrix and Jacobians equal
    the reference's."""
    model = _genericize(case.model, picks)
    assert gscfast.compile_model(model).generic
    x, y = case.x, case.y
    for fn in (gscfast.gsc, gscfast.gsc_matrix):
        assert_results_close(
            fn(model, x, y, backend="torch"), fn(model, x, y, backend="reference"), fn.__name__
        )
    if not case.couples:
        assert_results_close(
            gscfast.jacobian(model, x, backend="torch"),
            gscfast.jacobian(model, x, backend="reference"),
            "jacobian",
        )


def test_a_hooked_batch_norm_couples_and_cannot_be_frozen():
    """A train-mode batch norm behind a hook still couples the batch (measured exactly, as a
    batch datapoint); its statistics, computed inside the module, cannot be frozen."""
    model = nn.Sequential(nn.Linear(5, 6, dtype=F64), nn.BatchNorm1d(6, dtype=F64), nn.Tanh())
    model.append(nn.Linear(6, 3, dtype=F64))
    model[1].register_forward_hook(lambda mod, inp, out: 1.1 * out)
    x, y = _data()
    assert gscfast.compile_model(model).couples_batch
    assert_results_close(
        gscfast.gsc(model, x, y, backend="torch"), gscfast.gsc(model, x, y, backend="reference"), ""
    )
    with pytest.raises(ValueError, match=r"batchnorm='frozen' .* model\[1\] \(BatchNorm1d"):
        gscfast.gsc(model, x, y, batchnorm="frozen")


class _Jitter(nn.Module):
    """Noise of 1e-7 relative: close to deterministic, but random."""

    def forward(self, x):
        return x * (1 + 1e-7 * torch.randn_like(x))


def test_slight_randomness_is_refused_not_rounded_away():
    """The determinism check compares to the last bit: allclose (rtol 1e-5) let this through."""
    model = nn.Sequential(nn.Linear(4, 6, dtype=torch.float64), _Jitter(), nn.Tanh())
    x = torch.randn(5, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="different outputs for the same input"):
        gscfast.gsc(model, x, torch.randn(5, 6, dtype=torch.float64), backend="torch")
    with pytest.raises(ValueError, match="different outputs for the same input"):
        gscfast.gsc(model, x, torch.randn(5, 6, dtype=torch.float64), layers=["0"])
