from __future__ import annotations

from torch import Tensor

from ..nn import Residual
from .base import ForwardCtx, Rule, Shape, bind_shapes, op_forward, op_vjp, register


@register
class ResidualRule(Rule):
    """``y = x + scale * body(x)``; ``v J = v + scale * (v J_body)``."""

    module_types = (Residual,)
    kind = "residual"
    layout = "keep"  # its body is bound to return the order it takes (x + body(x))

    def __init__(self, module: Residual, path: str) -> None:
        super().__init__(module, path)
        self.scale = module.scale
        # The body's rules: compile_ops fills them in (rules never import the compiler).
        self.body: list[Rule] = []

    def forward(self, x: Tensor, ctx: ForwardCtx):
        h, saved = x, []
        for op in self.body:
            h, s = op_forward(op, h, ctx)
            saved.append(s)
        if h.shape != x.shape:
            raise ValueError(
                f"{self.path}: body maps {tuple(x.shape[-1:])} features to "
                f"{tuple(h.shape[-1:])}; a residual body must keep the shape"
            )
        return x + self.scale * h, saved

    def vjp(self, v: Tensor, saved) -> Tensor:
        u = v
        for op, s in zip(reversed(self.body), reversed(saved)):
            u = op_vjp(op, u, s)
        return v + self.scale * u

    def out_shape(self, shape: Shape) -> Shape:
        out, _ = bind_shapes(self.body, shape, self.cl_in, end=self.cl_in)
        if out != shape:
            raise ValueError(
                f"{self.path} (Residual): its body maps samples of shape {list(shape)} to "
                f"{list(out)}; a residual body must keep the shape"
            )
        return shape

    def tensors(self):
        return {
            f"body[{i}].{k}": t for i, op in enumerate(self.body) for k, t in op.tensors().items()
        }
