"""Chunks of datapoints that fit the memory budget, and per-datapoint squared norms: what the
torch engine, the fused engines and the non-finite check (``finite.locate``) all iterate with.

Its own module, below ``base`` (whose ``Backend`` runs ``finite.check_results``) and the engines,
so that none of them import each other in a cycle.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from torch import Tensor

from ..frozen import frozen_stats
from ..rules import ForwardCtx

if TYPE_CHECKING:
    from ..compiler import Program
    from ..validation import Problem

__all__ = ["iter_chunks", "sq_norms"]


def sq_norms(v: Tensor) -> Tensor:
    """``[P, ...]`` -> ``[P]`` squared Frobenius norms."""
    return v.reshape(v.shape[0], -1).square().sum(1)


def iter_chunks(
    pb: Problem, per_datapoint_bytes: int, init: Program | None = None
) -> Iterator[tuple[slice, slice, ForwardCtx]]:
    """Chunks of datapoints that fit the memory budget, in dataset-major order.

    Yields ``(dataset slice, sample slice, ctx)``. Batch datapoints are never split; per-sample
    datapoints are grouped by whole datasets when a chunk holds one or more, else split by samples.
    With frozen batch norm, each dataset group's batch statistics are gathered first
    (``gscfast.frozen.frozen_stats``, with ``init``'s too) and every chunk's ``ctx`` carries them.
    """
    c = pb.chunk_size or max(1, pb.memory // max(1, per_datapoint_bytes))
    per_dataset = 1 if pb.coupled else pb.B
    group = max(1, c // per_dataset)
    samples = pb.B if (pb.coupled or c >= pb.B) else c
    for d0 in range(0, pb.D, group):
        ds = slice(d0, min(pb.D, d0 + group))
        # with frozen batch norm, every chunk of the group sees the group's constants
        frozen, frozen0 = frozen_stats(pb.program, pb.x[ds], init) if pb.frozen else (None, None)
        for b0 in range(0, pb.B, samples):
            bs = slice(b0, min(pb.B, b0 + samples))
            yield (
                ds,
                bs,
                ForwardCtx(
                    coupled=pb.coupled,
                    frozen=frozen,
                    frozen_init=frozen0,
                    samples=bs.stop - bs.start,
                ),
            )
