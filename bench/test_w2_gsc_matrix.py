"""W2: ``gscfast.gsc_matrix`` (exact, and sketched) on B = 1,000 samples, 50 layers x 100, tanh;
against the best hand-written torch chain, per-pair ``vmap(jacrev)`` and the JAX peers
(``jaxpeers.py``: ``vmap`` of a ``lax.fori_loop`` chain and of ``lax.scan``)."""

from __future__ import annotations

import pytest
import torch
from benchlib import (
    BACKENDS,
    SIZES,
    assert_log_close,
    auto_choice,
    flops_w2,
    gaussian,
    jax_peers,
    make_model,
    pairs_jacrev_gsc_matrix,
    run_checked,
    torch_chain_gsc_matrix,
)

import gscfast

W = SIZES["w2"]
IMPLS = ["torch"] + [b for b in BACKENDS if b != "torch"] + ["auto", "torch_chain", "pairs_jacrev"]
IMPLS += ["jax_fori", "jax_scan"]
TOL = 1e-3


def _setup():
    model = make_model(W["depth"], W["width"], "tanh", None)
    x, y = gaussian(W["B"], W["width"], W["width"])
    return model, x, y


@pytest.mark.parametrize("impl", IMPLS)
def test_w2_exact(benchmark, sgemm_session, expected, impl):
    model, x, y = _setup()
    benchmark.group = "W2 gsc_matrix exact"
    info = dict(workload="W2", arch="tanh", impl=impl, B=W["B"], depth=W["depth"], width=W["width"])
    scale = 1.0
    if impl == "pairs_jacrev":
        # per-pair vmap(jacrev) is timed on a subset of the samples and scaled (time is linear in B)
        sub = W["pair_B"]
        xs, ys = x[:sub], y[:sub]
        fn = lambda: pairs_jacrev_gsc_matrix(model, xs, ys)  # noqa: E731
        ref = gscfast.gsc_matrix(model, xs, ys, backend="torch")
        check = lambda r: assert_log_close(r, ref, TOL, "W2 pairs_jacrev")  # noqa: E731
        scale = W["B"] / sub
        info["timed_B"] = sub
    else:
        if impl == "torch_chain":
            fn = lambda: torch_chain_gsc_matrix(model, x, y)  # noqa: E731
        elif impl.startswith("jax_"):
            peer = jax_peers().w2(model, x, y, impl.removeprefix("jax_"))
            fn, info["compile_s"] = peer.run, peer.compile_s
        else:
            fn = lambda: gscfast.gsc_matrix(model, x, y, backend=impl)  # noqa: E731
        if impl == "auto":
            info["auto_runs"] = auto_choice(model, x, y)
        key = ("w2",)

        def check(r):
            if key not in expected:  # the first implementation run ("torch") is the reference
                expected[key] = (
                    gscfast.gsc_matrix(model, x, y, backend="torch") if impl != "torch" else r
                )
            assert_log_close(r, expected[key], TOL, f"W2 {impl}")

    run_checked(
        benchmark,
        fn,
        check=check,
        flops=flops_w2(model, W["B"]),
        rounds=W["rounds"],
        sgemm=sgemm_session,
        scale=scale,
        **info,
    )


@pytest.mark.parametrize("impl", ["torch"] + [b for b in BACKENDS if b != "torch"] + ["auto"])
def test_w2_sketch(benchmark, sgemm_session, expected, impl):
    model, x, y = _setup()
    R = W["probes"]
    benchmark.group = f"W2 gsc_matrix sketch ({R} probes)"

    def fn():
        return gscfast.gsc_matrix(
            model,
            x,
            y,
            backend=impl,
            method="sketch",
            probes=R,
            generator=torch.Generator().manual_seed(0),
        )

    key = ("w2sketch",)

    def check(r):
        if key not in expected:
            expected[key] = (
                r
                if impl == "torch"
                else gscfast.gsc_matrix(
                    model,
                    x,
                    y,
                    backend="torch",
                    method="sketch",
                    probes=R,
                    generator=torch.Generator().manual_seed(0),
                )
            )
        assert_log_close(r, expected[key], TOL, f"W2 sketch {impl}")

    info = dict(
        workload="W2-sketch",
        arch="tanh",
        impl=impl,
        B=W["B"],
        depth=W["depth"],
        width=W["width"],
        probes=R,
    )
    if impl == "auto":
        info["auto_runs"] = auto_choice(model, x, y)
    run_checked(
        benchmark,
        fn,
        check=check,
        flops=flops_w2(model, W["B"], rows=R),
        rounds=W["rounds"],
        sgemm=sgemm_session,
        **info,
    )
