"""What the fused GPU backends (``"triton"``, ``"cupy"``) share: the layer plan and the orchestration.

A fused backend implements three kernels behind one small interface (``FusedEngine``); this
module runs the forward pass, the backward sweep of ``GSC(l, 0)``, the Jacobian chains, the
per-sample Jacobian and the effective-depth recursion with them, chunk by chunk.

What is fused: models whose every layer is ``nn.Linear -> [nn.LayerNorm (last dim) | nn.BatchNorm1d
with fixed statistics] -> [activation]`` (activations ReLU, LeakyReLU, Tanh, Sigmoid, ELU, SELU,
Softplus, GELU (both forms), Identity), float32 or float64, with per-sample datapoints: no batch
norm, eval-mode batch norm, or train-mode batch norm with ``batchnorm="frozen"`` (per-dataset
constants). Everything else (train-mode batch norm coupling a batch, ``Residual`` blocks, other
layer shapes, other dtypes, a gradient asked for without an error layer) takes the ``"torch"``
engine's path on the same device: slower, never a different number. In a model the kernels
take in part, its runs of layers they take run on them (``span_forward``, ``span_backward``,
``span_contributions``: ``lowering.FusedBackend``).

The three kernels (index letters as in ``backends/base.py``; ``N`` samples of a chunk, ``R`` rows
stacked per sample, a layer maps ``d_in -> d_out``):

- ``layer_fwd``: ``z = x W^T + b`` then the norm and the activation, in one pass over a tile of
  samples holding whole output rows; writes the output, the saved state of the layer's VJP
  (``ds [N, d_out]`` = activation derivative times the diagonal batch-norm scale; ``xh [N, d_out]``,
  ``inv [N]`` for layer norm), ``||f||^2`` per sample and per-tile pre-activation moments.
- ``chain_step``: for a tile of rows ``V [N*R, d_out]`` (or one ``[R, d_out]`` matrix broadcast
  over samples: identity or probe rows): scale by ``ds``, apply the layer-norm projection, multiply
  by ``W`` (``[d_out, d_in]``), write the result if asked and every row's squared norm.
- ``contrib_step``: the effective-depth recursion ``v^(lam) S + v^(lam-1) (G - S)`` for all
  ``lam`` of a tile at once (three products sharing the loads), rows' squared norms.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..compiler import Layer, Program
from ..frozen import FrozenStats
from ..rules import error_grad, error_value
from ..validation import Problem
from .base import Moments, ProbeFn, Sweep
from .chunks import iter_chunks
from .lowering import FusedBackend, LayerPlan, Norm, fused_or_fallback, lower
from .torch_engine import SpanForward

DTYPES = (torch.float32, torch.float64)

POISON = os.environ.get("GSCFAST_POISON", "") == "1"
"""Fill every buffer the engine allocates with NaN first (tests: an element no kernel writes shows)."""


def empty(shape, like: Tensor) -> Tensor:
    t = torch.empty(shape, dtype=like.dtype, device=like.device)
    return t.fill_(float("nan")) if POISON else t


@dataclass
class LayerSpec(LayerPlan):
    """A ``LayerPlan`` on the chunk's device and dtype (tensors contiguous; the diagonal batch
    norm's ``mean``/``gamma`` rows are groups of ``group_rows`` consecutive samples), with
    ``params = [eps, p0, p1]`` as a tensor in the kernel dtype (no float32 rounding of them)."""

    params: Tensor


@dataclass
class Saved:
    """What a layer's VJP needs, per sample of a chunk: ``ds [N, d_out]``, ``xh [N, d_out]``,
    ``inv [N]`` (None where the layer has no such factor)."""

    ds: Tensor | None
    xh: Tensor | None
    inv: Tensor | None


def build_specs(
    program: Program | list[Layer], like: Tensor, frozen: FrozenStats | None
) -> list[LayerSpec]:
    """``program``'s plans (``lowering.lower``) in model order on ``like``'s device and dtype.
    ``frozen`` holds its batch norms' frozen batch statistics ``(mean, var)`` of shape ``[G, 1, d]``
    (``iter_chunks``' ``ctx.frozen``)."""
    kw: dict[str, Any] = dict(dtype=like.dtype, device=like.device)

    specs = []
    for p in lower(program, frozen):
        tensors = {
            name: None if t is None else t.to(**kw).contiguous()
            for name in ("weight", "bias", "gamma", "beta", "mean")
            for t in [getattr(p, name)]
        }
        params = torch.tensor([p.eps, p.p0, p.p1], dtype=torch.float64).to(**kw)
        specs.append(LayerSpec(**{**vars(p), **tensors}, params=params))
    return specs


def merge_tiles(mom: Tensor, n: int, tile: int) -> Moments:
    """Per-tile moments ``mom [T, 4, d]`` (mean, M2, #positive, #negative of ``tile`` consecutive
    samples each, the last tile holding the rest of ``n``) -> one ``Moments`` (float64, Chan)."""
    T = mom.shape[0]
    m = mom.to(torch.float64)
    cnt = torch.full((T,), float(tile), dtype=torch.float64, device=mom.device)
    cnt[-1] = n - tile * (T - 1)
    mean = (cnt[:, None] * m[:, 0]).sum(0) / n
    m2 = m[:, 1].sum(0) + (cnt[:, None] * (m[:, 0] - mean).square()).sum(0)
    return Moments(n, mean, m2, m[:, 2].sum(0), m[:, 3].sum(0))


@dataclass
class Pass:
    """One chunk's fused forward pass."""

    N: int
    sq_out: Tensor  # [N, L+1]
    saved: dict[int, Saved]  # paper index -> VJP state
    saved0: dict[int, Saved]  # the same for ``init`` at the trained layer inputs
    specs: dict[int, LayerSpec]
    specs0: dict[int, LayerSpec]
    grad: Tensor | None  # [N, d_1]: d f_0 / d f_1


def _or(t: Tensor | None, dummy: Tensor) -> Tensor:
    """A kernel's pointer argument: ``t``, or a one-element dummy the kernel does not read."""
    return dummy if t is None else t


@dataclass
class KernelCall:
    """One launch of a fused kernel as both GPU backends make it.

    ``kind``: ``"fwd"`` (``layer_fwd``), ``"step"`` (``chain_step``) or ``"contrib"``
    (``contrib_step``); ``args``: its arguments in the kernels' order (absent tensors replaced by
    a dummy); ``switches``: its on/off features, named as ``cuda_sources.Flag`` and as the Triton
    kernels' constexprs; ``rows``: the rows it covers (samples for ``fwd``); ``spec``: the layer.
    """

    kind: str
    args: tuple
    switches: dict[str, bool]
    rows: int
    spec: LayerSpec


class FusedEngine(FusedBackend):
    """The four methods on three fused kernels; subclasses supply the kernels and the device test.

    Subclasses implement ``_device_ok``, ``moment_tile`` and ``_launch`` (one ``KernelCall``).
    """

    # ---------------------------------------------------------------- kernel interface

    def _device_ok(self, device: torch.device) -> bool:
        raise NotImplementedError

    def _launch(self, call: KernelCall) -> None:
        """Run one kernel launch (see ``KernelCall``) on the backend's kernels."""
        raise NotImplementedError

    def moment_tile(self, spec: LayerSpec) -> int:
        """Samples per tile of ``_layer_fwd``'s moments."""
        raise NotImplementedError

    # The three kernels' arguments, built once for both GPU backends (the kernels' ABI).

    def _layer_fwd(
        self,
        x: Tensor,
        spec: LayerSpec,
        group_rows: int,
        y: Tensor,
        saved: Saved,
        sq: Tensor | None,
        mom: Tensor | None,
    ) -> None:
        """``x [N, d_in]`` -> ``y [N, d_out]`` (also scratch when the output is not needed),
        ``saved``'s tensors, ``sq [N]`` = ``||y||^2``, ``mom [T, 4, d_out]`` per ``moment_tile``."""
        N, d = x.shape[0], x.new_empty(1)
        args = (
            x,
            spec.weight,
            _or(spec.bias, d),
            _or(spec.gamma, d),
            _or(spec.beta, d),
            _or(spec.mean, d),
            spec.params,
            y,
            _or(saved.ds, d),
            _or(saved.xh, d),
            _or(saved.inv, d),
            _or(sq, d),
            _or(mom, d),
            N,
            spec.din,
            spec.dout,
            group_rows,
        )
        switches = dict(
            HAS_BIAS=spec.bias is not None,
            HAS_GAMMA=spec.gamma is not None,
            HAS_BETA=spec.beta is not None,
            SAVE_DS=saved.ds is not None,
            SAVE_LN=saved.xh is not None,  # only layer norm saves xh (``_alloc_saved``)
            WRITE_SQ=sq is not None,
            STATS=mom is not None,
        )
        self._launch(KernelCall("fwd", args, switches, N, spec))

    @staticmethod
    def _vjp_switches(spec: LayerSpec) -> dict[str, bool]:
        ln = spec.norm == Norm.LAYER
        return dict(HAS_DS=spec.has_ds, LN=ln, HAS_GAMMA=ln and spec.gamma is not None)

    @staticmethod
    def _vjp_args(spec: LayerSpec, saved: Saved, d: Tensor) -> tuple:
        """The layer's VJP state: ``ds``, layer norm's ``gamma``, ``xh``, ``inv``, ``W``."""
        gamma = spec.gamma if spec.norm == Norm.LAYER else None
        return (_or(saved.ds, d), _or(gamma, d), _or(saved.xh, d), _or(saved.inv, d), spec.weight)

    def _chain_step(
        self,
        v: Tensor,
        rows: int,
        R: int,
        svn: int,
        svr: int,
        spec: LayerSpec,
        saved: Saved,
        out: Tensor | None,
        sqr: Tensor | None,
    ) -> None:
        """Row ``r`` (sample ``r // R``, row ``r % R`` of it) is ``v[(r // R) * svn + (r % R) * svr
        + :d_out]``; ``out [rows, d_in]`` = its VJP through the layer, ``sqr [rows]`` its squared norm."""
        d = v.new_empty(1)
        args = (
            v,
            *self._vjp_args(spec, saved, d),
            _or(out, d),
            _or(sqr, d),
            rows,
            R,
            spec.dout,
            spec.din,
            svn,
            svr,
        )
        switches = {
            **self._vjp_switches(spec),
            "STORE": out is not None,
            "WRITE_SQ": sqr is not None,
        }
        self._launch(KernelCall("step", args, switches, rows, spec))

    def _contrib_step(
        self,
        v: Tensor,
        N: int,
        M: int,
        spec: LayerSpec,
        saved: Saved,
        spec0: LayerSpec,
        saved0: Saved,
        out: Tensor,
        sqr: Tensor,
    ) -> None:
        """``v [N, M, d_out]`` -> ``out [N, M+1, d_in]``: ``out[:, j] = v[:, j] S + v[:, j-1] G -
        v[:, j-1] S`` (missing terms zero), ``S``/``G`` the layer's VJP with ``spec0``/``spec``;
        ``sqr [N*(M+1)]`` the rows' squared norms."""
        d = v.new_empty(1)
        args = (
            v,
            *self._vjp_args(spec, saved, d),
            *self._vjp_args(spec0, saved0, d),
            out,
            sqr,
            N,
            M,
            spec.dout,
            spec.din,
        )
        self._launch(KernelCall("contrib", args, self._vjp_switches(spec), N * (M + 1), spec))

    # ---------------------------------------------------------------- dispatch

    def takes(self, pb: Problem, method: str) -> bool:
        """Per-sample datapoints of float32 or float64 on a device the kernels run on."""
        return not pb.coupled and pb.x.dtype in DTYPES and self._device_ok(pb.x.device)

    def _fused_bytes(self, pb: Problem, rows: int, init: bool = False) -> int:
        """Working set per sample: saved state of every layer (twice with ``init``), the output
        rows of a step (in and out) and the forward activations."""
        w = pb.widths
        item = pb.x.element_size()
        saved = 2 * sum(w[1:-1]) + 2 * pb.L
        return item * (
            (2 if init else 1) * saved + 2 * rows * max(w[1:]) + 3 * max(w[1:]) + pb.L + 1
        )

    def _forward(
        self,
        pb: Problem,
        ds: slice,
        bs: slice,
        ctx,
        *,
        save: bool,
        moments: list | None = None,
        init: Program | None = None,
    ) -> Pass:
        x = pb.x[ds, bs]
        Dc, b, n = x.shape
        N, L = Dc * b, pb.L
        specs = build_specs(pb.program, x, ctx.frozen)
        specs0 = build_specs(init, x, ctx.frozen_init) if init is not None else None
        sq_t = x.new_full((L + 1, N), float("nan"))  # kernels write rows of it; sq_out is its view
        fw = Pass(N, sq_t.t(), {}, {}, {}, {}, None)
        group_rows = b if pb.frozen else N
        h = x.reshape(N, n)
        h = self._layers_fwd(specs, h.contiguous(), group_rows, fw, sq_t, save, moments, specs0)
        if pb.error is not None:
            assert pb.y is not None  # validation: an error layer comes with targets
            out = h.reshape(Dc, b, -1)
            yt = pb.y[ds, bs]
            e = error_value(pb.error, out, yt).reshape(N)
            fw.sq_out[:, 0] = e.square()
            fw.grad = error_grad(pb.error, out, yt).reshape(N, -1).contiguous()
        return fw

    def _layers_fwd(
        self,
        specs: list[LayerSpec],
        h: Tensor,
        group_rows: int,
        fw: Pass,
        sq_t: Tensor,
        save: bool,
        moments: list | None = None,
        specs0: list[LayerSpec] | None = None,
    ) -> Tensor:
        """The layers of ``specs`` (paper indices ``spec.index``) on ``h [N, d_in]``: their saved
        state into ``fw``, ``||f_m||^2`` into ``sq_t[m]``, moments into ``moments[m]``, ``init``'s
        layers (``specs0``) at the same inputs; returns the last output."""
        x, N = h, fw.N
        for i, spec in enumerate(specs):
            m = spec.index
            fw.specs[m] = spec
            y = empty((N, spec.dout), x)
            sv = self._alloc_saved(spec, N, x, save)
            sq = sq_t[m]
            mom = None
            if moments is not None and spec.has_pre:
                tile = self.moment_tile(spec)
                mom = empty((-(-N // tile), 4, spec.dout), x)
            self._layer_fwd(h, spec, group_rows, y, sv, sq, mom)
            fw.saved[m] = sv
            if moments is not None and mom is not None:
                mo = merge_tiles(mom, N, tile)
                moments[m] = mo if moments[m] is None else moments[m].merge(mo)
            if specs0 is not None:
                spec0 = specs0[i]
                fw.specs0[m] = spec0
                sv0 = self._alloc_saved(spec0, N, x, True)
                self._layer_fwd(h, spec0, group_rows, empty((N, spec0.dout), x), sv0, None, None)
                fw.saved0[m] = sv0
            h = y
        return h

    @staticmethod
    def _alloc_saved(spec: LayerSpec, N: int, like: Tensor, save: bool) -> Saved:
        if not save:
            return Saved(None, None, None)
        ln = spec.norm == Norm.LAYER
        return Saved(
            empty((N, spec.dout), like) if spec.has_ds else None,
            empty((N, spec.dout), like) if ln else None,
            empty((N,), like) if ln else None,
        )

    def _steps(
        self,
        fw: Pass,
        v: Tensor,
        R: int,
        broadcast: bool,
        k0: int,
        k1: int,
        dest: Tensor,
        scale: float,
    ) -> Tensor:
        """Push ``R`` rows per sample (one ``[R, d]`` matrix for all samples if ``broadcast``)
        through layers ``k0 .. k1-1``; ``dest[:, k+1]`` (``dest [N, L+1]``, a view) = each sample's
        squared norm after layer ``k`` divided by ``scale``. Returns the last rows ``[N*R, d]``.

        The kernels write every step's row norms into one buffer, reduced once at the end (no
        small launches between the steps)."""
        N = fw.N
        if k1 <= k0:
            return v
        sq = empty((k1 - k0, N * R), v)
        for k in range(k0, k1):
            spec = fw.specs[k]
            dout = spec.dout
            svn, svr = (0, dout) if broadcast else (R * dout, dout)
            out = empty((N * R, spec.din), v)
            self._chain_step(v, N * R, R, svn, svr, spec, fw.saved[k], out, sq[k - k0])
            v, broadcast = out, False
        s = sq.view(k1 - k0, N, R).sum(2) if R > 1 else sq
        dest[:, k0 + 1 : k1 + 1] = (s / scale if scale != 1 else s).T
        return v

    fuses_spans = True

    def span_forward(
        self, pb: Problem, span: list[Layer], h: Tensor, stats: bool, save: bool, rows: int = 1
    ) -> SpanForward:
        N, L = h.shape[0], pb.L
        end, first = span[-1].index, span[0].index  # the span maps f_{first+1} -> f_end
        sq_t = h.new_full((L + 1, N), float("nan"))
        fw = Pass(N, sq_t.t(), {}, {}, {}, {}, None)
        moments: list[Moments | None] | None = [None] * (L + 1) if stats else None
        specs = build_specs(span, h, None)
        out = self._layers_fwd(specs, h.contiguous(), N, fw, sq_t, save, moments)
        mom = None if moments is None else [None, *moments[end : first + 1]]
        return SpanForward(fw.sq_out[:, end - 1 : first + 1], mom, out, fw if save else None)

    def span_backward(
        self,
        pb: Problem,
        span: list[Layer],
        state: Pass,
        grad: Tensor,
        grad_in: bool,
        at: int | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        end, first = span[-1].index, span[0].index
        k = end if at is None else at  # the rows are at f_k
        N = state.N
        R = grad.shape[0] // N
        dest = grad.new_full((N, pb.L + 2), float("nan"))
        dest[:, k] = grad.reshape(N, -1).square().sum(1)
        v = self._steps(state, grad.contiguous(), R, False, k, first + int(grad_in), dest, 1.0)
        return dest[:, end - 1 : first + 1], (v if grad_in else None)

    def span_contributions(
        self,
        pb: Problem,
        span: list[Layer],
        init_span: list[Layer],
        h: Tensor,
        rows: Tensor,
        grad_in: bool,
    ) -> tuple[Tensor, Tensor | None]:
        N, Ls = h.shape[0], len(span)
        last, first = span[-1].index, span[0].index
        sq_t = h.new_full((pb.L + 1, N), float("nan"))
        fw = Pass(N, sq_t.t(), {}, {}, {}, {}, None)
        specs, specs0 = build_specs(span, h, None), build_specs(init_span, h, None)
        self._layers_fwd(specs, h.contiguous(), N, fw, sq_t, True, None, specs0)
        lam0 = rows.shape[0] // N
        res = h.new_full((N, Ls + 1, lam0 + Ls), float("nan"))
        v = rows.contiguous()
        for m in range(last, first + int(grad_in)):  # the layers whose VJPs are needed
            lam, spec = lam0 + m - last, fw.specs[m]
            nxt = empty((N * (lam + 1), spec.din), v)
            sqr = empty((N * (lam + 1),), v)
            self._contrib_step(v, N, lam, spec, fw.saved[m], fw.specs0[m], fw.saved0[m], nxt, sqr)
            if m < first:  # f_{m+1} is the span's row m - last + 2
                res[:, m - last + 2, : lam + 1] = sqr.view(N, lam + 1)
            v = nxt
        return res, (v if grad_in else None)

    # ---------------------------------------------------------------- the four methods

    @fused_or_fallback
    def sweep(self, pb: Problem, *, grads: bool, stats: bool) -> Sweep:
        L = pb.L
        moments: list[Moments | None] | None = [None] * (L + 1) if stats else None
        sq_out, sq_grad = [], []
        for ds, bs, ctx in iter_chunks(pb, self._fused_bytes(pb, 1)):
            fw = self._forward(pb, ds, bs, ctx, save=grads, moments=moments)
            sq_out.append(fw.sq_out)
            if grads:
                assert fw.grad is not None  # fused_or_fallback: a gradient needs an error layer
                g = fw.sq_out.new_full((fw.N, L + 1), float("nan"))
                g[:, 0] = 1
                g[:, 1] = fw.grad.square().sum(1)
                self._steps(fw, fw.grad, 1, False, 1, L, g, 1.0)  # the chain from l = 0
                sq_grad.append(g)
        return Sweep(torch.cat(sq_out), torch.cat(sq_grad) if grads else None, moments)

    @fused_or_fallback
    def chain(self, pb: Problem, probes: ProbeFn | None) -> Tensor:
        w, L = pb.widths, pb.L
        rows = max(w[1 : L + 1]) if probes is None else probes(1).shape[0]
        out = []
        for ds, bs, ctx in iter_chunks(pb, self._fused_bytes(pb, rows)):
            fw = self._forward(pb, ds, bs, ctx, save=True)
            res = fw.sq_out.new_full((fw.N, L + 1, L + 1), float("nan"))
            res[:, 0, 0] = 1
            if fw.grad is not None:
                res[:, 1, 0] = fw.grad.square().sum(1)
                self._steps(fw, fw.grad, 1, False, 1, L, res[:, :, 0], 1.0)
            for l in range(1, L + 1):
                if probes is None:
                    V = torch.eye(w[l], dtype=pb.x.dtype, device=pb.x.device)
                    r = 1.0
                else:
                    V = probes(l).to(pb.x).reshape(-1, w[l]).contiguous()
                    r = float(V.shape[0])
                res[:, l, l] = V.square().sum() / r
                self._steps(fw, V, V.shape[0], True, l, L, res[:, :, l], r)
            out.append(res)
        return torch.cat(out)

    @fused_or_fallback
    def jacobian(self, pb: Problem, start: int, end: int) -> Tensor:
        w = pb.widths
        N_all = pb.D * pb.B
        if start == end:
            eye = torch.eye(w[end], dtype=pb.x.dtype, device=pb.x.device)
            return eye.expand(N_all, w[end], w[end]).clone()
        result = empty((N_all, w[end], w[start]), pb.x)
        p0 = 0
        R = w[end]
        for ds, bs, ctx in iter_chunks(pb, self._fused_bytes(pb, R)):
            fw = self._forward(pb, ds, bs, ctx, save=True)
            N = fw.N
            v, broadcast = torch.eye(R, dtype=pb.x.dtype, device=pb.x.device), True
            for k in range(end, start):
                spec = fw.specs[k]
                last = k == start - 1
                o = (
                    result[p0 : p0 + N].view(N * R, spec.din)
                    if last
                    else empty((N * R, spec.din), v)
                )
                svn, svr = (0, spec.dout) if broadcast else (R * spec.dout, spec.dout)
                self._chain_step(v, N * R, R, svn, svr, spec, fw.saved[k], o, None)
                v, broadcast = o, False
            p0 += N
        return result

    @fused_or_fallback
    def contributions(self, pb: Problem, init: Program) -> Tensor:
        L, out = pb.L, []
        for ds, bs, ctx in iter_chunks(pb, self._fused_bytes(pb, L, init=True), init=init):
            fw = self._forward(pb, ds, bs, ctx, save=True, init=init)
            N = fw.N
            res = fw.sq_out.new_full((N, L + 1, L + 1), float("nan"))
            res[:, 0, 0] = 1
            v = fw.grad  # [N, 1, d_1]: g_1^(0)
            assert v is not None  # fused_or_fallback: contributions need an error layer
            res[:, 1, 0] = v.square().sum(1)
            for m in range(1, L):
                spec = fw.specs[m]
                nxt = empty((N * (m + 1), spec.din), v)
                sqr = empty((N * (m + 1),), v)
                self._contrib_step(v, N, m, spec, fw.saved[m], fw.specs0[m], fw.saved0[m], nxt, sqr)
                res[:, m + 1, : m + 1] = sqr.view(N, m + 1)
                v = nxt
            out.append(res)
        return torch.cat(out)
