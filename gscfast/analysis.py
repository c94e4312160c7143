"""``analyze``: GSC, collapsing-domain statistics and the explosion rate from one sweep."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from .api import PreactStats, explosion_rate, gsc_moments, preactivation_stats
from .backends import get_backend
from .estimators import GSCMoments
from .validation import check_error, in_dtype, make_problem

if TYPE_CHECKING:  # optional dependencies, imported where used
    from matplotlib.figure import Figure
    from pandas import DataFrame

__all__ = ["Analysis", "analyze"]


@dataclass
class Analysis:
    """Per-layer measurements of one model on one set of inputs (index ``l = 0..L``).

    Attributes:
        gsc: expected ``GSC(l, 0)``.
        preact_std: pre-activation std (quadratic mean over neurons), NaN where undefined.
        sign_diversity: mean sign diversity, NaN where undefined.
        rate: explosion rate ``exp(slope)`` of ``log GSC(l, 0)`` against ``l``.
        moments: the raw expectations behind ``gsc`` (``gscfast.estimators.GSCMoments``): keep
            these, not ``gsc``, to pool several datasets or networks (definitions.md).
    """

    gsc: Tensor
    preact_std: Tensor
    sign_diversity: Tensor
    rate: float
    moments: GSCMoments | None = None

    @property
    def L(self) -> int:
        """The number of layers (the error layer not counted)."""
        return len(self.gsc) - 1

    def to_dict(self) -> dict[str, Any]:
        """Plain Python lists and floats (NaN kept as float('nan')), e.g. for JSON."""
        return {
            "L": self.L,
            "rate": self.rate,
            "gsc": self.gsc.tolist(),
            "preact_std": self.preact_std.tolist(),
            "sign_diversity": self.sign_diversity.tolist(),
            "moments": None if self.moments is None else self.moments.to_dict(),
        }

    def to_frame(self) -> DataFrame:
        """A pandas DataFrame indexed by layer ``l`` (needs pandas)."""
        try:
            import pandas as pd
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("Analysis.to_frame needs pandas: pip install pandas") from e
        return pd.DataFrame(
            {
                "gsc": self.gsc.cpu().double().numpy(),
                "preact_std": self.preact_std.cpu().double().numpy(),
                "sign_diversity": self.sign_diversity.cpu().double().numpy(),
            },
            index=pd.RangeIndex(self.L + 1, name="l"),
        )

    def plot(self, path: str | Path | None = None, *, label: str | None = None) -> Figure:
        """Three panels as in Philipp et al. (2018), Figure 1; saves to ``path`` if given.
        Returns the matplotlib figure (needs matplotlib)."""
        try:
            import matplotlib

            if path is not None:
                matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt
        except ImportError as e:  # pragma: no cover
            raise ImportError("Analysis.plot needs matplotlib: pip install matplotlib") from e
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        l = list(range(self.L + 1))
        for ax, values, title in zip(
            axes,
            (self.gsc, self.preact_std, self.sign_diversity),
            ("GSC(l, 0)", "pre-activation std", "sign diversity"),
        ):
            ax.plot(l, values.cpu().double().numpy(), label=label or f"rate {self.rate:.3f}")
            ax.set_xlabel("compositional depth l")
            ax.set_title(title)
        axes[0].set_yscale("log")
        axes[0].legend()
        fig.tight_layout()
        if path is not None:
            fig.savefig(path)
        return fig


def analyze(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    error: str = "dot",
    batchnorm: str = "batch",
    backend: str = "auto",
    chunk_size: int | None = None,
    layers: Sequence[str] | None = None,
) -> Analysis:
    """GSC, pre-activation statistics and explosion rate in one forward/backward sweep
    (arguments as in ``gscfast.gsc``; with ``layers``, any model, by ``gsc_moments`` and
    ``preactivation_stats`` with those boundaries: two passes)."""
    check_error(error)
    if layers is not None:
        moments = gsc_moments(
            model,
            x,
            y,
            error=error,
            batchnorm=batchnorm,
            backend=backend,
            chunk_size=chunk_size,
            layers=layers,
        )
        g = in_dtype(moments.gsc(), x, "GSC(l, 0)")
        stats = preactivation_stats(
            model, x, batchnorm=batchnorm, backend=backend, chunk_size=chunk_size, layers=layers
        )
        return Analysis(g, stats.std, stats.sign_diversity, explosion_rate(g), moments)
    pb, _ = make_problem(model, x, y, error=error, batchnorm=batchnorm, chunk_size=chunk_size)
    sw = get_backend(backend, x.device).sweep(pb, grads=True, stats=True)
    # grads=True and stats=True asked for both
    assert sw.sq_grad is not None and sw.moments is not None
    moments = GSCMoments.of(sw.sq_out, sw.sq_grad, pb.columns)
    g = in_dtype(moments.gsc(), x, "GSC(l, 0)")
    stats = PreactStats.from_moments(sw.moments, x)
    return Analysis(g, stats.std, stats.sign_diversity, explosion_rate(g), moments)
