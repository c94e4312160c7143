"""Layer norm and group norm (over features of a sample) and batch norm (over the samples of a
batch, and the positions of a feature map).

All standardize ``x`` over a set of entries; their Jacobian is the same projection
``(u - mean(u) - xh * mean(u * xh)) / sigma`` with ``u = v * gamma``, taken over the normalized
features for layer norm, over a group of channels and their positions for group norm, and over
the samples of a batch datapoint (axis -2 of ``[P, R, S, d]``) and each channel's positions for
batch norm. Batch norm with fixed statistics (eval mode, or ``batchnorm="frozen"``) is a diagonal
scale. Layer norm takes flat features in C order; batch norm and group norm take feature maps
channels-last (``rules.base``), so ``[..., s * C]`` views as ``[..., s, C]`` (position, then
channel) and ``[..., s, G, C / G]``, and a channel's statistics reduce over axis -2 (and the batch).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..nn import poison_variance, uses_batch_stats
from .base import ForwardCtx, Rule, Shape, numel, register


def _standardize(
    x: Tensor, dim: int | tuple[int, ...], eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    mean = x.mean(dim, keepdim=True)
    xc = x - mean  # once: a pass over x less (the same bits as computing it twice)
    var = xc.square().mean(dim, keepdim=True)  # biased, as torch normalizes
    var = poison_variance(var)  # an overflowed variance gives NaN, not silent zeros
    inv = torch.rsqrt(var + eps)
    # in place where autograd allows: one fresh tensor fewer (the same bits)
    return (xc * inv if xc.requires_grad else xc.mul_(inv)), inv, mean, var


def _projection_vjp(u: Tensor, xh: Tensor, inv: Tensor, dim: int | tuple[int, ...]) -> Tensor:
    return (u - u.mean(dim, keepdim=True) - xh * (u * xh).mean(dim, keepdim=True)) * inv


def _spread(t: Tensor, s: int) -> Tensor:
    """Per-channel ``[..., C]`` -> ``[..., s * C]`` in the flat channels-last order."""
    return t if s == 1 else t.repeat(*([1] * (t.dim() - 1)), s)


@register
class LayerNormRule(Rule):
    """``nn.LayerNorm`` over the last ``k`` dimensions of a sample (``normalized_shape``): the
    sample is ``M`` groups of ``N`` features (``M = 1`` over the whole sample), each standardized
    with its own statistics, then scaled and shifted elementwise."""

    module_types = (nn.LayerNorm,)
    kind = "layer_norm"

    def __init__(self, module: nn.LayerNorm, path: str) -> None:
        super().__init__(module, path)
        self.eps = module.eps
        self.normalized = tuple(module.normalized_shape)
        self.features = numel(self.normalized)
        self.weight = None if module.weight is None else module.weight.detach().reshape(-1)
        bias = getattr(module, "bias", None)
        self.bias = None if bias is None else bias.detach().reshape(-1)

    def out_shape(self, shape: Shape) -> Shape:
        k = len(self.normalized)
        if tuple(shape[len(shape) - k :]) != self.normalized or len(shape) < k:
            raise self._refuse_shape(shape, f"{list(self.normalized)} in its last dimensions")
        return shape

    @property
    def groups(self) -> int:
        """``M``: the positions each standardized separately (1 over the whole sample)."""
        assert self.shape_in is not None  # bound before use (Program.bind)
        return numel(self.shape_in) // self.features

    def forward(self, x: Tensor, ctx: ForwardCtx):
        D, b, d = x.shape
        M = self.groups
        xg = x if M == 1 else x.reshape(D, b, M, -1)
        xh, inv, _, _ = _standardize(xg, -1, self.eps)
        y = xh if self.weight is None else xh * self.weight
        if self.bias is not None:
            y = y + self.bias
        if not ctx.save:
            return y.reshape(D, b, d), None
        return y.reshape(D, b, d), (ctx.rows(xh.reshape(D, b, d)), ctx.rows(inv.reshape(D, b, M)))

    def vjp(self, v: Tensor, saved) -> Tensor:
        xh, inv = saved
        M = self.groups
        if M > 1:  # [..., M * N] -> [..., M, N]: each group its own projection
            v, xh, inv = v.unflatten(-1, (M, -1)), xh.unflatten(-1, (M, -1)), inv[..., None]
        u = v if self.weight is None else v * self.weight
        out = _projection_vjp(u, xh, inv, -1)
        return out if M == 1 else out.flatten(-2)

    def tensors(self):
        return {k: t for k, t in (("weight", self.weight), ("bias", self.bias)) if t is not None}


class ChannelNormRule(Rule):
    """A norm over the channels of ``[C, *positions]`` samples (group norm, batch norm): it takes
    them channels-last, ``[..., s * C]``."""

    layout = "cl"

    @property
    def positions(self) -> int:
        """``s``: the positions of each channel in a sample (1 on ``[C]`` samples)."""
        assert self.shape_in is not None  # bound before use (Program.bind)
        return numel(self.shape_in[1:])


@register
class GroupNormRule(ChannelNormRule):
    """``nn.GroupNorm``: a sample ``[C, *positions]`` in ``G`` groups of ``C / G`` channels, each
    group standardized over its channels and positions; then a per-channel scale and shift."""

    module_types = (nn.GroupNorm,)
    kind = "group_norm"

    def __init__(self, module: nn.GroupNorm, path: str) -> None:
        super().__init__(module, path)
        self.eps = module.eps
        self.G, self.C = module.num_groups, module.num_channels
        self.weight = None if module.weight is None else module.weight.detach()
        self.bias = None if module.bias is None else module.bias.detach()

    def out_shape(self, shape: Shape) -> Shape:
        if not shape or shape[0] != self.C:
            raise self._refuse_shape(shape, f"{self.C} channels (its first dimension)")
        return shape

    def _groups(self, t: Tensor) -> Tensor:
        """Flat channels-last ``[..., s * C]`` -> ``[..., s, G, C / G]``."""
        return t.unflatten(-1, (self.positions, self.G, -1))

    def forward(self, x: Tensor, ctx: ForwardCtx):
        D, b, d = x.shape
        xh, inv, _, _ = _standardize(self._groups(x), (-3, -1), self.eps)
        xh = xh.reshape(D, b, d)
        y = xh if self.weight is None else xh * _spread(self.weight, self.positions)
        if self.bias is not None:
            y = y + _spread(self.bias, self.positions)
        return y, (ctx.rows(xh), ctx.rows(inv.reshape(D, b, self.G))) if ctx.save else None

    def vjp(self, v: Tensor, saved) -> Tensor:
        xh, inv = saved
        u = v if self.weight is None else v * _spread(self.weight, self.positions)
        # v may be one row stack for all datapoints ([1, R, S, d]), xh one per datapoint: the
        # result takes the broadcast shape, so the groups are merged back with flatten, not with
        # v's leading shape
        out = _projection_vjp(self._groups(u), self._groups(xh), inv[..., None, :, None], (-3, -1))
        return out.flatten(-3)

    def tensors(self):
        return {k: t for k, t in (("weight", self.weight), ("bias", self.bias)) if t is not None}


@register
class BatchNormRule(ChannelNormRule):
    """``nn.BatchNorm1d`` on ``[C]`` or ``[C, L]`` samples, ``BatchNorm2d`` on ``[C, H, W]``,
    ``BatchNorm3d`` on ``[C, T, H, W]``: each channel standardized over the batch and its ``s``
    positions.

    Statistics: running ones in eval mode; batch ones in train mode (or without running stats),
    either coupling the samples of a batch datapoint or, with ``batchnorm="frozen"``, treated as
    constants per dataset. The module's running statistics are never updated.
    """

    module_types = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    kind = "batch_norm"
    _NDIM: ClassVar[dict[type[nn.Module], tuple[int, ...]]] = {
        nn.BatchNorm1d: (1, 2),
        nn.BatchNorm2d: (3,),
        nn.BatchNorm3d: (4,),
    }

    def __init__(self, module: nn.modules.batchnorm._BatchNorm, path: str) -> None:
        super().__init__(module, path)
        self.eps = module.eps
        self.features = module.num_features
        self.ndims = next(n for t, n in self._NDIM.items() if isinstance(module, t))
        self.weight = None if module.weight is None else module.weight.detach()
        self.bias = None if module.bias is None else module.bias.detach()
        self.uses_batch_stats = uses_batch_stats(module)
        self.running: tuple[Tensor, Tensor] | None = None
        if not self.uses_batch_stats:
            mean, var = module.running_mean, module.running_var
            assert mean is not None  # uses_batch_stats is False only with running statistics
            if var is None:
                raise ValueError(
                    f"{path}: {type(module).__name__} has a running_mean but no running_var"
                )
            self.running = (mean.detach(), var.detach())

    def sample_ndim(self) -> int | None:
        return self.ndims[0] if len(self.ndims) == 1 else None

    def out_shape(self, shape: Shape) -> Shape:
        if len(shape) not in self.ndims or shape[0] != self.features:
            named = {1: "", 2: ", L", 3: ", H, W", 4: ", T, H, W"}
            dims = " or ".join(f"[{self.features}{named[n]}]" for n in self.ndims)
            raise self._refuse_shape(shape, dims)
        return shape

    def _affine(self, y: Tensor) -> Tensor:
        if self.weight is not None:
            y = y * self.weight
        return y + self.bias if self.bias is not None else y

    def forward(self, x: Tensor, ctx: ForwardCtx) -> tuple[Tensor, Any]:
        s = self.positions
        if s > 1:  # channels-last [D, b, s * C] -> [D, b * s, C]: the positions beside the batch
            D, b, d = x.shape
            y, saved = self._forward(x.reshape(D, b * s, self.features), ctx, s)
            return y.reshape(D, b, d), saved
        return self._forward(x, ctx, 1)

    def _forward(self, x: Tensor, ctx: ForwardCtx, s: int) -> tuple[Tensor, Any]:
        """``x [D, b * s, C]``, each row one position of one sample (rows of a sample together)."""
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
            if not ctx.save:
                return self._affine(xh), None
            xh_flat = xh.reshape(x.shape[0], -1, s * self.features)  # the VJP's rows [.., s * C]
            return self._affine(xh), (ctx.rows(xh_flat), ctx.rows(_spread(inv, s)))
        inv, scale = self.fixed_scale(var)
        y = self._affine((x - mean) * inv)
        if not ctx.save:
            return y, None
        return y, ctx.rows(_spread(scale.expand(x.shape[0], 1, self.features), s))

    def fixed_scale(self, var: Tensor) -> tuple[Tensor, Tensor]:
        """``(inv, scale)`` for fixed statistics of variance ``var``: ``inv = 1 / sqrt(var + eps)``
        and the diagonal Jacobian ``scale = inv * weight``. The one fold of a batch norm into a
        diagonal (the fused backends' lowering folds with it too)."""
        inv = torch.rsqrt(var + self.eps)
        return inv, inv if self.weight is None else inv * self.weight

    def vjp(self, v: Tensor, saved) -> Tensor:
        if isinstance(saved, tuple):
            xh, inv = saved
            s = self.positions
            u = v if self.weight is None else v * _spread(self.weight, s)
            if s == 1:
                return _projection_vjp(u, xh, inv, -2)
            # [P, R, S, s * C] -> [P, R, S, s, C]: the mean over the batch and the positions
            u, xh, inv = (t.unflatten(-1, (s, self.features)) for t in (u, xh, inv))
            return _projection_vjp(u, xh, inv, (-3, -2)).flatten(-2)
        return v * saved

    @property
    def coupling(self) -> bool:
        return self.uses_batch_stats

    def tensors(self):
        named = {"weight": self.weight, "bias": self.bias}
        if self.running is not None:
            named |= {"running_mean": self.running[0], "running_var": self.running[1]}
        return {k: t for k, t in named.items() if t is not None}
