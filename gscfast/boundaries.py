"""Layer boundaries named on any model (``layers=``): ``GSC(l, 0)`` by autograd through hooks.

For a model gscfast does not compile (not an ``nn.Sequential``, convolutions, any ``forward``),
the caller names the modules whose outputs are the layer boundaries ``f_L, ..., f_2`` in forward
order (as in ``model.named_modules()``); ``f_1`` is the model's output and ``f_0`` the error
(definitions.md). Forward hooks on the caller's modules capture the boundaries (removed
afterwards; the model runs on copies of its buffers, so it is never modified), and one backward
pass per chunk of samples gives ``d f_0 / d f_l`` at every boundary at once: exact. A boundary
counts every element of its output (a feature map included).

Checked before any number is computed, else an error naming the module:

- every boundary cuts the graph: in the autograd graph of the first forward, every path from
  the input to the output passes through it (else a path, such as a skip connection, bypasses
  it; the error names a module on that path, found by running the model with the boundary's
  output held constant);
- each named module runs exactly once per forward, in the order given, and outputs a tensor;
- the model is deterministic (no train-mode dropout);
- datapoints: with a batch norm using batch statistics (train mode) and ``batchnorm="batch"`` a
  datapoint is the whole batch (one forward and backward of all of ``x``); with
  ``batchnorm="frozen"`` the statistics of ``x`` are held constant (``gscfast.nn.freeze_batchnorm``)
  and a datapoint is one sample; then, and without batch norms, the samples must not be coupled
  (checked: the gradient of one sample's error reaches no other sample).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .backends.base import Moments
from .backends.finite import message, underflow_message
from .compiler import rule_for
from .errors import NumericalError
from .nn import (
    call_on_copies,
    couples_samples,
    freeze_batchnorm,
    same_values,
    uses_batch_stats,
)
from .rules import error_value
from .validation import BATCHNORM_MODES, COUPLED_JACOBIAN, check_finite, check_targets

# samples per chunk of the per-sample sweep (memory: one forward and backward of this many)
CHUNK = 256


def check_names(model: nn.Module, layers: Sequence[str]) -> list[nn.Module]:
    """The modules named by ``layers``, checked (names of ``model.named_modules()``, once each)."""
    if isinstance(layers, str) or not all(isinstance(n, str) for n in layers):
        raise TypeError("layers must be a list of module names (as in model.named_modules())")
    if not layers:
        raise ValueError("layers is empty: name at least one module whose output is a boundary")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers names a module twice: {list(layers)}")
    named = dict(model.named_modules())
    missing = [n for n in layers if n not in named or n == ""]
    if missing:
        raise ValueError(
            f"layers names {missing[0]!r}, which is not a submodule of the model; the names of "
            f"model.named_modules() are {[n for n in named if n][:12]}..."
        )
    return [named[n] for n in layers]


class _Capture:
    """Forward hooks that record each named module's output (optionally replaced by a constant
    copy: ``cut``) and which modules see an input that depends on ``x`` after the cut."""

    def __init__(self, model: nn.Module, layers: Sequence[str], cut: str | None = None) -> None:
        self.layers = list(layers)
        self.outputs: dict[str, list[Tensor]] = {n: [] for n in layers}
        self.order: list[str] = []
        self.after_cut: list[str] = []  # modules run after the cut whose input depends on x
        self.cut = cut
        self._cut_done = False
        self.handles = []
        named = dict(model.named_modules())
        for name in layers:
            self.handles.append(named[name].register_forward_hook(self._hook(name)))
        if cut is not None:
            for name, m in named.items():
                if name and not list(m.children()):
                    self.handles.append(m.register_forward_hook(self._watch(name)))

    def _hook(self, name: str):
        def hook(mod: nn.Module, args: Any, out: Any) -> Any:
            if not isinstance(out, Tensor):
                raise TypeError(
                    f"layers names {name!r} ({type(mod).__name__}), whose output is a "
                    f"{type(out).__name__}, not a tensor"
                )
            self.order.append(name)
            self.outputs[name].append(out)
            if name == self.cut:
                self._cut_done = True
                return out.detach()
            return None

        return hook

    def _watch(self, name: str):
        def watch(mod: nn.Module, args: Any, out: Any) -> None:
            cut_before = self._cut_done and name != self.cut
            if cut_before and any(isinstance(a, Tensor) and a.requires_grad for a in args):
                self.after_cut.append(name)

        return watch

    def __enter__(self) -> _Capture:
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()

    def check(self) -> None:
        for name in self.layers:
            if len(self.outputs[name]) != 1:
                raise ValueError(
                    f"layers names {name!r}, which runs {len(self.outputs[name])} times in one "
                    "forward; a boundary is the output of a module that runs once"
                )
        if self.order != self.layers:
            raise ValueError(
                f"layers must list the boundaries in the order the forward computes them "
                f"({self.order}), from the input side (f_L) to the output side (f_2)"
            )


def _check_cuts(model: nn.Module, x: Tensor, layers: Sequence[str]) -> None:
    """``ValueError`` naming the first boundary that some path from input to output bypasses."""
    probe = x[: min(2, x.shape[0])].detach().clone().requires_grad_(True)
    for name in layers:
        with _Capture(model, layers, cut=name) as cap:
            out = call_on_copies(model, probe)
        if isinstance(out, Tensor) and out.requires_grad:
            via = (
                f"through {cap.after_cut[0]!r}, which runs after {name!r} on values that do not "
                "pass through it"
                if cap.after_cut
                else "outside the model's submodules (e.g. a skip connection in a forward())"
            )
            raise ValueError(
                f"layers names {name!r}, but the model's output depends on its input by a path "
                f"that bypasses it ({via}): a boundary must cut the graph. Name a module every "
                "path passes through (e.g. the whole residual block, not its body)"
            )


def _check_per_sample(model: nn.Module, x: Tensor) -> None:
    """``ValueError`` if the gradient of one sample's output reaches another sample's input
    (on a probe of three samples: the datapoints are single samples only if they do not)."""
    res = torch.func.vjp(lambda t: call_on_copies(model, t), x[:3].detach())
    out, fn = res[0], res[1]
    if not isinstance(out, Tensor):
        raise TypeError(f"the model returns a {type(out).__name__}, not a tensor")
    if couples_samples(fn, out):
        raise ValueError(
            "the model couples the samples of a batch (the gradient of one sample's output "
            "reaches other samples' inputs) without a batch norm using batch statistics, so "
            "per-sample GSCs are not defined"
        )


def _first_bypassed(out: Tensor, boundaries: list[tuple[str, Tensor]], x: Tensor) -> str | None:
    """The first boundary that some path of ``out``'s autograd graph from ``x`` avoids (a walk
    of the graph of the forward just run, stopping at the boundary's node), or None."""
    for name, f in boundaries:
        stop, seen, stack = f.grad_fn, set(), [out.grad_fn]
        while stack:
            node = stack.pop()
            if node is None or node is stop or node in seen:
                continue
            seen.add(node)
            if getattr(node, "variable", None) is x:
                return name
            stack.extend(n for n, _ in node.next_functions)
    return None


def _refuse_random(model: nn.Module, x: Tensor) -> None:
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
            raise ValueError(
                f"{name} ({type(m).__name__}) is in train mode: it draws a new random mask on "
                "every call, so the model has no one Jacobian to measure; call model.eval()"
            )
    with torch.no_grad():
        a, b = call_on_copies(model, x), call_on_copies(model, x)
    if isinstance(a, Tensor) and not same_values(a, b):
        raise ValueError(
            "the model gives different outputs for the same input (a random module): there "
            "is no one Jacobian to measure"
        )


def _targets(error: str, y: Tensor, out: Tensor) -> Tensor:
    """``y`` as ``error_value`` takes it for the flattened outputs ``[b, m]``, checked as the
    compiled path checks it (``validation.check_targets``)."""
    check_targets(error, y, tuple(out.shape), 1, out)
    return y.reshape(out.shape[0], -1) if error == "dot" else y.long()


def _sq(t: Tensor | None, like: Tensor, coupled: bool) -> Tensor:
    """Squared norms per datapoint of ``t [b, ...]`` (``like``'s rows; zeros for ``None``: the
    error does not depend on that boundary), in float64."""
    return _sq_low(t, like, coupled)[0]


def _sq_low(t: Tensor | None, like: Tensor, coupled: bool) -> tuple[Tensor, Tensor]:
    """``_sq``, and the part of it from entries below the smallest normal number of ``t``'s
    dtype (entries computed with few significant bits: an underflow), in one pass."""
    rows = 1 if coupled else like.shape[0]
    if t is None:
        zero = torch.zeros(rows, dtype=torch.float64, device=like.device)
        return zero, zero
    sq = t.detach().reshape(t.shape[0], -1).to(torch.float64).square()
    s = sq.sum(1)
    low = torch.zeros_like(s)
    if t.dtype != torch.float64:
        tiny2 = torch.finfo(t.dtype).tiny ** 2  # |v| < tiny, for the float64 square of v
        small = (sq < tiny2) & (sq > 0)
        if bool(small.any()):  # rare: skip the masked sum otherwise
            low = (sq * small).sum(1)
    if coupled:
        return s.sum(0, keepdim=True), low.sum(0, keepdim=True)
    return s, low


def _prepare(
    model: nn.Module,
    x: Tensor,
    y: Tensor | None,
    layers: Sequence[str],
    batchnorm: str,
    chunk_size: int | None,
) -> tuple[nn.Module, bool]:
    """The checks before any number (see the module docstring); ``(model to run, coupled)``:
    the model with ``x``'s batch statistics frozen where asked, and whether a datapoint is the
    whole batch."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2 or x.shape[0] < 1:
        raise ValueError("with layers=, x must be a floating-point batch [B, ...] of model inputs")
    if y is not None and (not isinstance(y, Tensor) or y.shape[0] != x.shape[0]):
        raise ValueError(f"y must be a tensor with one row per sample of x ({x.shape[0]})")
    check_names(model, layers)
    if batchnorm not in BATCHNORM_MODES:
        raise ValueError(f"batchnorm must be one of {BATCHNORM_MODES}, got {batchnorm!r}")
    check_finite(x, "x")
    if y is not None:
        check_finite(y, "y")
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        check_finite(t, name)  # as the compiled path checks every rule's tensors
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    coupled = any(isinstance(m, _BatchNorm) and uses_batch_stats(m) for m in model.modules())
    if coupled and batchnorm == "frozen":  # x's batch statistics as constants: per-sample again
        model, coupled = freeze_batchnorm(model, x.detach()), False
    if coupled and x.shape[0] < 2:
        raise ValueError("a train-mode batch norm needs a batch of at least 2 samples")
    _refuse_random(model, x[: min(4, x.shape[0])])
    if not coupled and x.shape[0] > 1:
        _check_per_sample(model, x)
    return model, coupled


def _forward(
    model: nn.Module,
    x: Tensor,
    xc: Tensor,
    yc: Tensor | None,
    layers: Sequence[str],
    error: str | None,
    first: bool,
) -> tuple[list[Tensor], Tensor | None, Tensor]:
    """One chunk forward with the boundaries captured: ``([f_1, ..., f_L], e, xg)``, ``e`` the
    error per sample (None without ``error``), ``xg`` the chunk's input, all in one autograd
    graph. On the ``first`` chunk, the cut check (``x``: the whole batch, for naming the bypass)."""
    with _Capture(model, layers) as cap:
        xg = xc.detach().clone().requires_grad_(True)  # the boundaries join x's graph
        out = call_on_copies(model, xg)
    cap.check()
    if not isinstance(out, Tensor):
        raise TypeError(f"the model returns a {type(out).__name__}, not a tensor")
    if first:
        cut = _first_bypassed(out, [(n, cap.outputs[n][0]) for n in layers], xg)
        if cut is not None:
            _check_cuts(model, x, [cut])  # raises, naming the module the path goes through
            raise ValueError(f"layers names {cut!r}, but a path from input to output bypasses it")
    if cap.outputs[layers[-1]][0] is out:
        raise ValueError(
            f"layers names {layers[-1]!r}, whose output is the model's output: that is f_1, "
            "always a boundary; leave it out of layers"
        )
    fs = [out, *(cap.outputs[n][0] for n in reversed(layers))]  # f_1 .. f_L
    if error is None or yc is None:
        return fs, None, xg
    e = error_value(error, out.reshape(out.shape[0], -1), _targets(error, yc, out))
    return fs, e, xg


def sweep(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    layers: Sequence[str],
    *,
    error: str,
    batchnorm: str,
    chunk_size: int | None,
) -> tuple[Tensor, Tensor, list[int]]:
    """Per-datapoint ``||f_l||^2`` and ``||d f_0 / d f_l||^2`` ``[P, L+1]`` (``l = 0..L``, the
    paper's numbering: ``f_L`` is ``layers[0]``'s output, ``f_1`` the model's) and the columns
    ``n(l)`` (elements of ``f_l`` per datapoint; ``n(0) = 1``)."""
    model, coupled = _prepare(model, x, y, layers, batchnorm, chunk_size)
    return _sweep(model, coupled, x, y, layers, error, chunk_size)


def _chunks(n: int, coupled: bool, chunk_size: int | None) -> Iterator[slice]:
    """The samples of each chunk: the whole batch where it is one datapoint."""
    step = n if coupled else (chunk_size or CHUNK)
    return (slice(c0, c0 + step) for c0 in range(0, n, step))


def _where(layers: Sequence[str], l: int) -> str:
    """Boundary ``f_l`` in words, for errors."""
    if l <= 1:
        return "the error f_0" if l == 0 else "the model's output f_1"
    return f"layer f_{l}, the output of {layers[len(layers) + 1 - l]!r}"


def _sweep(
    model: nn.Module,
    coupled: bool,
    x: Tensor,
    y: Tensor,
    layers: Sequence[str],
    error: str,
    chunk_size: int | None,
) -> tuple[Tensor, Tensor, list[int]]:
    """``sweep`` of a model ``_prepare`` returned, with its overflow and underflow checks."""
    L = len(layers) + 1
    sq_out, sq_grad, columns = [], [], None
    low_out, low_grad = [], []  # the subnormal entries' share of them
    for c in _chunks(x.shape[0], coupled, chunk_size):
        xc, yc = x[c], y[c]
        fs, e, _ = _forward(model, x, xc, yc, layers, error, c.start == 0)
        assert e is not None  # error and y given
        grads = torch.autograd.grad(e.sum(), fs, allow_unused=True)
        f0 = e.detach().to(torch.float64)
        f0 = f0.sum(0, keepdim=True) if coupled else f0
        outs = [_sq_low(f, f, coupled) for f in fs]
        gs = [_sq_low(g, f, coupled) for g, f in zip(grads, fs)]
        zero = torch.zeros_like(f0)
        sq_out.append(torch.stack([f0.square(), *(s for s, _ in outs)], 1))
        sq_grad.append(torch.stack([torch.ones_like(f0), *(s for s, _ in gs)], 1))
        low_out.append(torch.stack([zero, *(low for _, low in outs)], 1))
        low_grad.append(torch.stack([zero, *(low for _, low in gs)], 1))
        if columns is None:
            per = [f[0].numel() * (xc.shape[0] if coupled else 1) for f in fs]
            columns = [1, *per]
    assert columns is not None and len(columns) == L + 1
    so, sg = torch.cat(sq_out), torch.cat(sq_grad)
    # an overflow: where it first shows, the forward from the input side, then the backward
    # pass from the output side
    fwd = [l for l in range(L, -1, -1) if not bool(torch.isfinite(so[:, l]).all())]
    bwd = [l for l in range(1, L + 1) if not bool(torch.isfinite(sg[:, l]).all())]
    if fwd or bwd:
        l = fwd[0] if fwd else bwd[0]
        what = "the value" if fwd else "the gradient d f_0 / d f_l"
        raise NumericalError(message(x.dtype, f"{_where(layers, l)} ({what})"))
    # an underflow: subnormal entries, computed with few significant bits, that make up more than
    # eps of a squared norm (below that they change it by at most eps)
    eps = torch.finfo(x.dtype).eps
    for what, s, low in (("the value", so, low_out), ("the gradient d f_0 / d f_l", sg, low_grad)):
        bad = torch.cat(low) > eps * s
        if bool(bad.any()):
            l = int(bad.any(0).nonzero()[0])
            raise NumericalError(underflow_message(x.dtype, f"{_where(layers, l)} ({what})"))
    return so, sg, columns


def matrix(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    layers: Sequence[str],
    *,
    error: str,
    batchnorm: str,
    chunk_size: int | None,
    probe_fn: Callable[[int, tuple[int, ...]], Tensor] | None,
) -> tuple[Tensor, Tensor, list[int]]:
    """Per-datapoint squared Frobenius norms ``||J_k^l||_F^2`` ``[P, L+1, L+1]`` (``k >= l``, NaN
    above the diagonal; column ``l = 0`` from one backward pass of the error, exact), with
    ``||f_l||^2`` ``[P, L+1]`` and the columns ``n(l)``. For ``l >= 1``, ``v J_k^l`` for every
    ``k > l`` at once from one backward pass of ``<v, f_l>`` per row ``v``: ``probe_fn(l, shape)``
    gives the rows ``[R, *shape]`` (``shape``: a datapoint's ``f_l``; the same rows for every
    datapoint), averaged (a sketch, unbiased for Rademacher rows); without it the identity's rows
    (exact, ``n(l)`` backward passes). Checked as ``sweep`` checks, which gives column 0."""
    model, coupled = _prepare(model, x, y, layers, batchnorm, chunk_size)
    so, sg, columns = _sweep(model, coupled, x, y, layers, error, chunk_size)
    L = len(layers) + 1
    out = []
    for c in _chunks(x.shape[0], coupled, chunk_size):
        xc, yc = x[c], y[c]
        fs, _, _ = _forward(model, x, xc, yc, layers, error, False)
        P = 1 if coupled else xc.shape[0]
        res = torch.full((P, L + 1, L + 1), float("nan"), dtype=torch.float64, device=x.device)
        for l in range(1, L + 1):
            f = fs[l - 1]
            shape = tuple(f.shape if coupled else f.shape[1:])
            if probe_fn is None:
                n = math.prod(shape)
                rows = torch.eye(n, dtype=f.dtype, device=f.device).reshape(n, *shape)
            else:
                rows = probe_fn(l, shape).to(dtype=f.dtype, device=f.device)
            acc = torch.zeros(P, L + 1, dtype=torch.float64, device=x.device)
            for v in rows:
                v = v.expand(f.shape)  # the same row for every datapoint
                acc[:, l] += _sq(v, f, coupled)
                if l < L:
                    gs = torch.autograd.grad(
                        f, fs[l:], grad_outputs=v, retain_graph=True, allow_unused=True
                    )
                    for k, g in enumerate(gs, l + 1):
                        acc[:, k] += _sq(g, fs[k - 1], coupled)
            res[:, l:, l] = acc[:, l:] / (1 if probe_fn is None else rows.shape[0])
            if not bool(torch.isfinite(res[:, l:, l]).all()):  # the forward and d f_0 were fine
                raise NumericalError(
                    message(x.dtype, f"a product v J_k^{l} (the backward from f_{l})")
                )
        out.append(res)
    sq = torch.cat(out)
    sq[:, 0, 0] = 1
    sq[:, 1:, 0] = sg[:, 1:]
    return sq, so, columns


def preactivation_moments(
    model: nn.Module,
    x: Tensor,
    layers: Sequence[str],
    *,
    batchnorm: str,
    chunk_size: int | None,
) -> list[Moments | None]:
    """Per boundary ``l = 0..L``, the ``Moments`` over all samples of ``x`` of its layer's
    pre-activation (definitions.md: the input of the activation module that ends the layer):
    defined where the named module's output is the output of an activation module (one with an
    activation rule) run within it, the module itself included: an activation named as a
    boundary, or a block that ends in one; its input is the pre-activation, each element of it
    (every position of a feature map) a neuron. None for ``l = 0, 1`` (the error, the model's
    output) and where the output is not an activation's (a residual sum, a pooling), as on the
    compiled path. With a batch norm using batch statistics the whole batch runs at once."""
    model, coupled = _prepare(model, x, None, layers, batchnorm, chunk_size)
    L = len(layers) + 1
    named = dict(model.named_modules())
    moments: list[Moments | None] = [None] * (L + 1)
    for c in _chunks(x.shape[0], coupled, chunk_size):
        last: dict[str, tuple[Tensor, Tensor]] = {}  # the latest activation's (input, output)
        outs: dict[str, Tensor] = {}

        def record(name: str, table: dict, pair: bool):
            def hook(mod: nn.Module, args: Any, out: Any) -> None:
                table[name] = (args[0], out) if pair else out

            return hook

        hooks = []
        for name in layers:
            for m in named[name].modules():
                rule = rule_for(m)
                if rule is not None and rule.is_activation:
                    hooks.append(m.register_forward_hook(record(name, last, True)))
            hooks.append(named[name].register_forward_hook(record(name, outs, False)))
        try:
            with torch.no_grad():
                call_on_copies(model, x[c])
        finally:
            for h in hooks:
                h.remove()
        for i, name in enumerate(layers):  # layers[0] is f_L
            z, a = last.get(name, (None, None))
            if z is not None and a is outs.get(name):
                if not bool(torch.isfinite(z).all()):
                    where = f"the pre-activation of {_where(layers, L - i)}"
                    raise NumericalError(message(x.dtype, where))
                chunk = Moments.of(z.reshape(z.shape[0], -1))
                prev = moments[L - i]
                moments[L - i] = chunk if prev is None else prev.merge(chunk)
    return moments


def jacobian(
    model: nn.Module,
    x: Tensor,
    layers: Sequence[str],
    *,
    start: int,
    end: int,
    batchnorm: str,
    chunk_size: int | None,
) -> Tensor:
    """Per-sample ``d f_end / d f_start`` ``[B, numel f_end, numel f_start]`` (a sample's
    boundaries flattened; ``start = L + 1``: the model's input) from backward passes of the
    identity's rows of ``f_end``, batched by ``vmap`` (``is_grads_batched``) where every operation
    of the model has a batching rule, one pass per row where not."""
    model, coupled = _prepare(model, x, None, layers, batchnorm, chunk_size)
    if coupled:
        raise ValueError(COUPLED_JACOBIAN)
    out = []
    for c in _chunks(x.shape[0], False, chunk_size):
        fs, _, xg = _forward(model, x, x[c], None, layers, None, c.start == 0)
        src = xg if start == len(fs) + 1 else fs[start - 1]
        dst = fs[end - 1]
        b, n = dst.shape[0], dst[0].numel()
        eye = torch.eye(n, dtype=dst.dtype, device=dst.device).reshape(n, 1, *dst.shape[1:])
        rows = eye.expand(n, *dst.shape)  # row j: e_j of every sample's f_end
        g = rows if src is dst else _vjp_rows(dst, src, rows)
        if not bool(torch.isfinite(g).all()):
            raise NumericalError(message(x.dtype, f"d f_{end} / d f_{start}"))
        out.append(g.detach().reshape(n, b, -1).transpose(0, 1))
    return torch.cat(out)


def _vjp_rows(out: Tensor, inp: Tensor, rows: Tensor) -> Tensor:
    """``rows [R, *out.shape]`` times ``d out / d inp``: ``[R, *inp.shape]``, batched by ``vmap``
    where the model allows it, one backward pass per row where not (zeros where ``out`` does not
    depend on ``inp``)."""
    try:
        (g,) = torch.autograd.grad(
            out, inp, rows, retain_graph=True, allow_unused=True, is_grads_batched=True
        )
    except RuntimeError:  # an operation without a batching rule
        parts = [
            torch.autograd.grad(out, inp, r, retain_graph=True, allow_unused=True)[0] for r in rows
        ]
        g = None if parts[0] is None else torch.stack(parts)
    return (
        torch.zeros(rows.shape[0], *inp.shape, dtype=inp.dtype, device=inp.device)
        if g is None
        else g
    )


def _init_layer(
    init_model: nn.Module, xc: Tensor, layers: Sequence[str], m: int, t: Tensor
) -> Tensor:
    """``f_m`` of ``init_model`` run with its boundary ``f_{m+1}`` replaced by ``t``: the layer
    that outputs ``f_m``, with the initial parameters, at the input ``t`` (the boundaries cut the
    graph, so nothing else reaches it)."""
    L = len(layers) + 1
    named = dict(init_model.named_modules())
    found: dict[str, Tensor] = {}

    def replace(mod: nn.Module, args: Any, out: Any) -> Tensor:
        if out.shape != t.shape:
            raise ValueError(
                f"init_model's {layers[L - m - 1]!r} outputs {tuple(out.shape)} where model's "
                f"outputs {tuple(t.shape)}: they must share the architecture"
            )
        return t

    def keep(mod: nn.Module, args: Any, out: Any) -> None:
        found["f"] = out

    handles = [named[layers[L - m - 1]].register_forward_hook(replace)]
    if m >= 2:
        handles.append(named[layers[L - m]].register_forward_hook(keep))
    try:
        out = call_on_copies(init_model, xc)
    finally:
        for h in handles:
            h.remove()
    return found["f"] if m >= 2 else out


def contributions(
    model: nn.Module,
    init_model: nn.Module,
    x: Tensor,
    y: Tensor,
    layers: Sequence[str],
    *,
    error: str,
    batchnorm: str,
    chunk_size: int | None,
) -> Tensor:
    """Per-datapoint ``||g_l^(lambda)||^2`` ``[P, L+1, L+1]`` (``[l, lambda]``, NaN where
    ``lambda > max(l - 1, 0)``) of the residual trick (definitions.md) between named boundaries.
    ``v G_m`` is a backward pass through the trained model's layer between ``f_{m+1}`` and
    ``f_m``; ``v S_m`` one through ``init_model`` run with its boundary ``f_{m+1}`` replaced by
    the trained model's (``_init_layer``); every ``lambda`` at once (``vmap``). A train-mode batch
    norm of ``init_model`` computes its statistics from that replaced input: within the batch
    datapoint (``"batch"``), or frozen over all of ``x`` (``"frozen"``, by
    ``freeze_batchnorm(..., replace=...)``), as the compiled path does."""
    names = dict(model.named_modules())
    init_names = dict(init_model.named_modules()) if isinstance(init_model, nn.Module) else {}
    if (
        not isinstance(init_model, nn.Module)
        or set(names) != set(init_names)
        or any(type(names[k]) is not type(init_names[k]) for k in names)
    ):
        raise ValueError("init_model must be a module with model's architecture (its submodules)")
    model, coupled = _prepare(model, x, y, layers, batchnorm, chunk_size)
    _prepare(init_model, x, y, layers, batchnorm, chunk_size)  # its tensors, randomness, samples
    # the trained model's values and gradients: overflow and underflow refused, as gsc does
    _sweep(model, coupled, x, y, layers, error, chunk_size)
    L = len(layers) + 1
    inits = dict.fromkeys(range(1, L), init_model)
    if batchnorm == "frozen" and any(
        isinstance(m, _BatchNorm) and uses_batch_stats(m) for m in init_model.modules()
    ):  # layer m's batch statistics at the trained input, over all of x (as gscfast.frozen)
        with torch.no_grad():
            full = _forward(model, x, x, None, layers, None, False)[0]
        for m in inits:
            inits[m] = freeze_batchnorm(init_model, x, replace={layers[L - m - 1]: full[m]})
    out = []
    for c in _chunks(x.shape[0], coupled, chunk_size):
        xc, yc = x[c], y[c]
        fs, e, _ = _forward(model, x, xc, yc, layers, error, c.start == 0)
        assert e is not None  # error and y given
        b = xc.shape[0]
        P = 1 if coupled else b  # a batch datapoint: the norms sum over its samples
        res = torch.full((P, L + 1, L + 1), float("nan"), dtype=torch.float64, device=x.device)
        res[:, 0, 0] = 1
        v = _vjp_rows(e, fs[0], torch.ones(1, b, dtype=e.dtype, device=e.device))  # g_1^(0)
        res[:, 1, 0] = _sq(v[0], fs[0], coupled)
        for m in range(1, L):
            a = _vjp_rows(fs[m - 1], fs[m], v)  # v G_m
            t = fs[m].detach().requires_grad_(True)
            s = _vjp_rows(_init_layer(inits[m], xc, layers, m, t), t, v)  # v S_m
            nxt = a.new_zeros(v.shape[0] + 1, *a.shape[1:])
            nxt[:-1] = s
            nxt[1:] += a - s  # v R_m = v G_m - v S_m raises lambda by one
            v = nxt
            sq = v.detach().to(torch.float64).reshape(m + 1, b, -1).square().sum(2)
            res[:, m + 1, : m + 1] = (sq.sum(1, keepdim=True) if coupled else sq).T
            if not bool(torch.isfinite(res[:, m + 1, : m + 1]).all()):  # v S_m, v R_m
                raise NumericalError(
                    message(x.dtype, f"g_{m + 1}^(lambda), the products through layer f_{m}")
                )
        out.append(res)
    return torch.cat(out)
