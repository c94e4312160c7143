"""Rules for modules without an analytic rule of their own.

- ``PassRule``: modules that are the identity on the flat features gscfast measures (``nn.Flatten``
  and ``nn.Unflatten``, which only change a sample's shape; dropout in eval mode); not a layer
  boundary.
- ``GenericRule``: any other module, and a supported one whose call is not its type's forward (a
  forward hook or pre-hook, an overridden ``forward``): the module is called as the caller's model
  calls it, hooks included, and its vector-Jacobian products come from ``torch.func.vjp``,
  batched over cotangent rows with ``torch.func.vmap``. Exact; slower than an analytic rule (one
  ``vjp`` per chunk and layer, the rows through ``vmap``), and the fused backends run such a
  program on the torch engine.

What the generic rule needs of a module, checked on every forward (else a clear error naming it):
it maps a tensor ``[batch, *shape_in]`` to one ``[batch, *shape_out]`` (vectors, feature maps,
token sequences); it is deterministic (the same input gives
the same output: no train-mode dropout); and, where samples are measured one at a time (no
train-mode batch norm in the model), it does not couple the samples of a batch (the gradient of
one sample's output reaches no other sample's input). A module that changes its buffers when
called (running statistics, counters) is called on copies of them, so the caller's model is
never modified. A generic module is never a layer boundary: layers end after the activations
gscfast knows (``RULES``); register a rule (``gscfast.rules.register``) for a custom activation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..nn import call_on_copies, couples_samples, same_values
from .base import ForwardCtx, Rule, Shape, numel, register


class PassRule(Rule):
    """The identity on flat features; the module is not called."""

    kind = "pass"

    def forward(self, x: Tensor, ctx: ForwardCtx) -> tuple[Tensor, None]:
        return x, None

    def vjp(self, v: Tensor, saved: None) -> Tensor:
        return v


def _sample_dim(module: nn.Module, path: str, dim: int, shape: Shape, what: str) -> int:
    """The dimension of one sample that dimension ``dim`` of a batch ``[N, *shape]`` is (from 0);
    ``ValueError`` where it is the batch's, which would mix samples."""
    full = dim + len(shape) + 1 if dim < 0 else dim
    if not 1 <= full <= len(shape):
        raise ValueError(
            f"{path} ({module}) has {what}={dim}, which on a batch of samples of shape "
            f"{list(shape)} is {'the batch dimension' if full == 0 else 'out of range'}; gscfast "
            "measures per-sample functions, which keep dimension 0 as the batch"
        )
    return full - 1


@register
class FlattenRule(PassRule):
    """``nn.Flatten``: a sample's dimensions ``start_dim .. end_dim`` merged; flat features are
    unchanged (they are already C-ordered)."""

    module_types = (nn.Flatten,)
    limits = "start_dim >= 1: dimension 0 is the batch"
    keeps_shape = False

    def out_shape(self, shape: Shape) -> Shape:
        m = self.module
        assert isinstance(m, nn.Flatten)  # the one module type of this rule
        a = _sample_dim(m, self.path, m.start_dim, shape, "start_dim")
        b = _sample_dim(m, self.path, m.end_dim, shape, "end_dim")
        if b < a:
            raise ValueError(f"{self.path} ({m}) has end_dim before start_dim")
        return (*shape[:a], numel(shape[a : b + 1]), *shape[b + 1 :])


@register
class UnflattenRule(PassRule):
    """``nn.Unflatten``: one dimension of a sample split in several; flat features unchanged."""

    module_types = (nn.Unflatten,)
    keeps_shape = False

    def out_shape(self, shape: Shape) -> Shape:
        m = self.module
        assert isinstance(m, nn.Unflatten)  # the one module type of this rule
        if not isinstance(m.dim, int):
            raise TypeError(f"{self.path} ({m}): named dimensions are not supported")
        a = _sample_dim(m, self.path, m.dim, shape, "dim")
        try:
            sizes = torch.empty(0).new_empty(shape[a]).unflatten(0, tuple(m.unflattened_size)).shape
        except RuntimeError as e:
            raise ValueError(f"{self.path} ({m}) cannot split {shape[a]} entries: {e}") from e
        return (*shape[:a], *sizes, *shape[a + 1 :])


@register
class DropoutRule(PassRule):
    module_types = (
        nn.Dropout,
        nn.Dropout1d,
        nn.Dropout2d,
        nn.Dropout3d,
        nn.AlphaDropout,
        nn.FeatureAlphaDropout,
    )
    limits = "eval mode: the identity"
    layout = "keep"

    def __init__(self, module: nn.Module, path: str) -> None:
        super().__init__(module, path)
        p: float = module.p  # type: ignore[assignment]  # Dropout's float attribute
        if module.training and p > 0:  # p = 0 keeps every unit: the identity
            # ValueError, as layers= says it: the module is supported, its mode is not
            raise ValueError(
                f"{path} ({type(module).__name__}) is in train mode: it draws a new random mask on "
                "every call, so the model has no one Jacobian to measure. Call model.eval() (dropout "
                "is then the identity), or remove the dropout"
            )


# Why a module takes the generic rule (shown by Program.generic and repr).
NO_RULE = "no analytic rule"


class GenericRule(Rule):
    """Any module, called as is; its VJPs by ``torch.func`` (module docstring)."""

    kind = "generic"
    keeps_shape = False  # not known without calling it

    def __init__(
        self, module: nn.Module, path: str, why: str = NO_RULE, activation: bool = False
    ) -> None:
        super().__init__(module, path)
        self.why = why
        self.is_activation = activation  # a hooked activation still ends its layer
        self._shapes: dict[Shape, Shape] = {}

    def _call(self, h: Tensor) -> Any:
        """The module on ``h``, hooks included, on copies of its buffers (``call_on_copies``)."""
        return call_on_copies(self.module, h)

    def _name(self) -> str:
        return f"{self.path} ({type(self.module).__name__}, {self.why}: gscfast's generic rule)"

    def _checked(self, y: Any, n: int) -> Tensor:
        if not isinstance(y, Tensor) or y.dim() < 2 or y.shape[0] != n:
            got = list(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise TypeError(
                f"{self._name()} returned {got} for a batch of {n} samples; the generic rule "
                "takes modules mapping a [batch, ...] tensor to a [batch, ...] tensor"
            )
        return y

    def out_shape(self, shape: Shape) -> Shape:
        if shape not in self._shapes:  # found by calling the module on zeros, batches of 2 and 3
            like = next((t for t in self.tensors().values()), None)
            dtype = like.dtype if like is not None else torch.get_default_dtype()
            device = like.device if like is not None else torch.device("cpu")
            shapes = set()
            for n in (2, 3):  # the leading dimension must be the batch (not, say, channels)
                try:
                    with torch.no_grad():
                        y = self._call(torch.zeros(n, *shape, dtype=dtype, device=device))
                except (RuntimeError, ValueError, IndexError) as e:
                    raise ValueError(
                        f"{self._name()} fails on inputs of shape [batch, {', '.join(map(str, shape))}]: {e}"
                    ) from e
                shapes.add(tuple(self._checked(y, n).shape[1:]))
            if len(shapes) != 1:
                raise TypeError(f"{self._name()} gives an output shape that depends on the batch")
            self._shapes[shape] = shapes.pop()
        return self._shapes[shape]

    def tensors(self) -> dict[str, Tensor]:
        named = [*self.module.named_parameters(), *self.module.named_buffers()]
        return {k: t.detach() for k, t in named if t.is_floating_point()}

    def forward(self, x: Tensor, ctx: ForwardCtx) -> tuple[Tensor, Any]:
        D, b, _ = x.shape
        if ctx.coupled:  # batch datapoints: the module sees each dataset's batch, as when run
            ys, fns = zip(*(self._vjp(self.unflat(x[i])) for i in range(D)))
            return torch.stack(ys).reshape(D, b, -1), (list(fns) if ctx.save else None)
        y, fn = self._vjp(self.unflat(x))
        if D * b > 1:
            self._check_per_sample(fn, y)
        return y.reshape(D, b, -1), ((fn, D * b) if ctx.save else None)

    def _vjp(self, h: Tensor) -> tuple[Tensor, Any]:
        """``(module(h), its vjp function)``, checked: the output's shape, determinism."""
        out = torch.func.vjp(self._call, h)  # outer no_grad does not apply inside torch.func
        y, fn = out[0], out[1]
        self._checked(y, h.shape[0])
        if self.shape_out is not None and tuple(y.shape[1:]) != self.shape_out:
            raise TypeError(
                f"{self._name()} returned samples of shape {list(y.shape[1:])}, where the same "
                f"input shape gave {list(self.shape_out)} before: its output shape must depend "
                "on its input's shape only"
            )
        # called the same way (under torch.func, so with autograd): a module may take another
        # path without it (nn.TransformerEncoderLayer's fused inference path), which differs in
        # the last bits and is not randomness
        again = torch.func.vjp(self._call, h)[0]
        if not same_values(y, again):
            raise ValueError(
                f"{self._name()} gives different outputs for the same input (random, such as "
                "dropout in train mode): there is no one Jacobian to measure. Make it "
                "deterministic (model.eval() for dropout)"
            )
        return y, fn

    def _check_per_sample(self, fn: Any, y: Tensor) -> None:
        """``ValueError`` if the gradient of sample 0's output reaches another sample's input."""
        if couples_samples(fn, y):
            raise ValueError(
                f"{self._name()} couples the samples of a batch (the gradient of one sample's "
                "output reaches other samples' inputs), so its per-sample Jacobians are not "
                "defined. The generic rule measures per-sample modules, or any module in a model "
                "whose datapoints are whole batches (with a train-mode batch norm)"
            )

    def vjp(self, v: Tensor, saved: Any) -> Tensor:
        if isinstance(saved, list):  # batch datapoints: v [D, R, B, d_out]
            return torch.stack(
                [self._rows(fn, v[p if v.shape[0] > 1 else 0]) for p, fn in enumerate(saved)]
            )
        fn, n = saved  # per-sample: v [P or 1, R, 1, d_out], P = n
        R, d_out = v.shape[1], v.shape[-1]
        vt = v.expand(n, *v.shape[1:]).reshape(n, R, d_out).transpose(0, 1)
        return self._rows(fn, vt).transpose(0, 1).unsqueeze(2)

    def _rows(self, fn: Any, vt: Tensor) -> Tensor:
        """``fn`` (a vjp function) on each of the flat rows ``vt [R, n, d_out]`` -> ``[R, n,
        d_in]``: batched by ``vmap``, or one at a time for a module ``vmap`` cannot batch."""
        assert self.shape_out is not None  # bound before use (Program.bind)
        R, n = vt.shape[:2]
        vt = vt.reshape(R, n, *self.shape_out)
        try:
            out = torch.func.vmap(fn)(vt)[0]
        except RuntimeError:
            out = torch.stack([fn(vt[r])[0] for r in range(R)])
        return out.reshape(R, n, -1)


__all__ = ["DropoutRule", "FlattenRule", "GenericRule", "PassRule", "UnflattenRule"]
