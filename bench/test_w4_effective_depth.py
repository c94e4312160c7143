"""W4: ``gscfast.effective_depth`` (residual-trick contribution profile), B = 10,000,
50 layers x 100, tanh; the 'trained' model is the initial one with perturbed weights.

The coupled case: batch-tanh (train-mode batch norm, ``batchnorm="batch"``: the whole set is one
datapoint) on CIFAR-sized inputs (3072 -> 50 x 100 -> 10, KL error), B = 10,000 (the CIFAR study
measures 50,000); the torch engine's path and numba's fused one."""

from __future__ import annotations

import copy

import pytest
import torch
from benchlib import (
    BACKENDS,
    SIZES,
    SMOKE,
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
# its own sizes here (benchlib's registry is the other workloads')
COUPLED = (
    dict(B=32, n=3072, depth=3, width=11, classes=10, rounds=1)
    if SMOKE
    else dict(B=10_000, n=3072, depth=50, width=100, classes=10, rounds=1)
)
COUPLED_IMPLS = [b for b in BACKENDS if b in ("torch", "numba")]


def _models(init=None):
    init = make_model(W["depth"], W["width"], "tanh", None) if init is None else init
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


@pytest.mark.parametrize("impl", COUPLED_IMPLS)
def test_w4_effective_depth_coupled(benchmark, sgemm_session, expected, impl):
    C = COUPLED
    arch = make_model(C["depth"], C["width"], "tanh", "batch", 0, C["n"], C["classes"])
    trained, init = _models(arch)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(C["B"], C["n"], generator=g)
    y = torch.randint(0, C["classes"], (C["B"],), generator=g)
    benchmark.group = "W4 effective_depth coupled"

    def run(backend):
        return gscfast.effective_depth(
            trained, init, x, y, error="kl", batchnorm="batch", backend=backend
        )

    key = ("w4", "coupled")
    if key not in expected:
        expected[key] = run("torch")

    def check(r):
        depth, profile = r
        assert depth == expected[key][0]
        assert_log_close(profile, expected[key][1], TOL, f"W4 coupled {impl}")

    run_checked(
        benchmark,
        lambda: run(impl),
        check=check,
        flops=flops_w4(trained, C["B"]),
        rounds=C["rounds"],
        sgemm=sgemm_session,
        workload="W4",
        arch="batch-tanh",
        impl=impl,
        B=C["B"],
        depth=C["depth"],
        width=C["width"],
    )
