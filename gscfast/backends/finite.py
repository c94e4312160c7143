"""Non-finite intermediate values: refused with the layer where they start, never returned.

Inputs and weights are checked at entry (``validation.check_finite``); values can still overflow
inside (float32 especially): in a layer's forward, in a normalization's variance, in the error,
or in the backward pass. Every backend's raw results pass ``check_results`` (``Backend`` wraps
its four methods), which costs a finite-sum test per result. Only when that fails is the problem
run again, forward and backward through the analytic rules (the torch engine) with a test after
every module, to name the first place where values stop being finite; the message is the same
whichever backend computed the results.

A normalization whose variance overflows would output zeros (``(x - mean) / sqrt(inf)``), finite
but wrong: every backend makes such a variance NaN instead (``nn.poison_variance`` for the
torch rules, the same test in the numba kernels and the reference backend), so it reaches this check.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..rules import error_grad, error_value
from .chunks import iter_chunks, sq_norms


def _finite(t: Tensor | None) -> bool:
    # NaN and Inf propagate through a sum, so a finite sum proves every entry finite; only a sum
    # that overflowed by itself needs the elementwise test.
    return t is None or bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _defined(pb, method: str) -> Tensor:
    """``[L+1, L+1]`` mask of the defined entries of ``chain`` or ``contributions``."""
    n = pb.L + 1
    k, l = torch.arange(n)[:, None], torch.arange(n)[None, :]
    if method == "contributions":
        return (l <= (k - 1).clamp(min=0)).to(pb.x.device)
    keep = l <= k
    if pb.error is None:  # row l = 0 starts from the error's gradient
        keep[1:, 0] = False
    return keep.to(pb.x.device)


def check_results(pb, method: str, result, init=None) -> None:
    """``ValueError`` naming where values stop being finite, if any defined entry of a backend's
    ``result`` (of ``method``) is NaN or Inf."""
    named: list[tuple[str, Tensor | None]]
    if method == "sweep":
        first = 0 if pb.error is not None else 1  # ||f_0||^2 is NaN by definition without y
        named = [
            ("||f_{l}||^2", result.sq_out[:, first:]),
            ("||d f_0 / d f_{l}||^2", result.sq_grad if pb.error is not None else None),
        ]
        named += [
            (f"the pre-activation moments of layer f_{l}", t)
            for l, m in enumerate(result.moments or [])
            if m is not None
            for t in (m.mean, m.m2)
        ]
    elif method in ("chain", "contributions"):
        named = [(f"the results of {method}", result[:, _defined(pb, method)])]
    else:
        named = [(f"the results of {method}", result)]
    bad = next(((name, t) for name, t in named if not _finite(t)), None)
    if bad is None:
        return
    where = locate(pb, init, norms=method != "jacobian")  # a Jacobian has no squared norms
    if where is None:  # the rules' pass is finite: the backend's own accumulation overflowed
        name, t = bad
        assert t is not None  # _finite(None) holds, so what failed it is a tensor
        if "{l}" in name:
            l = int((~torch.isfinite(t)).any(0).nonzero()[0]) + (1 if t.shape[1] == pb.L else 0)
            name = name.format(l=l)
        where = f"{name} (as the backend's {method} accumulates it; the values are finite)"
    raise ValueError(message(pb.x.dtype, where))


def message(dtype: torch.dtype, where: str) -> str:
    """The refusal of a computation in ``dtype`` whose values stop being finite at ``where``."""
    fix = (
        (
            "compute in float64 (model.double(), x.double() and a float y for error='dot'), "
            "or rescale the inputs, weights or targets"
        )
        if dtype != torch.float64
        else "rescale the inputs, weights or targets (they are already float64)"
    )
    return (
        f"values stop being finite (overflow to Inf, or NaN from it) in {dtype} at {where}; "
        f"gscfast refuses to return the NaN or wrong numbers that follow. To proceed, {fix}."
    )


def _bad(t: Tensor) -> bool:
    return not bool(torch.isfinite(t).all())


def _module(op) -> str:
    return f"{op.path} ({type(op.module).__name__})"


def locate(pb, init=None, norms: bool = True) -> str | None:
    """Run ``pb`` through the rules with a test after each module (forward, error, backward),
    of the values and (``norms``) of the per-datapoint squared norms gscfast reports; the first
    place where they are not finite, or None. Costs one pass of the torch engine."""
    w = pb.widths
    per = pb.x.element_size() * pb.S * 3 * sum(w[1:])
    for ds, bs, ctx in iter_chunks(pb, per, init=init):
        h = pb.x[ds, bs]
        P = h.shape[0] if pb.coupled else h.shape[0] * h.shape[1]
        saved: dict[int, list[Any]] = {}
        for layer in pb.program.layers:
            saved[layer.index] = []
            for op in layer.ops:
                h, s = op.forward(h, ctx)
                saved[layer.index].append(s)
                if _bad(h):
                    why = (
                        " (the variance of its input overflows)"
                        if op.kind.endswith("_norm")
                        else ""
                    )
                    return f"layer f_{layer.index}, the output of {_module(op)}{why}"
            if norms and _bad(sq_norms(h if pb.coupled else h.reshape(P, -1))):
                return f"||f_{layer.index}||^2, the squared norm of layer f_{layer.index}'s output"
        if pb.error is None:
            continue
        y = pb.y[ds, bs]
        e = error_value(pb.error, h, y)
        f0 = e.sum(1) if pb.coupled else e
        if _bad(f0):
            return f"the error f_0 (error={pb.error!r}) of the model's output f_1"
        if norms and _bad(f0.square()):
            return f"||f_0||^2, the square of the error f_0 (error={pb.error!r})"
        v = ctx.rows(error_grad(pb.error, h, y))
        for m in range(0, pb.L):
            if m > 0:
                layer = pb.program.layer(m)
                for op, s in zip(reversed(layer.ops), reversed(saved[m])):
                    v = op.vjp(v, s)
                    if _bad(v):
                        return (
                            f"the gradient d f_0 / d f_{m + 1} in the backward pass through "
                            f"layer f_{m}, at {_module(op)}"
                        )
            if norms and _bad(sq_norms(v)):
                return f"||d f_0 / d f_{m + 1}||^2, the squared norm of the gradient"
    return None
