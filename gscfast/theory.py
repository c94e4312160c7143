"""Constants of the theory in definitions.md, in one place for every study and test that uses them.

``R_S``: r(s) = E[s'(z)^2] / Var[s(z)] for z ~ N(0, 1), the per-layer growth of the squared
gradient norm in a plain linear -> batch-norm -> activation network (definitions.md), to three
decimals; ``r_s`` computes it by quadrature (the tests check ``R_S`` against it).
"""

from __future__ import annotations

import torch

from .nn import ACTIVATIONS

__all__ = ["R_S", "r_s"]

R_S: dict[str, float] = {"relu": 1.467, "tanh": 1.178, "selu": 1.072}


def r_s(act: str, points: int = 200_001) -> float:
    """``E[s'(z)^2] / Var[s(z)]`` for ``z ~ N(0, 1)`` (definitions.md) and ``s`` the activation
    ``act`` (a key of ``gscfast.nn.ACTIVATIONS``), by the trapezoid rule on ``[-12, 12]`` with a
    node at 0 (where ReLU has its kink; Gauss-Hermite would converge slowly)."""
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}: use one of {', '.join(ACTIVATIONS)}")
    z = torch.linspace(-12, 12, points, dtype=torch.float64, requires_grad=True)
    s = ACTIVATIONS[act]()(z)
    (ds,) = torch.autograd.grad(s.sum(), z)
    w = torch.exp(-(z.detach() ** 2) / 2)
    w[0] = w[-1] = w[0] / 2
    w = w / w.sum()
    s = s.detach()
    return float((w * ds**2).sum() / ((w * s**2).sum() - (w * s).sum() ** 2))
