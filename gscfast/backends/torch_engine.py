"""The ``"torch"`` backend: the analytic chain engine on batched GEMMs (CPU and GPU).

Each chunk of datapoints is run forward once, saving what the layer VJPs need; then stacks of
cotangent rows ``[P, R, S, d]`` are pushed through the layer rules, and only their squared norms
are kept, so no ``[B, L, d, d]`` tensor ever exists.

A fused backend (``lowering.FusedBackend``, a subclass) runs a model that its kernels take only
in part through this engine's methods, with the runs of layers its kernels take (``spans``)
handed to its ``span_forward`` and ``span_backward`` (rows entering at the span's end or at one
of its layers: a gradient, a chain's or a Jacobian's rows) and ``span_contributions`` (the
effective depth's lambda-rows).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..compiler import Layer, Program
from ..rules import ForwardCtx, error_grad, error_value
from ..validation import Problem
from .base import Backend, Moments, ProbeFn, Sweep
from .chunks import iter_chunks, sq_norms


@dataclass
class Trace:
    """One chunk's forward pass: saved VJP state per layer (paper index), norms, error gradient."""

    sq_out: Tensor  # [P, L+1]
    saved: dict[int, list[Any]] = field(default_factory=dict)
    inputs: dict[int, Tensor] = field(default_factory=dict)
    grad: Tensor | None = None  # [P, 1, S, d_1], d f_0 / d f_1
    spans: dict[int, Any] = field(default_factory=dict)  # span_forward's states by first layer
    tail: tuple[int, Tensor, Tensor | None] | None = None  # span_tail's (first, sq_grad, grad_in)


@dataclass
class SpanForward:
    """A fused backend's ``span_forward`` of a span of ``Ls`` layers on ``N`` samples. Columns
    are the span's own paper indices: column ``c = 1..Ls`` is the output of its ``c``-th layer
    from the end (column 0 is unused).

    Attributes:
        sq_out: ``[N, Ls+1]`` squared norms of the layer outputs.
        moments: ``Ls+1`` pre-activation moments (None where none), or None if not asked for.
        out: ``[N, d_out]`` the span's output (None from ``span_tail``).
        state: what ``span_backward`` needs (the backend's own; None if not saved).
    """

    sq_out: Tensor
    moments: list[Moments | None] | None
    out: Tensor | None
    state: Any


Span = list[Layer]
"""Consecutive layers of a program (model order) that a fused backend runs as one."""


def forward(
    pb: Problem,
    program: Program,
    ds: slice,
    bs: slice,
    ctx: ForwardCtx,
    *,
    moments: list[Moments | None] | None = None,
    keep_inputs: bool = False,
    norms: bool = True,
    spans: Sequence[Span] = (),
    span_forward: Any = None,
    span_tail: Any = None,
) -> Trace:
    """Run one chunk forward; accumulate pre-activation ``moments`` in place if given; without
    ``norms``, ``sq_out`` stays NaN (``jacobian`` needs no norms). The layers of ``spans`` run on
    ``span_forward`` (a fused backend's; per-sample datapoints), their states kept in
    ``Trace.spans`` if ``ctx.save``; a span that ends the model runs on ``span_tail``, if
    given, when the error's gradient is wanted: forward, error and backward at once
    (``Trace.tail``)."""
    h = pb.x[ds, bs]
    Dc, b = h.shape[:2]
    P = Dc if pb.coupled else Dc * b
    tr = Trace(sq_out=h.new_full((P, pb.L + 1), float("nan")))
    starts = {span[0].index: span for span in spans}
    skip = 0
    for layer in program.layers:
        m = layer.index
        if skip:
            skip -= 1
            continue
        span = starts.get(m)
        if span is not None:
            end = span[-1].index
            stats = moments is not None
            if keep_inputs:
                tr.inputs[m] = h.reshape(P, -1)
            if end == 1 and span_tail is not None and ctx.save and pb.error is not None:
                assert pb.y is not None  # make_problem requires y with an error layer
                y = pb.y[ds, bs]
                y = y.reshape(P) if pb.error == "kl" else y.reshape(P, -1)
                r, sq, gin = span_tail(pb, span, h.reshape(P, -1), y, stats, m < pb.L)
                tr.tail = (m, sq, gin)
                tr.sq_out[:, 0] = r.sq_out[:, 0]
            else:
                save = ctx.save and end < pb.L  # the first layer's VJP is never needed
                r = span_forward(pb, span, h.reshape(P, -1), stats, save)
                tr.spans[m] = r.state
            tr.sq_out[:, end : m + 1] = r.sq_out[:, 1:]
            if moments is not None:
                for c, mo in enumerate(r.moments[1:], start=end):
                    prev = moments[c]
                    if mo is not None:
                        moments[c] = mo if prev is None else prev.merge(mo)
            if r.out is None:  # span_tail: the error is done
                return tr
            h = r.out.reshape(Dc, b, -1)
            skip = len(span) - 1
            continue
        if keep_inputs:
            tr.inputs[m] = h
        h, tr.saved[m], pre = layer.forward(h, ctx)
        if norms:
            tr.sq_out[:, m] = sq_norms(h if pb.coupled else h.reshape(P, -1))
        if moments is not None and pre is not None:
            chunk = Moments.of(pre.reshape(-1, pre.shape[-1]))
            prev = moments[m]
            moments[m] = chunk if prev is None else prev.merge(chunk)
    if pb.error is not None:
        assert pb.y is not None  # make_problem requires y with an error layer
        y = pb.y[ds, bs]
        e = error_value(pb.error, h, y)
        f0 = e.sum(1) if pb.coupled else e.reshape(-1)
        tr.sq_out[:, 0] = f0.square()
        tr.grad = ctx.rows(error_grad(pb.error, h, y))
    return tr


class TorchBackend(Backend):
    name = "torch"
    priority = 10

    def _bytes(self, pb: Problem, rows: int) -> int:
        """Rough working set per datapoint: saved state (~3 tensors a layer) plus row stacks."""
        w = pb.widths
        item = pb.x.element_size()
        return item * pb.S * (3 * sum(w[1:]) + 4 * rows * max(w[1:]))

    def spans(
        self, pb: Problem, cuts: Sequence[int] = (), init: Program | None = None
    ) -> list[Span]:
        """The runs of layers that the ``span_*`` methods take, none across the boundaries
        ``f_c``, ``c`` in ``cuts``, and (``contributions``) whose ``init`` layers the kernels
        take too (none here: see ``lowering.FusedBackend``)."""
        return []

    def span_forward(
        self, pb: Problem, span: Span, h: Tensor, stats: bool, save: bool, rows: int = 1
    ) -> SpanForward:
        """``span`` on its input ``h [N, d_in]``, keeping what its VJP needs if ``save`` (for
        ``rows`` rows per sample). Implemented by the fused backends that have ``spans``."""
        raise NotImplementedError

    def span_backward(
        self,
        pb: Problem,
        span: Span,
        state: Any,
        grad: Tensor,
        grad_in: bool,
        at: int | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """From ``grad [N * R, d]``, ``R`` rows per sample at ``span``'s output (or at ``f_at``,
        the output of its layer ``at``: a gradient, a Jacobian's or a chain's rows), and the
        ``state`` of its ``span_forward``: ``[N, Ls+1]`` the squared norms of each sample's rows
        at its layers' outputs from there on (columns as ``SpanForward``'s; NaN before), and the
        rows at its input ``[N * R, d_in]`` if ``grad_in`` (else None)."""
        raise NotImplementedError

    def span_contributions(
        self,
        pb: Problem,
        span: Span,
        init_span: Span,
        h: Tensor,
        rows: Tensor,
        grad_in: bool,
    ) -> tuple[Tensor, Tensor | None]:
        """The residual-trick recursion through ``span`` (trained) and ``init_span`` (the same
        layers at their initial weights, evaluated at the trained inputs) from the span's input
        ``h [N, d_in]`` and ``rows [N * lam0, d_out]``, the lambda-rows ``g^(0) .. g^(lam0-1)``
        at its output: ``[N, Ls+1, lam0+Ls]`` the squared norms ``||g^(lam)||^2`` at its layers'
        outputs (rows as ``SpanForward``'s columns), and the rows at its input ``[N * (lam0 +
        Ls), d_in]`` if ``grad_in`` (else None)."""
        raise NotImplementedError

    span_tail: Any = None
    """A fused backend's ``(pb, span, h, y, stats, grad_in) -> (SpanForward, sq_grad, grad_in)``:
    a span that ends the model, forward, error (``y`` its targets ``[N, m]`` or labels ``[N]``;
    ``SpanForward.sq_out`` column 0 is ``f_0^2``) and backward in one pass; None: ``span_forward``
    and ``span_backward``."""

    def sweep(self, pb: Problem, *, grads: bool, stats: bool) -> Sweep:
        if grads and pb.error is None:
            raise ValueError("the gradients of a sweep need the error layer (error and y)")
        moments: list[Moments | None] | None = [None] * (pb.L + 1) if stats else None
        sq_out: list[Tensor] = []
        sq_grad: list[Tensor] = []
        spans = self.spans(pb)
        for ds, bs, ctx in iter_chunks(pb, self._bytes(pb, 1)):
            ctx.save = grads
            tr = forward(
                pb,
                pb.program,
                ds,
                bs,
                ctx,
                moments=moments,
                spans=spans,
                span_forward=self.span_forward,
                span_tail=self.span_tail,
            )
            sq_out.append(tr.sq_out)
            if grads:
                g = tr.sq_out.new_empty(tr.sq_out.shape)
                g[:, 0] = 1
                if tr.tail is not None:  # the last span's backward is done
                    m, sq, gin = tr.tail
                    g[:, 1 : m + 1] = sq[:, 1:]
                    if gin is not None:
                        v = gin.reshape(gin.shape[0], 1, 1, -1)
                        g[:, m + 1] = sq_norms(v)
                    m += 1
                else:
                    assert tr.grad is not None  # forward sets it with the error layer
                    v, m = tr.grad, 1
                    g[:, 1] = sq_norms(v)
                if m < pb.L:
                    self._vjps(pb, tr, spans, v, m, pb.L, g)
                sq_grad.append(g)
        return Sweep(torch.cat(sq_out), torch.cat(sq_grad) if grads else None, moments)

    def chain(self, pb: Problem, probes: ProbeFn | None) -> Tensor:
        w, L = pb.widths, pb.L
        rows = max(w[1:-1]) * pb.S if probes is None else probes(1).shape[0]
        out = []
        spans = self.spans(pb)

        def span_forward(pb: Problem, span: Span, h: Tensor, stats: bool, save: bool):
            return self.span_forward(pb, span, h, stats, True, rows)  # chains start anywhere

        for ds, bs, ctx in iter_chunks(pb, self._bytes(pb, rows)):
            tr = forward(pb, pb.program, ds, bs, ctx, spans=spans, span_forward=span_forward)
            P = tr.sq_out.shape[0]
            res = tr.sq_out.new_full((P, L + 1, L + 1), float("nan"))
            for l in range(L + 1):
                if l == 0:
                    res[:, 0, 0] = 1
                    if tr.grad is None:
                        continue
                    v, k0 = tr.grad, 1
                    res[:, 1, 0] = sq_norms(v)
                else:
                    v, k0 = self._start(pb, l, probes, tr.sq_out), l
                r = v.shape[1] if (probes is not None and l > 0) else 1  # sketch: mean over probes
                if l > 0:
                    res[:, l, l] = sq_norms(v) / r
                self._vjps(pb, tr, spans, v, k0, L, res[:, :, l], r)  # J_{k+1}^l = J_k^l G_k
            out.append(res)
        return torch.cat(out)

    def _vjps(
        self,
        pb: Problem,
        tr: Trace,
        spans: list[Span],
        v: Tensor,
        k0: int,
        k1: int,
        norms: Tensor | None,
        scale: float = 1.0,
    ) -> Tensor:
        """Push the rows ``v [P|1, R, S, d]`` at ``f_k0`` through layers ``k0 .. k1-1`` (the
        layers of ``spans`` on ``span_backward``; none may cross ``f_k1``); with ``norms [P,
        >= k1+1]``, ``norms[:, k+1]`` = each datapoint's squared norm after layer ``k`` over
        ``scale``. Returns the rows at ``f_k1`` (unchanged if the last span holds layer ``L``,
        whose VJP no caller needs then)."""
        of = {layer.index: span for span in spans for layer in span}
        P = tr.sq_out.shape[0]
        k = k0
        while k < k1:
            span = of.get(k)
            if span is None:
                v = pb.program.layer(k).vjp(v, tr.saved[k])
                if norms is not None:
                    norms[:, k + 1] = sq_norms(v) / scale
                k += 1
                continue
            first, last = span[0].index, span[-1].index  # the span maps f_{first+1} -> f_last
            R = v.shape[1]
            rows = v.expand(P, *v.shape[1:]).reshape(P * R, -1)  # per-sample vectors
            sq, gin = self.span_backward(pb, span, tr.spans[first], rows, first < k1, k)
            if norms is not None:  # the span's column c is f_{last + c - 1}
                norms[:, k + 1 : first + 1] = sq[:, k + 2 - last : first + 2 - last] / scale
            if gin is not None:
                v = gin.reshape(P, R, 1, -1)
                if norms is not None and first < pb.L:
                    norms[:, first + 1] = sq_norms(v) / scale
            k = first + 1
        return v

    def _start(self, pb: Problem, l: int, probes: ProbeFn | None, v_like: Tensor) -> Tensor:
        """Start rows for the chain from layer ``l``: ``[1, R, S, d_l]`` (broadcast over P)."""
        if probes is not None:
            return pb.program.to_order(probes(l).to(v_like)[None], l, True)
        # rows of the identity in C order; in the engine's order they are the same rows permuted,
        # which changes no sum of squared norms (jacobian reorders them, as it returns them)
        n = pb.n(l)
        return torch.eye(n, dtype=v_like.dtype, device=v_like.device).reshape(1, n, pb.S, -1)

    def jacobian(self, pb: Problem, start: int, end: int) -> Tensor:
        out = []
        rows = pb.S * pb.widths[end]
        spans = self.spans(pb, cuts=(start, end))  # each span wholly inside [end, start) or out

        def span_forward(pb: Problem, span: Span, h: Tensor, stats: bool, save: bool):
            save = end <= span[-1].index < start  # the spans the rows go through
            return self.span_forward(pb, span, h, stats, save, rows)

        for ds, bs, ctx in iter_chunks(pb, self._bytes(pb, rows)):
            tr = forward(
                pb, pb.program, ds, bs, ctx, norms=False, spans=spans, span_forward=span_forward
            )
            P = tr.sq_out.shape[0]
            v = pb.program.to_order(self._start(pb, end, None, tr.sq_out), end, True)
            v = self._vjps(pb, tr, spans, v, end, start, None)
            v = pb.program.to_order(v, start, False)  # the rows at f_start in C order
            out.append(v.expand(P, *v.shape[1:]).reshape(P, rows, -1))
        return out[0] if len(out) == 1 else torch.cat(out)

    def contributions(self, pb: Problem, init: Program) -> Tensor:
        if pb.error is None:
            raise ValueError("contributions need the error layer (error and y)")
        L, out = pb.L, []
        spans = self.spans(pb, init=init)
        of = {layer.index: span for span in spans for layer in span}

        def span_forward(pb: Problem, span: Span, h: Tensor, stats: bool, save: bool):
            return self.span_forward(pb, span, h, stats, False)  # the recursion redoes it

        for ds, bs, ctx in iter_chunks(pb, self._bytes(pb, pb.L), init=init):
            tr = forward(
                pb,
                pb.program,
                ds,
                bs,
                ctx,
                keep_inputs=True,
                spans=spans,
                span_forward=span_forward,
            )
            ictx = ctx.for_init()  # init's batch norms: their own frozen statistics
            P = tr.sq_out.shape[0]
            res = tr.sq_out.new_full((P, L + 1, L + 1), float("nan"))
            res[:, 0, 0] = 1
            v = tr.grad  # [P, lam, S, d]: g_1^(0) = G_0
            assert v is not None  # forward sets it with the error layer, checked above
            res[:, 1, 0] = sq_norms(v)
            m = 1
            while m < L:
                span = of.get(m)
                if span is not None:  # entered at its last layer, m
                    first, lam0 = span[0].index, v.shape[1]
                    init_span = [init.layer(layer.index) for layer in span]
                    rows = v.reshape(P * lam0, -1)
                    r, gin = self.span_contributions(
                        pb, span, init_span, tr.inputs[first], rows, first < L
                    )
                    res[:, m + 1 : first + 1, : r.shape[2]] = r[:, 2:]
                    if gin is not None:
                        v = gin.reshape(P, r.shape[2], 1, -1)
                        res[:, first + 1, : r.shape[2]] = v.square().sum((2, 3))
                    m = first + 1
                    continue
                _, s_init, _ = init.layer(m).forward(tr.inputs[m], ictx)  # S_m at the trained input
                a = pb.program.layer(m).vjp(v, tr.saved[m])  # v G_m
                s = init.layer(m).vjp(v, s_init)  # v S_m
                nxt = a.new_zeros(P, v.shape[1] + 1, *a.shape[2:])
                nxt[:, :-1] = s
                nxt[:, 1:] += a - s  # v R_m = v G_m - v S_m raises lambda by one
                v = nxt
                res[:, m + 1, : m + 1] = v.square().sum((2, 3))
                m += 1
            out.append(res)
        return torch.cat(out)
