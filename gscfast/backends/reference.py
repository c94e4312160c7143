"""The reference backend: plain torch autograd on copies of the original modules.

This is the ground truth every fast backend is tested against, so it favours obvious correctness
over speed and is meant for small problems. It never uses the analytic rules of
``gscfast.rules``: every layer function is the original modules called in order (``m(h)``) on
deep copies (the user's model is never touched), every Jacobian comes from autograd
(``torch.autograd.functional.jacobian`` / ``torch.autograd.grad``), one datapoint at a time, and
the error layer ``f_0`` is written out from definitions.md.

Batch norm:
- eval mode (running statistics): the module runs as is.
- batch datapoints (``pb.coupled``): train-mode batch norm runs on the whole ``[B, d]`` batch
  of the datapoint, so its Jacobians couple the samples.
- ``pb.frozen``: for each dataset, ``gscfast.nn.freeze_batchnorm`` runs the dataset through
  train-mode copies, recording the mean and biased variance of every batch-statistics batch
  norm's input with plain torch, and switches them to eval mode with those statistics as their
  running statistics (eval batch norm computes ``(x - running_mean) / sqrt(running_var + eps)``),
  i.e. constants. Not the engines' ``gscfast.frozen.frozen_stats``: the oracle computes its own
  statistics, so that a bug there cannot hide in both.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..compiler import Program
from ..nn import call_from_current_state, freeze_batchnorm, uses_batch_stats
from ..validation import Problem
from .base import Backend, Moments, ProbeFn, Sweep

Mods = list[nn.Module]  # one layer's modules, run in order


def _has_batch_stats(layers: list[Mods]) -> bool:
    """Whether a batch norm in ``layers`` (residual bodies included) uses batch statistics."""
    return any(
        isinstance(m, _BatchNorm) and uses_batch_stats(m)
        for mods in layers
        for top in mods
        for m in top.modules()
    )


def _copy_layers(program: Program, like: Tensor) -> list[Mods]:
    """Deep copies of ``program``'s layers' modules in model order, in ``like``'s dtype/device.

    One ``deepcopy`` for all layers, so a module shared between layers stays shared.
    """
    layers = copy.deepcopy([list(layer.modules) for layer in program.layers])
    for mods in layers:
        for m in mods:
            m.to(device=like.device, dtype=like.dtype)
            m.requires_grad_(False)
            for sub in m.modules():
                if isinstance(sub, (nn.LayerNorm, _BatchNorm)):
                    sub.register_forward_hook(_nan_if_variance_overflows)
                elif list(sub.buffers(recurse=False)):
                    call_from_current_state(sub)
    return layers


def _nan_if_variance_overflows(m: nn.Module, args: tuple[Tensor], out: Tensor) -> Tensor | None:
    """Forward hook of the copies' normalizations: where the variance of the input is not finite
    in its dtype, torch's module outputs zeros (finite but wrong); output NaN instead, which
    ``finite.check_results`` refuses, as every backend does."""
    if isinstance(m, nn.LayerNorm):
        dim = -1
    elif isinstance(m, _BatchNorm) and uses_batch_stats(m):
        dim = 0
    else:
        return None
    return (
        None
        if bool(torch.isfinite(args[0].detach().var(dim, correction=0)).all())
        else out + math.nan
    )


def _run(mods: Mods, shape: tuple[int, ...], h: Tensor, pre: list[Tensor] | None = None) -> Tensor:
    """Run one layer's modules on ``h [N, d_in]`` (flat samples of ``shape``, unflattened for the
    modules) -> ``[N, d_out]``; append the last module's input (flat) to ``pre``."""
    N = h.shape[0]
    h = h.reshape(N, *shape)
    for i, m in enumerate(mods):
        if pre is not None and i == len(mods) - 1:
            pre.append(h.reshape(N, -1))
        h = m(h)
    return h.reshape(N, -1)


def _freeze(layers: list[Mods], x: Tensor) -> list[Mods]:
    """Copies of ``layers`` whose batch-statistics batch norms hold the statistics of their input
    when ``x`` (one dataset, ``[B, n]``) runs through them (``gscfast.nn.freeze_batchnorm``; one
    copy of all layers, so a module shared between layers stays shared)."""
    frozen = freeze_batchnorm(nn.Sequential(*(nn.Sequential(*mods) for mods in layers)), x)
    return [list(seq.children()) for seq in frozen.children()]


def _error(kind: str, out: Tensor, y: Tensor) -> Tensor:
    """``f_0`` of one datapoint: the sum over its samples (rows of ``out [S, m]``) of ``e_i``."""
    if kind == "dot":
        return (out * y.to(out.dtype)).sum()
    if kind == "kl":
        return F.cross_entropy(out, y.long(), reduction="sum")  # sum_i -log softmax(out_i)[c_i]
    raise ValueError(f"unknown error kind {kind!r}")


def _jac(fn: Callable[[Tensor], Tensor | tuple[Tensor, ...]], h: Tensor):
    return torch.autograd.functional.jacobian(fn, h.detach(), vectorize=True)


class _Data:
    """Per-dataset layer functions and per-datapoint inputs of one ``Problem``."""

    def __init__(self, pb: Problem, program: Program | None = None) -> None:
        self.pb = pb
        self.program = program or pb.program
        self.L = self.program.L
        self.base = _copy_layers(self.program, pb.x)
        if _has_batch_stats(self.base) and not (pb.coupled or pb.frozen):
            raise ValueError(
                "the model has batch norm with batch statistics: it needs batch "
                "datapoints (coupled) or frozen statistics"
            )

    def shape(self, m: int) -> tuple[int, ...]:
        """One sample's input shape of layer ``m`` (paper index)."""
        shape = self.pb.program.layer(m).shape_in  # the trained program's (init: the same)
        assert shape is not None  # the Problem binds its program
        return shape

    def layers(self, d: int) -> list[Mods]:
        """Model-order layer modules for dataset ``d`` (frozen statistics of that dataset)."""
        if not self.pb.frozen:
            return self.base
        return _freeze(self.base, self.pb.x[d].reshape(self.pb.B, *self.shape(self.L)))

    def datapoints(self, d: int):
        """``(p, rows)`` for the datapoints of dataset ``d``: rows is a slice of samples."""
        pb = self.pb
        if pb.coupled:
            yield d, slice(0, pb.B)
        else:
            for b in range(pb.B):
                yield d * pb.B + b, slice(b, b + 1)

    def all(self):
        """``(p, d, rows, layers)`` for every datapoint, in dataset-major order."""
        for d in range(self.pb.D):
            layers = self.layers(d)
            for p, rows in self.datapoints(d):
                yield p, d, rows, layers

    def has_error(self) -> bool:
        return self.pb.error is not None and self.pb.y is not None

    def f0(self, out: Tensor, d: int, rows: slice) -> Tensor:
        assert self.pb.error is not None and self.pb.y is not None  # callers check has_error()
        return _error(self.pb.error, out, self.pb.y[d, rows])

    def forward(
        self, layers: list[Mods], x: Tensor, pre: dict[int, list[Tensor]] | None = None
    ) -> dict[int, Tensor]:
        """``{L+1: x, L: f_L, ..., 1: f_1}``; pre-activations appended to ``pre[l]``."""
        fs = {self.L + 1: x}
        for i, mods in enumerate(layers):
            m = self.L - i
            want = pre is not None and self.program.layer(m).has_preactivation
            fs[m] = _run(
                mods,
                self.shape(m),
                fs[m + 1],
                pre.setdefault(m, []) if pre is not None and want else None,
            )
        return fs

    def compose(self, layers: list[Mods], start: int, end: int) -> Callable[[Tensor], Tensor]:
        """``f_start -> f_end`` (``start >= end >= 1``)."""

        def fn(h: Tensor) -> Tensor:
            for m in range(start - 1, end - 1, -1):
                h = _run(layers[self.L - m], self.shape(m), h)
            return h

        return fn


class ReferenceBackend(Backend):
    """Ground truth by autograd on copies of the original modules (small problems only)."""

    name = "reference"
    priority = -100

    # ------------------------------------------------------------------ sweep
    def sweep(self, pb: Problem, *, grads: bool, stats: bool) -> Sweep:
        data = _Data(pb)
        L, x = pb.L, pb.x
        sq_out = torch.full((pb.P, L + 1), math.nan, dtype=x.dtype, device=x.device)
        sq_grad = torch.full_like(sq_out, math.nan)  # returned only with grads
        pre: dict[int, list[Tensor]] | None = {} if stats else None
        for p, d, rows, layers in data.all():
            xin = x[d, rows].detach().clone().requires_grad_(grads and data.has_error())
            with torch.set_grad_enabled(grads and data.has_error()):
                fs = data.forward(layers, xin, pre)
                for l in range(1, L + 1):
                    sq_out[p, l] = fs[l].detach().square().sum()
                if data.has_error():
                    f0 = data.f0(fs[1], d, rows)
                    sq_out[p, 0] = f0.detach().square()
            if grads:
                sq_grad[p, 0] = 1.0
                if data.has_error():
                    outs = [fs[l] for l in range(1, L + 1)]
                    gs = torch.autograd.grad(f0, outs, allow_unused=True)
                    for l, g in zip(range(1, L + 1), gs):
                        sq_grad[p, l] = 0.0 if g is None else g.square().sum()
        moments: list[Moments | None] | None = None
        if pre is not None:  # stats
            moments = [None] * (L + 1)
            for l, zs in pre.items():
                moments[l] = Moments.of(torch.cat([z.detach() for z in zs], 0))
        return Sweep(sq_out, sq_grad if grads else None, moments)

    # ------------------------------------------------------------------ chain
    def chain(self, pb: Problem, probes: ProbeFn | None) -> Tensor:
        data = _Data(pb)
        L, x, S = pb.L, pb.x, pb.S
        V = None
        if probes is not None:
            V = {}
            for l in range(1, L + 1):
                v = probes(l).to(device=x.device, dtype=x.dtype)
                if v.dim() != 3 or v.shape[1:] != (S, pb.widths[l]):
                    raise ValueError(
                        f"probes({l}) has shape {tuple(v.shape)}, expected [R, {S}, {pb.widths[l]}]"
                    )
                V[l] = v.reshape(v.shape[0], -1)
        out = torch.full((pb.P, L + 1, L + 1), math.nan, dtype=x.dtype, device=x.device)
        for p, d, rows, layers in data.all():
            with torch.no_grad():
                fs = data.forward(layers, x[d, rows])
            out[p, 0, 0] = 1.0
            for l in range(1, L + 1):
                out[p, l, l] = pb.n(l) if V is None else V[l].square().sum() / V[l].shape[0]
            for k in range(1, L + 1):
                # one Jacobian of f_k -> (f_{k-1}, ..., f_1[, f_0]) through the composed layers
                ends = list(range(k - 1, 0, -1))

                def fn(h: Tensor, k=k, ends=ends, d=d, rows=rows, layers=layers):
                    res, cur = [], h
                    for m in range(k - 1, 0, -1):
                        cur = _run(layers[L - m], data.shape(m), cur)
                        res.append(cur)
                    if data.has_error():
                        res.append(data.f0(cur, d, rows))
                    return tuple(res)

                if not ends and not data.has_error():
                    continue
                jacs = _jac(fn, fs[k])
                nk = fs[k].numel()
                for l, J in zip(ends, jacs):
                    J = J.reshape(-1, nk)
                    out[p, k, l] = (
                        J.square().sum() if V is None else (V[l] @ J).square().sum() / V[l].shape[0]
                    )
                if data.has_error():
                    out[p, k, 0] = jacs[-1].square().sum()
        return out

    # ------------------------------------------------------------------ jacobian
    def jacobian(self, pb: Problem, start: int, end: int) -> Tensor:
        L = pb.L
        if not (1 <= end <= start <= L + 1 and end <= L):
            raise ValueError(
                f"need 1 <= end <= start <= L+1 and end <= L (L={L}), got start={start}, end={end}"
            )
        data = _Data(pb)
        x, S, w = pb.x, pb.S, pb.widths
        out = torch.empty((pb.P, S * w[end], S * w[start]), dtype=x.dtype, device=x.device)
        for p, d, rows, layers in data.all():
            if start == end:
                out[p] = torch.eye(S * w[end], dtype=x.dtype, device=x.device)
                continue
            with torch.no_grad():
                h = data.compose(layers, L + 1, start)(x[d, rows]) if start <= L else x[d, rows]
            J = _jac(data.compose(layers, start, end), h)
            out[p] = J.reshape(S * w[end], S * w[start])
        return out

    # ------------------------------------------------------------------ contributions
    def contributions(self, pb: Problem, init: Program) -> Tensor:
        if pb.error is None or pb.y is None:
            raise ValueError("contributions need the error layer (error and y)")
        if init.L != pb.L:
            raise ValueError(f"init has {init.L} layers, the model {pb.L}")
        data = _Data(pb)
        idata = _Data(pb, init)
        L, x = pb.L, pb.x
        out = torch.full((pb.P, L + 1, L + 1), math.nan, dtype=x.dtype, device=x.device)
        for d in range(pb.D):
            layers = data.layers(d)
            ilayers = idata.base
            if pb.frozen:  # init layer m: batch statistics of its own input, the trained f_{m+1}
                with torch.no_grad():
                    hs = data.forward(layers, x[d])
                ilayers = [
                    _freeze([mods], hs[L - i + 1].reshape(pb.B, *data.shape(L - i)))[0]
                    for i, mods in enumerate(idata.base)
                ]
            for p, rows in data.datapoints(d):
                xin = x[d, rows].detach().clone().requires_grad_(True)
                fs = data.forward(layers, xin)
                f0 = data.f0(fs[1], d, rows)
                (g0,) = torch.autograd.grad(f0, [fs[1]])
                v = {0: g0.reshape(1, -1)}  # v_1^(lam)
                out[p, 0, 0] = 1.0
                out[p, 1, 0] = g0.square().sum()
                for l in range(1, L):  # v_{l+1}^(lam) = v_l^(lam) S_l + v_l^(lam-1) R_l
                    h = fs[l + 1].detach()
                    shape = (fs[l].numel(), h.numel())
                    G = _jac(functools.partial(_run, layers[L - l], data.shape(l)), h).reshape(
                        shape
                    )
                    Sm = _jac(functools.partial(_run, ilayers[L - l], data.shape(l)), h).reshape(
                        shape
                    )
                    R = G - Sm
                    new = {}
                    for lam in range(l + 1):
                        acc = torch.zeros(1, h.numel(), dtype=x.dtype, device=x.device)
                        if lam in v:
                            acc = acc + v[lam] @ Sm
                        if lam - 1 in v:
                            acc = acc + v[lam - 1] @ R
                        new[lam] = acc
                        out[p, l + 1, lam] = acc.square().sum()
                    v = new
        return out
