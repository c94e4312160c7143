"""Peak memory of one gscfast call in a fresh process (run by ``test_memory.py``).

Usage: ``python bench/memprobe.py KIND BACKEND B DEPTH WIDTH [N_IN CLASSES]`` with KIND ``w1``
(gsc, dot error), ``w2`` (gsc_matrix), ``cifar`` (gsc, kl error on N_IN features) or ``cnn``
(gsc, kl error, of a CNN of DEPTH 3x3 convolutions with WIDTH filters on 3 x 16 x 16 images,
compiled to the analytic convolution rules: issue 14's "memory bounded independently of B").
Prints one JSON line: peak RSS of the process, RSS before the call (inputs included), the
inputs' size, the seconds the call took.
"""

from __future__ import annotations

import json
import sys
import time

import torch
from benchlib import peak_rss, reset_peak

import gscfast


def main(argv: list[str]) -> None:
    kind, backend, B, depth, width = argv[0], argv[1], *map(int, argv[2:5])
    n_in = int(argv[5]) if len(argv) > 5 else width
    classes = int(argv[6]) if len(argv) > 6 else None
    if kind == "cnn":
        return cnn(backend, B, depth, width)
    model = gscfast.mlp(depth, width, act="relu", in_features=n_in, out_features=classes, seed=0)
    # compile (or load) the kernels first, on a tiny problem
    tiny = torch.randn(4, n_in)
    out_dim = classes or width
    if kind == "cifar":
        gscfast.gsc(model, tiny, torch.zeros(4, dtype=torch.long), error="kl", backend=backend)
    else:
        gscfast.gsc_matrix(model, tiny, torch.randn(4, out_dim), backend=backend)
        gscfast.gsc(model, tiny, torch.randn(4, out_dim), backend=backend)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, n_in, generator=g)
    if kind == "cifar":
        y = torch.randint(0, classes, (B,), generator=g)
    else:
        y = torch.randn(B, out_dim, generator=g)
    if kind == "w2":
        measure(lambda: gscfast.gsc_matrix(model, x, y, backend=backend), x, y)
    else:
        error = "kl" if kind == "cifar" else "dot"
        measure(lambda: gscfast.gsc(model, x, y, error=error, backend=backend), x, y)


def measure(call, x: torch.Tensor, y: torch.Tensor) -> None:
    """Run ``call`` once; print its peak RSS, the RSS before it and the inputs' size (JSON)."""
    inputs = x.numel() * x.element_size() + y.numel() * y.element_size()
    base = reset_peak()
    t0 = time.perf_counter()
    call()
    dt = time.perf_counter() - t0
    peak = peak_rss()
    print(
        json.dumps(
            {
                "peak_rss_mb": peak / 2**20,
                "base_rss_mb": base / 2**20,
                "extra_mb": (peak - base) / 2**20,
                "inputs_mb": inputs / 2**20,
                "call_s": dt,
            }
        )
    )


def cnn(backend: str, B: int, depth: int, width: int) -> None:
    from torch import nn

    torch.manual_seed(0)
    mods: list[nn.Module] = []
    c = 3
    for _ in range(depth):
        mods += [nn.Conv2d(c, width, 3, padding=1), nn.ReLU()]
        c = width
    model = nn.Sequential(*mods, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))
    zeros = torch.zeros(4, dtype=torch.long)
    gscfast.gsc(model, torch.randn(4, 3, 16, 16), zeros, error="kl", backend=backend)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 3, 16, 16, generator=g)
    y = torch.randint(0, 10, (B,), generator=g)
    measure(lambda: gscfast.gsc(model, x, y, error="kl", backend=backend), x, y)


if __name__ == "__main__":
    main(sys.argv[1:])
