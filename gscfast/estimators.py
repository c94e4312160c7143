"""The expected GSC as a ratio of expectations, pooled over datapoints, and its uncertainty.

definitions.md: over a set of datapoints the expected ``GSC(l, 0)`` is
``E||J_l^0||_qm^2 * E||f_l||^2 / E[f_0^2]``; over several datasets or networks the datapoints of all
of them are **pooled**. So what has to be kept per dataset (or network) is not its GSC but the raw
expectations behind it, ``GSCMoments``: the datapoint means of ``||J_l^0||_F^2``, of
``||f_l||^2`` (``l = 0``: ``f_0^2``) and the number of datapoints. Any pooled statistic follows from
those, and its uncertainty comes from resampling datasets (the bootstrap), never from averaging
per-dataset ratios: with batch norm a dataset is one datapoint, and a ratio with one draw of
``f_0^2`` (close to chi-square with one degree of freedom) in the denominator has no finite mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "BootstrapGSC",
    "GSCMoments",
    "bootstrap_gsc",
    "explosion_rates",
    "pool",
    "pooled_summary",
]


def _vector(values: Any, what: str) -> Tensor:
    t = torch.as_tensor(values, dtype=torch.float64).detach().cpu()
    if t.dim() != 1 or len(t) < 1:
        raise ValueError(
            f"{what} must be a non-empty 1-D sequence of numbers, got shape {tuple(t.shape)}"
        )
    return t


@dataclass(frozen=True)
class GSCMoments:
    """Raw expectations over ``count`` datapoints behind the expected ``GSC(l, 0)``, ``l = 0..L``.

    Attributes:
        sq_grad: ``[L+1]`` float64, the datapoint mean of ``||d f_0 / d f_l||_F^2`` (``l = 0``: 1).
        sq_out: ``[L+1]`` float64, the datapoint mean of ``||f_l||^2`` (``l = 0``: ``f_0^2``).
        n: ``[L+1]`` float64, the columns of ``J_l^0`` (``dim f_l`` of one datapoint; 1 at ``l = 0``).
        count: the number of datapoints the means are over.
    """

    sq_grad: Tensor
    sq_out: Tensor
    n: Tensor
    count: int

    def __post_init__(self) -> None:
        for name in ("sq_grad", "sq_out", "n"):
            object.__setattr__(self, name, _vector(getattr(self, name), name))
        if not len(self.sq_grad) == len(self.sq_out) == len(self.n):
            raise ValueError(
                f"sq_grad, sq_out and n must have one entry per layer l = 0..L, got "
                f"lengths {len(self.sq_grad)}, {len(self.sq_out)}, {len(self.n)}"
            )
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise ValueError(f"count must be a positive int, got {self.count!r}")
        for name in ("sq_grad", "sq_out", "n"):  # squared norms and widths: finite, >= 0
            t = getattr(self, name)
            if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
                raise ValueError(f"{name} must hold finite non-negative numbers, got {t.tolist()}")

    @property
    def L(self) -> int:
        """The number of layers (the error layer not counted)."""
        return len(self.sq_grad) - 1

    def gsc(self) -> Tensor:
        """``[L+1]`` float64 expected ``GSC(l, 0)`` (``GSC(0, 0) = 1``)."""
        out = self.sq_grad / self.n * self.sq_out / self.sq_out[0]
        out[0] = 1
        return out

    @staticmethod
    def of(sq_out: Tensor, sq_grad: Tensor, n: Sequence[int] | Tensor) -> GSCMoments:
        """From per-datapoint squared norms ``[P, L+1]`` (a backend's ``Sweep``)."""
        return GSCMoments(
            sq_grad.to(torch.float64).mean(0),
            sq_out.to(torch.float64).mean(0),
            torch.as_tensor(n, dtype=torch.float64),
            int(sq_out.shape[0]),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain lists and ints (for JSON records); ``from_dict`` reads it back exactly."""
        return {
            "sq_grad": self.sq_grad.tolist(),
            "sq_out": self.sq_out.tolist(),
            "n": self.n.tolist(),
            "count": self.count,
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> GSCMoments:
        """The inverse of ``to_dict``; ``ValueError`` (naming the field) for anything else."""
        if not isinstance(d, dict):
            raise ValueError(f"GSC moments must be a mapping, got {type(d).__name__}")
        for key in ("sq_grad", "sq_out", "n"):
            v = d.get(key)
            if not isinstance(v, list):
                raise ValueError(f"GSC moments: {key!r} is not a list of numbers")
            for i, t in enumerate(v):  # JSON's true reads back as an int: refuse it
                if isinstance(t, bool) or not isinstance(t, (int, float)):
                    raise ValueError(f"GSC moments: {key!r}[{i}] is not a number")
        count: Any = d.get("count")  # unchecked here: __post_init__ refuses all but a positive int
        return GSCMoments(d["sq_grad"], d["sq_out"], d["n"], count)


def _stack(moments: Sequence[GSCMoments]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(count-weighted sq_grad [N, L+1], count-weighted sq_out [N, L+1], counts [N], n [L+1])``."""
    if not moments:
        raise ValueError("nothing to pool: no GSC moments given")
    bad = next((i for i, m in enumerate(moments) if not isinstance(m, GSCMoments)), None)
    if bad is not None:
        raise TypeError(
            f"moments[{bad}] is a {type(moments[bad]).__name__}, not GSCMoments "
            "(gscfast.gsc_moments, Analysis.moments or GSCMoments.from_dict)"
        )
    n = moments[0].n
    for i, m in enumerate(moments):
        if not torch.equal(m.n, n):
            raise ValueError(
                f"moments[{i}] has layer widths {m.n.tolist()} but moments[0] has "
                f"{n.tolist()}; only the same architecture can be pooled"
            )
    c = torch.tensor([float(m.count) for m in moments], dtype=torch.float64)
    g = torch.stack([m.sq_grad for m in moments]) * c[:, None]
    o = torch.stack([m.sq_out for m in moments]) * c[:, None]
    return g, o, c, n


def pool(moments: Sequence[GSCMoments]) -> GSCMoments:
    """The moments of all datapoints of all ``moments`` together (count-weighted means).
    ``pool(ms).gsc()`` is the pooled expected GSC of definitions.md."""
    g, o, c, n = _stack(moments)
    total = c.sum()
    return GSCMoments(g.sum(0) / total, o.sum(0) / total, n, int(total))


def explosion_rates(gsc: Tensor) -> Tensor:
    """``exp(slope)`` of the least-squares fit of ``log GSC(l, 0)`` against ``l`` for each row of
    ``gsc [..., L+1]``, over each row's finite positive entries (NaN with fewer than two)."""
    g = gsc.to(torch.float64)
    l = torch.arange(g.shape[-1], dtype=torch.float64).expand_as(g)
    keep = torch.isfinite(g) & (g > 0)
    k = keep.to(torch.float64)
    cnt = k.sum(-1, keepdim=True)
    logg = torch.where(keep, g, torch.ones_like(g)).log()
    lm = (l * k).sum(-1, keepdim=True) / cnt
    gm = (logg * k).sum(-1, keepdim=True) / cnt
    lc = (l - lm) * k
    slope = (lc * (logg - gm)).sum(-1) / lc.square().sum(-1)
    return torch.where(cnt.squeeze(-1) >= 2, slope.exp(), torch.full_like(slope, math.nan))


@dataclass(frozen=True)
class BootstrapGSC:
    """Percentile bootstrap intervals over datasets (or networks) for the pooled GSC and its rate.

    Attributes:
        gsc_lo, gsc_hi: ``[L+1]`` bounds of the pooled expected ``GSC(l, 0)``.
        rate_lo, rate_hi: bounds of the explosion rate fitted to the pooled curve.
        level: the coverage asked for (0.95).
        resamples: the number of bootstrap resamples.
    """

    gsc_lo: Tensor
    gsc_hi: Tensor
    rate_lo: float
    rate_hi: float
    level: float
    resamples: int


def bootstrap_gsc(
    moments: Sequence[GSCMoments], *, resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> BootstrapGSC:
    """Percentile bootstrap over the given datasets: each resample draws ``len(moments)`` of them
    with replacement and pools their datapoints; the interval is the central ``level`` share of the
    resampled pooled GSCs (per layer) and of the explosion rates fitted to them. Seeded, so the
    interval is reproducible. With one dataset the interval is that dataset's value (no spread is
    measurable)."""
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level!r}")
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples must be a positive int, got {resamples!r}")
    g, o, c, n = _stack(moments)
    N = len(c)
    gen = torch.Generator().manual_seed(int(seed))
    idx = torch.randint(N, (resamples, N), generator=gen)
    # How often each dataset is drawn in each resample: pooled sums are then one matmul.
    mult = torch.zeros(resamples, N, dtype=torch.float64).scatter_add_(
        1, idx, torch.ones(resamples, N, dtype=torch.float64)
    )
    sg, so = mult @ g, mult @ o
    gsc = sg / n * so / so[:, :1] / (mult @ c)[:, None]
    gsc[:, 0] = 1
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo, hi = torch.nanquantile(gsc, q, dim=0)
    rlo, rhi = torch.nanquantile(explosion_rates(gsc), q).tolist()
    return BootstrapGSC(lo, hi, rlo, rhi, level, resamples)


def pooled_summary(
    moments: Sequence[GSCMoments], *, seed: int, resamples: int = 2000, level: float = 0.95
) -> dict[str, Any]:
    """What a study reports of several datasets or networks, as plain JSON-able values: the pooled
    expected ``GSC(l, 0)`` (``gsc``), its bootstrap band (``gsc_lo``, ``gsc_hi``), the explosion
    rate fitted to the pooled curve with its interval, and what was pooled."""
    g = pool(moments).gsc()
    b = bootstrap_gsc(moments, resamples=resamples, level=level, seed=seed)
    return {
        "gsc": g.tolist(),
        "gsc_lo": b.gsc_lo.tolist(),
        "gsc_hi": b.gsc_hi.tolist(),
        "rate": float(explosion_rates(g)),
        "rate_ci": [b.rate_lo, b.rate_hi],
        "datasets": len(moments),
        "datapoints": sum(m.count for m in moments),
        "bootstrap": {"resamples": b.resamples, "level": b.level, "seed": seed},
    }
