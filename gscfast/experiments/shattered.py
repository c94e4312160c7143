"""Shattered gradients at initialization (Balduzzi et al. 2017, "The shattered gradients problem:
if resnets are the answer, then what is the question?").

Networks with a scalar input and output, evaluated on a grid of 256 points in [-2, 2]: for each
network and each of 100 random initializations, the gradient d out / d x at every grid point;
its autocorrelation along the grid (per initialization, mean removed, 1 at lag 0, then averaged)
and the correlation matrix R(i, j) of the gradients at grid points i, j over the initializations
(definitions.md, "Shattered gradients"). Measured correlations are reported beside the paper's
predictions, 1/2^L for feedforward ReLU nets of depth L (Theorem 1) and ~1/(beta sqrt(L)) for
resnets with batch norm and beta-rescaling (Theorem 3), and, for the plain ReLU nets, beside the exact
infinite-width correlation of this very setup (``wide_relu_correlation``), which says why they do
not reach 1/2^L: on a one-dimensional grid their activation patterns at two points are not
independent, the assumption behind 1/2^L.

Networks (width 200, He initialization: weight variance 2/fan_in; random biases N(0, bias_std^2),
default 0.3, because a bias-free scalar ReLU net is positively homogeneous and its gradient is
constant on each side of 0):

  ReLU-L        L x (Linear -> ReLU), Linear(200, 1)
  batch-ReLU-L  L x (Linear -> BatchNorm1d -> ReLU), Linear(200, 1)
  resnet-L      Linear(1, 200), (L-2)/2 blocks x + beta body(x) with body Linear -> BN -> ReLU ->
                Linear -> BN -> ReLU, Linear(200, 1): L linear layers
  preresnet-L   Theorem 3's module: Linear(1, 200), L-2 blocks x + beta Linear(ReLU(BN(x))),
                Linear(200, 1): L linear layers (--beta: the paper's beta-rescaling, default 1)
  ll-ReLU-L     looks-linear: L x (Linear -> CReLU), mirrored weights [W0, -W0], so the net is
                exactly affine at initialization (--looks-linear adds one)

Gradients come from gscfast.jacobian(model, x, batchnorm="frozen") (the grid's batch-norm
statistics held constant: the derivative of the function the network computes on this grid);
networks gscfast cannot compile (CReLU) use torch.func.vmap(jacrev) on the same frozen function.
One job is one (network, chunk of initializations); ``gscfast.experiments.runner`` runs and stores
them. The previous default run (6 networks x 100 initializations, float64) took about 4 minutes on
this project's shared 2-core CPU (4.6 minutes with --looks-linear); building the float64 networks
costs about as much as their gradients. The three preresnet nets (6 + 24 + 48 one-layer blocks)
add about the cost of 1.6 resnet-50s; the current default has not been timed at full scale.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..nn import CReLU, Residual, freeze_batchnorm, init_weight, mlp
from .outputs import (
    add_study_arguments,
    check_integers,
    check_numbers,
    config_from_args,
    config_section,
    expand_names,
    figure_files,
    fmt,
    invocation_line,
    num,
    pyplot,
    resolve_device,
    resolve_dtype,
    run_command,
    run_timings,
    save_figure,
    sci,
    text_file,
    write_files,
)
from .runner import Job, Study, job_seed

__all__ = [
    "DEFAULT_ARCHS",
    "KINDS",
    "add_arguments",
    "aggregate",
    "autocorrelation",
    "check_result",
    "correlation_matrix",
    "expand_archs",
    "gradient_method",
    "grid",
    "input_gradients",
    "main",
    "make_config",
    "make_model",
    "make_study",
    "parse_arch",
    "predicted_correlation",
    "run_job",
    "summary_md",
    "table",
    "theorem3_correlation",
    "theorem3_variance",
    "wide_relu_correlation",
    "write_outputs",
]

NAME = "shattered"
HELP = "shattered gradients (Balduzzi et al. 2017): gradient autocorrelation and R(i, j) at init"

KINDS = ("ReLU", "batch-ReLU", "resnet", "preresnet", "ll-ReLU")
# The paper's feedforward depths 1, 24, 50 and its 50-layer resnet, plus the batch-norm
# feedforward nets that the paper's networks are compared with "despite batch normalization", and
# nets of 6, 24 and 48 of Theorem 3's residual modules (24: resnet-50's number of blocks).
DEFAULT_ARCHS = [
    "ReLU-1",
    "ReLU-24",
    "ReLU-50",
    "batch-ReLU-24",
    "batch-ReLU-50",
    "resnet-50",
    "preresnet-8",
    "preresnet-26",
    "preresnet-50",
]
BIAS_STD = 0.3
BETA = 1.0
_ARCH = re.compile(r"(ReLU|batch-ReLU|preresnet|resnet|ll-ReLU)-([0-9]+)")
_KIND_TEXT = {
    "ReLU": "feedforward: L x (Linear -> ReLU), then Linear(width, 1)",
    "batch-ReLU": "feedforward: L x (Linear -> BatchNorm1d -> ReLU), then Linear(width, 1)",
    "resnet": "Linear(1, width), (L-2)/2 blocks x + beta [Linear -> BN -> ReLU -> Linear -> BN -> ReLU](x), "
    "Linear(width, 1)",
    "preresnet": "Theorem 3's module: Linear(1, width), L-2 blocks x + beta Linear(ReLU(BN(x))), "
    "Linear(width, 1)",
    "ll-ReLU": "looks-linear: L x (Linear -> CReLU) with mirrored weights [W0, -W0], then Linear(2 width, 1)",
}


# ----------------------------------------------------------------------------- architectures
def parse_arch(name: str) -> dict[str, Any]:
    """``"ReLU-24"`` -> ``{"kind": "ReLU", "depth": 24, "theory_L": 24}``. ``depth`` counts the
    hidden layers (feedforward, looks-linear) or all linear layers (``resnet-L``: a stem, (L-2)/2
    two-layer blocks and a head, so L is even and at least 4; ``preresnet-L``: a stem, L-2
    one-layer blocks and a head, L >= 3); ``theory_L`` is the L of the paper's prediction (hidden
    layers; residual blocks for resnets)."""
    m = _ARCH.fullmatch(name)
    if m is None:
        raise ValueError(
            f"unknown architecture {name!r}: use ReLU-L, batch-ReLU-L, resnet-L, "
            f"preresnet-L or ll-ReLU-L with a depth L (e.g. ReLU-24, resnet-50)"
        )
    kind, depth = m.group(1), int(m.group(2))
    if kind == "resnet":
        if depth < 4 or depth % 2:
            raise ValueError(
                f"{name}: a resnet-L has a stem, (L-2)/2 two-layer blocks and a head, "
                f"so L must be even and at least 4"
            )
        return {"kind": kind, "depth": depth, "theory_L": (depth - 2) // 2}
    if kind == "preresnet":
        if depth < 3:
            raise ValueError(
                f"{name}: a preresnet-L has a stem, L-2 one-layer blocks and a head, "
                f"so L must be at least 3"
            )
        return {"kind": kind, "depth": depth, "theory_L": depth - 2}
    if depth < 1:
        raise ValueError(f"{name}: the depth must be at least 1")
    return {"kind": kind, "depth": depth, "theory_L": depth}


def expand_archs(names: list[str] | None, looks_linear: bool = False) -> list[str]:
    """Architecture names, checked, without repeats (default ``DEFAULT_ARCHS``); ``looks_linear``
    adds ``ll-ReLU-L`` for the deepest network given."""
    out = expand_names(names or DEFAULT_ARCHS, {}, parse_arch)
    if looks_linear:
        ll = f"ll-ReLU-{max(parse_arch(a)['depth'] for a in out)}"
        if ll not in out:
            out.append(ll)
    return out


def theorem3_variance(blocks: int, beta: float = BETA) -> float:
    """Theorem 3(a) of Balduzzi et al.: the gradient variance ``beta^2 (L - 1) + 1`` of a resnet
    with batch norm and beta-rescaling, here with ``L - 1 = blocks`` (a net without blocks has
    variance 1)."""
    return 1.0 + blocks * beta**2


def theorem3_correlation(blocks: int, beta: float = BETA) -> float:
    """The correlation of Theorem 3's model evaluated exactly (the paper states only its order,
    ``~ 1/(beta sqrt(L))``). Block ``k`` (0-based) is ``x + beta W relu(BN(x))`` with He weights;
    batch norm divides the branch by the standard deviation of ``x``, whose variance is
    ``1 + k beta^2`` (each block adds ``beta^2``), so a block multiplies the gradient variance by
    ``1 + beta^2 / (1 + k beta^2)`` and, at two inputs whose activation patterns are independent
    (each unit active with probability 1/2, co-active with 1/4), the covariance by
    ``1 + beta^2 / (2 (1 + k beta^2))``. The product of the variance factors telescopes to
    Theorem 3(a), ``theorem3_variance``; the covariance grows like ``beta sqrt(blocks)`` (3b)."""
    cov = 1.0
    for k in range(blocks):
        cov *= 1.0 + beta**2 / (2.0 * (1.0 + k * beta**2))
    return cov / theorem3_variance(blocks, beta)


def predicted_correlation(name: str, beta: float = BETA) -> float:
    """The paper's correlation between gradients at two inputs whose activation patterns are
    independent: 1/2^L for feedforward ReLU nets (with or without batch norm) of depth L
    (Theorem 1), ``theorem3_correlation`` for resnets of L blocks with branch scale ``beta``
    (Theorem 3, ~ 1/(beta sqrt(L))), and 1 for the looks-linear net (linear at initialization,
    so its gradient is the same everywhere)."""
    a = parse_arch(name)
    if a["kind"] in ("resnet", "preresnet"):
        return theorem3_correlation(a["theory_L"], beta)
    if a["kind"] == "ll-ReLU":
        return 1.0
    return 0.5 ** a["theory_L"]


def _relu_kernel(kxx: np.ndarray, kxy: np.ndarray, kyy: np.ndarray) -> np.ndarray:
    """``E[relu(u) relu(v)]`` for centred Gaussians with variances ``kxx, kyy`` and covariance
    ``kxy`` (the arc-cosine kernel of degree 1)."""
    d = np.sqrt(kxx * kyy)
    c = np.clip(kxy / d, -1.0, 1.0)
    theta = np.arccos(c)
    return d / (2.0 * np.pi) * (np.sin(theta) + (np.pi - theta) * c)


def _relu_output_kernel(a: np.ndarray, b: np.ndarray, depth: int, bias_std: float) -> np.ndarray:
    """Covariance over initializations of the outputs at inputs ``a`` and ``b`` of an infinitely
    wide ``ReLU-depth`` net as ``make_model`` draws it (first-layer weight variance 2, He 2/fan_in
    after it, biases N(0, bias_std^2)), up to the output layer's scale and bias (which do not
    change a correlation)."""
    sb2 = bias_std**2
    kaa, kab, kbb = 2.0 * a * a + sb2, 2.0 * a * b + sb2, 2.0 * b * b + sb2
    for _ in range(depth - 1):
        kaa, kab, kbb = (
            sb2 + 2.0 * _relu_kernel(kaa, kaa, kaa),
            sb2 + 2.0 * _relu_kernel(kaa, kab, kbb),
            sb2 + 2.0 * _relu_kernel(kbb, kbb, kbb),
        )
    return _relu_kernel(kaa, kab, kbb)


def wide_relu_correlation(
    x: np.ndarray, depth: int, bias_std: float = BIAS_STD, h: float = 1e-4
) -> np.ndarray:
    """``R [P, P]``: the exact correlation over initializations of ``d out / d x`` at the points
    ``x [P]`` for an infinitely wide ``ReLU-depth`` net of this study. The output is then a
    Gaussian process, its derivative one with covariance ``d^2 K(a, b) / da db``, taken here by
    central differences (step ``h``) of the output covariance ``K``. Theorem 1's ``1/2^L`` is the
    special case in which the pre-activations at the two inputs are uncorrelated in every layer
    (independent activation patterns); on a one-dimensional grid they are not."""
    x = np.asarray(x, dtype=np.float64).ravel()
    a, b = np.meshgrid(x, x, indexing="ij")
    k = lambda da, db: _relu_output_kernel(a + da, b + db, depth, bias_std)  # noqa: E731
    cov = (k(h, h) - k(h, -h) - k(-h, h) + k(-h, -h)) / (4.0 * h * h)
    s = np.sqrt(np.diag(cov))
    return cov / np.outer(s, s)


# ----------------------------------------------------------------------------- networks
def _linear(
    n_in: int, n_out: int, var: float, gen: torch.Generator, dtype: torch.dtype
) -> nn.Linear:
    lin = nn.Linear(n_in, n_out, dtype=dtype)
    init_weight(lin.weight, var, "gaussian", gen)
    return lin


def _mirrored(
    n_in: int, n_out: int, var: float, gen: torch.Generator, dtype: torch.dtype
) -> nn.Linear:
    """``Linear(2 n_in, n_out)`` with weight ``[W0, -W0]``: after a CReLU it computes ``W0 h``."""
    half = _linear(n_in, n_out, var, gen, dtype)
    lin = nn.Linear(2 * n_in, n_out, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.cat([half.weight, -half.weight], dim=1))
    return lin


def _random_biases(model: nn.Module, std: float, gen: torch.Generator) -> None:
    """Every Linear bias (in module order) i.i.d. N(0, std^2), drawn in float64 so that the
    network does not depend on the dtype."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen, dtype=torch.float64) * std)


def make_model(
    name: str,
    width: int,
    seed: int,
    *,
    bias_std: float = BIAS_STD,
    beta: float = BETA,
    dtype: torch.dtype = torch.float64,
) -> nn.Sequential:
    """The network ``name`` (see the module docstring) with scalar input and output, seeded
    (private generators; the global RNG is untouched), in train mode.

    Weights: He (variance 2/fan_in) in every ReLU layer, 1/fan_in in the output layer
    (``gscfast.mlp``'s default; it only scales the gradients); the looks-linear net uses
    variance 1/width for its mirrored halves W0 (its effective linear maps) and 1 for its first
    layer. Biases: N(0, bias_std^2) everywhere (in front of a batch norm they cancel). ``beta``
    scales the residual branches (``gscfast.nn.Residual(body, beta)``; the paper's beta-rescaling).
    """
    a = parse_arch(name)
    kind, L = a["kind"], a["depth"]
    gen = torch.Generator().manual_seed(job_seed(seed, "ends"))
    if kind in ("ReLU", "batch-ReLU"):
        model = mlp(
            L,
            width,
            act="relu",
            norm="batch" if kind == "batch-ReLU" else None,
            in_features=1,
            out_features=1,
            bias=True,
            seed=int(seed),
            dtype=dtype,
        )
    elif kind == "resnet":
        # Each block's body is gscfast.mlp's two-layer batch-ReLU stack.
        blocks = [
            Residual(
                mlp(
                    2,
                    width,
                    act="relu",
                    norm="batch",
                    bias=True,
                    seed=job_seed(seed, "block", k),
                    dtype=dtype,
                ),
                beta,
            )
            for k in range(a["theory_L"])
        ]
        model = nn.Sequential(
            _linear(1, width, 2.0, gen, dtype), *blocks, _linear(width, 1, 1.0 / width, gen, dtype)
        )
    elif kind == "preresnet":
        # Theorem 3's module: batch norm on the branch's input, one He-initialized ReLU layer.
        stem = _linear(1, width, 2.0, gen, dtype)
        blocks = [
            Residual(
                nn.Sequential(
                    nn.BatchNorm1d(width, affine=False, dtype=dtype),
                    nn.ReLU(),
                    _linear(width, width, 2.0 / width, gen, dtype),
                ),
                beta,
            )
            for _ in range(a["theory_L"])
        ]
        model = nn.Sequential(stem, *blocks, _linear(width, 1, 1.0 / width, gen, dtype))
    else:
        layers: list[nn.Module] = [_linear(1, width, 1.0, gen, dtype)]
        for _ in range(L - 1):
            layers += [CReLU(), _mirrored(width, width, 1.0 / width, gen, dtype)]
        model = nn.Sequential(*layers, CReLU(), _mirrored(width, 1, 1.0 / width, gen, dtype))
    _random_biases(model, bias_std, torch.Generator().manual_seed(job_seed(seed, "biases")))
    return model.train()


# ----------------------------------------------------------------------------- gradients
def gradient_method(model: nn.Module) -> str:
    """``"gscfast"`` when gscfast compiles ``model`` with analytic rules only, else
    ``"torch.func"`` (CReLU, which gscfast's generic rule would take through torch.func too)."""
    from ..compiler import compile_model

    try:
        generic = compile_model(model).generic
    except TypeError:
        return "torch.func"
    return "torch.func" if generic else "gscfast"


def input_gradients(model: nn.Module, x: Tensor, *, method: str = "auto") -> Tensor:
    """``d out / d x`` at every point of ``x [P, 1]`` for a model with scalar input and output:
    ``[P]``. Batch norms with batch statistics use those of ``x``, held constant (the derivative
    at each point of the function the network computes on this grid).

    ``method``: ``"gscfast"`` (``gscfast.jacobian(model, x, batchnorm="frozen")``),
    ``"torch.func"`` (``vmap(jacrev)`` of ``freeze_batchnorm(model, x)``, for any model), or
    ``"auto"``: gscfast when it compiles the model.
    """
    if x.dim() != 2 or x.shape[1] != 1:
        raise ValueError(f"x must be [P, 1] (scalar inputs), got {tuple(x.shape)}")
    if method == "auto":
        method = gradient_method(model)
    if method == "gscfast":
        from ..api import jacobian

        J = jacobian(model, x, batchnorm="frozen")
    elif method == "torch.func":
        frozen = freeze_batchnorm(model, x)
        # One sample at a time as a batch of one (BatchNorm1d wants [N, C]).
        J = torch.func.vmap(torch.func.jacrev(lambda t: frozen(t[None])[0]))(x)
    else:
        raise ValueError(f"method must be auto, gscfast or torch.func, got {method!r}")
    if J.shape[1:] != (1, 1):
        raise ValueError(f"the model must map [P, 1] to [P, 1]; its Jacobian is {tuple(J.shape)}")
    return J[:, 0, 0].detach()


def grid(points: int, low: float, high: float) -> Tensor:
    """The inputs: ``points`` equally spaced values in ``[low, high]``, ``[points, 1]`` float64."""
    return torch.linspace(low, high, points, dtype=torch.float64)[:, None]


# ----------------------------------------------------------------------------- statistics
def autocorrelation(g: np.ndarray) -> np.ndarray:
    """Autocorrelation of each row of ``g [E, P]`` along the grid, lags ``0..P-1``:
    ``a(k) = sum_i d_i d_{i+k} / sum_i d_i^2`` with ``d = g - mean(g)`` (the usual biased
    estimator: 1 at lag 0). A row that is constant along the grid gives NaN."""
    g = np.atleast_2d(np.asarray(g, dtype=np.float64))
    d = g - g.mean(axis=1, keepdims=True)
    P = g.shape[1]
    # Full correlation by FFT, zero-padded to avoid wrap-around.
    f = np.fft.rfft(d, n=2 * P, axis=1)
    c = np.fft.irfft(f * np.conj(f), n=2 * P, axis=1)[:, :P]
    c0 = (d * d).sum(axis=1)  # exact lag 0 (not the FFT's rounding)
    with np.errstate(all="ignore"):
        out = c / c0[:, None]
    out[:, 0] = 1.0
    out[~_varies(g)] = np.nan
    return out


def _varies(g: np.ndarray) -> np.ndarray:
    """Rows of ``g`` that are not constant along the grid up to rounding (the looks-linear
    net's gradients are constant: their spread is at the level of float rounding)."""
    scale = np.abs(g).max(axis=1)
    return (g.max(axis=1) - g.min(axis=1)) > 1e3 * np.finfo(np.float32).eps * scale


def correlation_matrix(g: np.ndarray) -> np.ndarray:
    """``R [P, P]``: the Pearson correlation over initializations (rows of ``g [E, P]``) of the
    gradients at grid points ``i`` and ``j``."""
    d = g - g.mean(axis=0)
    cov = d.T @ d
    s = np.sqrt(np.diag(cov))
    with np.errstate(all="ignore"):
        return cov / np.outer(s, s)


def _mean_off_diagonal(R: np.ndarray) -> float:
    P = R.shape[0]
    return float((np.nansum(R) - np.nansum(np.diag(R))) / (P * P - P))


def _jackknife_se(g: np.ndarray) -> float:
    """Jackknife standard error (over initializations) of the mean off-diagonal R(i, j)."""
    E = g.shape[0]
    if E < 3:
        return math.nan
    loo = np.array(
        [_mean_off_diagonal(correlation_matrix(np.delete(g, k, axis=0))) for k in range(E)]
    )
    return float(math.sqrt((E - 1) / E * ((loo - loo.mean()) ** 2).sum()))


def _first_below(a: np.ndarray, level: float) -> int | None:
    idx = np.flatnonzero(a < level)
    return int(idx[0]) if len(idx) else None


# ----------------------------------------------------------------------------- one job
def run_job(config: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """One (network, chunk of initializations) job: each seeded network's gradients on the grid."""
    device, dtype = resolve_device(config["device"]), resolve_dtype(config["dtype"])
    x = grid(config["points"], config["low"], config["high"]).to(device=device, dtype=dtype)
    grads, method = [], None
    for seed in spec["net_seeds"]:
        model = make_model(
            spec["arch"],
            config["width"],
            seed,
            bias_std=config["bias_std"],
            beta=config["beta"],
            dtype=dtype,
        ).to(device)
        method = method or gradient_method(model)
        grads.append(input_gradients(model, x, method=method).double().cpu().tolist())
    return {"gradients": grads, "method": method, "device": str(device)}


def check_result(config: dict, spec: dict, result: dict) -> None:
    """Raises ``ValueError`` unless ``result`` looks like ``run_job``'s."""
    g = result.get("gradients")
    n, P = len(spec["net_seeds"]), config["points"]
    if not isinstance(g, list) or len(g) != n:
        raise ValueError(f"'gradients' is not a list of {n} gradients")
    for i, row in enumerate(g):
        check_numbers(row, f"'gradients'[{i}]", P)
    if result.get("method") not in ("gscfast", "torch.func"):
        raise ValueError("'method' is not gscfast or torch.func")


# ----------------------------------------------------------------------------- the study
def make_config(
    *,
    archs: list[str] | None = None,
    looks_linear: bool = False,
    ensemble: int = 100,
    chunk: int = 10,
    points: int = 256,
    low: float = -2.0,
    high: float = 2.0,
    width: int = 200,
    bias_std: float = BIAS_STD,
    beta: float = BETA,
    seed: int = 0,
    device: str = "auto",
    dtype: str = "float64",
) -> dict[str, Any]:
    """The study's configuration (the paper's scale by default), checked."""
    archs = expand_archs(archs, looks_linear)
    check_integers(
        ("ensemble", ensemble, 2, " (correlations are taken over the ensemble)"),
        ("chunk", chunk, 1),
        ("points", points, 4),
        ("width", width, 1),
    )
    low, high, bias_std, beta = float(low), float(high), float(bias_std), float(beta)
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"need finite low < high, got low={low}, high={high}")
    if not (math.isfinite(bias_std) and bias_std >= 0):
        raise ValueError(f"bias_std must be finite and >= 0, got {bias_std}")
    if not (math.isfinite(beta) and beta >= 0):
        raise ValueError(f"beta (the residual branch scale) must be finite and >= 0, got {beta}")
    resolve_dtype(dtype)
    return {
        "archs": archs,
        "ensemble": ensemble,
        "chunk": chunk,
        "points": points,
        "low": low,
        "high": high,
        "width": width,
        "bias_std": bias_std,
        "beta": beta,
        "seed": int(seed),
        "device": device,
        "dtype": dtype,
    }


def make_study(config: dict[str, Any]) -> Study:
    """Jobs ``<arch>.<first member>``, architecture-major, ``chunk`` initializations each.
    Member ``m`` of network ``arch`` has seed ``job_seed(seed, "net", arch, m)``, so the numbers
    do not depend on the chunk size, job order, engine or resume."""
    jobs = []
    for arch in config["archs"]:
        for first in range(0, config["ensemble"], config["chunk"]):
            members = range(first, min(first + config["chunk"], config["ensemble"]))
            jobs.append(
                Job(
                    f"{arch}.{first:05d}",
                    {
                        "arch": arch,
                        "first": first,
                        "net_seeds": [job_seed(config["seed"], "net", arch, m) for m in members],
                    },
                )
            )
    return Study(NAME, config, jobs, run_job, check_result, gpu=config["device"] != "cpu")


# ----------------------------------------------------------------------------- aggregation
def _gradients(config: dict, records: dict, arch: str) -> tuple[np.ndarray, list[int], str]:
    """``([E, P] gradients in member order, net seeds, method)`` of ``arch`` from the records."""
    recs = sorted(
        (r for r in records.values() if r["spec"]["arch"] == arch), key=lambda r: r["spec"]["first"]
    )
    g = np.array([row for r in recs for row in r["result"]["gradients"]], dtype=np.float64)
    seeds = [s for r in recs for s in r["spec"]["net_seeds"]]
    return g, seeds, recs[0]["result"]["method"]


def _noise_references(config: dict) -> dict[str, list[float]]:
    """Mean autocorrelation of white noise and of brown noise (a random walk) with the grid's
    length and the ensemble's size, by the same estimator (seeded)."""
    rng = np.random.default_rng(job_seed(config["seed"], "noise-references"))
    white = rng.standard_normal((config["ensemble"], config["points"]))
    return {
        "white": autocorrelation(white).mean(axis=0).tolist(),
        "brown": autocorrelation(np.cumsum(white, axis=1)).mean(axis=0).tolist(),
    }


def _theory(config: dict[str, Any], arch: str, g: np.ndarray) -> dict[str, Any]:
    """What theory says for ``arch`` in this very setup: for plain ReLU nets the exact
    infinite-width correlation (``wide_relu_correlation``: its mean over pairs, at lag 1 and by
    lag); for resnets Theorem 3's variance beside the measured one. ``None`` where not defined."""
    a = parse_arch(arch)
    out: dict[str, Any] = {
        "wide_R": None,
        "wide_R_lag1": None,
        "wide_R_by_lag": None,
        "theorem3_variance": None,
        "variance_ratio": None,
        "asymptotic": None,
    }
    if a["kind"] == "ReLU":
        x = grid(config["points"], config["low"], config["high"])[:, 0].numpy()
        R = wide_relu_correlation(x, a["depth"], config["bias_std"])
        by_lag = [float(np.diagonal(R, k).mean()) for k in range(config["points"])]
        out.update(wide_R=_mean_off_diagonal(R), wide_R_lag1=by_lag[1], wide_R_by_lag=by_lag)
    elif a["kind"] in ("resnet", "preresnet"):
        n, beta = a["theory_L"], config["beta"]
        # Without blocks the gradient is v . w (stem variance 2, head 1/width): variance 2.
        out.update(
            theorem3_variance=theorem3_variance(n, beta),
            variance_ratio=float((g**2).mean()) / 2.0 / theorem3_variance(n, beta),
            asymptotic=None if beta == 0 else 1.0 / (beta * math.sqrt(n)),
        )
    return out


def aggregate(config: dict[str, Any], records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every number of the study from the job records (R(i, j) is computed here, never stored
    per job): per network the mean autocorrelation, R by lag, the mean off-diagonal R with its
    jackknife standard error, the paper's prediction, the theory for this setup (``_theory``),
    and one initialization's gradients."""
    archs: dict[str, Any] = {}
    for arch in config["archs"]:
        g, seeds, method = _gradients(config, records, arch)
        acf = autocorrelation(g)
        varies = ~np.isnan(acf[:, 1])
        R = correlation_matrix(g)
        by_lag = np.array([np.nanmean(np.diagonal(R, k)) for k in range(config["points"])])
        mean_acf = acf[varies].mean(axis=0) if varies.any() else np.full(config["points"], np.nan)
        spread = (g.max(axis=1) - g.min(axis=1)) / np.abs(g).max(axis=1)
        archs[arch] = {
            **parse_arch(arch),
            "method": method,
            "predicted": predicted_correlation(arch, config["beta"]),
            "mean_R": _mean_off_diagonal(R),
            "mean_R_se": _jackknife_se(g),
            "R_lag1": float(by_lag[1]),
            "acf_lag1": float(mean_acf[1]),
            "half_lag": _first_below(mean_acf, 0.5),
            "constant_members": int((~varies).sum()),
            "max_relative_spread": float(spread.max()),
            "gradient_rms": float(np.sqrt((g**2).mean())),
            **_theory(config, arch, g),
            "acf": mean_acf.tolist(),
            "R_by_lag": by_lag.tolist(),
            "example": {"member": 0, "net_seed": seeds[0], "gradient": g[0].tolist()},
            "net_seeds": seeds,
        }
    x = grid(config["points"], config["low"], config["high"])[:, 0]
    return {
        "study": NAME,
        "config": config,
        "x": x.tolist(),
        "archs": archs,
        "noise": _noise_references(config),
    }


# ----------------------------------------------------------------------------- outputs
def gradients_csv(config: dict[str, Any], records: dict[str, dict[str, Any]]) -> str:
    """One row per (network, initialization): ``arch, member, net_seed, g_0 .. g_{P-1}``, where
    ``g_i`` is the gradient at grid point ``x_i`` (exact round-trip numbers)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["arch", "member", "net_seed", *(f"g_{i}" for i in range(config["points"]))])
    for arch in config["archs"]:
        g, seeds, _ = _gradients(config, records, arch)
        for m, (row, s) in enumerate(zip(g, seeds)):
            w.writerow([arch, m, s, *map(num, row.tolist())])
    return buf.getvalue()


def plot(results: dict[str, Any], records: dict[str, dict[str, Any]], paths: list[Path]) -> None:
    """Row 1: one initialization's gradient along the grid per network; row 2: the correlation
    matrix R(i, j) per network; row 3: the mean autocorrelation against lag (with white and brown
    noise) and the mean R(i, i + k) against k (dashed: the wide-net theory of the plain ReLU
    nets)."""
    plt = pyplot()
    cfg, archs = results["config"], results["archs"]
    n = len(archs)
    x = np.array(results["x"])
    fig = plt.figure(figsize=(max(12.0, 2.6 * n), 10.5))
    gs = fig.add_gridspec(3, 2 * n, height_ratios=(1.0, 1.25, 1.3))
    colors = plt.get_cmap("tab10").colors
    image = None
    for i, (arch, a) in enumerate(archs.items()):
        ax = fig.add_subplot(gs[0, 2 * i : 2 * i + 2])
        ax.plot(x, a["example"]["gradient"], color=colors[i % 10], linewidth=0.9)
        ax.set_title(f"{arch}: d out / d x", fontsize=9)
        ax.set_xlabel("x", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.ticklabel_format(axis="y", useOffset=False)
        if a["constant_members"]:  # constant up to rounding: do not magnify the rounding
            mid = float(np.mean(a["example"]["gradient"]))
            ax.set_ylim(mid - max(abs(mid), 1.0), mid + max(abs(mid), 1.0))
        ax = fig.add_subplot(gs[1, 2 * i : 2 * i + 2])
        g, _, _ = _gradients(cfg, records, arch)
        image = ax.imshow(
            correlation_matrix(g),
            vmin=-1,
            vmax=1,
            cmap="RdBu_r",
            extent=(x[0], x[-1], x[-1], x[0]),
            interpolation="nearest",
        )
        ax.set_title(f"R(i, j), mean {a['mean_R']:.3f}", fontsize=9)
        ax.tick_params(labelsize=7)
    ax = fig.add_subplot(gs[2, :n])
    lags = np.arange(cfg["points"])
    shown = min(cfg["points"], 64)
    for name, style in (("brown", "--"), ("white", ":")):
        ax.plot(
            lags[:shown], results["noise"][name][:shown], style, color="gray", label=f"{name} noise"
        )
    for i, (arch, a) in enumerate(archs.items()):
        if a["constant_members"] < cfg["ensemble"]:
            ax.plot(lags[:shown], a["acf"][:shown], color=colors[i % 10], label=arch)
    ax.set_title("autocorrelation along the grid (mean over initializations)", fontsize=10)
    ax.set_xlabel("lag (grid steps)")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.legend(fontsize=7, ncol=2)
    ax = fig.add_subplot(gs[2, n:])
    for i, (arch, a) in enumerate(archs.items()):
        ax.plot(lags, a["R_by_lag"], color=colors[i % 10], label=arch)
        if a.get("wide_R_by_lag") is not None:  # the exact wide-net value of the same setup
            ax.plot(lags, a["wide_R_by_lag"], "--", color=colors[i % 10], linewidth=0.9)
    ax.set_title("mean R(i, i + k) over i (dashed: wide-net theory)", fontsize=10)
    ax.set_xlabel("k (grid steps)")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.legend(fontsize=7, ncol=2)
    fig.suptitle(
        f"Shattered gradients at initialization: width {cfg['width']}, {cfg['points']} "
        f"points in [{cfg['low']:g}, {cfg['high']:g}], {cfg['ensemble']} initializations, "
        f"bias std {cfg['bias_std']:g}",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0, 0.93, 0.97))
    if image is not None:
        fig.colorbar(image, cax=fig.add_axes((0.94, 0.38, 0.01, 0.25)))
    save_figure(fig, paths)


def _pick(archs: dict[str, Any], kind: str) -> tuple[str, dict[str, Any]] | None:
    """The deepest network of ``kind`` in the run, or ``None``."""
    found = [(a["depth"], arch, a) for arch, a in archs.items() if a["kind"] == kind]
    return None if not found else max(found, key=lambda t: t[0])[1:]


def _setup_comparison(results: dict[str, Any]) -> list[str]:
    """The paper's setup against this study's, point by point, with the numbers of this run that
    say where the paper's predictions hold and why the others differ."""
    cfg, archs = results["config"], results["archs"]
    relu, bn, pre, res = (_pick(archs, k) for k in ("ReLU", "batch-ReLU", "preresnet", "resnet"))
    # pre, res: whether the run has resnets of each kind (all of them are listed in point 5)

    def acf(a: dict[str, Any]) -> str:
        return "constant" if a["acf_lag1"] is None else fmt(a["acf_lag1"])

    def versus(a: dict[str, Any], value: float) -> str:
        """Whether the measured mean R lies within 2 SE of ``value``."""
        inside = abs(a["mean_R"] - value) <= 2 * a["mean_R_se"]
        return "within" if inside else "outside"

    lines = [
        "## The paper's setup and this study's, point by point",
        "",
        "Sources: Theorem 1, Theorem 3 and section 2's text on Figures 1 and 2 of Balduzzi et al. "
        "(ICML 2017, arXiv:1702.08591v2), as quoted below. The appendix with the experiments' "
        "network details could not be read for this study; where a point rests on it, it says so.",
        "",
        '1. **The quantity.** Paper: "Theorem 1 (covariance of gradients in feedforward nets). '
        "Suppose weights are initialized with variance sigma^2 = 2/N following He et al. (2015). "
        "Then a) the variance of the gradient at x^(i) is C(i) = 1, b) the covariance is "
        'C(i, j) = 1/2^L": a covariance over random initializations at two fixed inputs, '
        'computed by "counting the number of co-active paths", under the assumption that the '
        "activation patterns at the two inputs are independent (each unit active with "
        "probability 1/2, co-active with 1/4). Study: the same correlation over initializations, "
        "R(i, j), at every pair of the grid's points. **Matched**: the estimator. **Not the "
        "same**: which pairs. On a one-dimensional grid nearby points share their activation "
        "patterns, and far apart the deep plain nets' gradients are anti-correlated, so the mean over "
        "all pairs is not Theorem 1's number; the wide-net theory column computes the exact "
        "correlation of this setup without the independence assumption.",
        "2. **Initialization, width, inputs.** He initialization (sigma^2 = 2/fan_in, Theorem 1): "
        f"**matched**. Width {cfg['width']}, {cfg['points']} points in "
        f"[{cfg['low']:g}, {cfg['high']:g}], scalar input and output: the study's reading of "
        "Figure 1 (not checked against the appendix). Biases: the theorems have none; the study "
        f"draws N(0, {cfg['bias_std']:g}^2) **(choice)**, without which a plain scalar ReLU net "
        "is homogeneous and nothing shatters; batch norm cancels them.",
    ]
    if relu is not None or bn is not None:
        text = (
            '3. **Feedforward nets and batch norm.** Paper, section 2: "there are still '
            "correlations in the 50-layer resnet whereas in the equivalent feedforward net, "
            'the gradients are indistinguishable from white noise". '
        )
        if bn is not None:
            name, a = bn
            text += (
                f"Batch-norm net {name}: ACF(1) {acf(a)} and R(i, i+1) {fmt(a['R_lag1'])} "
                f"(white noise: about 0), mean R {fmt(a['mean_R'], 4)} +- "
                f"{fmt(a['mean_R_se'], 4)}, {versus(a, a['predicted'])} 2 SE of 1/2^L = "
                f"{sci(a['predicted'])}. "
            )
        if relu is not None:
            name, a = relu
            text += (
                f"Plain He-initialized ReLU net {name}: ACF(1) {acf(a)} and R(i, i+1) "
                f"{fmt(a['R_lag1'])}, not white (its mean R over all pairs can still be near "
                "0: see 4). "
            )
        text += (
            "Whether the paper's feedforward nets had batch norm is in its appendix, not "
            'read here; its abstract compares resnets with feedforward nets "despite '
            'well-chosen initialization and batch normalization".'
        )
        lines.append(text)
    if relu is not None:
        name, a = relu
        lines.append(
            f"4. **Why plain ReLU nets do not shatter as 1/2^L says.** For {name} the exact "
            f"wide-net correlation of this setup is {fmt(a['wide_R'], 4)} averaged over pairs "
            f"and {fmt(a['wide_R_lag1'])} at neighbouring points; measured: "
            f"{fmt(a['mean_R'], 4)} +- {fmt(a['mean_R_se'], 4)} ({versus(a, a['wide_R'])} 2 SE "
            f"of the theory) and {fmt(a['R_lag1'])} (every plain ReLU net's pair is in the "
            "table). At He initialization a ReLU net is critical: the pre-activations at two "
            "nearby grid points stay almost perfectly correlated through the layers, so the two "
            "points share most of their activation pattern, against Theorem 1's independence: "
            "R(i, i+1) stays high, and the mean over all pairs, which averages these positive "
            "near-pair correlations with negative far-pair ones, is small without the gradients "
            "being white. Differences between the measurement and this infinite-width theory "
            "that exceed the SE are of the order of finite-width corrections "
            f"(depth/width = {a['depth'] / cfg['width']:.2f}), not investigated further."
        )
    if pre is not None or res is not None:
        text = (
            "5. **Resnets.** Paper, Theorem 3 (covariance of gradients in resnets with BN and "
            'rescaling): "a) the variance is beta^2 (L - 1) + 1; b) the covariance is '
            '~ beta sqrt(L); the correlation is ~ 1/(beta sqrt(L))". That variance '
            "telescopes only for the module x + beta W relu(BN(x)) with He weights, batch norm "
            "dividing the branch by the standard deviation of x (variance 1 + k beta^2 after k "
            "blocks): `preresnet-L` builds exactly that module, and `theorem3_correlation` "
            "evaluates its correlation exactly (the paper gives only the order; 1/sqrt(24) = "
            "0.20 is that order for 24 blocks). `resnet-L` (two layers, batch norm after each "
            "linear layer, a ReLU closing the branch) is a different module, kept for "
            "comparison. "
        )
        for name, a in archs.items():
            if a["kind"] in ("preresnet", "resnet"):
                text += (
                    f"{name}: mean R {fmt(a['mean_R'], 4)} +- {fmt(a['mean_R_se'], 4)} "
                    f"against {fmt(a['predicted'], 4)} ({versus(a, a['predicted'])} 2 SE), "
                    "gradient variance "
                    f"{sci(a['variance_ratio'])} x Theorem 3(a). "
                )
        text += (
            "Where the measured variance is near Theorem 3(a) (few blocks, or small "
            "beta), the correlation is near Theorem 3's; the deeper the net, the more its "
            "variance exceeds 3(a) and the further its correlation falls below. The reason: "
            "the theorem treats batch norm as a division by the forward standard deviation "
            "of x, the same factor for the signal and the gradient, while batch norm here "
            "divides by the standard deviation over the batch of grid points, which the "
            "branches' shattered gradients outgrow (the batch-norm gradient growth of "
            "definitions.md, r(s) = 1.467 per layer for ReLU). The branches then outweigh "
            "the skip path that all points share, and the correlation drops."
        )
        lines.append(text)
    return lines


def summary_md(results: dict[str, Any], run_info: dict[str, Any]) -> str:
    """The summary: measured correlations beside the predictions, how they are made, the
    configuration, timings, machine and files."""
    cfg, t = results["config"], run_info["timings"]
    noise = results["noise"]
    archs = results["archs"]
    lines = [
        "# Shattered gradients (Balduzzi et al. 2017)",
        "",
        f"gscfast {run_info['version']}: {len(cfg['archs'])} networks x {cfg['ensemble']} random "
        f"initializations; width {cfg['width']}; {cfg['points']} grid points in "
        f"[{cfg['low']:g}, {cfg['high']:g}]; bias std {cfg['bias_std']:g} (choice); residual "
        f"branch scale beta {cfg['beta']:g}; {cfg['dtype']}; seed {cfg['seed']}.",
        "",
        "## Measured correlations beside the paper's predictions and this setup's theory",
        "",
        "| network | L | paper's prediction | mean R(i, j), i != j (+- SE) | wide-net theory: mean R "
        "| R(i, i+1) (theory) | ACF(1) | ACF < 0.5 from lag | gradient rms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for arch, a in archs.items():
        rule = {"resnet": "Thm 3", "preresnet": "Thm 3", "ll-ReLU": "linear"}.get(
            a["kind"], "1/2^L"
        )
        if a["constant_members"] == cfg["ensemble"]:
            acf1, half = "constant", "constant"
        else:
            acf1, half = (
                fmt(a["acf_lag1"]),
                "never" if a["half_lag"] is None else str(a["half_lag"]),
            )
        wide = "" if a.get("wide_R") is None else fmt(a["wide_R"], 4)
        lag1 = fmt(a["R_lag1"]) + (
            "" if a.get("wide_R_lag1") is None else f" ({fmt(a['wide_R_lag1'])})"
        )
        lines.append(
            f"| {arch} | {a['theory_L']} | {sci(a['predicted'])} ({rule}) "
            f"| {fmt(a['mean_R'], 4)} +- {fmt(a['mean_R_se'], 4)} | {wide} | {lag1} "
            f"| {acf1} | {half} | {sci(a['gradient_rms'])} |"
        )
    for name in ("brown", "white"):
        below = _first_below(np.array(noise[name]), 0.5)
        lines.append(
            f"| {name} noise (reference) | | | | | | {fmt(noise[name][1])} | "
            f"{'never' if below is None else below} | |"
        )
    residual = {arch: a for arch, a in archs.items() if a["kind"] in ("resnet", "preresnet")}
    if residual:
        lines += [
            "",
            "Residual nets against Theorem 3 (batch norm, beta-rescaling):",
            "",
            "| network | blocks n | Theorem 3's model, exact | ~1/(beta sqrt(n)) | mean R (+- SE) "
            "| Theorem 3(a) variance 1 + n beta^2 | measured variance / Theorem 3(a) |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for arch, a in residual.items():
            lines.append(
                f"| {arch} | {a['theory_L']} | {fmt(a['predicted'], 4)} "
                f"| {'' if a['asymptotic'] is None else fmt(a['asymptotic'], 4)} "
                f"| {fmt(a['mean_R'], 4)} +- {fmt(a['mean_R_se'], 4)} "
                f"| {sci(a['theorem3_variance'])} | {sci(a['variance_ratio'])} |"
            )
    lines += [
        "",
        *_setup_comparison(results),
        "",
        "- **SE** is the jackknife standard error over initializations; for white-noise "
        f"gradients the pair average is 0 up to it (a single R(i, j) has noise 1/sqrt(E) = "
        f"{1 / math.sqrt(cfg['ensemble']):.2f}).",
        "- **L**: hidden layers of a feedforward net; residual blocks of a resnet (resnet-50: "
        "a stem, 24 blocks of two layers and a head; preresnet-50: a stem, 48 one-layer "
        "blocks and a head).",
        "- **wide-net theory**: for the plain ReLU nets, the exact correlation over "
        "initializations of an infinitely wide net of this setup (the output is a Gaussian "
        "process; the gradient's covariance is the mixed second derivative of its kernel; "
        "`wide_relu_correlation`); no closed form is computed here for the batch-norm nets.",
        "- **measured variance / Theorem 3(a)**: the mean squared gradient over points and "
        "initializations, divided by 2 (the variance of a net without blocks: stem weight "
        "variance 2, head 1/width) and by 1 + n beta^2.",
    ]
    lines += [
        "",
        "## How the numbers are made",
        "",
        f"- Inputs: {cfg['points']} equally spaced x in [{cfg['low']:g}, {cfg['high']:g}], as one "
        "batch. Networks: scalar input and output, width "
        f"{cfg['width']}; " + "; ".join(f"`{k}-L`: {v}" for k, v in _KIND_TEXT.items()) + ".",
        "- Initialization: He (weight variance 2/fan_in) in the ReLU layers and the resnets' "
        "stems, 1/fan_in in the output layer (`gscfast.mlp`); non-learnable batch norms; residual "
        f"branches scaled by beta = {cfg['beta']:g}; the looks-linear net draws its "
        "halves W0 with variance 1/width (its effective linear maps) and puts "
        "W = [W0, -W0] after each CReLU, so that W CReLU(h) = W0 h and the net is affine.",
        f"- Biases: i.i.d. N(0, {cfg['bias_std']:g}^2) in every linear layer **(choice)**: "
        "without biases a scalar-input ReLU net is positively homogeneous, its gradient is "
        "constant on each side of 0 and nothing shatters. Biases in front of a batch norm cancel, "
        "so the batch-norm nets and the resnets do not depend on them. No bias std makes plain "
        "ReLU nets' gradients white at this grid spacing: at He initialization they are critical "
        "(nearby inputs stay correlated), so their ACF(1) falls with depth but stays well above "
        "0; the batch-norm feedforward nets, the networks the paper compares resnets with, "
        "shatter to white noise.",
        '- Gradients: `gscfast.jacobian(model, x, batchnorm="frozen")`, i.e. with the batch norms\' '
        "statistics of the grid batch held constant: the derivative at each point of the function "
        "the network computes on this grid; networks gscfast cannot compile (CReLU) use "
        "`torch.func.vmap(torch.func.jacrev(...))` of the same function (batch norms switched to "
        "eval mode with the grid's statistics). Per network: "
        + ", ".join(f"{arch} {a['method']}" for arch, a in results["archs"].items())
        + ".",
        "- Autocorrelation: per initialization, a(k) = sum_i d_i d_(i+k) / sum_i d_i^2 with the "
        "mean over the grid removed (d = g - mean g), then the mean over initializations; a "
        "gradient constant along the grid (the looks-linear net) has none.",
        "- R(i, j): the Pearson correlation over the initializations of the gradients at grid "
        "points i and j, computed from all records (`gradients.csv`); `R_by_lag[k]` in "
        "results.json is its mean along the k-th off-diagonal.",
        "- Brown and white noise: the same estimator on seeded white noise and its running sum "
        f"({cfg['ensemble']} series of {cfg['points']} points).",
        f'- Seeds: member m of network `arch` has the seed `job_seed({cfg["seed"]}, "net", arch, '
        "m)` (SHA-256), so the numbers do not depend on job order, chunking, engine or resume.",
        "",
        *config_section(cfg),
        "## Timings",
        "",
        invocation_line(run_info),
        f"- All {t['jobs']} jobs: {t['job_seconds']:.1f} s of job time in total "
        f"(the run may have been split by --resume); devices {', '.join(t['devices'])}.",
        "",
        "| network | seconds per initialization |",
        "| --- | --- |",
    ]
    for arch, s in t["per_member"].items():
        lines.append(f"| {arch} | {s:.4f} |")
    lines += [
        "",
        f"Machine: {run_info['machine']}.",
        "",
        "## Files",
        "",
        "- `shattered.png`, `shattered.pdf`: per network one initialization's gradient "
        "along the grid and the correlation matrix R(i, j); the mean autocorrelation "
        "against lag beside white and brown noise; the mean R(i, i + k) against k (dashed: "
        "the wide-net theory of the plain ReLU nets).",
        "- `results.json`: every number (per network: the table's values, the mean "
        "autocorrelation `acf` at every lag, `R_by_lag`, the wide-net theory's "
        "`wide_R_by_lag` (plain ReLU nets), Theorem 3's `theorem3_variance` and the measured "
        "`variance_ratio` (resnets), one initialization's gradient, the seeds), the grid `x`, "
        "the noise references, the configuration and the timings.",
        "- `gradients.csv`: every initialization's gradients, one row per (network, member): "
        "`arch, member, net_seed, g_0 .. g_(P-1)`, `g_i` at `x_i` of results.json.",
        f"- `manifest.json`, `jobs/`: the run's identity and one record per (network, chunk "
        f"of {cfg['chunk']} initializations); `gscfast shattered --out DIR --resume` with the "
        "same options continues or regenerates these files.",
        "",
    ]
    return "\n".join(lines)


def _timings(config: dict, records: dict, result) -> dict[str, Any]:
    per_member = {}
    for arch in config["archs"]:
        recs = [r for r in records.values() if r["spec"]["arch"] == arch]
        per_member[arch] = sum(r["seconds"] for r in recs) / sum(
            len(r["spec"]["net_seeds"]) for r in recs
        )
    return {**run_timings(result), "per_member": per_member}


def write_outputs(out: str | Path, config: dict[str, Any], result) -> dict[str, Path]:
    """results.json, gradients.csv, shattered.png/pdf and summary.md from a complete run's
    records."""
    results = aggregate(config, result.records)
    files = [
        text_file("gradients.csv", gradients_csv(config, result.records)),
        figure_files("shattered", lambda paths: plot(results, result.records, paths)),
    ]
    return write_files(
        out,
        result,
        results,
        files,
        summary_md,
        timings=_timings(config, result.records, result),
        extras=("timings", "seconds"),
    )


def table(results: dict[str, Any]) -> str:
    """The command's short report: per network the prediction, mean R(i, j), the wide-net theory
    of this setup (plain ReLU nets) and ACF(1)."""
    rows = [f"{'network':<16} {'predicted':>10} {'mean R':>8} {'theory':>8} {'ACF(1)':>7}"]
    rows += [
        f"{arch:<16} {sci(a['predicted']):>10} {fmt(a['mean_R'], 4):>8} "
        f"{'' if a.get('wide_R') is None else fmt(a['wide_R'], 4):>8} "
        f"{'const' if a['acf_lag1'] is None else fmt(a['acf_lag1']):>7}"
        for arch, a in results["archs"].items()
    ]
    return "\n".join(rows) + "\n"


# ----------------------------------------------------------------------------- command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--archs",
        nargs="+",
        default=None,
        metavar="ARCH",
        help="networks: ReLU-L, batch-ReLU-L, resnet-L (L linear layers, L even), "
        "preresnet-L (Theorem 3's module, L linear layers), ll-ReLU-L "
        f"(default: {' '.join(DEFAULT_ARCHS)})",
    )
    p.add_argument(
        "--looks-linear",
        action="store_true",
        help="add the looks-linear net ll-ReLU-L (CReLU, mirrored weights) of the "
        "deepest network's depth",
    )
    p.add_argument(
        "--ensemble", type=int, default=100, help="random initializations per network (default 100)"
    )
    p.add_argument("--chunk", type=int, default=10, help="initializations per job (default 10)")
    p.add_argument("--points", type=int, default=256, help="grid points (default 256)")
    p.add_argument("--low", type=float, default=-2.0, help="grid start (default -2)")
    p.add_argument("--high", type=float, default=2.0, help="grid end (default 2)")
    p.add_argument("--width", type=int, default=200, help="hidden width (default 200)")
    p.add_argument(
        "--beta",
        type=float,
        default=BETA,
        help=f"scale of the residual branches, x + beta body(x): the paper's "
        f"beta-rescaling, its Theorem 3 and Figure 2c (default {BETA:g})",
    )
    p.add_argument(
        "--bias-std",
        type=float,
        default=BIAS_STD,
        help=f"std of the random biases (default {BIAS_STD}; 0 makes plain ReLU nets "
        "homogeneous: no shattering)",
    )
    add_study_arguments(p, NAME, dtype="float64", backend=None)


def main(args: argparse.Namespace) -> int:
    config = config_from_args(make_config, args)

    def write(result) -> dict[str, Path]:
        paths = write_outputs(args.out, config, result)
        print("" if args.quiet else table(json.loads(paths["results.json"].read_text())), end="")
        return paths

    return run_command(make_study(config), args, write)
