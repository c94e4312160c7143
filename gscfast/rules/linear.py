from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import ForwardCtx, Rule, register


@register
class LinearRule(Rule):
    """``y = x W^T + b``; ``J = W`` (``[out, in]``), so ``v J = v @ W``."""

    module_types = (nn.Linear,)
    kind = "linear"

    def __init__(self, module: nn.Linear, path: str) -> None:
        super().__init__(module, path)
        self.weight: Tensor = module.weight.detach()
        self.bias: Tensor | None = None if module.bias is None else module.bias.detach()

    def forward(self, x: Tensor, ctx: ForwardCtx) -> tuple[Tensor, None]:
        return torch.nn.functional.linear(x, self.weight, self.bias), None

    def vjp(self, v: Tensor, saved: None) -> Tensor:
        return v @ self.weight

    def in_features(self) -> int:
        return self.weight.shape[1]

    def out_features(self, d_in: int) -> int:
        return self.weight.shape[0]

    def tensors(self) -> dict[str, Tensor]:
        return {"weight": self.weight} | ({} if self.bias is None else {"bias": self.bias})
