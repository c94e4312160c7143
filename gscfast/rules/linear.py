from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import ForwardCtx, Rule, Shape, numel, register


@register
class LinearRule(Rule):
    """``y = x W^T + b`` over the last dimension of a sample (``[..., in]`` -> ``[..., out]``, as
    ``nn.Linear`` applies); ``J = W`` (``[out, in]``) on each position, so ``v J = v @ W``."""

    module_types = (nn.Linear,)
    kind = "linear"
    keeps_shape = False

    def __init__(self, module: nn.Linear, path: str) -> None:
        super().__init__(module, path)
        self.weight: Tensor = module.weight.detach()
        self.bias: Tensor | None = None if module.bias is None else module.bias.detach()

    def sample_ndim(self) -> int:
        return 1  # [D, B, n] inputs: an MLP's samples are vectors

    def out_shape(self, shape: Shape) -> Shape:
        n_in, n_out = self.weight.shape[1], self.weight.shape[0]
        if len(shape) == 1 and shape[0] != n_in:
            raise ValueError(
                f"{self.path} (Linear) expects {n_in} features but receives {shape[0]}"
            )
        if not shape or shape[-1] != n_in:
            raise self._refuse_shape(shape, f"{n_in} features in the last dimension")
        return (*shape[:-1], n_out)

    @property
    def positions(self) -> int:
        """Positions the map applies at: 1 on vectors, ``T`` on ``[T, in]`` samples."""
        assert self.shape_in is not None  # bound before use (Program.bind)
        return 1 if len(self.shape_in) == 1 else numel(self.shape_in[:-1])

    def forward(self, x: Tensor, ctx: ForwardCtx) -> tuple[Tensor, None]:
        if self.positions == 1:
            return torch.nn.functional.linear(x, self.weight, self.bias), None
        D, b, _ = x.shape
        y = torch.nn.functional.linear(x.reshape(D, b, self.positions, -1), self.weight, self.bias)
        return y.reshape(D, b, -1), None

    def vjp(self, v: Tensor, saved: None) -> Tensor:
        if self.positions == 1:
            return v @ self.weight
        return (v.reshape(*v.shape[:-1], self.positions, -1) @ self.weight).flatten(-2)

    def tensors(self) -> dict[str, Tensor]:
        return {"weight": self.weight} | ({} if self.bias is None else {"bias": self.bias})
