"""The pattern of Philipp, Song & Carbonell (2018), Figure 1, on the paper's 50 x 100 networks."""

from __future__ import annotations

import pytest
import torch

import gscfast

ARCHS = {  # name -> (activation, norm, explodes)
    "ReLU": ("relu", None, False),
    "layer-ReLU": ("relu", "layer", False),
    "batch-ReLU": ("relu", "batch", True),
    "tanh": ("tanh", None, False),
    "layer-tanh": ("tanh", "layer", True),
    "batch-tanh": ("tanh", "batch", True),
    "SeLU": ("selu", None, True),
}


@pytest.mark.parametrize("name", ARCHS)
def test_pooled_gsc_50_0_over_five_networks(name):
    """The pooled expected GSC(50, 0) of five networks (each on its own data) is large exactly
    for the architectures the paper finds exploding."""
    act, norm, explodes = ARCHS[name]
    moments = []
    for seed in range(5):
        g = torch.Generator().manual_seed(1000 + seed)
        x = torch.randn(1000, 100, generator=g) / 10
        x = x / x.norm(dim=1, keepdim=True) * 10
        y = torch.randn(1000, 100, generator=g) / 10
        model = gscfast.mlp(50, 100, act=act, norm=norm, seed=seed)
        moments.append(gscfast.analyze(model, x, y).moments)
    pooled = gscfast.pool(moments).gsc()[50].item()
    assert (pooled > 20) if explodes else (pooled < 20), (name, pooled)
