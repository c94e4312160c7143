"""CIFAR's random crop and horizontal flip as batched tensor ops, against a per-image reference
that uses the same random draws."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from gscfast.data import augment, random_crop, random_hflip


def reference_crop(x, padding, seed, fill):
    """Per image: pad with the per-channel fill, slice the window at the drawn offset."""
    off = torch.randint(
        0, 2 * padding + 1, (len(x), 2), generator=torch.Generator().manual_seed(seed)
    )
    out = []
    for img, (i, j) in zip(x, off.tolist()):
        p = F.pad(img, (padding,) * 4, value=0.0)
        border = torch.ones_like(p, dtype=torch.bool)
        border[:, padding:-padding, padding:-padding] = False
        p = torch.where(border, fill[:, None, None], p)
        out.append(p[:, i : i + x.shape[2], j : j + x.shape[3]])
    return torch.stack(out), off


def test_random_crop_matches_the_per_image_reference():
    x = torch.randn(64, 3, 8, 10)
    fill = torch.tensor([-1.5, 0.25, 2.0])
    got = random_crop(x, 3, torch.Generator().manual_seed(7), fill)
    want, off = reference_crop(x, 3, 7, fill)
    assert torch.equal(got, want) and got.shape == x.shape
    assert set(off.flatten().tolist()) == set(range(7))  # every offset 0..2p occurs (64 images)
    assert torch.equal(random_crop(x, 0, torch.Generator(), 0.0), x)  # no padding: the image itself
    centered = random_crop(x, 2, torch.Generator().manual_seed(7), 5.0)
    assert ((centered == 5.0) | torch.isin(centered, x)).all()  # only image pixels or the fill


def test_random_hflip_flips_exactly_the_drawn_images():
    x = torch.randn(50, 3, 4, 4)
    got = random_hflip(x, torch.Generator().manual_seed(3))
    flip = torch.rand(50, generator=torch.Generator().manual_seed(3)) < 0.5
    for img, out, f in zip(x, got, flip):
        assert torch.equal(out, img.flip(-1) if f else img)
    assert 0 < int(flip.sum()) < 50
    assert torch.equal(random_hflip(x, torch.Generator(), p=0.0), x)


def test_augment_is_seeded_and_leaves_the_global_rng_alone():
    x = torch.randn(20, 3, 32, 32)
    state = torch.get_rng_state()
    a = augment(x, torch.Generator().manual_seed(1), padding=4, fill=torch.zeros(3))
    b = augment(x, torch.Generator().manual_seed(1), padding=4, fill=torch.zeros(3))
    assert torch.equal(a, b) and not torch.equal(a, x)
    assert torch.equal(torch.get_rng_state(), state)
    g = torch.Generator().manual_seed(1)
    assert torch.equal(a, random_hflip(random_crop(x, 4, g, torch.zeros(3)), g))  # crop, then flip
    with pytest.raises(ValueError, match="padding"):
        random_crop(x, -1, torch.Generator())
