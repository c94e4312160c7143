"""Random supported models and inputs for the cross-backend tests (hypothesis strategies).

A drawn ``Case`` holds a model, inputs and labels, all built from one seed so a failure
reproduces from the printed example.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from torch import nn

import gscfast

ACTS = [
    "relu",
    "tanh",
    "selu",
    "sigmoid",
    "gelu",
    "gelu_tanh",
    "leaky_relu",
    "elu",
    "softplus",
    "identity",
]
NORMS = [None, "layer", "layer_affine", "batch", "batch_affine"]


def make_act(name: str) -> nn.Module:
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    if name == "leaky_relu":
        return nn.LeakyReLU(0.07)
    if name == "elu":
        return nn.ELU(0.8)
    if name == "softplus":
        return nn.Softplus(beta=1.5, threshold=3.0)  # a low threshold exercises both branches
    return gscfast.nn.ACTIVATIONS[name]()


def make_norm(kind: str | None, d: int, bn_eval: bool, g: torch.Generator) -> list[nn.Module]:
    if kind is None:
        return []
    affine = kind.endswith("affine")
    if kind.startswith("layer"):
        m = nn.LayerNorm(d, elementwise_affine=affine)
    else:
        m = nn.BatchNorm1d(d, affine=affine)
        with torch.no_grad():
            m.running_mean.copy_(torch.randn(d, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(d, generator=g) + 0.5)
        if bn_eval:
            m.eval()
    if affine:
        with torch.no_grad():
            m.weight.copy_(1 + 0.3 * torch.randn(d, generator=g))
            m.bias.copy_(0.3 * torch.randn(d, generator=g))
    return [m]


@dataclass
class Case:
    model: nn.Sequential
    x: torch.Tensor
    y: torch.Tensor
    labels: torch.Tensor
    couples: bool
    desc: str

    def __repr__(self) -> str:
        return f"Case({self.desc}, x={tuple(self.x.shape)})"


@st.composite
def cases(
    draw,
    *,
    dtype=torch.float64,
    max_depth: int = 12,
    max_width: int = 40,
    batchnorm: bool = True,
    datasets: bool = True,
    max_batch: int = 5,
) -> Case:
    """A random supported model with inputs ``x [B, n]`` or ``[D, B, n]`` and targets."""
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    depth = draw(st.integers(1, max_depth))
    # Norms are scale-invariant: behind a bottleneck of one or two features their Jacobian is
    # only the eps term and results are dominated by rounding. Models with norms get widths >= 3.
    use_norms = draw(st.booleans())
    lo = 3 if use_norms else 1
    n_in = draw(st.integers(lo, max(lo, max_width)))
    bn_eval = draw(st.booleans())
    norms = NORMS if batchnorm else [n for n in NORMS if n is None or n.startswith("layer")]
    layers: list[nn.Module] = []
    desc = []
    d = n_in
    for _ in range(depth):
        act = draw(st.sampled_from(ACTS))
        bias = draw(st.booleans())
        residual = draw(st.booleans())
        out = d if residual else draw(st.integers(lo, max(lo, max_width)))
        norm = draw(st.sampled_from(norms)) if use_norms else None
        lin = nn.Linear(d, out, bias=bias)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(out, d, generator=g) * math.sqrt(1.5 / d))
            if bias:
                lin.bias.copy_(0.2 * torch.randn(out, generator=g))
        block = [lin, *make_norm(norm, out, bn_eval, g), make_act(act)]
        if residual:
            layers.append(
                gscfast.nn.Residual(nn.Sequential(*block), scale=draw(st.sampled_from([1.0, 0.5])))
            )
        else:
            # Nest some layers in Sequentials: the compiler must flatten them.
            layers.append(nn.Sequential(*block) if draw(st.booleans()) else block[0])
            if not isinstance(layers[-1], nn.Sequential):
                layers.extend(block[1:])
        desc.append(f"{'res' if residual else ''}{norm or ''}{'+b' if bias else ''}:{act}:{out}")
        d = out
    if draw(st.booleans()):  # a final linear layer without activation
        out = draw(st.integers(lo, max(lo, max_width)))
        layers.append(nn.Linear(d, out, bias=draw(st.booleans())))
        with torch.no_grad():
            layers[-1].weight.copy_(torch.randn(out, d, generator=g) / math.sqrt(d))
        desc.append(f"linear:{out}")
        d = out
    model = nn.Sequential(*layers).to(dtype)
    couples = gscfast.compile_model(model).couples_batch
    B = draw(st.integers(3 if couples else 1, max(3, max_batch)))  # (see norms above)
    D = draw(st.sampled_from([None, 1, 2])) if datasets else None
    lead = (B,) if D is None else (D, B)
    x = torch.randn(*lead, n_in, generator=g, dtype=torch.float64).to(dtype)
    # Targets agree in sign with the outputs, so f_0 = sum <y_i, out_i> has no cancellation: an
    # error near 0 would make every GSC ill-conditioned and float32 comparisons meaningless.
    with torch.no_grad():
        probe = copy.deepcopy(model).double()
        xs = x.double() if D is not None else x.double()[None]
        out = torch.stack([probe(xi) for xi in xs]).reshape(*lead, d)
    y = (torch.randn(*lead, d, generator=g, dtype=torch.float64).abs() * out.sign()).to(dtype)
    labels = torch.randint(0, d, lead, generator=g)
    return Case(model, x, y, labels, couples, " ".join(desc))


def norm_condition(case: Case) -> float:
    """How much a normalization's centring amplifies rounding: the largest ``max|x| / std(x)`` of
    a statistic-computing norm's input over its normalized axis (train-mode batch norm: the batch;
    layer norm: the features). ``x - mean`` loses ``log2`` of it in bits, and a norm of an input
    that is constant along that axis (``inf``) has an output that is pure rounding noise."""
    model = copy.deepcopy(case.model).double()  # a train-mode batch norm updates running stats
    worst = [0.0]

    def hook(mod, args):
        (h,) = args
        dim = 0 if isinstance(mod, nn.BatchNorm1d) else -1
        std = h.std(dim, unbiased=False)
        ratio = h.abs().amax(dim) / std
        ratio[h.abs().amax(dim) == 0] = 0.0  # an all-zero input normalizes to exact zeros
        worst[0] = max(worst[0], float(ratio.max()))

    handles = [
        m.register_forward_pre_hook(hook)
        for m in model.modules()
        if isinstance(m, nn.LayerNorm) or (isinstance(m, nn.BatchNorm1d) and m.training)
    ]
    try:
        with torch.no_grad():
            xs = case.x.double() if case.x.dim() == 3 else case.x.double()[None]
            for xi in xs:
                model(xi)
    finally:
        for h in handles:
            h.remove()
    return worst[0]


def to64(case: Case) -> Case:
    """The same case in float64 (the ground truth for float32 results)."""
    return Case(
        copy.deepcopy(case.model).double(),
        case.x.double(),
        case.y.double(),
        case.labels,
        case.couples,
        case.desc,
    )


def assert_results_close(got, want, where: str) -> None:
    """Float64 results of two backends agree (tuples item by item, ints exactly)."""
    if isinstance(want, tuple):
        for g, w in zip(got, want):
            assert_results_close(g, w, where)
        return
    if isinstance(want, int):
        assert got == want, where
        return
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, equal_nan=True, msg=where)


def seed_parameters(model: nn.Module, seed: int, scale: float) -> nn.Module:
    """``model`` with every parameter redrawn ``N(0, scale^2)`` from ``seed`` (in place)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return model
