"""Feature maps (issue 14 item 1): the rules of convolutional networks (``Conv1d/2d``, pooling,
``BatchNorm1d/2d`` over channels, ``GroupNorm``, ``LayerNorm`` over several dimensions,
``Flatten``/``Unflatten``, ``Linear`` on token sequences) and the generic rule on feature maps.

- Each rule's forward and VJP equal torch's module and autograd in float64, over random options
  and odd sizes (hypothesis), per sample and over batch datapoints.
- Every public function on convolutional models equals the reference backend (the modules
  themselves under autograd), which in turn equals ``torch.func`` and the ``layers=`` path.
- How ``x`` holds samples, and the refusals, name the module.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from strategies import assert_results_close, make_act, seed_parameters
from torch import nn

import gscfast
from gscfast.rules import ForwardCtx

F64 = torch.float64
BACKENDS = ["torch", "numba"]  # numba hands feature maps to the torch engine


# ---------------------------------------------------------------- one rule against autograd


def _check_rule(module, shape, B, seed, coupled, ties=False):
    """Forward and VJP of ``module``'s compiled rule on ``B`` samples of ``shape`` equal torch's
    module and autograd (per-sample rows, or one batch datapoint with ``coupled``); ``ties``
    rounds ``x`` so that windows hold equal values."""
    module = module.to(F64)
    program = gscfast.compile_model(nn.Sequential(module))
    try:
        program.bind(shape)
    except ValueError:
        assume(False)  # a shape the module does not take (torch refuses it too)
    (layer,) = program.layers
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, *shape, generator=g, dtype=F64)
    x = x.round() if ties else x
    want = module(x.clone().requires_grad_(True))
    if not bool(torch.isfinite(want).all()):  # a max-pool window in the padding only: refused
        with pytest.raises(
            gscfast.NumericalError, match="outputs -inf: a window lies entirely in its padding"
        ):
            layer.forward(x.reshape(1, B, -1), ForwardCtx(coupled=coupled, samples=B))
        return
    ctx = ForwardCtx(coupled=coupled, samples=B)
    y, saved, _ = layer.forward(x.reshape(1, B, -1), ctx)
    torch.testing.assert_close(y, want.detach().reshape(1, B, -1), rtol=1e-12, atol=1e-12)
    R, d_out = 3, y.shape[-1]
    v = torch.randn(B, R, d_out, generator=g, dtype=F64)
    got = layer.vjp(v.transpose(0, 1)[None] if coupled else v.reshape(B, R, 1, d_out), saved)
    _rows_equal_autograd(module, x, v, got, coupled)
    if not coupled:  # one row stack for every datapoint ([1, R, 1, d]), as the chain starts
        shared = v[:1].expand(B, R, d_out)
        got = layer.vjp(shared[:1].reshape(1, R, 1, d_out), saved)
        assert got.shape[0] in (1, B), got.shape  # 1: the same for every datapoint (linear)
        got = got.expand(B, *got.shape[1:])
        _rows_equal_autograd(module, x, shared, got, coupled)


def _rows_equal_autograd(module, x, v, got, coupled):
    """``got`` (a rule's VJP of the rows ``v [B, R, d_out]``) equals autograd's, row by row."""
    B = x.shape[0]
    want_shape = module(x).shape
    for r in range(v.shape[1]):
        xr = x.clone().requires_grad_(True)
        (gx,) = torch.autograd.grad(module(xr), xr, v[:, r].reshape(want_shape))
        row = got[0, r] if coupled else got[:, r, 0]
        torch.testing.assert_close(row, gx.reshape(B, -1), rtol=1e-11, atol=1e-12)


def _pads(draw, kernel, dilation, stride, nd):
    kind = draw(st.sampled_from(["int", "valid", "same"] if stride == 1 else ["int", "valid"]))
    if kind == "int":
        return (
            draw(st.integers(0, 2))
            if nd == 1
            else (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
        )
    return kind


@st.composite
def convs(draw):
    nd = draw(st.sampled_from([1, 2]))
    groups = draw(st.integers(1, 3))
    cin, cout = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    tup = (lambda a, b: a) if nd == 1 else (lambda a, b: (a, b))
    k = tup(draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = draw(st.sampled_from([1, 1, 2, 3]))
    dilation = draw(st.integers(1, 2))
    padding = _pads(draw, k, dilation, stride, nd)
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    bias = draw(st.booleans())
    cls = nn.Conv1d if nd == 1 else nn.Conv2d
    module = cls(cin, cout, k, stride, padding, dilation, groups, bias, padding_mode=mode)
    spatial = tuple(draw(st.integers(1, 9)) for _ in range(nd))
    return module, (cin, *spatial)


@st.composite
def pools(draw):
    nd = draw(st.sampled_from([1, 2]))
    kind = draw(st.sampled_from(["max", "avg", "adaptive"]))
    k = draw(st.integers(1, 3))
    stride = draw(st.sampled_from([None, 1, 2]))
    pad = draw(st.integers(0, k // 2))
    ceil = draw(st.booleans())
    if kind == "max":
        cls = nn.MaxPool1d if nd == 1 else nn.MaxPool2d
        module = cls(k, stride, pad, dilation=draw(st.integers(1, 2)), ceil_mode=ceil)
    elif kind == "avg":
        include = draw(st.booleans())
        if nd == 1:
            module = nn.AvgPool1d(k, stride, pad, ceil, include)
        else:
            div = draw(st.sampled_from([None, 1, 3]))
            module = nn.AvgPool2d(k, stride, pad, ceil, include, div)
    else:
        size = draw(st.integers(1, 4))
        module = (
            nn.AdaptiveAvgPool1d(size)
            if nd == 1
            else nn.AdaptiveAvgPool2d((size, draw(st.sampled_from([None, 1, 3]))))
        )
    C = draw(st.integers(1, 3))
    return module, (C, *(draw(st.integers(1, 8)) for _ in range(nd)))


@st.composite
def norms(draw):
    kind = draw(st.sampled_from(["bn", "gn", "ln"]))
    nd = draw(st.integers(1, 2))
    C = draw(st.integers(1, 4))
    shape = (C, *(draw(st.integers(1, 5)) for _ in range(nd)))
    if kind == "bn":
        module = (nn.BatchNorm1d if nd == 1 else nn.BatchNorm2d)(C, affine=draw(st.booleans()))
        if draw(st.booleans()):  # eval mode: running statistics (made nontrivial)
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            module.eval()
    elif kind == "gn":
        G = draw(st.sampled_from([d for d in range(1, C + 1) if C % d == 0]))
        module = nn.GroupNorm(G, C, affine=draw(st.booleans()))
    else:
        k = draw(st.integers(1, len(shape)))
        module = nn.LayerNorm(shape[len(shape) - k :], elementwise_affine=draw(st.booleans()))
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(-1.5, 1.5)
    return module, shape


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=convs(), B=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_conv_rules_equal_autograd(case, B, seed):
    module, shape = case
    _check_rule(module, shape, B, seed, coupled=False)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=pools(), B=st.integers(1, 3), seed=st.integers(0, 2**16), ties=st.booleans())
def test_pool_rules_equal_autograd(case, B, seed, ties):
    module, shape = case
    _check_rule(module, shape, B, seed, coupled=False, ties=ties)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=norms(), B=st.integers(2, 4), seed=st.integers(0, 2**16))
def test_norm_rules_equal_autograd(case, B, seed):
    module, shape = case
    coupled = isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training
    _check_rule(module, shape, B, seed, coupled=coupled)


def test_max_pool_ties_route_as_autograd():
    """Equal values in a window: the gradient goes to the entry torch's max picks."""
    module = nn.MaxPool2d(3, 1, padding=1).to(F64)
    program = gscfast.compile_model(nn.Sequential(module))
    program.bind((1, 4, 4))
    x = torch.ones(1, 1, 4, 4, dtype=F64)  # every window a tie
    (layer,) = program.layers
    _, saved, _ = layer.forward(x.reshape(1, 1, -1), ForwardCtx(coupled=False, samples=1))
    v = torch.randn(1, 1, 1, 16, dtype=F64)
    got = layer.vjp(v, saved)
    xr = x.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(module(xr), xr, v.reshape(1, 1, 4, 4))
    torch.testing.assert_close(got.reshape(-1), want.reshape(-1), rtol=0, atol=0)


# ---------------------------------------------------------------- every function, whole models


class Gate(nn.Module):
    """A custom module on feature maps (no rule: the generic rule, on ``[C, H, W]``)."""

    def __init__(self, C: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, C, 1, dtype=F64)

    def forward(self, x):
        return x * torch.sigmoid(self.conv(x))


def _seed(model: nn.Module, seed: int) -> nn.Module:
    return seed_parameters(model, seed, 0.5)


def _models() -> dict[str, tuple[nn.Module, tuple[int, ...], dict]]:
    """name -> (model, one sample's shape, keyword arguments)."""
    kw = dict(dtype=F64)
    cnn = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, **kw),
        nn.BatchNorm2d(4, **kw),
        nn.ReLU(),
        nn.MaxPool2d(2, ceil_mode=True),
        nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2, padding_mode="reflect", **kw),
        nn.GroupNorm(2, 4, **kw),
        nn.Tanh(),
        nn.Conv2d(4, 3, 2, padding="same", dilation=2, bias=False, **kw),
        Gate(3),
        nn.ELU(),
        nn.AvgPool2d(2, 1, padding=1, count_include_pad=False),
        nn.LayerNorm([3, 3, 3], **kw),
        nn.AdaptiveAvgPool2d((2, 1)),
        nn.Flatten(),
        nn.Linear(6, 3, **kw),
    ).eval()
    cnn1d = nn.Sequential(
        nn.Conv1d(3, 4, 3, padding=1, padding_mode="circular", **kw),
        nn.BatchNorm1d(4, **kw),
        nn.Tanh(),
        nn.MaxPool1d(3, 2, padding=1),
        nn.Conv1d(4, 4, 2, dilation=2, **kw),
        nn.Softplus(),
        nn.AvgPool1d(2, ceil_mode=True),
        nn.AdaptiveAvgPool1d(2),
        nn.Flatten(),
        nn.Linear(8, 3, **kw),
    ).eval()
    resnet = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, **kw),
        nn.BatchNorm2d(4, **kw),  # train mode: batch statistics
        nn.ReLU(),
        gscfast.Residual(
            nn.Sequential(
                nn.Conv2d(4, 4, 3, padding=1, bias=False, **kw),
                nn.BatchNorm2d(4, **kw),
                nn.ReLU(),
                nn.Conv2d(4, 4, 3, padding=1, **kw),
            )
        ),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3, **kw),
    )
    tokens = nn.Sequential(  # [B, T * E] -> [T, E] tokens: Linear and LayerNorm per token
        nn.Unflatten(1, (4, 3)),
        nn.LayerNorm(3, **kw),
        nn.Linear(3, 5, **kw),
        nn.GELU(),
        nn.Linear(5, 3, **kw),
        nn.Flatten(),
        nn.Tanh(),
        nn.Linear(12, 3, **kw),
    )
    mnist = nn.Sequential(nn.Flatten(), nn.Linear(12, 6, **kw), nn.Tanh(), nn.Linear(6, 3, **kw))

    def unflattened(norm: nn.Module) -> nn.Sequential:
        """An MLP's layer shape (Linear, norm, activation) whose norm sees [2, 3] samples: per
        position (the fused kernels, which normalize vectors, must hand it to the torch engine;
        numba once gave wrong GSCs here)."""
        return nn.Sequential(
            nn.Linear(6, 6, **kw),
            nn.Unflatten(1, (2, 3)),
            norm,
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(6, 3, **kw),
        )

    return {
        "cnn": (cnn, (2, 7, 6), {}),
        "cnn1d": (cnn1d, (3, 11), {}),
        "resnet-batch": (resnet, (2, 5, 5), {"batchnorm": "batch"}),
        "resnet-frozen": (copy.deepcopy(resnet), (2, 5, 5), {"batchnorm": "frozen"}),
        "tokens": (tokens, (12,), {}),
        "mnist": (mnist, (1, 3, 4), {}),
        "unflatten-ln": (unflattened(nn.LayerNorm(3, **kw)), (6,), {}),
        "unflatten-bn-batch": (unflattened(nn.BatchNorm1d(2, **kw)), (6,), {"batchnorm": "batch"}),
        "unflatten-bn-frozen": (
            unflattened(nn.BatchNorm1d(2, **kw)),
            (6,),
            {"batchnorm": "frozen"},
        ),
    }


def _data(shape, B=5, D=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(D, B, *shape, generator=g, dtype=F64)
    return x, torch.randn(D, B, 3, generator=g, dtype=F64), torch.randint(0, 3, (D, B), generator=g)


def _results(model, init, shape, backend, **kw):
    x, y, labels = _data(shape)
    pre = gscfast.preactivation_stats(model, x, backend=backend, **kw)
    out = {
        "gsc_dot": gscfast.gsc(model, x, y, backend=backend, **kw),
        "gsc_kl": gscfast.gsc(model, x, labels, error="kl", backend=backend, **kw),
        "gsc_matrix": gscfast.gsc_matrix(model, x[0], y[0], backend=backend, **kw),
        # the same probes in C order: the engines hold feature maps channels-last
        "gsc_matrix_sketch": gscfast.gsc_matrix(
            model,
            x[0],
            y[0],
            backend=backend,
            method="sketch",
            probes=3,
            generator=torch.Generator().manual_seed(5),
            **kw,
        ),
        "preact_std": pre.std,
        "effective_depth": gscfast.effective_depth(model, init, x[0], y[0], backend=backend, **kw),
    }
    if kw.get("batchnorm") != "batch":
        out["jacobian"] = gscfast.jacobian(model, x[0], backend=backend, **kw)
        out["jacobian_inner"] = gscfast.jacobian(model, x[1], start=3, end=2, backend=backend, **kw)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(_models()))
def test_every_function_equals_the_reference(name, backend):
    model, shape, kw = _models()[name]
    model = _seed(model, 3)
    init = _seed(copy.deepcopy(model), 7)
    want = _results(model, init, shape, "reference", **kw)
    got = _results(model, init, shape, backend, **kw)
    for key in want:
        assert_results_close(got[key], want[key], f"{name} {backend} {key}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_feature_map_outputs_equal_the_reference(backend):
    """A model whose output ``f_1`` is a feature map (and whose layers hold them channels-last in
    the engines): ``dot`` targets, Jacobians at the output and inner boundaries (in C order, as
    the reference gives them), pre-activation statistics."""
    kw = dict(dtype=F64)
    model = _seed(
        nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1, **kw),
            nn.BatchNorm2d(3, **kw).eval(),
            nn.ReLU(),
            nn.Conv2d(3, 4, 2, **kw),
            nn.Tanh(),
            nn.AvgPool2d(2, 1),
            nn.Conv2d(4, 2, 1, **kw),
        ),
        4,
    )
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 2, 5, 6, generator=g, dtype=F64)
    y = torch.randn(2, 4, 2, 3, 4, generator=g, dtype=F64)

    def results(b):
        return {
            "gsc": gscfast.gsc(model, x, y, backend=b),
            "gsc_matrix": gscfast.gsc_matrix(model, x[0], y[0], backend=b),
            "jacobian": gscfast.jacobian(model, x[0], backend=b),
            "jacobian_inner": gscfast.jacobian(model, x[1], start=3, end=2, backend=b),
            "jacobian_out": gscfast.jacobian(model, x[1], start=2, end=1, backend=b),
            "preact_std": gscfast.preactivation_stats(model, x, backend=b).std,
        }

    want, got = results("reference"), results(backend)
    for key in want:
        assert_results_close(got[key], want[key], f"{backend} {key}")


def test_the_reference_equals_torch_func():
    """The oracle on feature maps: its Jacobians are ``vmap(jacrev)`` of the model (and of the
    code between two layer boundaries)."""
    model, shape, _ = _models()["cnn"]
    model = _seed(model, 5)
    x = _data(shape)[0][0]
    want = _per_sample(model, x)
    got = gscfast.jacobian(model, x, backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # f_3 = after the Tanh (model[6]), f_2 = after the ELU (model[9])
    head, mid = model[:7], model[7:10]
    want = _per_sample(mid, head(x))
    got = gscfast.jacobian(model, x, start=3, end=2, backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def _per_sample(f, x):
    """``[B, d_out, d_in]``: the diagonal blocks of ``jacrev`` of ``f`` on the batch (``BatchNorm2d``
    refuses the unbatched samples ``vmap`` would hand it)."""
    B = x.shape[0]
    J = torch.func.jacrev(f)(x).reshape(B, -1, B, x[0].numel())
    return J.diagonal(dim1=0, dim2=2).permute(2, 0, 1)


@pytest.mark.parametrize("name", ["cnn", "resnet-batch", "resnet-frozen"])
def test_compiled_feature_maps_equal_the_layers_path(name):
    """Two independent implementations: the analytic rules and hooks plus autograd
    (``layers=``, the activations' outputs named as boundaries)."""
    model, shape, kw = _models()[name]
    model = _seed(model, 4)
    x, y, _ = _data(shape, D=1)
    program = gscfast.compile_model(model)  # each layer's last module, by name
    names = [layer.ops[-1].path[len("model[") : -1] for layer in program.layers[:-1]]
    got = gscfast.gsc(model, x[0], y[0], **kw)
    want = gscfast.gsc(model, x[0], y[0], layers=names, **kw)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_float32_feature_maps_match_float64():
    model, shape, _ = _models()["cnn"]
    model = _seed(model, 6)
    x, y, _ = _data(shape)
    want = gscfast.gsc(model, x, y)
    got = gscfast.gsc(copy.deepcopy(model).float(), x.float(), y.float())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=0)


def test_the_model_is_not_changed():
    model, shape, kw = _models()["resnet-batch"]
    model = _seed(model, 2)
    before = copy.deepcopy(model.state_dict())
    x, y, _ = _data(shape)
    gscfast.gsc(model, x, y, **kw)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# ---------------------------------------------------------------- layout and refusals


def test_how_x_holds_samples():
    kw = dict(dtype=F64)
    conv = nn.Sequential(nn.Conv2d(2, 3, 3, **kw), nn.ReLU(), nn.Flatten(), nn.Linear(12, 3, **kw))
    x = torch.randn(2, 5, 2, 4, 4, dtype=F64)
    y = torch.randn(2, 5, 3, dtype=F64)
    both = gscfast.gsc(conv, x, y)  # [D, B, C, H, W]: pooled over the datasets' samples
    torch.testing.assert_close(gscfast.gsc(conv, x.flatten(0, 1), y.flatten(0, 1)), both)
    J = gscfast.jacobian(conv, x)
    assert J.shape == (2, 5, 3, 32)
    torch.testing.assert_close(J[1], gscfast.jacobian(conv, x[1]), rtol=0, atol=0)
    with pytest.raises(
        ValueError,
        match=r"x must be \[B, C, H, W\] or \[D, B, C, H, W\] .*"
        r"model\[0\], Conv2d, takes samples of 3 dimensions\), got shape \(5, 32\)",
    ):
        gscfast.gsc(conv, x[0].reshape(5, -1), y[0])
    # a model that starts with Flatten: [B, ...] feature maps, or [B, n] / [D, B, n] vectors
    mnist = _models()["mnist"][0]
    img = torch.randn(4, 1, 3, 4, dtype=F64)
    t = torch.randn(4, 3, dtype=F64)
    torch.testing.assert_close(
        gscfast.gsc(mnist, img, t), gscfast.gsc(mnist, img.reshape(4, 12), t)
    )
    J = gscfast.jacobian(mnist, img)
    assert J.shape == (4, 3, 12)  # flat: every element of a sample, C order
    torch.testing.assert_close(J, torch.func.vmap(torch.func.jacrev(mnist))(img).reshape(4, 3, 12))


def test_refusals_name_the_module():
    kw = dict(dtype=F64)
    x = torch.randn(3, 2, 5, 5, dtype=F64)
    cases = [
        (
            nn.Sequential(nn.Conv2d(3, 3, 3, **kw)),
            r"model\[0\] \(Conv2d\) expects feature maps \[3, H, W\] per sample but receives "
            r"\[2, 5, 5\]",
        ),
        (
            nn.Sequential(nn.Conv2d(2, 3, 7, **kw)),
            r"model\[0\] \(Conv2d\) does not take samples of shape \[2, 5, 5\]: .*Kernel size",
        ),
        (
            nn.Sequential(nn.Conv2d(2, 3, 3, **kw), nn.Flatten(), nn.Linear(20, 3, **kw)),
            r"model\[2\] \(Linear\) expects 20 features but receives 27",
        ),
        (
            nn.Sequential(gscfast.Residual(nn.Conv2d(2, 2, 3, **kw))),
            r"model\[0\] \(Residual\): its body maps samples of shape \[2, 5, 5\] to \[2, 3, 3\]",
        ),
        (
            nn.Sequential(nn.Conv2d(2, 3, 3, **kw), nn.BatchNorm1d(3, **kw)),
            r"model\[1\] \(BatchNorm1d\) expects \[3\] or \[3, L\] per sample but receives "
            r"\[3, 3, 3\]",
        ),
        (
            nn.Sequential(nn.Conv2d(2, 3, 3, **kw), nn.LayerNorm(4, **kw)),
            r"model\[1\] \(LayerNorm\) expects \[4\] in its last dimensions",
        ),
    ]
    for model, match in cases:
        with pytest.raises(ValueError, match=match):
            gscfast.gsc(model, x, torch.zeros(3, 1, dtype=F64), backend="torch")
    with pytest.raises(TypeError, match=r"model\[0\] \(MaxPool2d.*returns \(values, indices\)"):
        gscfast.compile_model(nn.Sequential(nn.MaxPool2d(2, return_indices=True)))
    fmap = nn.Sequential(nn.Conv2d(2, 3, 1, **kw))
    with pytest.raises(
        ValueError, match=r"error='kl' needs logits .* samples of shape \[3, 5, 5\]"
    ):
        gscfast.gsc(fmap, x, torch.zeros(3, dtype=torch.long), error="kl")
    with pytest.raises(
        ValueError, match=r"error='dot' needs y of the output's shape \(3, 3, 5, 5\)"
    ):
        gscfast.gsc(fmap, x, torch.zeros(3, 75, dtype=F64))
    # dot targets in the output's shape: fine
    gscfast.gsc(fmap, x, torch.zeros(3, 3, 5, 5, dtype=F64) + 1)


# ---------------------------------------------------------------- random convolutional models


@st.composite
def cnns(draw):
    """A random ``nn.Sequential`` CNN in float64 (convolutions with random options, every norm
    over channels in each mode, pooling, residual blocks, a generic module), its input shape and
    the ``batchnorm`` mode: ``(model, shape, mode, description)``."""
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    nd = draw(st.sampled_from([1, 2]))
    C = draw(st.integers(1, 3))
    shape = (C, *(draw(st.integers(3, 6)) for _ in range(nd)))
    conv = nn.Conv1d if nd == 1 else nn.Conv2d
    mods: list[nn.Module] = []
    desc: list[str] = []
    h = torch.zeros(2, *shape, dtype=F64)

    def add(m: nn.Module, name: str) -> bool:
        nonlocal h
        m = m.to(F64)
        try:
            with torch.no_grad():
                out = m.eval()(h) if isinstance(m, nn.modules.batchnorm._BatchNorm) else m(h)
        except RuntimeError:
            return False  # too small for it
        if out.numel() == 0:
            return False
        m.train()
        mods.append(m)
        desc.append(name)
        h = out
        return True

    for _ in range(draw(st.integers(1, 3))):
        c_in = h.shape[1]
        kind = draw(st.sampled_from(["conv", "conv", "residual", "pool"]))
        if kind == "conv":
            c_out = draw(st.integers(1, 4))
            groups = draw(st.sampled_from([d for d in (1, 2) if c_in % d == 0 and c_out % d == 0]))
            k, s = draw(st.integers(1, 3)), draw(st.integers(1, 2))
            pad = draw(st.sampled_from([0, 1, "same"])) if s == 1 else draw(st.integers(0, 1))
            mode = draw(st.sampled_from(["zeros", "reflect", "circular", "replicate"]))
            add(
                conv(c_in, c_out, k, s, pad, groups=groups, padding_mode=mode),
                f"conv{k}/{s}/{pad}/{mode}",
            )
        elif kind == "residual":
            body = nn.Sequential(conv(c_in, c_in, 3, padding=1), make_act("tanh"))
            add(gscfast.Residual(body, 0.5), "residual")
        else:
            pool = draw(st.sampled_from(["max", "avg"]))
            cls = {("max", 1): nn.MaxPool1d, ("max", 2): nn.MaxPool2d}.get((pool, nd))
            m = cls(2, ceil_mode=True) if cls else (nn.AvgPool1d if nd == 1 else nn.AvgPool2d)(2, 1)
            add(m, f"{pool}pool")
        c = h.shape[1]
        norm = draw(st.sampled_from([None, "bn", "bn_eval", "gn", "ln"]))
        if norm in ("bn", "bn_eval"):
            bn = (nn.BatchNorm1d if nd == 1 else nn.BatchNorm2d)(c)
            with torch.no_grad():
                bn.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
                bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            add(bn, norm)
            if norm == "bn_eval":
                mods[-1].eval()
        elif norm == "gn" and h[0].numel() > 2:  # torch refuses one value per group on N = 1
            add(nn.GroupNorm(1 if c % 2 else 2, c), "gn")
        elif norm == "ln":
            add(nn.LayerNorm(list(h.shape[1:])), "ln")
        if draw(st.booleans()):
            add(Gate(c) if nd == 2 else nn.Identity(), "gate")
        act = draw(st.sampled_from(["relu", "tanh", "elu", "softplus", "gelu"]))
        add(make_act(act), act)
    add(nn.Flatten(), "flatten")
    add(nn.Linear(h.shape[1], 3), "linear")
    model = nn.Sequential(*mods)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64) * 0.7)
    train_bn = any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules()
    )
    mode = draw(st.sampled_from(["batch", "frozen"])) if train_bn else "batch"
    return model, shape, mode, " ".join(desc)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cnns())
def test_random_cnns_equal_the_reference(case):
    """Random CNNs: every function on the torch engine equals the reference backend (the modules
    under autograd), float64."""
    model, shape, mode, desc = case
    init = _seed(copy.deepcopy(model), 9)
    kw = {"batchnorm": mode}
    want = _results(model, init, shape, "reference", **kw)
    got = _results(model, init, shape, "torch", **kw)
    for key in want:
        assert_results_close(got[key], want[key], f"{desc} ({mode}) {key}")
