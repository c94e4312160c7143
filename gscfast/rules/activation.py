"""Elementwise activations: each supplies only its derivative, saved at forward time."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import ForwardCtx, Rule, register

SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946


class ActivationRule(Rule):
    """``y = s(z)`` elementwise; ``v J = v * s'(z)``. Subclasses implement ``derivative``."""

    is_activation = True
    layout = "keep"  # elementwise

    def derivative(self, z: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor, ctx: ForwardCtx) -> tuple[Tensor, Tensor | None]:
        y = self.module(x)
        return y, ctx.rows(self.derivative(x, y)) if ctx.save else None

    def vjp(self, v: Tensor, saved: Tensor) -> Tensor:
        return v * saved


@register
class ReLURule(ActivationRule):
    module_types = (nn.ReLU,)
    kind = "relu"

    def derivative(self, z, y):  # autograd's convention: s'(0) = 0
        return (z > 0).to(z.dtype)


@register
class LeakyReLURule(ActivationRule):
    module_types = (nn.LeakyReLU,)
    kind = "leaky_relu"

    def derivative(self, z, y):
        # Python scalars in torch.where would give float32; stay in z's dtype.
        return torch.where(
            z > 0, torch.ones_like(z), torch.full_like(z, self.module.negative_slope)
        )


@register
class TanhRule(ActivationRule):
    module_types = (nn.Tanh,)
    kind = "tanh"

    def derivative(self, z, y):
        # 1 - y^2 in one fresh tensor, not two: a fresh [50000, 100] tensor costs more to fault
        # in than to compute (the same bits: 1 - a is -a + 1)
        return (y * y).neg_().add_(1)


@register
class SigmoidRule(ActivationRule):
    module_types = (nn.Sigmoid,)
    kind = "sigmoid"

    def derivative(self, z, y):
        return y * (1 - y)


@register
class ELURule(ActivationRule):
    module_types = (nn.ELU,)
    kind = "elu"

    def derivative(self, z, y):
        return torch.where(z > 0, torch.ones_like(z), self.module.alpha * torch.exp(z))


@register
class SELURule(ActivationRule):
    module_types = (nn.SELU,)
    kind = "selu"

    def derivative(self, z, y):
        return SELU_SCALE * torch.where(z > 0, torch.ones_like(z), SELU_ALPHA * torch.exp(z))


@register
class GELURule(ActivationRule):
    module_types = (nn.GELU,)
    kind = "gelu"

    def derivative(self, z, y):
        if self.module.approximate == "tanh":
            k = math.sqrt(2.0 / math.pi)
            t = torch.tanh(k * (z + 0.044715 * z**3))
            return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * k * (1 + 3 * 0.044715 * z * z)
        cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2.0)))
        pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
        return cdf + z * pdf


@register
class SoftplusRule(ActivationRule):
    module_types = (nn.Softplus,)
    kind = "softplus"

    def derivative(self, z, y):
        bz = self.module.beta * z
        return torch.where(bz > self.module.threshold, torch.ones_like(z), torch.sigmoid(bz))


@register
class IdentityRule(ActivationRule):
    module_types = (nn.Identity,)
    kind = "identity"

    def forward(self, x: Tensor, ctx: ForwardCtx) -> tuple[Tensor, None]:
        return x, None

    def vjp(self, v: Tensor, saved: Tensor | None) -> Tensor:
        return v
