"""W6: ``GSC(l, 0)`` of any model by ``layers=`` (``auto``) and, where it compiles, by the
analytic convolution rules at every activation (``compiled``; issue 14): VGG38 (32 filters, CIFAR-sized
inputs, batch 100, without and with batch norm and residual connections) at its block
boundaries, against one plain autograd forward and backward of the same batch, which is what a
training step costs (target: at most 1.5x of it).

FLOPs: the convolutions and the linear layer of one forward, times 3 (forward, the gradient with
respect to the activations, the one with respect to the weights); the same count for both rows,
so that their GFLOP/s compare as their times do."""

from __future__ import annotations

import pytest
import torch
from benchlib import SIZES, conv_linear_flops, run_checked
from torch import nn

import gscfast
from gscfast.experiments.vgg import vgg

W = SIZES["w6"]
VARIANTS = {"VGG38": (False, False), "VGG38-BN": (True, False), "VGG38-BN-RC": (True, True)}


def _flops(model: nn.Module, x: torch.Tensor) -> float:
    return 3 * conv_linear_flops(model, x)


def _fwd_bwd(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return float(loss.detach())


@pytest.mark.parametrize("impl", ["auto", "compiled", "autograd_fwd_bwd"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_w6_vgg_gsc(benchmark, sgemm_session, variant, impl):
    bn, rc = VARIANTS[variant]
    model = vgg(W["blocks"], filters=W["filters"], batch_norm=bn, residual=rc, seed=0).train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(W["B"], 3, W["size"], W["size"], generator=g)
    y = torch.randint(0, 100, (W["B"],), generator=g)
    names = [n for n, _ in model.named_children()][:-1]  # every block boundary; f_1 = logits
    benchmark.group = f"W6 any model {variant}"
    if impl == "auto":
        fn = lambda: gscfast.gsc(model, x, y, error="kl", layers=names)  # noqa: E731

        def check(r):
            assert r.shape == (len(names) + 2,) and bool(torch.isfinite(r).all())

    elif impl == "compiled":  # the analytic conv rules: a boundary after every activation
        if not bn:
            pytest.skip(
                "VGG38's float32 gradients underflow inside (GSC about 1e-36): the compiled "
                "path, which checks every activation boundary, refuses it (NumericalError)"
            )
        L = gscfast.compile_model(model).L
        fn = lambda: gscfast.gsc(model, x, y, error="kl")  # noqa: E731

        def check(r):
            assert r.shape == (L + 1,) and bool(torch.isfinite(r).all())

    else:
        fn = lambda: _fwd_bwd(model, x, y)  # noqa: E731
        check = None
    run_checked(
        benchmark,
        fn,
        check=check,
        flops=_flops(model, x),
        rounds=W["rounds"],
        sgemm=sgemm_session,
        workload="W6",
        arch=variant,
        impl=impl,
        B=W["B"],
        boundaries=len(names),
    )
