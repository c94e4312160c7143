"""W3: ``gscfast.jacobian`` input to output, B = 1,000, 50 layers x 100, tanh; against
``vmap(jacrev(model))`` (default and chunked), ``torch.autograd.functional.jacobian`` per
sample and the JAX peers (``jaxpeers.py``: ``vmap(jacfwd)`` and ``vmap(jacrev)``)."""

from __future__ import annotations

import pytest
from benchlib import (
    BACKENDS,
    SIZES,
    assert_rel_close,
    auto_choice,
    flops_w3,
    functional_jacobian,
    gaussian,
    jax_peers,
    make_model,
    run_checked,
    vmap_jacrev_jacobian,
)

import gscfast

W = SIZES["w3"]
IMPLS = (
    ["torch"]
    + [b for b in BACKENDS if b != "torch"]
    + ["auto", "vmap_jacrev"]
    + [f"vmap_jacrev_chunk{c}" for c in W["chunks"]]
    + ["functional_per_sample", "jax_jacfwd", "jax_jacrev"]
)
TOL = 1e-3  # of each sample's largest entry


@pytest.mark.parametrize("impl", IMPLS)
def test_w3_jacobian(benchmark, sgemm_session, expected, impl):
    model = make_model(W["depth"], W["width"], "tanh", None)
    x, _ = gaussian(W["B"], W["width"], W["width"])
    benchmark.group = "W3 jacobian"
    info = dict(workload="W3", arch="tanh", impl=impl, B=W["B"], depth=W["depth"], width=W["width"])
    key = ("w3",)
    if key not in expected:
        expected[key] = gscfast.jacobian(model, x, backend="torch")
    ref = expected[key]
    scale = 1.0
    if impl == "functional_per_sample":
        sub = W["func_B"]
        xs = x[:sub]
        fn = lambda: functional_jacobian(model, xs)  # noqa: E731
        check = lambda r: assert_rel_close(r, ref[:sub], TOL, impl)  # noqa: E731
        scale = W["B"] / sub
        info["timed_B"] = sub
    else:
        if impl == "vmap_jacrev":
            fn = lambda: vmap_jacrev_jacobian(model, x)  # noqa: E731
        elif impl.startswith("jax_"):
            peer = jax_peers().w3(model, x, impl.removeprefix("jax_"))
            fn, info["compile_s"] = peer.run, peer.compile_s
        elif impl.startswith("vmap_jacrev_chunk"):
            c = int(impl.removeprefix("vmap_jacrev_chunk"))
            fn = lambda: vmap_jacrev_jacobian(model, x, chunk_size=c)  # noqa: E731
        else:
            fn = lambda: gscfast.jacobian(model, x, backend=impl)  # noqa: E731
        check = lambda r: assert_rel_close(r, ref, TOL, impl)  # noqa: E731
    if impl == "auto":
        info["auto_runs"] = auto_choice(model, x, method="jacobian")
    run_checked(
        benchmark,
        fn,
        check=check,
        flops=flops_w3(model, W["B"]),
        rounds=W["rounds"],
        sgemm=sgemm_session,
        scale=scale,
        **info,
    )
