"""The model compiler: ``nn.Sequential`` -> a ``Program`` of layers of analytic rules.

A layer ends right after each activation module, after each ``Residual`` block (one layer by
itself), and at the end of the model (definitions.md). Layers are numbered from the error layer:
the first layer of the model outputs ``f_L``, the last ``f_1``; ``f_0`` is the error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module_globals
from torch.nn.modules.batchnorm import _BatchNorm

from .nn import Residual, uses_batch_stats
from .rules import RULES, ForwardCtx, Rule
from .rules.base import Shape, bind_shapes, numel, op_forward, op_vjp, relayout
from .rules.generic import NO_RULE, GenericRule
from .rules.norm import BatchNormRule
from .rules.residual import ResidualRule


def supported() -> str:
    """What models gscfast compiles, read from the ``RULES`` registry (so a registered rule is
    listed too): the text of "not supported" errors."""
    torch_types: list[str] = []
    activations: list[str] = []
    others: list[str] = []
    for t, rule in RULES.items():
        torch_module = t.__module__.startswith("torch.nn")
        name = f"nn.{t.__name__}" if torch_module else f"{t.__module__}.{t.__name__}"
        name += f" ({rule.limits})" if rule.limits else ""
        if rule.is_activation:
            activations.append(name)
        else:
            (torch_types if torch_module else others).append(name)
    items = [*torch_types, f"the activations {', '.join(activations)}", *others]
    return f"nn.Sequential (nested allowed) of {', '.join(items[:-1])}, and {items[-1]}"


def rule_for(module: nn.Module) -> type[Rule] | None:
    """The registered rule of ``module``'s type (or of a supported base type), or None."""
    rule = RULES.get(type(module))
    if rule is None:  # subclasses of a supported module type use its rule
        rule = next((r for t, r in RULES.items() if isinstance(module, t)), None)
    return rule


# Hooks torch runs when a module is called. Forward hooks and pre-hooks change what the module
# computes: such a module is called as is, by the generic rule. Backward hooks change the
# gradients autograd would give, and torch.func cannot run them: refused (all backends alike).
_FORWARD_HOOKS = {
    "_forward_pre_hooks": "a forward pre-hook",
    "_forward_hooks": "a forward hook",
}
_BACKWARD_HOOKS = {
    "_backward_pre_hooks": "a backward pre-hook (register_full_backward_pre_hook)",
    "_backward_hooks": "a backward hook (register_full_backward_hook or register_backward_hook)",
}
_GLOBAL_HOOKS = {
    "_global_forward_pre_hooks": "a global forward pre-hook "
    "(torch.nn.modules.module.register_module_forward_pre_hook)",
    "_global_forward_hooks": "a global forward hook "
    "(torch.nn.modules.module.register_module_forward_hook)",
    "_global_backward_pre_hooks": "a global backward pre-hook "
    "(torch.nn.modules.module.register_module_full_backward_pre_hook)",
    "_global_backward_hooks": "a global backward hook (torch.nn.modules.module."
    "register_module_full_backward_hook or register_module_backward_hook)",
}
_HOW = (
    "gscfast computes each module's own forward by its analytic rule and would not run it. "
    "Remove it (handle.remove()) before calling gscfast, or take the Jacobian with torch "
    "(torch.func.jacrev, or gscfast.autograd.jacobian, which delegates such models to torch)"
)
_HOW_BACKWARD = (
    "gscfast's Jacobians are the model's own derivatives, which such a hook may change, and "
    "torch.func cannot run it. Remove it (handle.remove()) before calling gscfast, or take the "
    "Jacobian with torch (gscfast.autograd.jacobian delegates such models to torch)"
)


def check_global_hooks() -> None:
    """``TypeError`` if a global module hook is registered (torch would run it on every call)."""
    for name, kind in _GLOBAL_HOOKS.items():
        if getattr(_module_globals, name, None):
            raise TypeError(f"{kind} is registered: {_HOW}.")


def _base_type(module: nn.Module) -> type[nn.Module] | None:
    """The supported type whose forward ``module`` is computed with (itself or a parent)."""
    bases: tuple[type[nn.Module], ...] = (nn.Sequential, Residual, *RULES)
    t = type(module)
    return t if t in bases else next((b for b in bases if isinstance(module, b)), None)


def generic_reason(module: nn.Module, where: str) -> str | None:
    """Why calling ``module`` is not its supported type's forward, so that the generic rule must
    call it as is: a forward hook or pre-hook, or ``forward``/``__call__`` overridden by a
    subclass or on the instance; None if it is plain (or of no supported type). ``TypeError``
    (naming ``module`` at ``where``) for a backward hook."""
    name = type(module).__name__
    for attr, kind in _BACKWARD_HOOKS.items():
        if getattr(module, attr, None):
            raise TypeError(f"{where} ({name}) has {kind}: {_HOW_BACKWARD}.")
    for attr, kind in _FORWARD_HOOKS.items():
        if getattr(module, attr, None):
            return f"has {kind}"
    base = _base_type(module)
    if base is None:
        return None
    overridden = (
        "forward" in vars(module)
        or type(module).forward is not base.forward
        or "__call__" in vars(module)
        or type(module).__call__ is not nn.Module.__call__
        or type(module)._call_impl is not nn.Module._call_impl
    )
    return f"overrides forward() of {base.__name__}" if overridden else None


def check_plain(module: nn.Module, where: str) -> None:
    """``TypeError`` naming ``module`` (at ``where``) unless calling it is exactly its supported
    type's forward: no hooks, no ``forward`` or ``__call__`` overridden by a subclass or on the
    instance (where its function is composed from its children, as ``GradientFlow`` needs)."""
    reason = generic_reason(module, where)
    if reason is not None:
        raise TypeError(f"{where} ({type(module).__name__}) {reason}: {_HOW}.")


def _flatten(module: nn.Module, path: str) -> list[tuple[nn.Module, str, str | None]]:
    """``(leaf, path, why generic or None)``: nested Sequentials are flattened, except one whose
    call is not the composition of its children (a hook, an overridden forward)."""
    reason = generic_reason(module, path)
    if isinstance(module, nn.Sequential) and reason is None:
        return [leaf for i, m in enumerate(module) for leaf in _flatten(m, f"{path}[{i}]")]
    return [(module, path, reason)]


def _check_no_hidden_boundary(module: nn.Module, where: str, why: str) -> None:
    """``TypeError`` if ``module``, which the generic rule calls as one function, contains an
    activation or a residual block: definitions.md puts layer boundaries after them, which gscfast
    cannot see inside a module it calls as a whole."""
    for name, sub in module.named_modules():
        rule = rule_for(sub) if name else None
        if rule is not None and (rule.is_activation or rule is ResidualRule):
            inner = "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in name.split("."))
            raise TypeError(
                f"{where} ({type(module).__name__}, {why}) would be taken by gscfast's generic "
                f"rule as one function, but it contains {where}{inner} "
                f"({type(sub).__name__}), after which definitions.md ends a layer: the layers "
                "inside it would go unmeasured. Build the model as an nn.Sequential of its "
                "layers (without hooks or overridden forwards on the containers), or take the "
                "Jacobian with torch (gscfast.autograd.jacobian delegates such models to torch)"
            )


def compile_ops(module: nn.Module, path: str = "model") -> list[Rule]:
    """The rules of ``module``'s leaves in order: each leaf's analytic rule, or the generic rule
    (``gscfast.rules.generic``) for a module without one or whose call is not its type's forward.
    """
    ops: list[Rule] = []
    for leaf, where, reason in _flatten(module, path):
        rule = rule_for(leaf)
        if rule is None or reason is not None:
            _check_no_hidden_boundary(leaf, where, reason or NO_RULE)
            # a hooked activation still ends its layer (its output, hook and all, is f_l)
            active = rule is not None and rule.is_activation
            ops.append(GenericRule(leaf, where, reason or NO_RULE, activation=active))
            continue
        op = rule(leaf, where)
        if isinstance(op, ResidualRule):  # the body is compiled like any module list
            assert isinstance(leaf, Residual)  # the one module type ResidualRule is for
            op.body = compile_ops(leaf.body, f"{where}.body")
        ops.append(op)
    return ops


@dataclass
class Layer:
    """One layer: the rules from the previous layer's end up to this one's.

    Attributes:
        index: paper numbering (this layer outputs ``f_index``).
        ops: its rules in order.
        modules: the original modules (what the reference backend runs).
    """

    index: int
    ops: list[Rule]
    modules: list[nn.Module]
    shape_in: Shape | None = None  # one sample's input and output shapes (Program.bind)
    shape_out: Shape | None = None
    cl_out: bool = False  # whether its output is channels-last (rules.base; Program.bind)

    @property
    def has_preactivation(self) -> bool:
        """Whether the layer ends in an activation (so its pre-activation is defined)."""
        return self.ops[-1].is_activation

    def forward(self, x: Tensor, ctx: ForwardCtx) -> tuple[Tensor, list[Any], Tensor | None]:
        """``x [D, b, d_in]`` -> ``(y, saved, pre-activation or None)``; the pre-activation in
        the order of the activation's input (``ops[-1].cl_in``)."""
        if self.shape_in is None:
            raise RuntimeError(f"layer f_{self.index} has no input shape: call Program.bind first")
        saved, pre = [], None
        for op in self.ops:
            if op.is_activation and op is self.ops[-1]:
                pre = x
            x, s = op_forward(op, x, ctx)
            saved.append(s)
        return x, saved, pre

    def vjp(self, v: Tensor, saved: list[Any]) -> Tensor:
        """``v [P, R, S, d_out]`` -> ``v @ (d f_index / d f_{index+1})``."""
        for op, s in zip(reversed(self.ops), reversed(saved)):
            v = op_vjp(op, v, s)
        return v


def all_ops(ops: list[Rule]) -> Iterator[Rule]:
    """``ops`` in order, each followed by the rules of its residual body (depth first)."""
    for op in ops:
        yield op
        yield from all_ops(getattr(op, "body", []))


@contextlib.contextmanager
def _buffers_kept(model: nn.Module) -> Iterator[None]:
    """Restores every buffer of ``model`` that changed inside the block: reading a parametrized
    weight runs its parametrization, which may update buffers (spectral norm's power iteration in
    train mode); gscfast reads the value one call of the model would use, and leaves the model as
    it was."""
    before = [(b, b.detach().clone()) for b in model.buffers() if not b.is_meta]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, old in before:
                if not torch.equal(b, old):
                    b.copy_(old)


class Program:
    """A compiled model: ``layers[i]`` is the ``i``-th layer in model order (it outputs
    ``f_{L-i}``); ``layer(m)`` looks a layer up by its paper index ``m`` in ``1..L``."""

    def __init__(self, model: nn.Module, name: str = "model") -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"{name} must be an nn.Module, got {type(model).__name__}")
        check_global_hooks()
        self.model = model
        self._bound: tuple[Shape, list[Shape]] | None = None
        with _buffers_kept(model):  # rules read parametrized weights (a train-mode spectral
            self._compile(model, name)  # norm's power iteration updates its buffers)

    def _compile(self, model: nn.Module, name: str) -> None:
        leaves = _flatten(model, name)
        groups: list[list[tuple[Rule, nn.Module]]] = [[]]
        for leaf, where, _ in leaves:
            (op,) = compile_ops(leaf, where)
            groups[-1].append((op, leaf))
            if op.is_activation or isinstance(leaf, Residual):
                groups.append([])
        groups = [g for g in groups if g]
        if not groups:
            raise TypeError(f"the model has no modules; expected {supported()}")
        L = len(groups)
        self.layers = [
            Layer(L - i, [op for op, _ in g], [m for _, m in g]) for i, g in enumerate(groups)
        ]

    @property
    def L(self) -> int:
        return len(self.layers)

    def layer(self, m: int) -> Layer:
        return self.layers[self.L - m]

    def ops(self):
        """Every rule, residual bodies included."""
        for layer in self.layers:
            yield from all_ops(layer.ops)

    @property
    def generic(self) -> list[GenericRule]:
        """The rules of the modules that take the generic rule (``torch.func``; exact, slower),
        residual bodies included; each has ``path``, ``module`` and ``why``."""
        return [op for op in self.ops() if isinstance(op, GenericRule)]

    @property
    def couples_batch(self) -> bool:
        """Whether some batch norm uses batch statistics (so datapoints are whole batches), its
        own rule's or inside a module the generic rule calls (a hooked batch norm, say)."""
        return any(
            isinstance(op, BatchNormRule) and op.uses_batch_stats for op in self.ops()
        ) or bool(self.generic_batch_stats)

    @property
    def generic_batch_stats(self) -> list[GenericRule]:
        """Generic modules that contain a batch norm using batch statistics: they couple the
        samples, and gscfast cannot hold those statistics constant (``batchnorm="frozen"``)."""
        return [
            op
            for op in self.generic
            if any(isinstance(m, _BatchNorm) and uses_batch_stats(m) for m in op.module.modules())
        ]

    def sample_ndim(self) -> int | None:
        """How many dimensions one input sample has, where the model says: the first rule that
        fixes it (``Linear``: 1, ``Conv2d``: 3), looking past rules that keep the shape
        (activations, norms); None where none does before a rule that may change the shape
        (``Flatten``, a generic module)."""
        for op in self.ops():
            nd = op.sample_ndim()
            if nd is not None:
                return nd
            if not op.keeps_shape:
                return None
        return None

    def bind(self, shape: Shape | int) -> list[Shape]:
        """Set every rule's and layer's shapes for input samples of ``shape`` (``n`` for
        vectors); return the shapes ``[f_0 (a scalar), f_1, ..., f_L, x]``. ``ValueError`` names
        the first module that does not take the shape it receives."""
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        if self._bound is None or self._bound[0] != shape:
            self._bound = None  # until every rule has taken its shape
            shapes, cl = [shape], False  # x is in C order, and so is the model's output f_1
            for layer in self.layers:
                layer.shape_in = shapes[-1]
                end = False if layer is self.layers[-1] else None
                layer.shape_out, cl = bind_shapes(layer.ops, shapes[-1], cl, end)
                layer.cl_out = cl
                shapes.append(layer.shape_out)
            self._bound = (shape, [(), *shapes[1:][::-1], shape])
        return self._bound[1]

    def channels_last(self, m: int) -> bool:
        """Whether the engines hold ``f_m`` channels-last (``x``, ``f_{L+1}``, and ``f_1`` never)."""
        return 1 <= m <= self.L and self.layer(m).cl_out

    def to_order(self, t: Tensor, m: int, cl: bool) -> Tensor:
        """Flat rows ``[..., d_m]`` at ``f_m`` from C order to the engines' order of ``f_m``
        (``cl``), or back; unchanged where that order is C order."""
        if not self.channels_last(m):
            return t
        shape = self.layer(m).shape_out
        assert shape is not None  # channels_last(m) holds only for a bound program
        return relayout(t, shape, cl)

    def widths(self, shape: Shape | int) -> list[int]:
        """``[dim f_0 = 1, dim f_1, ..., dim f_L, dim x]`` (elements of one sample) for input
        samples of ``shape``; binds the program to it (``bind``)."""
        return [numel(s) for s in self.bind(shape)]

    def __repr__(self) -> str:
        lines = [f"Program(L={self.L})"]
        lines += [
            f"  f_{layer.index}: " + " -> ".join(op.kind for op in layer.ops)
            for layer in self.layers
        ]
        lines += [
            f"  generic: {op.path} ({type(op.module).__name__}, {op.why})" for op in self.generic
        ]
        return "\n".join(lines)


def compile_model(model: nn.Module, name: str = "model") -> Program:
    """Compile ``model`` (see module docstring); ``TypeError`` names any unsupported module, any
    module with a hook or an overridden ``forward``, and any global module hook. ``name`` is what
    module paths in errors start with (``"init_model"`` gives ``init_model[0]``)."""
    return Program(model, name)
