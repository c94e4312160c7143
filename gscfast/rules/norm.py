"""Layer norm (over features) and batch norm (over the samples of a batch).

Both standardize ``x`` along one axis; their Jacobian is the same projection
``(u - mean(u) - xh * mean(u * xh)) / sigma`` with ``u = v * gamma``, taken over features for
layer norm and over the samples of a batch datapoint (axis -2 of ``[P, R, S, d]``) for batch norm.
Batch norm with fixed statistics (eval mode, or ``batchnorm="frozen"``) is a diagonal scale.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..nn import poison_variance, uses_batch_stats
from .base import ForwardCtx, Rule, register


def _standardize(x: Tensor, dim: int, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    mean = x.mean(dim, keepdim=True)
    xc = x - mean  # once: a pass over x less (the same bits as computing it twice)
    var = xc.square().mean(dim, keepdim=True)  # biased, as torch normalizes
    var = poison_variance(var)  # an overflowed variance gives NaN, not silent zeros
    inv = torch.rsqrt(var + eps)
    # in place where autograd allows: one fresh tensor fewer (the same bits)
    return (xc * inv if xc.requires_grad else xc.mul_(inv)), inv, mean, var


def _projection_vjp(u: Tensor, xh: Tensor, inv: Tensor, dim: int) -> Tensor:
    return (u - u.mean(dim, keepdim=True) - xh * (u * xh).mean(dim, keepdim=True)) * inv


@register
class LayerNormRule(Rule):
    module_types = (nn.LayerNorm,)
    kind = "layer_norm"
    limits = "last dimension"

    def __init__(self, module: nn.LayerNorm, path: str) -> None:
        super().__init__(module, path)
        if len(module.normalized_shape) != 1:
            raise TypeError(
                f"{path}: LayerNorm over {tuple(module.normalized_shape)} is not "
                "supported; gscfast supports LayerNorm over the last dimension only"
            )
        self.eps = module.eps
        self.features = module.normalized_shape[0]
        self.weight = None if module.weight is None else module.weight.detach()
        self.bias = None if getattr(module, "bias", None) is None else module.bias.detach()

    def in_features(self) -> int:
        return self.features

    def forward(self, x: Tensor, ctx: ForwardCtx):
        xh, inv, _, _ = _standardize(x, -1, self.eps)
        y = xh if self.weight is None else xh * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y, (ctx.rows(xh), ctx.rows(inv)) if ctx.save else None

    def vjp(self, v: Tensor, saved) -> Tensor:
        xh, inv = saved
        u = v if self.weight is None else v * self.weight
        return _projection_vjp(u, xh, inv, -1)

    def tensors(self):
        return {k: t for k, t in (("weight", self.weight), ("bias", self.bias)) if t is not None}


@register
class BatchNormRule(Rule):
    """``nn.BatchNorm1d`` on ``[N, C]`` inputs.

    Statistics: running ones in eval mode; batch ones in train mode (or without running stats),
    either coupling the samples of a batch datapoint or, with ``batchnorm="frozen"``, treated as
    constants per dataset. The module's running statistics are never updated.
    """

    module_types = (nn.BatchNorm1d,)
    kind = "batch_norm"

    def __init__(self, module: nn.BatchNorm1d, path: str) -> None:
        super().__init__(module, path)
        self.eps = module.eps
        self.features = module.num_features
        self.weight = None if module.weight is None else module.weight.detach()
        self.bias = None if module.bias is None else module.bias.detach()
        self.uses_batch_stats = uses_batch_stats(module)
        self.running: tuple[Tensor, Tensor] | None = None
        if not self.uses_batch_stats:
            mean, var = module.running_mean, module.running_var
            assert mean is not None  # uses_batch_stats is False only with running statistics
            if var is None:
                raise ValueError(f"{path}: BatchNorm1d has a running_mean but no running_var")
            self.running = (mean.detach(), var.detach())

    def in_features(self) -> int:
        return self.features

    def _affine(self, y: Tensor) -> Tensor:
        if self.weight is not None:
            y = y * self.weight
        return y + self.bias if self.bias is not None else y

    def forward(self, x: Tensor, ctx: ForwardCtx) -> tuple[Tensor, Any]:
        if self.running is not None:
            mean, var = self.running
        elif ctx.frozen is not None:
            mean, var = ctx.frozen[self]
        else:
            if not ctx.coupled:
                raise RuntimeError(f"{self.path}: batch statistics need batch datapoints")
            xh, inv, mean, var = _standardize(x, -2, self.eps)
            if ctx.record is not None:
                ctx.record.record(self, mean, var)
            return self._affine(xh), (ctx.rows(xh), ctx.rows(inv)) if ctx.save else None
        inv, scale = self.fixed_scale(var)
        y = self._affine((x - mean) * inv)
        return y, ctx.rows(scale.expand(x.shape[0], 1, x.shape[-1])) if ctx.save else None

    def fixed_scale(self, var: Tensor) -> tuple[Tensor, Tensor]:
        """``(inv, scale)`` for fixed statistics of variance ``var``: ``inv = 1 / sqrt(var + eps)``
        and the diagonal Jacobian ``scale = inv * weight``. The one fold of a batch norm into a
        diagonal (the fused backends' lowering folds with it too)."""
        inv = torch.rsqrt(var + self.eps)
        return inv, inv if self.weight is None else inv * self.weight

    def vjp(self, v: Tensor, saved) -> Tensor:
        if isinstance(saved, tuple):
            xh, inv = saved
            u = v if self.weight is None else v * self.weight
            return _projection_vjp(u, xh, inv, -2)
        return v * saved

    @property
    def coupling(self) -> bool:
        return self.uses_batch_stats

    def tensors(self):
        named = {"weight": self.weight, "bias": self.bias}
        if self.running is not None:
            named |= {"running_mean": self.running[0], "running_var": self.running[1]}
        return {k: t for k, t in named.items() if t is not None}
