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

import math
from typing import Any

import torch
from torch import Tensor

from ..errors import NumericalError
from ..rules import error_grad, error_value
from ..rules.base import op_forward, op_vjp
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
    """``NumericalError`` naming where values stop being finite, if any defined entry of a
    backend's ``result`` (of ``method``) is NaN or Inf; or where a sweep's squared norms
    underflow (``check_underflow``)."""
    _check_finite_results(pb, method, result, init)
    if method == "sweep":
        check_underflow(pb, result, init)


def check_underflow(pb, result, init=None) -> None:
    """``NumericalError`` where a sweep's squared norms or moments, summed in the computation's
    dtype (float32 say), lost values to underflow: a value below the square root of the dtype's
    smallest normal number (1.1e-19 in float32) has a square with few significant bits or none
    (flushed to 0), so ``||f_l||^2`` of values of 1e-36 comes out as 0, and GSCs as 0 / 0 or
    pre-activation stds as 0, with no NaN or Inf to show it.

    Only a squared norm below ``n(l) * tiny / eps`` can have lost more than ``eps`` of itself so;
    where one is (exact zeros included: a dead ReLU layer), ``locate_underflow`` runs the problem
    again through the rules, summing squares in float64, and decides."""
    dtype = result.sq_out.dtype
    if dtype == torch.float64:  # its range (1e-308) is beyond any network's values
        return
    fi = torch.finfo(dtype)
    bound = torch.tensor(pb.columns, dtype=torch.float64) * (fi.tiny / fi.eps)
    bound = bound.to(result.sq_out.device)
    first = 0 if pb.error is not None else 1  # ||f_0|| is NaN by definition without y
    low = any(
        bool((t[:, first:].to(torch.float64) < bound[first:]).any())
        for t in (result.sq_out, result.sq_grad)
        if t is not None
    )
    if low:
        where = locate_underflow(pb, init)
        if where is not None:
            raise NumericalError(underflow_message(dtype, where))


def check_product_underflow(pb, method: str, result: Tensor, arg: Any, rerun: Any) -> None:
    """``NumericalError`` where ``chain``'s ``||J_k^l||^2`` or ``contributions``'
    ``||g_l^(lambda)||^2``, summed in float32 say, lost values to underflow (see
    ``check_underflow``). Only an entry below ``terms * tiny / eps`` can have; where one is, the
    backend runs the method again in float64 (``rerun(pb64, arg)``: a float64 copy of the
    models; the same probes or initial model, ``arg``), and entries under the bound that differ
    from it by more than 1e-3 are refused, naming the pair.

    A backend that sums the squares in float64 returns ``result`` in float64 (the API's
    expectations are in float64 anyway). Its squares cannot underflow; only the values
    themselves can, each computed by at most ``c = 8 * max width`` float32 operations (a GEMM of
    inner dimension up to twice a width and the elementwise steps around it), each of which
    loses at most ``tiny`` to underflow. A squared norm of ``terms`` values at or above
    ``terms * (c * tiny / eps)^2`` has a root mean square value of at least ``c * tiny / eps``,
    so underflow costs it less than ``eps`` relative, as rounding does: only entries below that
    are run again. (The coupled effective depth's high-order contributions, 1e-34 at 10,000
    CIFAR-sized images, are normal numbers whose float32 squares would still be exact, but fell
    below the first bound, and every call ran twice.)"""
    dtype = pb.x.dtype
    if dtype == torch.float64:
        return
    fi = torch.finfo(dtype)
    n = torch.tensor(pb.columns, dtype=torch.float64, device=result.device)
    terms = n[:, None] * n[None, :] if method == "chain" else n[:, None].expand(-1, n.shape[0])
    if result.dtype == torch.float64:  # squares summed in float64
        floor = (8 * max(pb.widths) * fi.tiny / fi.eps) ** 2
    else:
        floor = fi.tiny / fi.eps
    r = result.to(torch.float64)
    low = (r < terms * floor) & _defined(pb, method)
    if not bool(low.any()):
        return
    import copy
    import dataclasses

    from ..compiler import Program

    y = pb.y.double() if pb.y is not None and pb.y.is_floating_point() else pb.y
    pb64 = dataclasses.replace(
        pb, program=Program(copy.deepcopy(pb.program.model).double()), x=pb.x.double(), y=y
    )
    if method == "contributions":
        arg = Program(copy.deepcopy(arg.model).double(), "init_model")
    r64 = rerun(pb64, arg).to(device=r.device, dtype=torch.float64)
    # Only entries under the bound can have lost to underflow. The others differ from float64
    # by float32's rounding, as every float32 result does; in a chaotic network (layer-tanh, 50
    # layers) that is more than 1e-3 for some gradients, which were refused as "underflow".
    lost = low & ((r - r64).abs() > 1e-3 * r64.abs())
    if bool(lost.any()):
        p, a, b = (int(i) for i in lost.nonzero()[0])
        what = f"||J_{a}^{b}||^2" if method == "chain" else f"||g_{a}^({b})||^2"
        raise NumericalError(
            underflow_message(
                dtype,
                f"{what} of datapoint {p} ({float(r[p, a, b]):.3g}; in float64 "
                f"{float(r64[p, a, b]):.3g})",
            )
        )


def locate_underflow(pb, init=None) -> str | None:
    """Run ``pb`` through the rules (one pass of the torch engine) and name the first layer
    value, pre-activation or gradient whose entries below ``sqrt(tiny)`` of the dtype make up more
    than ``eps`` of its squared norm (squared in float64), or None."""
    fi = torch.finfo(pb.x.dtype)
    small = math.sqrt(fi.tiny)

    def lost(t: Tensor, rows: int) -> bool:
        v = t.reshape(rows, -1).to(torch.float64)
        sq = v.square()
        return bool(((sq * (v.abs() < small)).sum(1) > fi.eps * sq.sum(1)).any())

    w = pb.widths
    per = pb.x.element_size() * pb.S * 3 * sum(w[1:])
    for ds, bs, ctx in iter_chunks(pb, per, init=init):
        ctx.save = pb.error is not None
        h = pb.x[ds, bs]
        rows = h.shape[0] if pb.coupled else h.shape[0] * h.shape[1]
        saved: dict[int, Any] = {}
        for layer in pb.program.layers:
            m = layer.index
            h, saved[m], pre = layer.forward(h, ctx)
            if pre is not None and lost(pre, rows):
                return f"the pre-activation of layer f_{m}"
            if lost(h, rows):
                return f"layer f_{m}, the output of {_module(layer.ops[-1])}"
        if pb.error is None:
            continue
        v = ctx.rows(error_grad(pb.error, h, pb.y[ds, bs]))
        for m in range(0, pb.L):
            if m > 0:
                v = pb.program.layer(m).vjp(v, saved[m])
            if lost(v, v.shape[0]):
                return f"the gradient d f_0 / d f_{m + 1}"
    return None


def _check_finite_results(pb, method: str, result, init=None) -> None:
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
    raise NumericalError(message(pb.x.dtype, where))


def underflow_message(dtype: torch.dtype, where: str) -> str:
    """The refusal of a computation in ``dtype`` whose values underflow at ``where``."""
    return (
        f"values or their squares underflow below the smallest normal {dtype} "
        f"({torch.finfo(dtype).tiny:.3g}) at {where}: such numbers keep few significant bits or "
        "none (0 where flushed), and gscfast refuses to return the wrong numbers that follow. To proceed, compute in float64 (model.double(), "
        "x.double()), or rescale the inputs, weights or targets."
    )


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
                h, s = op_forward(op, h, ctx)
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
                    v = op_vjp(op, v, s)
                    if _bad(v):
                        return (
                            f"the gradient d f_0 / d f_{m + 1} in the backward pass through "
                            f"layer f_{m}, at {_module(op)}"
                        )
            if norms and _bad(sq_norms(v)):
                return f"||d f_0 / d f_{m + 1}||^2, the squared norm of the gradient"
    return None
