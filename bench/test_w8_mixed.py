"""W8: ``gscfast.gsc`` of a model the fused kernels take only in part (issue 14, item 6): W1's
tanh network (B = 10,000, 50 layers x 100) with the activation of its 25th layer replaced by a
module of the user's own (``Swish``, taken by the generic rule). ``auto`` (numba on a CPU) runs
the two runs of 24 fused layers on either side on its kernels (``lowering.fused_spans``) and the
rest on the torch engine's path; ``torch`` is that path for every layer (what ``auto`` ran for
such a model before); ``autograd`` is what a user would otherwise write. ``auto_mlp`` is the same
network with its tanh back, which the kernels take whole: the cost of the break.

FLOPs: W1's count (one forward and one backward GEMM per Linear), the same for every row."""

from __future__ import annotations

import pytest
import torch
from benchlib import SIZES, assert_log_close, autograd_gsc, flops_w1, gaussian, run_checked
from torch import nn

import gscfast

W = SIZES["w8"]
TOL = 5e-2  # log space, float32 at depth 50 (as W1)


class Swish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


def mixed_model(depth: int, width: int) -> tuple[nn.Sequential, nn.Sequential]:
    """(the model with ``Swish`` at the middle layer's activation, the plain tanh MLP)."""
    base = gscfast.mlp(depth, width, act="tanh", seed=0)
    mods = list(base)
    acts = [i for i, m in enumerate(mods) if isinstance(m, nn.Tanh)]
    mods[acts[len(acts) // 2 - 1]] = Swish()
    return nn.Sequential(*mods), base


@pytest.mark.parametrize("impl", ["auto", "torch", "autograd", "auto_mlp"])
def test_w8_mixed_gsc(benchmark, sgemm_session, expected, impl):
    model, base = mixed_model(W["depth"], W["width"])
    x, y = gaussian(W["B"], W["width"], W["width"])
    benchmark.group = "W8 gsc of a model fused in part"
    key = ("w8", impl == "auto_mlp")
    if key not in expected:
        expected[key] = gscfast.gsc(base if impl == "auto_mlp" else model, x, y, backend="torch")
    if impl == "autograd":
        fn = lambda: autograd_gsc(model, x, y)  # noqa: E731
    elif impl == "auto_mlp":
        fn = lambda: gscfast.gsc(base, x, y)  # noqa: E731
    else:
        fn = lambda: gscfast.gsc(model, x, y, backend=impl)  # noqa: E731
    run_checked(
        benchmark,
        fn,
        check=lambda r: assert_log_close(r, expected[key], TOL, f"W8 {impl}"),
        flops=flops_w1(model, W["B"]),
        rounds=W["rounds"],
        sgemm=sgemm_session,
        workload="W8",
        arch="tanh+swish",
        impl=impl,
        B=W["B"],
        depth=W["depth"],
        width=W["width"],
    )
