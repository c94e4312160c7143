"""The rule interface: one small class per supported module type (BackPACK-style).

Layouts (index letters used throughout gscfast):
    D datasets, B samples per dataset, P datapoints, R stacked cotangent rows, S samples per datapoint.
- ``forward`` sees activations as ``[D, b, d]`` (a chunk of ``b`` samples of each dataset).
- Every activation is flat: one sample's ``d`` features are its tensor of shape ``shape_in`` (a
  feature map ``[C, H, W]``, say) flattened, so norms count every element and only the rules that
  need the shape (convolutions, pooling, norms over channels) unflatten it. ``bind_shapes`` sets
  each rule's ``shape_in`` and ``shape_out`` for one input shape.
- Flat feature maps are in one of two orders: C order (``torch.flatten``'s: channel, then
  position), or channels-last (position, then channel), in which the convolution and pooling
  kernels of oneDNN run 2-3x faster on CPUs (no reorders). Each rule says which it takes
  (``layout``); ``bind_shapes`` records where the order changes, and ``op_forward``/``op_vjp``
  convert there. Norms do not depend on the order; the model's input and output, and every
  per-element result gscfast returns, are in C order.
- ``vjp`` sees cotangent stacks as ``[P, R, S, d_out]`` and returns ``[P, R, S, d_in]``.
  Per-sample datapoints have ``P = D * b, S = 1``; batch datapoints (train-mode batch norm) have
  ``P = D, S = B``, so a batch-norm VJP reduces over axis ``-2`` and every other rule ignores it.
Saved tensors are stored already broadcastable to ``[P, 1, S, k]`` (``ForwardCtx.rows``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from ..frozen import FrozenStats

Shape = tuple[int, ...]  # one sample's shape (without the batch)


@dataclass
class ForwardCtx:
    """What a forward pass over one chunk needs to know.

    Attributes:
        coupled: batch datapoints (train-mode batch norm with batch statistics).
        frozen: the batch statistics treated as constants (``batchnorm="frozen"``) of the program
            this pass runs, for this chunk's datasets (``gscfast.frozen``); ``None`` when not
            frozen.
        frozen_init: the same for the initial model of ``contributions`` (``for_init``).
        record: where batch norms computing batch statistics record them (the pre-pass of
            ``gscfast.frozen.frozen_stats``).
        samples: samples per dataset in this chunk (``b``).
        save: keep what the VJPs need (off for forward-only passes).
    """

    coupled: bool
    frozen: FrozenStats | None = None
    frozen_init: FrozenStats | None = None
    record: FrozenStats | None = None
    samples: int = 1
    save: bool = True

    def for_init(self) -> ForwardCtx:
        """This chunk's context for a pass over the initial model (``contributions``)."""
        return replace(self, frozen=self.frozen_init, frozen_init=None)

    def rows(self, t: Tensor) -> Tensor:
        """``[D, b|1, k]`` -> broadcastable ``[P, 1, S|1, k]`` in this chunk's datapoint layout."""
        if self.coupled:
            return t.unsqueeze(1)
        D, b, k = t.shape
        if b == 1 and self.samples != 1:  # a per-dataset constant, spread over its samples
            if D == 1:
                return t.reshape(1, 1, 1, k)
            t = t.expand(D, self.samples, k)
        return t.reshape(-1, 1, 1, k)


class Rule:
    """Analytic forward and vector-Jacobian product for one module.

    Subclasses set ``module_types`` and implement ``forward`` and ``vjp``; ``kind`` names the rule
    for backends that generate their own kernels (numba, triton, cupy).
    """

    module_types: ClassVar[tuple[type[nn.Module], ...]] = ()
    kind: ClassVar[str] = "?"
    is_activation: bool = False  # ends a layer; per instance for the generic rule
    limits: ClassVar[str] = ""  # which of the module type's configurations it supports, if not all
    # Whether the output has the input's shape (elementwise maps, norms): the search for the
    # sample's number of dimensions (``Program.sample_ndim``) looks past such a rule.
    keeps_shape: ClassVar[bool] = True
    # The order of flat feature maps it takes and gives (module docstring): "c" (C order),
    # "cl" (channels-last where the orders differ), or "keep" (elementwise: whichever it gets).
    layout: ClassVar[str] = "c"

    def __init__(self, module: nn.Module, path: str) -> None:
        self.module = module
        self.path = path
        # one sample's input and output shapes (``bind_shapes``); None until bound
        self.shape_in: Shape | None = None
        self.shape_out: Shape | None = None
        # bound with the shapes: whether its input and output are channels-last, and whether
        # op_forward converts its input to that order first, and its output to the other after
        self.cl_in = self.cl_out = False
        self.relayout_in = self.relayout_out = False

    def forward(self, x: Tensor, ctx: ForwardCtx) -> tuple[Tensor, Any]:
        """``x [D, b, d_in]`` -> ``(y [D, b, d_out], saved)``."""
        raise NotImplementedError

    def vjp(self, v: Tensor, saved: Any) -> Tensor:
        """``v [P, R, S, d_out]`` -> ``v @ J  [P, R, S, d_in]``."""
        raise NotImplementedError

    def sample_ndim(self) -> int | None:
        """The number of dimensions of one sample's input this rule fixes (``Conv2d``: 3, ``[C, H,
        W]``), or None where it takes several (``BatchNorm1d``: ``[C]`` or ``[C, L]``)."""
        return None

    def out_shape(self, shape: Shape) -> Shape:
        """One sample's output shape for input ``shape``; ``ValueError`` naming the module if it
        does not take that shape."""
        return shape

    def unflat(self, t: Tensor) -> Tensor:
        """Flat ``[..., d]`` -> ``[N, *shape_in]``."""
        if self.shape_in is None:
            raise RuntimeError(f"{self.path}: the rule has no input shape (Program.bind)")
        return t.reshape(-1, *self.shape_in)

    def _refuse_shape(self, shape: Shape, want: str) -> ValueError:
        return ValueError(
            f"{self.path} ({type(self.module).__name__}) expects {want} per sample but receives "
            f"{list(shape)}"
        )

    def tensors(self) -> dict[str, Tensor]:
        """Parameters and buffers this rule reads (checked for dtype, device and finiteness)."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path})"


def numel(shape: Shape) -> int:
    """The elements of one sample of ``shape`` (1 for a scalar ``()``)."""
    return int(torch.Size(shape).numel())


def orders_differ(shape: Shape) -> bool:
    """Whether channels-last and C order differ for samples of ``shape`` (several channels and
    several positions); where they do not, a sample is taken to be in C order."""
    return len(shape) >= 2 and shape[0] > 1 and numel(shape[1:]) > 1


def relayout(t: Tensor, shape: Shape, to_cl: bool) -> Tensor:
    """Flat samples of ``shape`` (``[..., C * s]``) from C order to channels-last (``to_cl``) or
    back."""
    C, s = shape[0], numel(shape[1:])
    pair = (C, s) if to_cl else (s, C)
    return t.unflatten(-1, pair).transpose(-1, -2).flatten(-2)


def bind_shapes(
    ops: list[Rule], shape: Shape, cl: bool = False, end: bool | None = None
) -> tuple[Shape, bool]:
    """Set each rule's shapes (``shape_in``, ``shape_out``) and orders for a sample of ``shape``
    entering ``ops`` channels-last (``cl``) or in C order; return the shape and order after them,
    converted to channels-last or C order by ``end`` where given. ``ValueError`` names the first
    rule that does not take the shape it receives."""
    for op in ops:
        want = {"c": False, "cl": orders_differ(shape), "keep": cl}[op.layout]
        op.cl_in, op.relayout_in, op.relayout_out = want, want != cl, False
        out = tuple(op.out_shape(shape))  # after cl_in: a residual binds its body in that order
        op.shape_in, op.shape_out = shape, out
        cl = op.cl_out = {"c": False, "cl": orders_differ(out), "keep": want}[op.layout]
        shape = out
    if end is not None and ops and cl != end:
        ops[-1].relayout_out, cl = True, end
    return shape, cl


def op_forward(op: Rule, x: Tensor, ctx: ForwardCtx) -> tuple[Tensor, Any]:
    """``op.forward`` with the order conversions ``bind_shapes`` recorded around it."""
    assert op.shape_in is not None and op.shape_out is not None  # bound (Program.bind)
    if op.relayout_in:
        x = relayout(x, op.shape_in, op.cl_in)
    y, saved = op.forward(x, ctx)
    return (relayout(y, op.shape_out, not op.cl_out) if op.relayout_out else y), saved


def op_vjp(op: Rule, v: Tensor, saved: Any) -> Tensor:
    """``op.vjp`` with the order conversions ``bind_shapes`` recorded around it."""
    assert op.shape_in is not None and op.shape_out is not None  # bound (Program.bind)
    if op.relayout_out:
        v = relayout(v, op.shape_out, op.cl_out)
    v = op.vjp(v, saved)
    return relayout(v, op.shape_in, not op.cl_in) if op.relayout_in else v


# module type -> rule class; filled by `register`.
RULES: dict[type[nn.Module], type[Rule]] = {}


def register(rule: type[Rule], *, override: bool = False) -> type[Rule]:
    """Register ``rule`` for its ``module_types``; replacing an existing rule must be asked for."""
    for t in rule.module_types:
        if t in RULES and RULES[t] is not rule and not override:
            raise ValueError(
                f"a rule for {t.__name__} is already registered ({RULES[t].__name__}); "
                "pass override=True to replace it"
            )
        RULES[t] = rule
    return rule
