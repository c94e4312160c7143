"""CIFAR's standard augmentation as batched tensor ops (no torchvision): a random crop of the
image padded by ``padding`` pixels on each side, then a random horizontal flip, each image of a
batch drawn independently, as torchvision's ``RandomCrop(32, padding=4)`` and
``RandomHorizontalFlip()`` do.

The random numbers come from an explicit CPU ``torch.Generator`` (then moved to the batch's
device), so a batch's augmentation is the same on every device and does not touch the global RNG.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["augment", "random_crop", "random_hflip"]


def random_crop(
    x: Tensor, padding: int, generator: torch.Generator, fill: Tensor | float = 0.0
) -> Tensor:
    """Each image of ``x [B, C, H, W]`` padded with ``fill`` (a number, or one value per channel
    ``[C]``) by ``padding`` pixels on each side, then cropped back to ``H x W`` at an offset drawn
    uniformly from ``{0, ..., 2 * padding}`` in each direction (torchvision's distribution)."""
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    B, C, H, W = x.shape
    off = torch.randint(0, 2 * padding + 1, (B, 2), generator=generator).to(x.device)
    if padding == 0:
        return x.clone()
    padded = x.new_empty(B, C, H + 2 * padding, W + 2 * padding)
    fill_t = torch.as_tensor(fill, dtype=x.dtype, device=x.device)
    padded[:] = fill_t.reshape(1, -1, 1, 1) if fill_t.dim() else fill_t
    padded[:, :, padding : padding + H, padding : padding + W] = x
    # One gather for the whole batch: rows [B, H, 1] and columns [B, 1, W] of each image's window.
    rows = (off[:, 0:1] + torch.arange(H, device=x.device))[:, :, None]
    cols = (off[:, 1:2] + torch.arange(W, device=x.device))[:, None, :]
    b = torch.arange(B, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[b, rows, cols].permute(0, 3, 1, 2).contiguous()


def random_hflip(x: Tensor, generator: torch.Generator, p: float = 0.5) -> Tensor:
    """Each image of ``x [B, C, H, W]`` mirrored left-right with probability ``p``."""
    flip = (torch.rand(len(x), generator=generator) < p).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def augment(
    x: Tensor, generator: torch.Generator, *, padding: int = 4, fill: Tensor | float = 0.0
) -> Tensor:
    """``random_crop`` then ``random_hflip`` (the order of the usual CIFAR pipeline). For images
    standardized per channel, pass ``fill`` = the standardized black pixel
    (``ImageSplits.black``) to pad as torchvision pads the raw image, with zeros."""
    return random_hflip(random_crop(x, padding, generator, fill), generator)
