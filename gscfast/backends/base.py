"""The one backend interface; what every backend is handed, ``Problem``, is built and defined in
``gscfast.validation``.

A backend computes four raw quantities *per datapoint*; ``gscfast.api`` turns them into GSCs,
statistics and profiles, so the ratio and expectation logic lives in one place.

Index letters: D datasets, B samples per dataset, n input features, L layers, P datapoints
(``P = D`` with batch datapoints, ``P = D * B`` otherwise, dataset-major), S samples per datapoint
(``B`` or 1), ``d_l = dim`` of one sample's ``f_l``. Layer indices follow the paper: ``f_L`` is the
first layer's output, ``f_1`` the model's output, ``f_0`` the error.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..compiler import Program
from ..validation import Problem
from .finite import check_product_underflow, check_results

ProbeFn = Callable[[int], Tensor]
"""``probes(l) -> [R, S, d_l]`` start rows for the chain from layer ``l >= 1`` (sketching)."""


@dataclass
class Moments:
    """Per-neuron pre-activation moments over samples, mergeable across chunks (Chan et al.).
    The neurons are in the engine's order (channels-last for feature maps, ``rules.base``):
    gscfast reports only means over a layer's neurons (``PreactStats``), which do not depend on
    it."""

    count: int
    mean: Tensor  # [d] float64
    m2: Tensor  # [d] float64, sum of squared deviations
    pos: Tensor  # [d] number of positive values
    neg: Tensor  # [d] number of negative values

    @staticmethod
    def of(z: Tensor) -> Moments:
        """Moments of ``z [N, d]`` (N samples)."""
        # One pass in z's dtype (exact enough for its precision); chunks merge in float64.
        var, mean = torch.var_mean(z.detach(), 0, correction=0)
        return Moments(
            z.shape[0],
            mean.to(torch.float64),
            var.to(torch.float64) * z.shape[0],
            (z > 0).sum(0, dtype=torch.float64),
            (z < 0).sum(0, dtype=torch.float64),
        )

    def merge(self, other: Moments | None) -> Moments:
        if other is None:
            return self
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + delta.square() * (self.count * other.count / n)
        return Moments(n, mean, m2, self.pos + other.pos, self.neg + other.neg)


@dataclass
class Sweep:
    """What one forward + backward sweep gives, per datapoint.

    Attributes:
        sq_out: ``[P, L+1]``, ``||f_l||^2`` (``l = 0``: the squared error ``f_0^2``; NaN without ``y``).
        sq_grad: ``[P, L+1]``, ``||d f_0 / d f_l||^2`` (``l = 0``: 1), or None if not asked for.
        moments: for ``l = 0..L``, the pre-activation ``Moments`` of layer ``l`` over all samples,
            None where the layer has no pre-activation (and for ``l = 0``); None if not asked for.
    """

    sq_out: Tensor
    sq_grad: Tensor | None
    moments: list[Moments | None] | None


class Backend(ABC):
    """A way to compute the four raw quantities. Subclasses implement every abstract method.

    Results are tensors on ``pb.x``'s device in ``pb.x``'s dtype, one row per datapoint in
    dataset-major order.
    """

    name: ClassVar[str]
    priority: ClassVar[int] = 0  # higher wins for backend="auto" among those that support a device

    def __init_subclass__(cls, **kwargs) -> None:
        # Every backend's results pass one finiteness check (finite.py), so no backend returns
        # numbers computed from overflowed values, and all refuse with the same message.
        super().__init_subclass__(**kwargs)
        for method in ("sweep", "chain", "jacobian", "contributions"):
            if method in cls.__dict__:
                setattr(cls, method, _checked(method, cls.__dict__[method]))

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """None if usable here, else why not (a missing package, say)."""
        return None

    @classmethod
    def supports(cls, device: torch.device) -> bool:
        """Whether this backend runs on tensors of ``device``."""
        return True

    @abstractmethod
    def sweep(self, pb: Problem, *, grads: bool, stats: bool) -> Sweep:
        """One forward and (if ``grads``) backward sweep: see ``Sweep``."""

    @abstractmethod
    def chain(self, pb: Problem, probes: ProbeFn | None) -> Tensor:
        """``[P, L+1, L+1]``: entry ``[k, l]`` is ``||J_k^l||_F^2`` for ``k >= l``, NaN above.

        Row ``l = 0`` starts from the error's gradient (so ``[k, 0] = ||d f_0 / d f_k||^2`` and
        ``[0, 0] = 1``). With ``probes``, each ``l >= 1`` starts from ``V = probes(l) [R, S, d_l]``
        instead of the identity, and entry ``[k, l]`` is ``||V J_k^l||_F^2 / R`` (so ``[l, l]`` is
        ``||V||^2 / R``): an unbiased estimate when ``E[V^T V] = R I``.
        """

    @abstractmethod
    def jacobian(self, pb: Problem, start: int, end: int) -> Tensor:
        """``J = d f_end / d f_start`` per datapoint, ``[P, S*d_end, S*d_start]``.

        ``start`` in ``1..L+1`` (``L+1`` is the model input), ``end`` in ``1..L``, ``start >= end``.
        Rows and columns are ordered (sample, feature) for batch datapoints.
        """

    @abstractmethod
    def contributions(self, pb: Problem, init: Program) -> Tensor:
        """``[P, L+1, L+1]``: entry ``[l, lam] = ||g_l^(lam)||^2`` (definitions.md, effective depth)
        with ``init`` the same architecture at its initial weights; NaN for ``lam > max(l-1, 0)``.

        ``chain`` and ``contributions`` return the problem's dtype, or float64 where they sum the
        squared norms in float64 (``finite.check_product_underflow`` then screens for underflow
        with the tighter bound that allows).
        """


def _bound(pb: Problem, init: Any) -> Any:
    """``init`` (the initial model's program of ``contributions``) bound to ``pb``'s sample
    shape, as ``pb.program`` is: its rules need the shapes."""
    if isinstance(init, Program):
        assert pb.sample_shape is not None  # set by Problem
        init.bind(pb.sample_shape)
    return init


def _checked(method: str, fn: Callable) -> Callable:
    @functools.wraps(fn)
    def run(self, pb: Problem, *args, **kwargs):
        if method == "contributions":
            _bound(pb, args[0] if args else kwargs.get("init"))
        result = fn(self, pb, *args, **kwargs)
        init = (args[0] if args else kwargs.get("init")) if method == "contributions" else None
        check_results(pb, method, result, init)
        if method in ("chain", "contributions"):
            arg = init if method == "contributions" else (args[0] if args else kwargs.get("probes"))
            check_product_underflow(
                pb, method, result, arg, lambda pb64, a: fn(self, pb64, _bound(pb64, a))
            )
        return result

    return run
