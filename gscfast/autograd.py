"""Drop-in for ``torch.autograd.functional``: see ``jacobian``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeGuard

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.utils.parametrize import is_parametrized

from .backends import get_backend
from .compiler import Program, compile_model
from .rules.generic import NO_RULE, GenericRule
from .validation import Problem, make_problem

__all__ = ["jacobian"]

# Dtypes the fast path serves; reduced-precision inputs go to torch, whose kernels define them.
_FAST_DTYPES = (torch.float32, torch.float64)


def jacobian(
    func: Callable[..., Any],
    inputs: Tensor | tuple[Tensor, ...],
    create_graph: bool = False,
    strict: bool = False,
    vectorize: bool = False,
    strategy: str = "reverse-mode",
) -> Any:
    """``torch.autograd.functional.jacobian`` with the same signature, results and errors, fast
    for the models gscfast compiles.

    It returns what ``torch.autograd.functional.jacobian(func, inputs, create_graph, strict,
    vectorize, strategy)`` returns: for a model mapping ``x [B, n]`` to ``[B, m]``, a tensor
    ``[B, m, B, n]`` with ``x``'s dtype and device; for a 1-tuple ``inputs``, ``(J,)`` (``[J]``
    with ``strategy="forward-mode"``, as torch returns).

    Fast path, taken when all of these hold:

    - ``func`` is an ``nn.Module`` that ``gscfast.compile_model`` compiles: with analytic rules,
      and with the generic rule (``torch.func``) for torch's own module types without a rule of
      their own (``nn.Softmax``, ``nn.Upsample``, ``nn.InstanceNorm2d``, ``nn.SiLU``,
      ``nn.TransformerEncoderLayer``, ...) where neither they nor any module inside them has a
      hook or a parametrization. The generic rule calls such a module several times (to find
      its output shape, for ``vjp``, to check that it is deterministic), which only torch's own
      modules are known to allow without a visible difference: modules with hooks, overridden
      ``forward`` methods and types defined outside ``torch.nn`` may have side effects (a hook
      that records, a counter) that torch's one call of ``func`` would show once, so they go to
      torch. A generic module that turns out random (train-mode dropout inside it) or to mix
      the samples of a batch is handed to torch too;
    - ``inputs`` is one float32/float64 tensor ``[B, n]`` (or ``[n]`` for a model without batch
      norm or generic modules), or a batch of feature maps ``[B, C, L]`` / ``[B, C, H, W]`` for a model that starts
      with a ``Conv1d`` / ``Conv2d`` (or a pooling or a norm over channels), or a 1-tuple of one, that passes gscfast's input checks (matching dtype, device and
      width, finite values, a batch of at least 2 for a train-mode batch norm);
    - ``create_graph=False``, and ``strategy="reverse-mode"`` (not with both ``strict`` and
      ``vectorize``) or ``strategy="forward-mode"`` with ``vectorize=True`` and ``strict=False``.
      torch's forward-mode result keeps a graph to the parameters and to ``x``, so forward mode
      is fast only where that result would not require grad: under ``torch.no_grad()``, or when
      neither ``x`` nor any parameter requires grad.

    The Jacobian is then built from gscfast's analytic per-layer rules in one batched backward
    chain instead of ``B * m`` autograd calls, and does not require grad (as torch's does not).
    Per-sample models give a block-diagonal result (``J[i, :, i, :]`` is sample ``i``'s Jacobian,
    zeros elsewhere); a train-mode batch norm (batch statistics) couples the samples and
    gives the full matrix. The module is left as torch leaves it: torch calls ``func(x)`` once,
    which updates a train-mode batch norm's running statistics, and so does the fast path (one
    forward without a graph, after the Jacobian, which uses the batch statistics).

    Two deliberate differences, both where torch's vectorized forward mode
    (``strategy="forward-mode"``, ``vectorize=True``) fails and the fast path returns the
    Jacobian, which equals torch's reverse-mode result:

    - a 1-D ``x`` under ``torch.no_grad()`` through a bias-free ``Linear`` followed by another
      layer: torch raises "Trying to set a forward gradient that has a different size...";
    - an ``nn.Flatten`` of feature maps: torch raises "Batching rule not implemented for
      aten::flatten.using_ints...".

    Otherwise, including every argument combination torch rejects, it delegates to
    ``torch.autograd.functional.jacobian``, so the result and any error are torch's own.
    """
    J = _fast_jacobian(func, inputs, create_graph, strict, vectorize, strategy)
    if J is not None:
        return J
    return torch.autograd.functional.jacobian(
        func, inputs, create_graph, strict, vectorize, strategy
    )


def _plain_module(model: nn.Module) -> bool:
    """Whether the fast path may serve ``model``, which ``compile_model`` accepted (so no hooks
    and no overridden ``forward``): none of its tensors is an inference tensor, on which torch
    raises its own error."""
    return not any(t.is_inference() for t in (*model.parameters(), *model.buffers()))


def _plain_input(x: object) -> TypeGuard[Tensor]:
    # exact types: a Tensor subclass may override what the fast path relies on
    if not isinstance(x, Tensor) or type(x) not in (Tensor, nn.Parameter):
        return False
    if x.layout != torch.strided:
        return False
    if x.dtype not in _FAST_DTYPES or x.dim() < 1 or x.is_inference():
        return False
    is_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return not (is_wrapped is not None and is_wrapped(x))


# Where a module keeps forward hooks and backward hooks (``generic_torch_module``).
_HOOK_ATTRS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _generic_torch_module(op: GenericRule) -> bool:
    """Whether the fast path may serve a module the generic rule takes (see ``jacobian``): one of
    torch's own types without a rule (not a hooked or overridden one), with only torch's own
    types inside it, and no hook or parametrization anywhere in it."""
    if op.why != NO_RULE:
        return False
    return all(
        type(m).__module__.startswith("torch.nn.")
        and not is_parametrized(m)
        and not any(getattr(m, a, None) for a in _HOOK_ATTRS)
        for m in op.module.modules()
    )


def _update_running_stats(model: nn.Module, x: Tensor) -> None:
    """Leave ``model`` as torch's ``jacobian`` leaves it. torch calls ``model(x)`` once, which
    updates the running statistics of each train-mode batch norm or instance norm that tracks
    them (``running_mean``, ``running_var``, ``num_batches_tracked``); the fast path does not run
    the model (its generic rule calls modules on copies of their buffers), so it runs that one
    forward here, without a graph (the update is the same: it never depends on autograd)."""
    if any(
        isinstance(m, _NormBase) and m.training and m.track_running_stats for m in model.modules()
    ):
        with torch.no_grad():
            model(x.detach())


def _engine_jacobian(func: nn.Module, x: Tensor, program: Program) -> tuple[Problem, Tensor] | None:
    """``(problem, jacobian from the input to the output)`` by gscfast's engine, or None where
    torch must answer."""
    try:
        pb, _ = make_problem(func, x, None, batchnorm="batch", program=program)
        if 0 in pb.widths:
            return None
        backend = get_backend("auto", x.device)
    except (TypeError, ValueError, RuntimeError):
        # torch reproduces its own behaviour (or error) for such input, and for a generic
        # module that does not take it (or returns what the generic rule does not take)
        return None
    with torch.no_grad():
        try:
            return pb, backend.jacobian(pb, pb.L + 1, 1)
        except (TypeError, ValueError):
            # values that overflow inside (torch returns its own Inf/NaN result), or a generic
            # module that is random or mixes the samples (torch's own result, or error)
            return None


def _fast_jacobian(
    func: Callable[..., Any],
    inputs: Tensor | tuple[Tensor, ...],
    create_graph: bool,
    strict: bool,
    vectorize: bool,
    strategy: str,
) -> Tensor | tuple[Tensor] | list[Tensor] | None:
    """The Jacobian by gscfast's engine, or None where torch must answer."""
    if not isinstance(func, nn.Module) or create_graph:
        return None
    if strategy == "reverse-mode":
        if strict and vectorize:
            return None
    elif strategy != "forward-mode" or not vectorize or strict:
        return None
    is_tuple = isinstance(inputs, tuple)
    if is_tuple and len(inputs) != 1:
        return None
    x = inputs[0] if is_tuple else inputs
    if not _plain_input(x) or torch.is_inference_mode_enabled():
        return None
    try:
        program = compile_model(func)
    except (TypeError, ValueError):  # what gscfast refuses: torch calls it as it is
        return None
    if not all(_generic_torch_module(op) for op in program.generic) or not _plain_module(func):
        # hooked, overridden or foreign modules are torch's to answer: the drop-in promises
        # torch's result, errors and side effects, and torch calls them once (the generic rule
        # calls them several times)
        return None
    if (
        strategy == "forward-mode"
        and torch.is_grad_enabled()
        and (x.requires_grad or any(t.requires_grad for t in (*func.parameters(), *func.buffers())))
    ):
        return None  # torch's forward-mode result carries a graph to these tensors
    nd = program.sample_ndim() or 1
    if nd == 1 and x.dim() not in (1, 2):
        return None  # vectors: [B, n] or [n] ([D, B, n] means datasets to gscfast, not to torch)
    if nd > 1 and x.dim() != nd + 1:
        return None  # feature maps: batched only (torch's unbatched forms differ by module)
    one_d = x.dim() == 1
    if one_d and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in func.modules()):
        return None  # batch norm rejects 1-D input: torch's error
    if one_d and program.generic:
        return None  # a module's unbatched form may differ from its batched one (nn.Softmax(1))
    x2 = x.detach().unsqueeze(0) if one_d else x.detach()
    # gscfast calls a generic module before it may hand the call to torch (a module that turns
    # out random): on a fork of the random generators, so that torch's call draws what it would
    cuda = [x.device.index or 0] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda, enabled=bool(program.generic)):
        found = _engine_jacobian(func, x2, program)
    if found is None:
        return None
    pb, Jb = found
    assert pb.sample_shape is not None  # set by make_problem
    B, n, m = x2.shape[0], pb.widths[-1], pb.widths[1]
    in_shape, out_shape = pb.sample_shape, pb.program.bind(pb.sample_shape)[1]
    with torch.no_grad():
        if pb.coupled:  # [1, B*m, B*n], rows and columns ordered (sample, feature)
            out = Jb.reshape(B, m, B, n).to(dtype=x.dtype, device=x.device).contiguous()
        else:  # [B, m, n] per-sample blocks on the diagonal
            out = torch.zeros((B, m, B, n), dtype=x.dtype, device=x.device)
            out.diagonal(dim1=0, dim2=2).copy_(Jb.permute(1, 2, 0))
    out = out.reshape(m, n) if one_d else out.reshape(B, *out_shape, B, *in_shape)
    out = out.detach()
    _update_running_stats(func, x)
    if not is_tuple:
        return out
    # torch nests by input: a tuple, except that its forward mode builds (and returns) a list.
    return [out] if strategy == "forward-mode" else (out,)
