"""W8: ``gscfast.gsc`` of a model the fused kernels take only in part (issue 14, item 6): W1's
networks without batch norm (B = 10,000, 50 layers x 100; batch norm in train mode couples the
batch, which keeps the torch engine's path) with the activation of their 25th layer replaced by a
module of the user's own (``Swish``, taken by the generic rule). ``auto`` (numba on a CPU) runs
the two runs of 24 fused layers on either side on its kernels (``lowering.fused_spans``) and the
rest on the torch engine's path; ``torch`` is that path for every layer (what ``auto`` ran for
such a model before); ``autograd`` is what a user would otherwise write. ``auto_mlp`` is the same
network with its tanh back, which the kernels take whole: the cost of the break.

And ``gscfast.jacobian`` (input to output) of the tanh model with W3's sizes (B = 1,000), where
the Jacobian's 100 rows per sample cross the generic layer: ``vmap(jacrev)`` at its best
``chunk_size`` is the peer; ``gscfast.gsc_matrix`` (exact) of the same model on B = 200
samples, whose chains start at every layer, inside the spans too; and ``effective_depth`` of it
(moved weights as the trained model) on B = 2,000 in float64 (in float32 its high-order
contributions, about 1e-43 here, underflow, and gscfast refuses them).

FLOPs: W1's, W3's, W2's and W4's counts, the same for every row of a table."""

from __future__ import annotations

import copy

import pytest
import torch
from benchlib import (
    ARCHS,
    SIZES,
    assert_log_close,
    assert_rel_close,
    auto_choice,
    autograd_gsc,
    flops_w1,
    flops_w2,
    flops_w3,
    flops_w4,
    gaussian,
    run_checked,
    vmap_jacrev_jacobian,
)
from torch import nn

import gscfast

W = SIZES["w8"]
TOL = 5e-2  # log space, float32 at depth 50 (as W1)


class Swish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


def mixed_model(
    depth: int, width: int, act: str, norm: str | None
) -> tuple[nn.Sequential, nn.Sequential]:
    """(the model with ``Swish`` at the middle layer's activation, the plain MLP)."""
    base = gscfast.mlp(depth, width, act=act, norm=norm, seed=0)
    mods = list(base)
    acts = [i for i, m in enumerate(mods) if isinstance(m, (nn.Tanh, nn.ReLU, nn.SELU))]
    mods[acts[len(acts) // 2 - 1]] = Swish()
    return nn.Sequential(*mods), base


@pytest.mark.parametrize("impl", ["auto", "torch", "autograd", "auto_mlp"])
@pytest.mark.parametrize("arch", [a for a, (_, norm) in ARCHS.items() if norm != "batch"])
def test_w8_mixed_gsc(benchmark, sgemm_session, expected, arch, impl):
    model, base = mixed_model(W["depth"], W["width"], *ARCHS[arch])
    x, y = gaussian(W["B"], W["width"], W["width"])
    benchmark.group = f"W8 gsc of a model fused in part {arch}"
    key = ("w8", arch, impl == "auto_mlp")
    if key not in expected:
        expected[key] = gscfast.gsc(base if impl == "auto_mlp" else model, x, y, backend="torch")
    if impl == "autograd":
        fn = lambda: autograd_gsc(model, x, y)  # noqa: E731
    elif impl == "auto_mlp":
        fn = lambda: gscfast.gsc(base, x, y)  # noqa: E731
    else:
        fn = lambda: gscfast.gsc(model, x, y, backend=impl)  # noqa: E731
    extra = {"auto_runs": auto_choice(model, x, y, method="sweep")} if impl == "auto" else {}
    run_checked(
        benchmark,
        fn,
        check=lambda r: assert_log_close(r, expected[key], TOL, f"W8 {impl}"),
        flops=flops_w1(model, W["B"]),
        rounds=W["rounds"],
        sgemm=sgemm_session,
        workload="W8",
        arch=arch,
        **extra,
        impl=impl,
        B=W["B"],
        depth=W["depth"],
        width=W["width"],
    )


@pytest.mark.parametrize(
    "impl",
    ["auto", "torch", "auto_mlp"] + [f"vmap_jacrev_chunk{c}" for c in SIZES["w3"]["chunks"]],
)
def test_w8_mixed_jacobian(benchmark, sgemm_session, expected, impl):
    W3 = SIZES["w3"]
    model, base = mixed_model(W3["depth"], W3["width"], "tanh", None)
    x, _ = gaussian(W3["B"], W3["width"], W3["width"])
    benchmark.group = "W8 jacobian of a model fused in part"
    key = ("w8 jacobian", impl == "auto_mlp")
    if key not in expected:
        expected[key] = gscfast.jacobian(base if impl == "auto_mlp" else model, x, backend="torch")
    if impl == "auto_mlp":
        fn = lambda: gscfast.jacobian(base, x)  # noqa: E731
    elif impl.startswith("vmap_jacrev_chunk"):
        c = int(impl.removeprefix("vmap_jacrev_chunk"))
        fn = lambda: vmap_jacrev_jacobian(model, x, chunk_size=c)  # noqa: E731
    else:
        fn = lambda: gscfast.jacobian(model, x, backend=impl)  # noqa: E731
    extra = {"auto_runs": auto_choice(model, x, method="jacobian")} if impl == "auto" else {}
    run_checked(
        benchmark,
        fn,
        check=lambda r: assert_rel_close(r, expected[key], 1e-3, f"W8 jacobian {impl}"),
        flops=flops_w3(model, W3["B"]),
        rounds=W3["rounds"],
        sgemm=sgemm_session,
        workload="W8J",
        arch="tanh",
        **extra,
        impl=impl,
        B=W3["B"],
        depth=W3["depth"],
        width=W3["width"],
    )


@pytest.mark.parametrize("impl", ["auto", "torch", "auto_mlp"])
def test_w8_mixed_gsc_matrix(benchmark, sgemm_session, expected, impl):
    W2 = SIZES["w2"]
    B = max(2, W2["B"] // 5)
    model, base = mixed_model(W2["depth"], W2["width"], "tanh", None)
    x, y = gaussian(B, W2["width"], W2["width"])
    benchmark.group = "W8 gsc_matrix of a model fused in part"
    key = ("w8 gsc_matrix", impl == "auto_mlp")
    net = base if impl == "auto_mlp" else model
    if key not in expected:
        expected[key] = gscfast.gsc_matrix(net, x, y, backend="torch")
    backend = "torch" if impl == "torch" else "auto"
    extra = {"auto_runs": auto_choice(model, x, y, method="chain")} if impl == "auto" else {}
    run_checked(
        benchmark,
        lambda: gscfast.gsc_matrix(net, x, y, backend=backend),
        check=lambda r: assert_log_close(r, expected[key], TOL, f"W8 gsc_matrix {impl}"),
        flops=flops_w2(model, B),
        rounds=1,
        sgemm=sgemm_session,
        workload="W8C",
        arch="tanh",
        **extra,
        impl=impl,
        B=B,
        depth=W2["depth"],
        width=W2["width"],
    )


def _moved(model: nn.Module) -> nn.Module:
    """A 'trained' copy of ``model``: every parameter moved (W4's recipe)."""
    trained = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.3 * p.std() * torch.randn(p.shape, generator=g))
    return trained


@pytest.mark.parametrize("impl", ["auto", "torch", "auto_mlp"])
def test_w8_mixed_effective_depth(benchmark, sgemm_session, expected, impl):
    W4 = SIZES["w4"]
    B = max(2, W4["B"] // 5)
    model, base = mixed_model(W4["depth"], W4["width"], "tanh", None)
    init = (base if impl == "auto_mlp" else model).double()
    trained = _moved(init)
    x, y = (t.double() for t in gaussian(B, W4["width"], W4["width"]))
    benchmark.group = "W8 effective_depth of a model fused in part"
    key = ("w8 effective_depth", impl == "auto_mlp")
    if key not in expected:
        expected[key] = gscfast.effective_depth(trained, init, x, y, backend="torch")

    def check(r):
        assert r[0] == expected[key][0]
        assert_log_close(r[1], expected[key][1], 1e-3, f"W8 effective_depth {impl}")

    backend = "torch" if impl == "torch" else "auto"
    extra = (
        {"auto_runs": auto_choice(trained, x, y, method="contributions")} if impl == "auto" else {}
    )
    run_checked(
        benchmark,
        lambda: gscfast.effective_depth(trained, init, x, y, backend=backend),
        check=check,
        flops=flops_w4(trained, B),
        rounds=1,
        sgemm=sgemm_session,
        workload="W8E",
        arch="tanh",
        impl=impl,
        B=B,
        depth=W4["depth"],
        width=W4["width"],
        **extra,
    )
