"""W4: ``gscfast.effective_depth`` (residual-trick contribution profile), B = 10,000,
50 layers x 100, tanh; the 'trained' model is the initial one with perturbed weights."""

from __future__ import annotations

import copy

import pytest
import torch
from benchlib import (
    BACKENDS,
    SIZES,
    assert_log_close,
    auto_choice,
    flops_w4,
    gaussian,
    make_model,
    run_checked,
)

import gscfast

W = SIZES["w4"]
IMPLS = ["torch"] + [b for b in BACKENDS if b != "torch"] + ["auto"]
TOL = 1e-3


def _models():
    init = make_model(W["depth"], W["width"], "tanh", None)
    trained = copy.deepcopy(init)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.3 * p.std() * torch.randn(p.shape, generator=g))
    return trained, init


@pytest.mark.parametrize("impl", IMPLS)
def test_w4_effective_depth(benchmark, sgemm_session, expected, impl):
    trained, init = _models()
    x, y = gaussian(W["B"], W["width"], W["width"])
    benchmark.group = "W4 effective_depth"
    key = ("w4",)
    if key not in expected:
        expected[key] = gscfast.effective_depth(trained, init, x, y, backend="torch")

    def check(r):
        depth, profile = r
        assert depth == expected[key][0]
        assert_log_close(profile, expected[key][1], TOL, f"W4 {impl}")

    info = dict(workload="W4", arch="tanh", impl=impl, B=W["B"], depth=W["depth"], width=W["width"])
    if impl == "auto":
        info["auto_runs"] = auto_choice(trained, x, y, method="contributions")
    run_checked(
        benchmark,
        lambda: gscfast.effective_depth(trained, init, x, y, backend=impl),
        check=check,
        flops=flops_w4(trained, W["B"]),
        rounds=W["rounds"],
        sgemm=sgemm_session,
        **info,
    )
