"""Frozen batch norm (``batchnorm="frozen"``, definitions.md): a train-mode batch norm measured
with the batch statistics of its whole dataset (all ``B`` samples) as constants, so that each
sample is its own datapoint. With an initial model (effective depth), the initial layer ``m``'s
batch norms take the statistics of their own inputs there, which are the trained model's layer
inputs ``f_{m+1}``.

The mechanism has exactly two homes, on purpose:

- **the engines** (torch, numba, triton, cupy) share ``frozen_stats``: one forward pass of a group
  of datasets through the compiled rules with batch statistics, in which every batch-statistics
  batch norm records its ``(mean, biased variance)`` into a ``FrozenStats``, keyed by its position
  in the model (its rule path), never by object identity. ``ForwardCtx.frozen`` hands them to
  ``BatchNormRule.forward``; the fused backends flatten the same ``FrozenStats`` into constants.
- **the oracle** (the reference backend) and the studies use ``gscfast.nn.freeze_batchnorm``: a
  copy of the torch modules in eval mode whose running statistics are the batch's, computed with
  plain torch (``mean(0)``, ``var(0, correction=0)``) on the modules' own forward pass. The
  reference is what the engines are tested against; computing its statistics with the engines'
  code would make a bug in that code invisible to every comparison.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from .rules import ForwardCtx

if TYPE_CHECKING:
    from .compiler import Program
    from .rules import Rule

__all__ = ["FrozenStats", "frozen_stats"]


class FrozenStats:
    """The frozen batch statistics of one program's batch norms on one group of ``G`` datasets:
    ``(mean, var)`` of shape ``[G, 1, d]`` for each batch norm that uses batch statistics, looked
    up by its rule (keyed by the rule's path, its position in the model)."""

    def __init__(self) -> None:
        self._stats: dict[str, tuple[Tensor, Tensor]] = {}

    def record(self, rule: Rule, mean: Tensor, var: Tensor) -> None:
        """Keep ``rule``'s batch statistics (the pre-pass of ``frozen_stats``)."""
        if rule.path in self._stats:  # two rules at one position: the key would be ambiguous
            raise RuntimeError(f"{rule.path}: frozen batch statistics recorded twice")
        self._stats[rule.path] = (mean, var)

    def __contains__(self, rule: Rule) -> bool:
        return rule.path in self._stats

    def __getitem__(self, rule: Rule) -> tuple[Tensor, Tensor]:
        stats = self._stats.get(rule.path)
        if stats is None:
            raise KeyError(f"{rule.path}: no frozen batch statistics were recorded for it")
        return stats

    def __len__(self) -> int:
        return len(self._stats)

    def __repr__(self) -> str:
        return f"FrozenStats({sorted(self._stats)})"


def frozen_stats(
    program: Program, x: Tensor, init: Program | None = None
) -> tuple[FrozenStats, FrozenStats | None]:
    """The frozen statistics of ``program``'s batch norms on the datasets ``x [G, B, n]``, from one
    forward pass with batch statistics; with ``init`` (the same architecture), also those of
    ``init``'s batch norms, each layer of ``init`` run on ``program``'s input to that layer. Both
    programs must be bound to the sample shape (``Program.bind``; a ``Problem`` binds its own)."""
    stats = FrozenStats()
    stats0 = None if init is None else FrozenStats()
    ctx = ForwardCtx(coupled=True, record=stats, save=False, samples=x.shape[1])
    ctx0 = ForwardCtx(coupled=True, record=stats0, save=False, samples=x.shape[1])
    h = x
    for i, layer in enumerate(program.layers):
        if init is not None:
            init.layers[i].forward(h, ctx0)
        h, _, _ = layer.forward(h, ctx)
    return stats, stats0
