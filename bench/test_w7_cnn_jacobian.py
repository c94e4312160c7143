"""W7: per-sample Jacobians of a small CNN by ``gscfast.jacobian`` (issue 14), input to output
(``[B, 10, 3 * 16 * 16]``): ``auto`` (the default call: the analytic convolution and pooling
rules on the torch engine) and ``layers`` (``layers=``: hooks and autograd), against ``torch.func.vmap(torch.func.jacrev(model))``
at every ``chunk_size`` (issue 14's target: faster than its best). Both are checked against each
other before timing.

The CNN: conv 3x3 (3 -> 16), ReLU, conv 3x3 (16 -> 16), ReLU, average pool 2x2, conv 3x3
(16 -> 16), ReLU, global average pool, Linear(16, 10); eval mode.

FLOPs: one forward of the convolutions and the linear layer, plus one input-gradient backward
pass (about one forward's FLOPs) per output row: ``F * (1 + 10)``, the same count for every row,
so that their GFLOP/s compare as their times do."""

from __future__ import annotations

import pytest
import torch
from benchlib import SIZES, conv_linear_flops, run_checked
from torch import nn

import gscfast

W = SIZES["w7"]
CHUNKS = [None, *W["chunks"]]


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    c = W["filters"]
    return nn.Sequential(
        nn.Conv2d(3, c, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(c, c, 3, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Conv2d(c, c, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(c, 10),
    ).eval()


def _flops(model: nn.Module, x: torch.Tensor) -> float:
    return conv_linear_flops(model, x) * (1 + 10)


def _vmap_jacrev(model: nn.Module, x: torch.Tensor, chunk: int | None) -> torch.Tensor:
    J = torch.func.vmap(torch.func.jacrev(model, chunk_size=chunk))(x[:, None])
    return J.reshape(x.shape[0], 10, -1)


@pytest.mark.parametrize(
    "impl",
    ["auto", "layers", *(f"vmap_jacrev_chunk{c}" if c else "vmap_jacrev" for c in CHUNKS)],
)
def test_w7_cnn_jacobian(benchmark, sgemm_session, impl):
    model = _cnn()
    x = torch.randn(W["B"], 3, W["size"], W["size"], generator=torch.Generator().manual_seed(1))
    want = _vmap_jacrev(model, x, None).detach()
    benchmark.group = "W7 CNN per-sample jacobian"
    if impl == "auto":
        fn = lambda: gscfast.jacobian(model, x)  # noqa: E731
    elif impl == "layers":
        fn = lambda: gscfast.jacobian(model, x, layers=["1"])  # noqa: E731
    else:
        chunk = int(impl.removeprefix("vmap_jacrev_chunk")) if "chunk" in impl else None
        fn = lambda: _vmap_jacrev(model, x, chunk)  # noqa: E731

    def check(r):
        torch.testing.assert_close(r.detach(), want, rtol=1e-4, atol=1e-6)

    run_checked(
        benchmark,
        fn,
        check=check,
        flops=_flops(model, x),
        rounds=W["rounds"],
        sgemm=sgemm_session,
        workload="W7",
        arch="cnn",
        impl=impl,
        B=W["B"],
    )
