"""W5: time against B, depth and width for W1 (``gsc``, tanh) and W2 (``gsc_matrix``, tanh), to
show that the cost grows as the FLOP count does (GFLOP/s stays flat)."""

from __future__ import annotations

import pytest
from benchlib import (
    BACKENDS,
    SIZES,
    assert_log_close,
    flops_w1,
    flops_w2,
    gaussian,
    make_model,
    run_checked,
)

import gscfast

TOL = 1e-3


def _grid(name: str, axis: str):
    s = SIZES[name]
    values = s[axis + "s"] if axis != "B" else s["Bs"]
    for v in values:
        p = {k: s[k] for k in ("B", "depth", "width") if k in s}
        p[axis] = v
        yield pytest.param(name, p, id=f"{name}-{axis}={v}")


CASES = [
    c
    for n, a in (
        ("w5_w1_B", "B"),
        ("w5_w1_depth", "depth"),
        ("w5_w1_width", "width"),
        ("w5_w2_B", "B"),
        ("w5_w2_depth", "depth"),
        ("w5_w2_width", "width"),
    )
    for c in _grid(n, a)
]
IMPLS = ["torch"] + [b for b in BACKENDS if b != "torch"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name,p", CASES)
def test_w5_scaling(benchmark, sgemm_session, expected, name, p, impl):
    w1 = name.startswith("w5_w1")
    model = make_model(p["depth"], p["width"], "tanh", None)
    x, y = gaussian(p["B"], p["width"], p["width"])
    axis = name.rsplit("_", 1)[1]
    benchmark.group = f"W5 {'W1 gsc' if w1 else 'W2 gsc_matrix'} vs {axis}"
    fn = (
        (lambda: gscfast.gsc(model, x, y, backend=impl))
        if w1
        else (lambda: gscfast.gsc_matrix(model, x, y, backend=impl))
    )
    key = (name, tuple(sorted(p.items())))

    def check(r):
        if key not in expected:
            expected[key] = (
                r
                if impl == "torch"
                else (
                    gscfast.gsc(model, x, y, backend="torch")
                    if w1
                    else gscfast.gsc_matrix(model, x, y, backend="torch")
                )
            )
        assert_log_close(r, expected[key], TOL, f"{name} {p} {impl}")

    flops = flops_w1(model, p["B"]) if w1 else flops_w2(model, p["B"])
    run_checked(
        benchmark,
        fn,
        check=check,
        flops=flops,
        rounds=SIZES[name]["rounds"],
        sgemm=sgemm_session,
        workload="W5-" + ("W1" if w1 else "W2"),
        axis=axis,
        impl=impl,
        arch="tanh",
        **p,
    )
