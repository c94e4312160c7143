"""scikit-learn's bundled 8x8 digits: real images that need no download."""

from __future__ import annotations

import torch
from torch import Tensor


def digits(
    train: bool = True, *, test_fraction: float = 0.2, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """``x [N, 64]`` float32 standardized with the training split's mean and std, ``y [N]`` int64.

    The 1,797 images are split once by a seeded permutation (``test_fraction`` held out).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the digits dataset needs scikit-learn: pip install scikit-learn") from e
    bunch = load_digits()
    x = torch.as_tensor(bunch.data, dtype=torch.float64)
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = round(test_fraction * len(x))
    tr, te = perm[n_test:], perm[:n_test]
    mean, std = x[tr].mean(), x[tr].std(unbiased=False)
    idx = tr if train else te
    return ((x[idx] - mean) / std).to(torch.float32), y[idx]
