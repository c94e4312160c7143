"""Trained-model diagnostics of the CIFAR study: the compositional-depth-reduction (Taylor)
curve and the operator norms of the weight changes (definitions.md)."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from .api import jacobian
from .compiler import all_ops, compile_model
from .rules.error import error_value
from .rules.linear import LinearRule
from .validation import check_finite, check_same_architecture

__all__ = ["taylor_curve", "weight_change_norms"]


@torch.no_grad()
def _run(modules: list[nn.Module], x: Tensor, chunk: int = 8192) -> Tensor:
    seq = nn.Sequential(*modules)
    return torch.cat([seq(x[i : i + chunk]) for i in range(0, len(x), chunk)]) if modules else x


def taylor_curve(
    model: nn.Module,
    x_train: Tensor,
    x: Tensor,
    y: Tensor,
    *,
    error: str = "kl",
) -> dict[str, Tensor]:
    """Error of the model with its ``K`` output-side layers replaced by one affine layer.

    For ``K = 0..L``, the layers ``f_1 .. f_K`` are replaced by their first-order Taylor expansion
    around the mean of their input over ``x_train`` (``F(mu) + J_F(mu) (h - mu)``), and the
    reduced model is evaluated on ``(x, y)``. ``K = 0`` is the model itself. The model is
    evaluated in eval mode (batch norm with running statistics) on a copy; it is not modified.

    Returns:
        ``{"loss": [L+1], "error_rate": [L+1]}`` (mean error-layer value; for ``error="kl"`` also
        the classification error rate, NaN otherwise), indexed by ``K``.
    """
    check_finite(x_train, "x_train")
    check_finite(x, "x")
    model = copy.deepcopy(model).eval()
    program = compile_model(model)
    L = program.L
    loss = torch.full((L + 1,), float("nan"), dtype=torch.float64)
    rate = loss.clone()
    for K in range(L + 1):
        prefix = [m for layer in program.layers[: L - K] for m in layer.modules]
        suffix = [m for layer in program.layers[L - K :] for m in layer.modules]
        h = _run(prefix, x)
        if K == 0:
            out = h
        else:
            mu = _run(prefix, x_train).mean(0, keepdim=True)
            f = nn.Sequential(*suffix)
            J = jacobian(f, mu)[0]  # [d_out, d_in]
            with torch.no_grad():
                out = f(mu) + (h - mu) @ J.T
        e = error_value(error, out.unsqueeze(0), y.unsqueeze(0))[0]
        loss[K] = e.double().mean()
        if error == "kl":
            rate[K] = (out.argmax(-1) != y).double().mean()
    return {"loss": loss, "error_rate": rate}


def weight_change_norms(model: nn.Module, init_model: nn.Module) -> Tensor:
    """``[L+1]``: the spectral norm of ``W_t - W_0`` of each layer's (first) linear map, in the
    paper's numbering; NaN for ``l = 0`` and layers without a linear map."""
    trained, init = compile_model(model), compile_model(init_model, "init_model")
    check_same_architecture(trained, init)
    out = torch.full((trained.L + 1,), float("nan"), dtype=torch.float64)
    for a, b in zip(trained.layers, init.layers):
        lin = [
            (p, q)
            for p, q in zip(all_ops(a.ops), all_ops(b.ops))
            if isinstance(p, LinearRule) and isinstance(q, LinearRule)  # same architecture
        ]
        if lin:
            p, q = lin[0]
            out[a.index] = torch.linalg.matrix_norm((p.weight - q.weight).double(), ord=2)
    return out
