"""Errors that callers may want to tell apart from other bad input."""

from __future__ import annotations

__all__ = ["NumericalError"]


class NumericalError(ValueError):
    """Numbers the computation's dtype cannot hold: inputs, targets, parameters or buffers that
    are not finite (NaN or Inf); intermediate values that overflow; or a result that would leave
    the range of the caller's dtype (below its smallest normal number, where a float32 GSC of
    1e-45 would come back with one significant bit or as 0, or above its largest). gscfast
    refuses to return numbers computed from or into such values, naming where.

    A ``ValueError`` like every refusal of bad input; catch this class to tell a diverged model
    or an overflow from a wrong argument (``GradientFlow`` records no GSC at such a step instead
    of stopping the training it watches)."""
