"""W1: ``gscfast.gsc`` on one Gaussian dataset (B = 10,000, 50 layers x 100), each of the 7
architectures, every backend plus the baselines a user would otherwise write: torch autograd and
``vmap(jacrev)``, and the JAX peers (``jaxpeers.py``: ``jax.grad`` with respect to per-layer
perturbations, an explicit ``jax.vjp`` chain)."""

from __future__ import annotations

import pytest
from benchlib import (
    ARCHS,
    BACKENDS,
    SIZES,
    assert_log_close,
    auto_choice,
    autograd_gsc,
    flops_w1,
    gaussian,
    jax_peers,
    make_model,
    run_checked,
    vmap_jacrev_gsc,
)

import gscfast

W = SIZES["w1"]
IMPLS = ["torch"] + [b for b in BACKENDS if b != "torch"] + ["auto", "autograd", "vmap_jacrev"]
IMPLS += ["jax_grad", "jax_vjp"]
# Sanity check in log space. float32 at depth 50 is ill-conditioned for batch-ReLU: every float32
# implementation (torch, autograd, numba) is ~1e-2 off the float64 value there; the others agree
# to ~1e-4. The tight correctness tests are tests/backends/test_numba.py.
TOL = 5e-2


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_w1_gsc(benchmark, sgemm_session, expected, arch, impl):
    act, norm = ARCHS[arch]
    model = make_model(W["depth"], W["width"], act, norm)
    x, y = gaussian(W["B"], W["width"], W["width"])
    benchmark.group = f"W1 gsc {arch}"
    if impl == "vmap_jacrev" and norm == "batch":
        pytest.skip("train-mode batch norm couples the batch: there is no per-sample vmap")
    info = dict(workload="W1", arch=arch, impl=impl, B=W["B"], depth=W["depth"], width=W["width"])
    if impl == "autograd":
        fn = lambda: autograd_gsc(model, x, y)  # noqa: E731
    elif impl.startswith("jax_"):
        peer = jax_peers().w1(model, x, y, impl.removeprefix("jax_"))
        fn, info["compile_s"] = peer.run, peer.compile_s
    elif impl == "vmap_jacrev":
        fn = lambda: vmap_jacrev_gsc(model, x, y)  # noqa: E731
    else:
        fn = lambda: gscfast.gsc(model, x, y, backend=impl)  # noqa: E731
    key = ("w1", arch)
    if key not in expected:
        expected[key] = gscfast.gsc(model, x, y, backend="torch")
    if impl == "auto":
        info["auto_runs"] = auto_choice(model, x, y, method="sweep")
    run_checked(
        benchmark,
        fn,
        check=lambda r: assert_log_close(r, expected[key], TOL, f"W1 {arch} {impl}"),
        flops=flops_w1(model, W["B"]),
        rounds=W["rounds"],
        sgemm=sgemm_session,
        **info,
    )


def test_w1_gemm_bound(benchmark, sgemm_session):
    """The W1 sweep's GEMMs alone (``gemmbound.py``): what gscfast's W1 rows would take with no
    elementwise work, no bookkeeping and no Python around them."""
    from gemmbound import SweepGemms

    model = make_model(W["depth"], W["width"], "tanh", None)
    x, _ = gaussian(W["B"], W["width"], W["width"])
    benchmark.group = "W1 GEMM bound"
    bound = SweepGemms(model, x)
    run_checked(
        benchmark,
        bound.run,
        check=None,
        flops=flops_w1(model, W["B"]),
        rounds=W["rounds"],
        sgemm=sgemm_session,
        workload="W1-BOUND",
        impl="gemm_bound",
        B=W["B"],
        depth=W["depth"],
        width=W["width"],
        tile=bound.T,
        gemm="gscfast" if bound.own else "openblas",
    )
