"""Error layers f_0 (definitions.md): ``dot`` (Gaussian study) and ``kl`` (CIFAR study)."""

from __future__ import annotations

import torch
from torch import Tensor


def error_value(kind: str, out: Tensor, y: Tensor) -> Tensor:
    """Per-sample error ``e [D, b]`` of outputs ``out [D, b, m]``."""
    if kind == "dot":
        return (out * y).sum(-1)
    logp = torch.log_softmax(out, -1)
    return -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)


def error_grad(kind: str, out: Tensor, y: Tensor) -> Tensor:
    """``d e_i / d out_i  [D, b, m]``."""
    if kind == "dot":
        return y.to(out.dtype).expand_as(out)
    g = torch.softmax(out, -1)
    return g - torch.nn.functional.one_hot(y, out.shape[-1]).to(out.dtype)
