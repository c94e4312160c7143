"""Drop-in for ``torch.autograd.functional``: see ``jacobian``."""
from __future__ import annotations

import torch

__all__ = ["jacobian"]


def jacobian(func, inputs, create_graph=False, strict=False, vectorize=False, strategy="reverse-mode"):
    """``torch.autograd.functional.jacobian`` (placeholder delegating to torch)."""
    return torch.autograd.functional.jacobian(func, inputs, create_graph, strict, vectorize, strategy)
