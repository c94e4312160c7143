"""Modules and model builders: the paper's networks as plain ``nn.Sequential``s."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["ACTIVATIONS", "CReLU", "Residual", "freeze_batchnorm", "init_weight", "mlp"]


class Residual(nn.Module):
    """``y = x + scale * body(x)``; gscfast treats the whole block as one layer.

    Args:
        body: a module (usually an ``nn.Sequential``) mapping ``[*, d]`` to ``[*, d]``.
        scale: the branch scale (``1 / sqrt(L)`` is the usual choice for deep stacks).
    """

    def __init__(self, body: nn.Module, scale: float = 1.0) -> None:
        super().__init__()
        self.body = body
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.scale * self.body(x)

    def extra_repr(self) -> str:
        return f"scale={self.scale:g}"


class CReLU(nn.Module):
    """Concatenated ReLU: ``[relu(x), relu(-x)]`` along the last dimension (twice the width).

    With mirrored weights ``W = [W0, -W0]`` in the next ``nn.Linear`` the pair computes exactly
    ``W0 x`` (``relu(h) - relu(-h) = h``): the "looks-linear" initialization of Balduzzi et al.
    (2017), under which a deep rectifier network is affine at initialization. gscfast's compiler
    does not support this module (it changes the width inside an activation), so Jacobians through
    it are taken with autograd.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.relu(x), torch.relu(-x)], dim=-1)


ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "selu": nn.SELU,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "softplus": nn.Softplus,
    "identity": nn.Identity,
}
"""Name -> module class of the activations ``mlp`` accepts (all are supported by the compiler)."""


def _norm(kind: str | None, width: int) -> list[nn.Module]:
    if kind is None:
        return []
    if kind == "layer":
        return [nn.LayerNorm(width, elementwise_affine=False)]
    if kind == "batch":
        return [nn.BatchNorm1d(width, affine=False)]
    raise ValueError(f"norm must be None, 'layer' or 'batch', got {kind!r}")


def init_weight(w: torch.Tensor, var: float, init: str, gen: torch.Generator) -> None:
    """Fill ``w`` in place with per-entry variance ``var`` from ``gen`` (drawn in float64):
    ``init="gaussian"`` i.i.d. normal, ``"orthogonal"`` a scaled orthogonal matrix."""
    with torch.no_grad():
        if init == "gaussian":
            w.copy_(torch.randn(w.shape, generator=gen, dtype=torch.float64) * math.sqrt(var))
        elif init == "orthogonal":
            # Orthogonal with the same per-entry variance as the Gaussian init:
            # singular values sqrt(var * fan_in) (square matrices: exactly norm-preserving x gain).
            rows, cols = w.shape
            a = torch.randn(max(rows, cols), min(rows, cols), generator=gen, dtype=torch.float64)
            q, r = torch.linalg.qr(a)
            q = q * torch.sign(torch.diagonal(r))
            q = q if rows >= cols else q.T
            w.copy_(q[:rows, :cols] * math.sqrt(var * cols))
        else:
            raise ValueError(f"init must be 'gaussian' or 'orthogonal', got {init!r}")


def mlp(
    depth: int,
    width: int,
    *,
    act: str,
    norm: str | None = None,
    in_features: int | None = None,
    out_features: int | None = None,
    weight_var: float | None = None,
    init: str = "gaussian",
    bias: bool = False,
    residual: float | str | None = None,
    seed: int | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Sequential:
    """Build the MLPs of Philipp, Song & Carbonell (2018).

    Each of the ``depth`` layers is ``Linear -> [norm] -> act`` (one layer in gscfast's numbering).
    Norms are non-learnable (``elementwise_affine=False`` / ``affine=False``) as in the paper.

    Args:
        depth: number of hidden layers.
        width: their width.
        act: activation name, one of ``ACTIVATIONS`` (``"relu"``, ``"tanh"``, ``"selu"``, ...).
        norm: ``None``, ``"layer"`` or ``"batch"``.
        in_features: input dimension (default ``width``).
        out_features: if given, a final ``Linear(width, out_features)`` layer without norm or
            activation is appended (the model then has ``depth + 1`` layers).
        weight_var: variance of each weight entry (default ``2 / fan_in`` for ReLU,
            ``1 / fan_in`` otherwise, as in the paper).
        init: ``"gaussian"`` or ``"orthogonal"`` (same per-entry variance).
        bias: add zero-initialized biases.
        residual: ``None`` for a plain net; a float wraps each layer (from the second on, where
            shapes allow) as ``Residual(layer, scale)``; ``"sqrt"`` uses ``scale = 1/sqrt(depth)``.
        seed: seed for the weights (a private generator; the global RNG is untouched).
        dtype: parameter dtype (default ``torch.get_default_dtype()``).

    Returns:
        The model, in train mode (batch norm uses batch statistics).
    """
    if depth < 1 or width < 1:
        raise ValueError(f"depth and width must be >= 1, got depth={depth}, width={width}")
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
    if residual == "sqrt":
        branch_scale: float | None = 1.0 / math.sqrt(depth)
    elif residual is None or isinstance(residual, (int, float)):
        branch_scale = None if residual is None else float(residual)
    else:
        raise ValueError(f"residual must be None, a float or 'sqrt', got {residual!r}")
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
    dtype = dtype or torch.get_default_dtype()
    n_in = in_features or width
    layers: list[nn.Module] = []
    for i in range(depth):
        fan_in = n_in if i == 0 else width
        lin = nn.Linear(fan_in, width, bias=bias, dtype=dtype)
        var = weight_var if weight_var is not None else (2.0 if act == "relu" else 1.0) / fan_in
        init_weight(lin.weight, var, init, gen)
        if bias:
            nn.init.zeros_(lin.bias)
        block = nn.Sequential(lin, *_norm(norm, width), ACTIVATIONS[act]())
        if branch_scale is not None and fan_in == width:
            layers.append(Residual(block, branch_scale))
        else:
            layers.extend(block)
    if out_features is not None:
        lin = nn.Linear(width, out_features, bias=bias, dtype=dtype)
        init_weight(lin.weight, weight_var if weight_var is not None else 1.0 / width, init, gen)
        if bias:
            nn.init.zeros_(lin.bias)
        layers.append(lin)
    return nn.Sequential(*layers).to(dtype)


def poison_variance(var: torch.Tensor) -> torch.Tensor:
    """``var`` with non-finite entries made NaN, so that a normalization whose variance overflowed
    outputs NaN (refused by ``backends.finite``) rather than silent zeros (``rsqrt(inf) = 0``)."""
    return torch.where(torch.isfinite(var), var, math.nan)  # O(size of var), no sync


def uses_batch_stats(bn: _BatchNorm) -> bool:
    """Whether batch norm ``bn`` normalizes with the statistics of its batch (train mode, or no
    running statistics) rather than with its running statistics."""
    return bn.training or bn.running_mean is None


def freeze_batchnorm(
    model: nn.Module, x: torch.Tensor, replace: Mapping[str, torch.Tensor] | None = None
) -> nn.Module:
    """A copy of ``model`` whose batch norms that use batch statistics are switched to eval mode
    with the statistics of the batch ``x`` (mean, biased variance) as running statistics: the
    function whose per-sample derivative ``gscfast.jacobian(..., batchnorm="frozen")`` computes.
    Its outputs on ``x`` equal ``model``'s; ``model`` is not modified.

    This is the module-level home of frozen batch norm (the reference backend and the studies;
    ``gscfast.frozen`` says why the engines have their own). A variance that overflowed becomes
    NaN (outputs NaN, not silent zeros). ``ValueError`` if such a batch norm is not called by
    ``model(x)`` or is called more than once (its statistics would not be one batch's).

    ``replace``: module names whose outputs are replaced by the given tensors while the statistics
    are gathered (effective depth: the initial model's layer run on the trained model's input)."""
    frozen = copy.deepcopy(model)
    bns = [m for m in frozen.modules() if isinstance(m, _BatchNorm) and uses_batch_stats(m)]
    if not bns:
        return frozen
    names = {m: name or type(frozen).__name__ for name, m in frozen.named_modules()}
    stats: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(mod: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        if mod in stats:
            raise ValueError(
                f"{names[mod]} ({type(mod).__name__}) is called more than once in one forward "
                "pass: each call has its own batch statistics, which one module in eval mode "
                "cannot hold; use a separate module per call"
            )
        h = inputs[0]
        dims = [0, *range(2, h.dim())]  # per channel: over the batch and any spatial dimensions
        stats[mod] = (h.mean(dims), h.var(dims, correction=0))

    hooks = [m.register_forward_pre_hook(record) for m in bns]
    named = dict(frozen.named_modules())
    for name, t in (replace or {}).items():
        hooks.append(named[name].register_forward_hook(lambda mod, a, out, t=t: t))
    try:
        with torch.no_grad():
            frozen(x)  # train mode: each batch norm sees exactly its input in the frozen model
    finally:
        for h in hooks:
            h.remove()
    for m in bns:
        if m not in stats:
            raise ValueError(
                f"{names[m]} ({type(m).__name__}) is not called by the forward pass, so it has "
                "no batch statistics to freeze"
            )
        mean, var = stats[m]
        m.register_buffer("running_mean", mean.clone())
        m.register_buffer("running_var", poison_variance(var))
        m.track_running_stats = True
        m.eval()
    return frozen


def call_from_current_state(m: nn.Module) -> None:
    """Make every call of ``m`` start from the buffers ``m`` has now (a forward pre-hook that
    restores them first, by name, so deep copies of ``m`` restore their own). For the reference
    backend's copies: a module that updates its own buffers when called (spectral norm's power
    iteration in train mode, as a pre-hook or a parametrization) would otherwise change from one
    datapoint or layer function to the next, while gscfast measures the caller's model as of one
    call."""
    snapshot = {k: b.detach().clone() for k, b in m.named_buffers(recurse=False)}

    def restore(module: nn.Module, args: object) -> None:
        with torch.no_grad():
            for k, old in snapshot.items():
                getattr(module, k).copy_(old)

    m.register_forward_pre_hook(restore, prepend=True)  # before the module's own pre-hooks


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two outputs of the same call are equal to the last bit, NaN equal to NaN (an
    overflow is not randomness; it is reported as such further on). The determinism check of the
    generic rule and of ``layers=``: a module with noise of 1e-7 is random, not close enough."""
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=0, atol=0, equal_nan=True))


def call_on_copies(module: nn.Module, x: torch.Tensor) -> Any:
    """``module(x)``, hooks included, with constant parameters and copies of its buffers: a
    module that updates its buffers when called (running statistics, counters, spectral norm's
    power iteration) leaves the caller's module unchanged. The generic rule and ``layers=``
    call modules through it."""
    state = {k: p.detach() for k, p in module.named_parameters()}
    state |= {k: b.detach().clone() for k, b in module.named_buffers()}
    return torch.func.functional_call(module, state, (x,))


def couples_samples(
    vjp_fn: Callable[[torch.Tensor], tuple[torch.Tensor, ...]], y: torch.Tensor
) -> bool:
    """Whether the function whose ``vjp_fn`` (``torch.func.vjp``) gave outputs ``y [b, ...]``
    couples the samples of its batch: a random cotangent on sample 0's output reaches another
    sample's input (exact zeros otherwise)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    u = torch.zeros_like(y)
    u[0] = torch.randn(y[0].shape, generator=g, dtype=torch.float64).to(y)
    (gx,) = vjp_fn(u)
    return bool((gx[1:] != 0).any())
