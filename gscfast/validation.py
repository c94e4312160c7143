"""Input checks: bad input gets an error saying what and where, never a wrong number; and the
``Problem`` they build (``make_problem``), what every backend is handed."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .compiler import Program, compile_model
from .errors import NumericalError

ERRORS = ("dot", "kl")
BATCHNORM_MODES = ("batch", "frozen")


def memory_budget(default: str = "512M") -> int:
    """Bytes a backend may use for its working set: ``GSCFAST_MEMORY`` (e.g. ``2G``, ``512M``)."""
    text = os.environ.get("GSCFAST_MEMORY", default).strip()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"GSCFAST_MEMORY must look like '512M' or '2G', got {text!r}")
    return int(float(m[1]) * 1024 ** " KMGT".index(m[2].upper() or " "))


@dataclass
class Problem:
    """A validated request: the compiled model, inputs in ``[D, B, n]`` layout, and options.

    Attributes:
        program: the compiled model, bound to ``sample_shape`` (``Program.bind``).
        x: ``[D, B, n]``: each sample flattened (C order), ``n`` its elements.
        y: ``[D, B, m]`` targets (``error="dot"``), ``[D, B]`` int64 labels (``"kl"``) or None.
        error: ``"dot"``, ``"kl"`` or None (no error layer needed).
        coupled: batch datapoints (train-mode batch norm with batch statistics).
        frozen: train-mode batch norm whose batch statistics are treated as constants.
        chunk_size: datapoints per chunk, or None to size chunks by ``memory``.
        memory: the working-set budget in bytes.
        sample_shape: one input sample's shape (``(n,)`` for vectors, ``(C, H, W)`` for images).
    """

    program: Program
    x: Tensor
    y: Tensor | None
    error: str | None
    coupled: bool
    frozen: bool
    chunk_size: int | None = None
    memory: int = 512 * 2**20
    sample_shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.sample_shape is None:
            self.sample_shape = (self.x.shape[-1],)
        self.program.bind(self.sample_shape)  # a replaced program (dataclasses.replace) too

    @property
    def D(self) -> int:
        return self.x.shape[0]

    @property
    def B(self) -> int:
        return self.x.shape[1]

    @property
    def L(self) -> int:
        return self.program.L

    @property
    def P(self) -> int:
        return self.D if self.coupled else self.D * self.B

    @property
    def S(self) -> int:
        return self.B if self.coupled else 1

    @property
    def widths(self) -> list[int]:
        """``[1, d_1, ..., d_L, n]``: per-sample dims of ``f_0 .. f_L`` and of the input."""
        assert self.sample_shape is not None  # set by __post_init__
        return self.program.widths(self.sample_shape)

    def n(self, l: int) -> int:
        """Columns of ``J_k^l`` for ``k = l``: ``dim f_l`` of one datapoint."""
        return 1 if l == 0 else self.S * self.widths[l]

    @property
    def columns(self) -> list[int]:
        """``[n(0), ..., n(L)]``."""
        w = self.widths  # once: each call binds the program
        return [1] + [self.S * w[l] for l in range(1, self.L + 1)]


COUPLED_JACOBIAN = (
    "the model has a train-mode batch norm, which couples the samples of a batch, so per-sample "
    "Jacobians are not defined; pass batchnorm='frozen' to treat its batch statistics as "
    "constants, or use gscfast.autograd.jacobian for the full Jacobian"
)


def check_error(error: object) -> None:
    """``ValueError`` unless ``error`` names an error layer (functions that need one)."""
    if error not in ERRORS:
        raise ValueError(f"error must be one of {ERRORS}, got {error!r}")


def check_not_meta(t: Tensor, what: str) -> None:
    """``ValueError`` if ``t`` is a meta tensor (a shape without values)."""
    if t.is_meta:
        raise ValueError(
            f"{what} is a meta tensor (device 'meta'): it has a shape but no values, "
            "so gscfast has nothing to compute with. Create it on a real device (a "
            "model built on meta: model.to_empty(device='cpu'), then load or "
            "initialize its weights)"
        )


def check_finite(t: Tensor, what: str) -> None:
    """``NumericalError`` naming the first NaN/Inf entry of ``t`` (or saying it is a meta tensor)."""
    check_not_meta(t, what)
    if t.is_floating_point() or t.is_complex():
        # A finite sum proves every entry finite (NaN and Inf propagate, overflow only makes
        # it Inf) without a mask the size of t; the mask is formed only to say where.
        if t.numel() and bool(torch.isfinite(t.sum())):
            return
        bad = ~torch.isfinite(t)
        if bad.any():
            idx = tuple(int(i) for i in bad.nonzero()[0])
            val = t[idx].item()
            raise NumericalError(
                f"{what} contains {'NaN' if val != val else 'Inf'} at index {idx} "
                f"({int(bad.sum())} non-finite entries in all)"
            )


def in_dtype(t: Tensor, like: Tensor, what: str) -> Tensor:
    """Results ``t`` computed in float64, on ``like``'s device and in its dtype (the caller's).
    ``NumericalError`` where a finite nonzero entry is outside that dtype's normal range: below
    its smallest normal number it would come back with few significant bits or as 0 (a GSC of
    1e-45 in float32, say), above its largest as Inf."""
    out = t.to(device=like.device, dtype=like.dtype)
    if like.dtype == t.dtype or not like.is_floating_point():
        return out
    fi = torch.finfo(like.dtype)
    a = t.abs()
    bad = torch.isfinite(t) & (a != 0) & ((a < fi.tiny) | (a > fi.max))
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        v = float(t[idx])
        side = f"below the smallest normal {like.dtype} ({fi.tiny:.3g})"
        if abs(v) > fi.max:
            side = f"above the largest {like.dtype} ({fi.max:.3g})"
        raise NumericalError(
            f"{what} at index {idx} is {v:.4g}, {side}: returned in {like.dtype} (x's dtype) it "
            f"would read {float(out[idx]):.4g}. Compute in float64 (model.double(), "
            "x.double()); for GSC(l, 0), gscfast.gsc_moments(...).gsc() gives the float64 values"
        )
    return out


def check_model_tensors(program: Program, x: Tensor) -> None:
    """``ValueError`` naming the first parameter or buffer of ``program`` that is on a meta
    device, on another device than ``x``, of another dtype, or not finite."""
    for op in program.ops():
        for name, t in op.tensors().items():
            where = f"{op.path} ({type(op.module).__name__}) {name}"
            check_not_meta(t, where)
            if t.device != x.device:
                raise ValueError(
                    f"{where} is on {t.device} but x is on {x.device}; "
                    "move the model or x so they match"
                )
            if t.dtype != x.dtype:
                raise ValueError(
                    f"{where} has dtype {t.dtype} but x has dtype {x.dtype}; "
                    f"use model.to({x.dtype}) or x.to({t.dtype})"
                )
            check_finite(t, where)


def check_targets(error: str, y: Tensor, out: tuple[int, ...], lead: int, like: Tensor) -> None:
    """``ValueError`` unless ``y`` fits ``error`` for model outputs of shape ``out`` whose first
    ``lead`` dimensions index samples (the rest: one sample's output): ``"dot"``, a tensor of
    ``out``'s shape in ``like``'s dtype and device, finite; ``"kl"``, integer class labels of
    shape ``out[:lead]`` in ``[0, m)``, ``m`` the elements of one sample's output."""
    check_not_meta(y, "y")
    if y.device != like.device:
        raise ValueError(f"y is on {y.device} but x is on {like.device}")
    if error == "dot":
        if tuple(y.shape) != out:
            raise ValueError(
                f"error='dot' needs y of the output's shape {out}, got {tuple(y.shape)}"
            )
        if y.dtype != like.dtype:
            raise ValueError(f"y has dtype {y.dtype} but x has dtype {like.dtype}")
        check_finite(y, "y")
        return
    m = math.prod(out[lead:])
    if tuple(y.shape) != out[:lead]:
        raise ValueError(
            f"error='kl' needs integer class labels y of shape {out[:lead]}, got {tuple(y.shape)}"
        )
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"error='kl' needs integer class labels, got y of dtype {y.dtype}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= m):
        bad = ((y < 0) | (y >= m)).nonzero()[0]
        raise ValueError(
            f"y has label {int(y[tuple(bad)])} at index {tuple(bad.tolist())}; "
            f"labels must lie in [0, {m}) for a model with {m} outputs"
        )


def _check_y(error: str, y: Tensor, x3: Tensor, out: tuple[int, ...], squeeze: bool) -> Tensor:
    lead = tuple(x3.shape[1:2]) if squeeze else tuple(x3.shape[:2])
    if error == "kl" and len(out) != 1:
        raise ValueError(
            f"error='kl' needs logits (one vector per sample), but the model outputs samples of "
            f"shape {list(out)}; use error='dot', or end the model in the logits"
        )
    check_targets(error, y, (*lead, *out), len(lead), x3)
    if error == "dot":
        return y.reshape(*x3.shape[:2], -1)
    return y.reshape(x3.shape[:2]).long()


def sample_layout(program: Program, x: Tensor) -> tuple[bool, tuple[int, ...]]:
    """How ``x`` holds samples for ``program``: ``(one dataset, the shape of one sample)``, and
    binds ``program`` to that shape. ``x`` is ``[B, *sample]`` or ``[D, B, *sample]``. The model
    fixes a sample's number of dimensions where its first rule that cares says it
    (``Program.sample_ndim``: 1 for an MLP, 3 for a ``Conv2d`` network). Where none says (the
    model starts with ``Flatten``, say), the reading of ``x`` the model takes: ``[B, n]`` for 2-d
    ``x``; ``[D, B, n]`` first, then ``[B, C, L]``, for 3-d ``x``; ``[B, ...]`` first, then ``[D,
    B, ...]``, for more dimensions."""
    nd = program.sample_ndim()
    if nd is None:
        k = x.dim()
        tries = [1] if k == 2 else [1, 2] if k == 3 else [k - 1, k - 2]
        for i, n in enumerate(tries):
            sample = tuple(x.shape[k - n :])
            try:
                program.bind(sample)
            except ValueError:
                if i == len(tries) - 1:
                    raise
                continue
            return k == n + 1, sample
        raise AssertionError("unreachable: the last reading raised")
    if x.dim() not in (nd + 1, nd + 2):
        names = {1: "n", 2: "C, L", 3: "C, H, W"}
        dims = names.get(nd, ", ".join(f"s{i}" for i in range(nd)))
        first = next(op for op in program.ops() if op.sample_ndim() is not None)
        raise ValueError(
            f"x must be [B, {dims}] or [D, B, {dims}] (D datasets) for this model "
            f"({first.path}, {type(first.module).__name__}, takes samples of {nd} "
            f"dimension{'s' if nd > 1 else ''}), got shape {tuple(x.shape)}"
        )
    sample = tuple(x.shape[x.dim() - nd :])
    program.bind(sample)
    return x.dim() == nd + 1, sample


def make_problem(
    model: nn.Module,
    x: Tensor,
    y: Tensor | None = None,
    *,
    error: str | None = None,
    batchnorm: str = "batch",
    chunk_size: int | None = None,
    program: Program | None = None,
) -> tuple[Problem, bool]:
    """Validate everything and build the ``Problem``; also return whether ``x`` was 2-D.

    ``error=None`` means no error layer is needed (``y`` is ignored).
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"x must be [B, n] or [D, B, n] (D datasets), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    check_not_meta(x, "x")
    if x.numel() == 0:
        raise ValueError(f"x is empty (shape {tuple(x.shape)}); gscfast needs at least one sample")
    if batchnorm not in BATCHNORM_MODES:
        raise ValueError(f"batchnorm must be one of {BATCHNORM_MODES}, got {batchnorm!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    program = program or compile_model(model)
    squeeze, sample = sample_layout(program, x)
    x3 = (x.unsqueeze(0) if squeeze else x).reshape(
        -1, x.shape[-len(sample) - 1], math.prod(sample)
    )
    shapes = program.bind(sample)  # bound already: the shapes of f_0 .. f_L
    check_model_tensors(program, x3)
    check_finite(x, "x")
    couples = program.couples_batch
    if batchnorm == "frozen" and program.generic_batch_stats:
        op = program.generic_batch_stats[0]
        raise ValueError(
            f"batchnorm='frozen' holds batch statistics constant, but {op.path} "
            f"({type(op.module).__name__}, {op.why}) computes them inside a module gscfast's "
            "generic rule calls as is; use batchnorm='batch', or remove the hook"
        )
    if couples and x3.shape[1] < 2:
        raise ValueError(
            "the model has a batch norm using batch statistics (train mode), which "
            "needs more than one sample per batch; got a batch of 1. Use eval mode "
            "(running statistics) or a larger batch"
        )
    y3 = None
    if error is not None:
        check_error(error)
        if y is None:
            raise ValueError(
                f"error={error!r} needs y ({'targets of the output shape' if error == 'dot' else 'integer class labels'})"
            )
        if not isinstance(y, Tensor):
            raise TypeError(f"y must be a torch.Tensor, got {type(y).__name__}")
        y3 = _check_y(error, y, x3, shapes[1], squeeze)
    pb = Problem(
        program=program,
        x=x3.detach(),
        y=y3,
        error=error,
        coupled=couples and batchnorm == "batch",
        frozen=couples and batchnorm == "frozen",
        chunk_size=chunk_size,
        memory=memory_budget(),
        sample_shape=sample,
    )
    return pb, squeeze


def check_same_architecture(trained: Program, init: Program) -> None:
    """``ValueError`` unless both programs have the same layers of the same module types/shapes."""
    a, b = list(trained.ops()), list(init.ops())
    if len(trained.layers) != len(init.layers) or len(a) != len(b):
        raise ValueError(
            f"init_model has {len(init.layers)} layers ({len(b)} modules) but model "
            f"has {len(trained.layers)} ({len(a)} modules); they must share the architecture"
        )
    for p, q in zip(a, b):
        same_shapes = {k: tuple(t.shape) for k, t in p.tensors().items()} == {
            k: tuple(t.shape) for k, t in q.tensors().items()
        }
        why_p, why_q = (getattr(r, "why", None) for r in (p, q))  # GenericRule: why generic
        if type(p.module) is type(q.module) and why_p != why_q:
            # the same module, but torch calls it differently (a hook, an overridden forward):
            # the two models need not compute the same function
            def how(why: str | None) -> str:
                return why or "has no hook or overridden forward"

            raise ValueError(
                f"{p.path} ({type(p.module).__name__}): in model it {how(why_p)}, in init_model "
                f"it {how(why_q)}; model and init_model must be one architecture at two sets of "
                "weights: give both the same hooks and forwards"
            )
        if type(p.module) is not type(q.module) or not same_shapes:
            raise ValueError(f"{p.path}: model has {p.module} but init_model has {q.module}")
