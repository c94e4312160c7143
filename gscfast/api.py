"""Public functions. Every quantity is defined in definitions.md; backends compute raw
per-datapoint squared norms and this module turns them into expectations and ratios.

Shapes: ``x`` is ``[B, n]`` (one dataset) or ``[D, B, n]`` (D independent datasets); for a model
over feature maps, ``[B, C, H, W]`` or ``[D, B, C, H, W]`` (``[B, C, L]`` for ``Conv1d``): the
model's first module that fixes a sample's dimensions says which (``validation.sample_layout``).
A datapoint is one sample of ``x``, or with a train-mode batch norm (``batchnorm="batch"``) one
whole dataset. Per-sample widths ``d_l`` count every element of a sample's ``f_l`` (Jacobians
are flat, in ``torch.flatten``'s order).
Per-layer results have length ``L + 1`` indexed in the paper's numbering (``0`` = error layer,
``L`` = first layer's output). Results are on ``x``'s device with ``x``'s dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .backends import get_backend
from .backends.base import Moments
from .compiler import compile_model
from .estimators import GSCMoments, explosion_rates
from .validation import (
    COUPLED_JACOBIAN,
    Problem,
    check_error,
    check_model_tensors,
    check_same_architecture,
    in_dtype,
    make_problem,
)

__all__ = [
    "PreactStats",
    "effective_depth",
    "explosion_rate",
    "gsc",
    "gsc_matrix",
    "gsc_moments",
    "jacobian",
    "preactivation_stats",
]


def _mean(t: Tensor) -> Tensor:
    """Expectation over datapoints (axis 0), accumulated in float64."""
    return t.to(torch.float64).mean(0)


def _n(pb: Problem) -> Tensor:
    return torch.tensor(pb.columns, dtype=torch.float64, device=pb.x.device)


def _per_datapoint(t: Tensor, pb: Problem, squeeze: bool) -> Tensor:
    """``[P, ...]`` -> ``[B, ...]`` / ``[D, B, ...]`` (per-sample) or ``[D, ...]`` (batch)."""
    if pb.coupled or squeeze:
        return t
    return t.reshape(pb.D, pb.B, *t.shape[1:])


def gsc(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    error: str = "dot",
    batchnorm: str = "batch",
    backend: str = "auto",
    reduction: str = "mean",
    chunk_size: int | None = None,
    layers: Sequence[str] | None = None,
) -> Tensor:
    """Gradient scale coefficients ``GSC(l, 0)`` for ``l = 0..L``.

    Args:
        model: an ``nn.Sequential`` of supported modules (never modified); with ``layers``, any
            module.
        x: ``[B, n]`` or ``[D, B, n]`` inputs (feature maps: ``[B, C, H, W]`` or ``[D, B, C, H,
            W]``, see the module docstring); with ``layers``, one batch ``[B, ...]`` of the
            model's inputs.
        y: targets of the output's shape (``error="dot"``) or integer labels ``[B]``/``[D, B]``
            (``error="kl"``).
        error: the error layer, ``"dot"`` or ``"kl"``.
        batchnorm: ``"batch"`` (train-mode batch norm couples the batch: one datapoint per
            dataset) or ``"frozen"`` (batch statistics as constants: one datapoint per row).
        backend: ``"auto"``, ``"reference"``, ``"torch"``, ``"numba"``, ``"triton"``, ``"cupy"``.
        reduction: ``"mean"`` for the expected GSC ``E||J||_qm^2 E||f_l||^2 / E||f_0||^2``;
            ``"none"`` for per-datapoint GSCs, ``[B, L+1]``/``[D, B, L+1]`` (``[D, L+1]`` for
            batch datapoints).
        chunk_size: datapoints per chunk (default: sized by ``GSCFAST_MEMORY``).
        layers: names of the modules (``model.named_modules()``) whose outputs are the layer
            boundaries ``f_L, ..., f_2``, in forward order; ``f_1`` is the model's output. For
            any model, not only a compiled Sequential: forward hooks capture the boundaries and
            autograd gives ``d f_0 / d f_l`` (exact; ``backend`` must be ``"auto"``); every
            boundary must cut the graph (``gscfast.boundaries``).

    Returns:
        ``[L+1]`` tensor (``GSC(0, 0) = 1``).

    Example:
        >>> model = gscfast.mlp(50, 100, act="tanh", norm="batch", seed=0)
        >>> x, y = torch.randn(1000, 100), torch.randn(1000, 100)
        >>> gscfast.gsc(model, x, y)[-1]  # GSC(50, 0)
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if reduction == "mean":
        moments = gsc_moments(
            model,
            x,
            y,
            error=error,
            batchnorm=batchnorm,
            backend=backend,
            chunk_size=chunk_size,
            layers=layers,
        )
        return in_dtype(moments.gsc(), x, "GSC(l, 0)")
    if layers is not None:
        sq_out, sq_grad, n = _layers_sweep(
            model, x, y, layers, error, batchnorm, backend, chunk_size
        )
        per = _gsc_per_datapoint(sq_out, sq_grad, torch.tensor(n, dtype=torch.float64))
        return in_dtype(per, x, "a datapoint's GSC(l, 0)")
    check_error(error)  # error=None would mean "no error layer" to make_problem
    pb, squeeze = make_problem(model, x, y, error=error, batchnorm=batchnorm, chunk_size=chunk_size)
    sw = get_backend(backend, x.device).sweep(pb, grads=True, stats=False)
    assert sw.sq_grad is not None  # grads=True asked for it
    per = _gsc_per_datapoint(sw.sq_out, sw.sq_grad, _n(pb))
    return in_dtype(_per_datapoint(per, pb, squeeze), x, "a datapoint's GSC(l, 0)")


def _gsc_per_datapoint(sq_out: Tensor, sq_grad: Tensor, n: Tensor) -> Tensor:
    """``[P, L+1]`` float64 GSCs of each datapoint from its squared norms (``GSC(0, 0) = 1``)."""
    out = sq_out.to(torch.float64)
    per = sq_grad.to(torch.float64) / n.to(out.device) * out / out[:, :1]
    per[:, 0] = 1
    return per


def _check_auto(backend: str) -> None:
    if backend != "auto":
        raise ValueError(
            f"layers= runs on autograd through hooks; backend must be 'auto', got {backend!r}"
        )


def _layers_sweep(model, x, y, layers, error, batchnorm, backend, chunk_size):
    """``gscfast.boundaries.sweep`` for ``layers=``, after the checks of the other arguments."""
    from . import boundaries

    check_error(error)
    _check_auto(backend)
    return boundaries.sweep(
        model, x, y, layers, error=error, batchnorm=batchnorm, chunk_size=chunk_size
    )


def gsc_moments(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    error: str = "dot",
    batchnorm: str = "batch",
    backend: str = "auto",
    chunk_size: int | None = None,
    layers: Sequence[str] | None = None,
) -> GSCMoments:
    """The raw expectations behind ``gsc(...)`` (arguments as there): keep these, not GSCs, to
    combine several datasets or networks, ``gscfast.pool(moments).gsc()`` being the pooled expected
    GSC of definitions.md (and ``gscfast.bootstrap_gsc`` its interval)."""
    if layers is not None:
        sq_out, sq_grad, n = _layers_sweep(
            model, x, y, layers, error, batchnorm, backend, chunk_size
        )
        return GSCMoments.of(sq_out, sq_grad, n)
    check_error(error)  # error=None would mean "no error layer" to make_problem
    pb, _ = make_problem(model, x, y, error=error, batchnorm=batchnorm, chunk_size=chunk_size)
    sw = get_backend(backend, x.device).sweep(pb, grads=True, stats=False)
    assert sw.sq_grad is not None  # grads=True asked for it
    return GSCMoments.of(sw.sq_out, sw.sq_grad, pb.columns)


def gsc_matrix(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    error: str = "dot",
    batchnorm: str = "batch",
    backend: str = "auto",
    method: str = "exact",
    probes: int = 64,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    layers: Sequence[str] | None = None,
) -> Tensor:
    """All pairs: ``[L+1, L+1]``, entry ``[k, l]`` the expected ``GSC(k, l)`` for ``k >= l``,
    NaN above the diagonal.

    ``method="exact"`` forms every ``J_k^l``; ``method="sketch"`` estimates each squared Frobenius
    norm with ``probes`` Rademacher vectors (unbiased; ``generator`` seeds them), which is how
    batch-datapoint models get hidden-layer pairs at large B (the exact ``J`` there is
    ``(B d) x (B d)``). The same probes are used for every datapoint. Row ``l = 0`` is always exact.

    ``layers``: named boundaries on any model, as for ``gsc`` (``gscfast.boundaries.matrix``):
    by autograd, one backward pass per probe and boundary ``l`` gives ``v J_k^l`` for every
    ``k > l`` (exact: one per element of a datapoint's ``f_l``, so ``"sketch"`` for feature maps).
    On a model that also compiles, the same ``generator`` gives the same probes and numbers.
    """
    if method not in ("exact", "sketch"):
        raise ValueError(f"method must be 'exact' or 'sketch', got {method!r}")
    check_error(error)
    if method == "sketch" and (not isinstance(probes, int) or probes < 1):
        raise ValueError(f"probes must be a positive int, got {probes!r}")
    base = int(torch.randint(2**62, (1,), generator=generator).item()) if method == "sketch" else 0

    def rademacher(l: int, shape: Sequence[int]) -> Tensor:
        # Per-layer seeds: the probes do not depend on chunking, on the backend or on layers=.
        g = torch.Generator().manual_seed(base + l)
        v = torch.randint(0, 2, (probes, *shape), generator=g) * 2 - 1
        return v.to(dtype=x.dtype, device=x.device)

    if layers is not None:
        from . import boundaries

        _check_auto(backend)
        sq, sq_out, columns = boundaries.matrix(
            model,
            x,
            y,
            layers,
            error=error,
            batchnorm=batchnorm,
            chunk_size=chunk_size,
            probe_fn=rademacher if method == "sketch" else None,
        )
        n = torch.tensor(columns, dtype=torch.float64, device=x.device)
    else:
        pb, _ = make_problem(model, x, y, error=error, batchnorm=batchnorm, chunk_size=chunk_size)
        be = get_backend(backend, x.device)
        probe_fn = None
        if method == "sketch":

            def probe_fn(l: int) -> Tensor:
                return rademacher(l, (pb.S, pb.widths[l]))

        sq = be.chain(pb, probe_fn).to(torch.float64)
        n = _n(pb)
        sq_out = be.sweep(pb, grads=False, stats=False).sq_out
    f = _mean(sq_out)
    res = _mean(sq) / n[:, None] * f[:, None] / f[None, :]
    res.diagonal().fill_(1)  # GSC(k, k) = 1 by definition, also where f_k = 0
    res = res.masked_fill(torch.ones_like(res, dtype=torch.bool).triu(1), float("nan"))
    return in_dtype(res, x, "GSC(k, l)")


class PreactStats(NamedTuple):
    """Collapsing-domain statistics per layer, ``[L+1]`` each (NaN where undefined)."""

    std: Tensor
    sign_diversity: Tensor

    @classmethod
    def from_moments(cls, moments: list[Moments | None], like: Tensor) -> PreactStats:
        """The statistics from a sweep's per-layer ``moments`` (None: no pre-activation there),
        on ``like``'s device and dtype."""
        std = torch.full((len(moments),), float("nan"), dtype=torch.float64)
        div = std.clone()
        for l, m in enumerate(moments):
            if m is None:
                continue
            std[l] = (m.m2 / m.count).mean().sqrt()  # quadratic mean over neurons
            tot = m.pos + m.neg
            div[l] = torch.where(
                tot > 0, torch.minimum(m.pos, m.neg) / tot.clamp(min=1), 0.0
            ).mean()
        return cls(in_dtype(std, like, "a pre-activation std"), div.to(like))


def preactivation_stats(
    model: nn.Module,
    x: Tensor,
    *,
    batchnorm: str = "batch",
    backend: str = "auto",
    chunk_size: int | None = None,
    layers: Sequence[str] | None = None,
) -> PreactStats:
    """Pre-activation standard deviation and sign diversity per layer, over all samples of ``x``.

    The std is the population std of each neuron's pre-activation across samples, reported as the
    quadratic mean over neurons; the sign diversity is ``min(P, N) / (P + N)`` per neuron, averaged.
    Layers that do not end in an activation (and ``l = 0``) get NaN.

    ``layers``: named boundaries on any model, as for ``gsc``; the pre-activation of ``f_l`` is
    the input of the activation module whose output is the named module's (the module itself if
    it is one), every element of it a neuron; NaN where that output is not an activation's and
    at ``l = 1`` (``gscfast.boundaries.preactivation_moments``).
    """
    if layers is not None:
        from . import boundaries

        _check_auto(backend)
        moments = boundaries.preactivation_moments(
            model, x, layers, batchnorm=batchnorm, chunk_size=chunk_size
        )
        return PreactStats.from_moments(moments, x)
    pb, _ = make_problem(model, x, None, batchnorm=batchnorm, chunk_size=chunk_size)
    sw = get_backend(backend, x.device).sweep(pb, grads=False, stats=True)
    assert sw.moments is not None  # stats=True asked for them
    return PreactStats.from_moments(sw.moments, x)


def jacobian(
    model: nn.Module,
    x: Tensor,
    *,
    start: int | None = None,
    end: int | None = None,
    batchnorm: str = "batch",
    backend: str = "auto",
    chunk_size: int | None = None,
    layers: Sequence[str] | None = None,
) -> Tensor:
    """Per-sample Jacobians ``d f_end / d f_start``: ``[B, d_end, d_start]`` (``[D, B, ...]`` for
    3-D ``x``).

    ``start`` is a layer index in ``1..L`` or None for the model input; ``end`` is in ``1..L`` or
    None for the model output ``f_1``. The default equals
    ``torch.func.vmap(torch.func.jacrev(model))(x)``. Models whose batch norm uses batch statistics
    couple the samples, so per-sample Jacobians need ``batchnorm="frozen"`` (or use
    ``gscfast.autograd.jacobian`` for the full coupled Jacobian).

    ``layers``: named boundaries on any model, as for ``gsc``; ``d_l`` is then every element of a
    sample's ``f_l`` (a feature map flattened), ``x`` one batch ``[B, ...]``, and the rows come
    from backward passes batched by ``vmap`` (``gscfast.boundaries.jacobian``).
    """
    if layers is not None:
        from . import boundaries

        _check_auto(backend)
        s, e = _span(len(layers) + 1, start, end)
        J = boundaries.jacobian(
            model, x, layers, start=s, end=e, batchnorm=batchnorm, chunk_size=chunk_size
        )
        return J.to(x.dtype)
    pb, squeeze = make_problem(model, x, None, batchnorm=batchnorm, chunk_size=chunk_size)
    if pb.coupled:
        raise ValueError(COUPLED_JACOBIAN)
    s, e = _span(pb.L, start, end)
    J = get_backend(backend, x.device).jacobian(pb, s, e)
    return (J if squeeze else J.reshape(pb.D, pb.B, *J.shape[1:])).to(x.dtype)


def _span(L: int, start: int | None, end: int | None) -> tuple[int, int]:
    s = L + 1 if start is None else start
    e = 1 if end is None else end
    for name, v, hi in (("start", s, L + 1), ("end", e, L)):
        if not isinstance(v, int) or not 1 <= v <= hi:
            raise ValueError(f"{name} must be a layer index in 1..{L} (or None), got {v!r}")
    if s < e:
        raise ValueError(
            f"start ({s}) must be an earlier layer than end ({e}): in the paper's "
            "numbering layer indices decrease towards the output"
        )
    return s, e


def effective_depth(
    model: nn.Module,
    init_model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    error: str = "dot",
    tau: float = 0.01,
    batchnorm: str = "batch",
    backend: str = "auto",
    chunk_size: int | None = None,
    layers: Sequence[str] | None = None,
) -> tuple[int, Tensor]:
    """Effective depth by the residual trick (definitions.md).

    ``layers``: named boundaries on any model (and the same names on ``init_model``), as for
    ``gsc``: ``G_m`` and ``S_m`` are the layers between consecutive boundaries, evaluated by
    autograd, ``S_m`` by running ``init_model`` with its boundary ``f_{m+1}`` replaced by the
    trained model's (``gscfast.boundaries.contributions``); a train-mode batch norm of
    ``init_model`` takes its batch statistics at the trained input too (``batchnorm="batch"``: the
    batch is the datapoint; ``"frozen"``: gathered over all of ``x``, as the compiled path does).

    Returns:
        ``(depth, profile)``: ``profile[l, lam]`` is the contribution ``c(l, lambda)`` (quadratic
        expectation over datapoints of ``||g_l^(lambda)||``), ``[L+1, L+1]``, NaN where
        ``lambda > max(l-1, 0)``; ``depth`` is the largest ``lambda`` with
        ``c(L, lambda) >= tau * sum_lambda c(L, lambda)``.
    """
    if not 0 <= tau <= 1:
        raise ValueError(f"tau must lie in [0, 1], got {tau!r}")
    check_error(error)
    if layers is not None:
        from . import boundaries

        _check_auto(backend)
        sq = boundaries.contributions(
            model,
            init_model,
            x,
            y,
            layers,
            error=error,
            batchnorm=batchnorm,
            chunk_size=chunk_size,
        )
    else:
        pb, _ = make_problem(model, x, y, error=error, batchnorm=batchnorm, chunk_size=chunk_size)
        init = compile_model(init_model, "init_model")
        check_same_architecture(pb.program, init)
        check_model_tensors(init, pb.x)
        sq = get_backend(backend, x.device).contributions(pb, init)
    profile = _mean(sq).sqrt()
    last = profile[-1]
    ok = torch.nan_to_num(last, nan=-1.0) >= tau * torch.nansum(last)
    depth = int(ok.nonzero().max()) if ok.any() else 0
    return depth, in_dtype(profile, x, "the contribution c(l, lambda)")


def explosion_rate(gsc_values: Tensor) -> float:
    """``exp(slope)`` of the least-squares fit of ``log GSC(l, 0)`` against ``l`` (finite, positive
    entries only)."""
    g = gsc_values.detach().cpu()
    if g.dim() != 1:
        raise ValueError(f"explosion_rate takes one GSC curve [L+1], got shape {tuple(g.shape)}")
    return float(explosion_rates(g))
