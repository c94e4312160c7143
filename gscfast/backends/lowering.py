"""The one lowering of a compiled model to the fused kernels (numba, triton, cupy), and the one
place that says what they fuse.

- ``Act`` and ``Norm``: the activation and norm codes every fused kernel switches on. The CUDA
  header ``kernels/common/codes.cuh`` is generated from them (``scripts/gen-codes``; a test checks
  the checked-in copy), the numba kernels import them as plain ints.
- ``ACTIVATIONS``: rule class -> its code and parameters, one line per activation. Adding an
  activation to the fused backends is its rule, its code in ``Act`` (then ``scripts/gen-codes``),
  one line here, and its kernel bodies.
- ``lower``: a ``Program`` -> one ``LayerPlan`` per layer (the linear map, the norm with a fixed
  batch norm folded into a diagonal scale, the activation and its parameters). The numba backend
  packs the plans into its flat arrays, the GPU engine into its per-layer specs.
- ``coupled_vjp`` and ``coupled_recursion_takes``: a layer's VJP with batch statistics (batch
  datapoints) as a scale and a batch-norm projection, for numba's coupled contributions.
- ``FusedBackend`` and ``fused_or_fallback``: the one dispatcher of a fused backend's methods:
  the fused kernels when they take the problem, else the ``"torch"`` engine's path, which hands
  the runs of layers the kernels take (``fused_spans``) back to them.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from ..compiler import Layer, Program
from ..frozen import FrozenStats
from ..rules import Rule
from ..rules.activation import (
    ELURule,
    GELURule,
    IdentityRule,
    LeakyReLURule,
    ReLURule,
    SELURule,
    SigmoidRule,
    SoftplusRule,
    TanhRule,
)
from ..rules.generic import PassRule
from ..rules.linear import LinearRule
from ..rules.norm import BatchNormRule, LayerNormRule
from ..validation import Problem
from .torch_engine import TorchBackend


class Act(IntEnum):
    """Activation codes of the fused kernels (``NONE``: the layer has no activation)."""

    NONE = 0
    IDENTITY = 1
    RELU = 2
    LEAKY = 3
    TANH = 4
    SIGMOID = 5
    ELU = 6
    SELU = 7
    SOFTPLUS = 8
    GELU = 9
    GELU_TANH = 10


class Norm(IntEnum):
    """Norm codes of the fused kernels."""

    NONE = 0
    LAYER = 1  # layer norm over the features
    DIAG = 2  # batch norm with fixed statistics: a diagonal scale
    BATCH = 3  # batch norm with batch statistics over a batch datapoint (numba's coupled sweep)


class Unsupported(Exception):
    """The problem has something the fused kernels do not cover (the torch path takes it)."""


def _gelu(m: nn.GELU) -> tuple[Act, float, float]:
    if m.approximate == "none":
        return Act.GELU, 0.0, 0.0
    if m.approximate == "tanh":
        return Act.GELU_TANH, 0.0, 0.0
    raise Unsupported(f"GELU(approximate={m.approximate!r})")


ACTIVATIONS: dict[type[Rule], Callable[[Any], tuple[Act, float, float]]] = {
    ReLURule: lambda m: (Act.RELU, 0.0, 0.0),
    LeakyReLURule: lambda m: (Act.LEAKY, float(m.negative_slope), 0.0),
    TanhRule: lambda m: (Act.TANH, 0.0, 0.0),
    SigmoidRule: lambda m: (Act.SIGMOID, 0.0, 0.0),
    ELURule: lambda m: (Act.ELU, float(m.alpha), 0.0),
    SELURule: lambda m: (Act.SELU, 0.0, 0.0),
    SoftplusRule: lambda m: (Act.SOFTPLUS, float(m.beta), float(m.threshold)),
    GELURule: _gelu,
    IdentityRule: lambda m: (Act.IDENTITY, 0.0, 0.0),
}
"""Activation rule -> ``module -> (code, p0, p1)``: its kernel code and parameters (negative slope,
alpha, beta and threshold); ``Unsupported`` for a form the kernels do not implement."""


def activation(rule: Rule | None) -> tuple[Act, float, float]:
    """``(code, p0, p1)`` of an activation rule (``Act.NONE`` for None)."""
    if rule is None:
        return Act.NONE, 0.0, 0.0
    return ACTIVATIONS[type(rule)](rule.module)


def split_layer(layer: Layer) -> tuple[LinearRule, Rule | None, Rule | None]:
    """``(linear, norm | None, activation | None)`` of a layer of the fused kernels' shape
    ``Linear -> [LayerNorm | BatchNorm1d] -> [activation]``, or ``Unsupported``."""
    ops = [op for op in layer.ops if not isinstance(op, PassRule)]  # identities (eval dropout)
    if not ops or type(ops[0]) is not LinearRule:
        raise Unsupported(f"layer f_{layer.index} does not start with nn.Linear")
    lin, rest = ops[0], ops[1:]
    assert isinstance(lin, LinearRule)
    for op in layer.ops:  # the kernels' samples are vectors: a norm after Unflatten is not
        for shape in (op.shape_in, op.shape_out):  # theirs (it normalizes per position)
            if shape is not None and len(shape) != 1:
                raise Unsupported(f"layer f_{layer.index}: {op.path} on samples of shape {shape}")
    norm = act = None
    if rest and type(rest[0]) in (LayerNormRule, BatchNormRule):
        norm, rest = rest[0], rest[1:]
    if rest and type(rest[0]) in ACTIVATIONS:
        act, rest = rest[0], rest[1:]
    if rest:
        raise Unsupported(f"layer f_{layer.index}: {[op.kind for op in layer.ops]}")
    activation(act)  # refuses the forms the kernels lack
    return lin, norm, act


def check_program(program: Program) -> None:
    """``Unsupported`` unless every layer has a fused kernel (batch statistics are checked later)."""
    for layer in program.layers:
        split_layer(layer)


def fused_spans(
    program: Program, cuts: Sequence[int] = (), init: Program | None = None
) -> list[list[Layer]]:
    """The maximal runs of consecutive layers of ``program`` that lower to the fused kernels
    (``lower_layer`` without frozen statistics; with ``init``, its layer of the same index too:
    a hook can make one model's layer generic and not the other's), in model order, none of them
    across the layer boundaries ``f_c`` for ``c`` in ``cuts``."""
    spans: list[list[Layer]] = []
    run: list[Layer] = []
    for layer in program.layers:
        if run and layer.index + 1 in cuts:
            spans.append(run)
            run = []
        try:
            lower_layer(layer, None)
            if init is not None:
                lower_layer(init.layer(layer.index), None)
        except Unsupported:
            if run:
                spans.append(run)
            run = []
            continue
        run.append(layer)
    if run:
        spans.append(run)
    return spans


def programs_fused(*programs: Program | None) -> bool:
    """Whether every layer of every given program (None is skipped) has a fused kernel."""
    try:
        for program in programs:
            if program is not None:
                check_program(program)
    except Unsupported:
        return False
    return True


# ----------------------------------------------------------------------------- the plan


@dataclass
class LayerPlan:
    """One layer lowered for the fused kernels (tensors as the rules hold them: the model's dtype
    and device; the packers convert).

    Attributes:
        index: paper index ``m`` (the layer outputs ``f_m``).
        weight: ``[d_out, d_in]``; bias ``[d_out]`` or None.
        norm: ``Norm``; ``eps`` its epsilon (0 for ``NONE`` and ``DIAG``). ``LAYER``/``BATCH``:
            ``gamma``/``beta`` the affine ``[d_out]`` or None. ``DIAG``: ``mean`` and ``gamma``
            (the folded scale ``weight / sqrt(var + eps)``) ``[G, d_out]``, one row per group of
            samples (a dataset with frozen statistics; one row for running statistics), ``beta``.
        act: ``Act``; ``p0``, ``p1`` its parameters (``ACTIVATIONS``).
    """

    index: int
    weight: Tensor
    bias: Tensor | None
    norm: Norm
    eps: float
    gamma: Tensor | None
    beta: Tensor | None
    mean: Tensor | None
    act: Act
    p0: float
    p1: float

    @property
    def din(self) -> int:
        return self.weight.shape[1]

    @property
    def dout(self) -> int:
        return self.weight.shape[0]

    @property
    def has_ds(self) -> bool:
        """Whether the VJP scales by a per-sample vector (activation derivative / BN scale)."""
        return self.act not in (Act.NONE, Act.IDENTITY) or self.norm == Norm.DIAG

    @property
    def has_pre(self) -> bool:
        """Whether the layer ends in an activation (its pre-activation is defined)."""
        return self.act != Act.NONE


def lower_layer(layer: Layer, frozen: FrozenStats | None, coupled: bool = False) -> LayerPlan:
    """``layer`` as a ``LayerPlan``, or ``Unsupported``. A batch norm with batch statistics
    becomes ``Norm.BATCH`` with ``coupled`` (batch datapoints), else ``Norm.DIAG`` with the
    constants ``frozen`` holds for it (``gscfast.frozen``), else ``Unsupported``."""
    lin, norm, act = split_layer(layer)
    code, eps, gamma, beta, mean = Norm.NONE, 0.0, None, None, None
    if isinstance(norm, LayerNormRule) or (
        isinstance(norm, BatchNormRule) and norm.uses_batch_stats and coupled
    ):
        # both standardize (over features / over the batch) with eps, gamma and beta
        code = Norm.LAYER if isinstance(norm, LayerNormRule) else Norm.BATCH
        eps, gamma, beta = float(norm.eps), norm.weight, norm.bias
    elif isinstance(norm, BatchNormRule):
        if norm.uses_batch_stats:
            if frozen is None or norm not in frozen:
                raise Unsupported("batch norm with batch statistics couples the samples")
            m, v = frozen[norm]
        else:
            assert norm.running is not None  # no batch statistics: running ones
            m, v = norm.running
        m, v = m.reshape(-1, m.shape[-1]), v.reshape(-1, v.shape[-1])
        code, mean, gamma, beta = Norm.DIAG, m, norm.fixed_scale(v)[1], norm.bias
    a, p0, p1 = activation(act)
    return LayerPlan(layer.index, lin.weight, lin.bias, code, eps, gamma, beta, mean, a, p0, p1)


def lower(
    program: Program | Sequence[Layer],
    frozen: FrozenStats | None = None,
    *,
    coupled: bool = False,
) -> list[LayerPlan]:
    """``program``'s layers (or a span of them) in model order as plans (see ``lower_layer``)."""
    layers = program.layers if isinstance(program, Program) else program
    return [lower_layer(layer, frozen, coupled) for layer in layers]


# ----------------------------------------------------------------------------- coupled recursion


def coupled_recursion_takes(program: Program) -> bool:
    """Whether the coupled contributions recursion (numba's ``_contributions_coupled``) takes
    every layer of ``program``: ``Linear -> [BatchNorm1d] -> [activation]`` (a layer norm's
    projection is over the features, which that recursion does not do)."""
    try:
        return all(not isinstance(split_layer(layer)[1], LayerNormRule) for layer in program.layers)
    except Unsupported:
        return False


def coupled_vjp(layer: Layer, saved: list[Any], p: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(W [d_out, d_in], c, x)`` of ``layer`` at batch datapoint ``p`` of its saved forward
    state (the rules' ``forward``): its VJP is ``u = v * c`` (``c`` broadcasts to ``[B, d_out]``),
    then, with batch statistics, the batch-norm projection ``u - mean_B(u) - x * mean_B(u * x)``
    with ``x [B, d_out]`` the standardized input (None without), then ``@ W``. The activation
    derivative, the batch-norm weight and ``1/sigma`` fold into ``c``: ``1/sigma`` is one number
    per feature, so it commutes with the projection. ``Unsupported`` for a layer norm."""
    lin, norm, act = split_layer(layer)
    if norm is not None and not isinstance(norm, BatchNormRule):
        raise Unsupported(f"layer f_{layer.index}: {norm.kind} in the coupled recursion")
    c = torch.ones((), dtype=lin.weight.dtype, device=lin.weight.device)
    x: Tensor | None = None
    for op, st in zip(layer.ops, saved):
        if op is act and st is not None:
            c = c * st[p, 0]  # [B, d]: the derivative (ForwardCtx.rows of a batch datapoint)
        elif op is norm and isinstance(st, tuple):  # batch statistics: (standardized x, 1/sigma)
            assert isinstance(norm, BatchNormRule)
            x, scale = st[0][p, 0], st[1][p, 0]
            c = c * (scale if norm.weight is None else scale * norm.weight)
        elif op is norm:  # fixed statistics: a diagonal scale
            c = c * st[p, 0]
    return lin.weight, c, x


# ----------------------------------------------------------------------------- the dispatcher

F = TypeVar("F", bound=Callable[..., Any])


class FusedBackend(TorchBackend):
    """A backend with fused kernels for some problems and the ``"torch"`` engine's path (which it
    subclasses) for the rest; its methods are wrapped in ``fused_or_fallback``.

    Subclasses implement ``takes``: whether their kernels run ``pb``'s device, dtype and kind of
    datapoint for ``method``; ``fused`` adds what every fused backend needs of the program.

    A model the kernels take only in part (a generic module, a convolution, a residual block
    between runs of ``Linear -> [norm] -> [activation]`` layers): all four methods run on the
    torch engine's path with each run of layers the kernels take (``spans``) on the subclass's
    ``span_forward``, ``span_backward`` and ``span_contributions``, where it sets
    ``fuses_spans``; per-sample datapoints without frozen batch statistics (those are gathered
    over a whole model).
    """

    fuses_spans: ClassVar[bool] = False

    def takes(self, pb: Problem, method: str) -> bool:
        raise NotImplementedError

    def spans(
        self, pb: Problem, cuts: Sequence[int] = (), init: Program | None = None
    ) -> list[list[Layer]]:
        if not self.fuses_spans or pb.coupled or pb.frozen or not self.takes(pb, "sweep"):
            return []
        return fused_spans(pb.program, cuts, init)

    def fused(self, pb: Problem, method: str = "chain", init: Program | None = None) -> bool:
        """Whether ``method`` (``"sweep"``, ``"chain"``, ``"jacobian"``, ``"contributions"``)
        runs on the fused kernels for ``pb`` (and the initial weights ``init``), else on the torch
        engine's path."""
        return self.takes(pb, method) and programs_fused(pb.program, init)


def fused_or_fallback(fn: F) -> F:
    """Run a ``FusedBackend`` method on the fused kernels when ``self.fused`` says so and, for a
    gradient from the error (``sweep(grads=True)``, ``contributions``), the problem has an error
    layer; else the torch engine's method of the same name."""
    method = fn.__name__
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def run(self: FusedBackend, pb: Problem, *args: Any, **kwargs: Any) -> Any:
        bound = sig.bind(self, pb, *args, **kwargs).arguments
        from_error = method == "contributions" or bool(bound.get("grads", False))
        if (from_error and pb.error is None) or not self.fused(pb, method, bound.get("init")):
            return getattr(TorchBackend, method)(self, pb, *args, **kwargs)
        return fn(self, pb, *args, **kwargs)

    return run  # type: ignore[return-value]  # functools.wraps keeps fn's signature
