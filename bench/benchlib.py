"""Shared pieces of the benchmark suite (``bench/conftest.py`` holds the fixtures): the sizes registry, FLOP counts, the sgemm yardstick,
peak-memory probes, the baselines a user would write, and ``run_checked`` (every benchmark runs
only after its result agreed with the torch backend on the same inputs).

Sizes: ``GSCFAST_BENCH_SCALE=full`` (default, the issue's sizes) or ``smoke`` (tiny: what
``tests/test_bench_smoke.py`` runs with ``--benchmark-disable`` so the suite cannot rot).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from types import ModuleType

import numpy as np
import pytest
import scipy.linalg  # noqa: F401  (loads scipy's OpenBLAS, the one numba's ``@`` calls)
import threadpoolctl
import torch
from report import GSCFAST_ROWS
from torch import nn

import gscfast
from gscfast.backends import BACKENDS as GSCFAST_BACKENDS
from gscfast.backends import available_backends, get_backend
from gscfast.machine import fma_peak, gemm_rate

SCALE = os.environ.get("GSCFAST_BENCH_SCALE", "full")
if SCALE not in ("full", "smoke"):
    raise ValueError(f"GSCFAST_BENCH_SCALE must be 'full' or 'smoke', got {SCALE!r}")
SMOKE = SCALE == "smoke"

# ----------------------------------------------------------------------------- sizes registry
# depth = hidden layers of gscfast.mlp(depth, width); B = samples; rounds = timed repetitions.
SIZES: dict[str, dict] = {
    "full": {
        "w1": dict(B=10_000, depth=50, width=100, rounds=3),
        "w2": dict(B=1_000, depth=50, width=100, rounds=1, pair_B=8, probes=64),
        "w3": dict(B=1_000, depth=50, width=100, rounds=3, func_B=20, chunks=(16, 64, 256)),
        "w4": dict(B=10_000, depth=50, width=100, rounds=2),
        "w5_w1_B": dict(Bs=(1_000, 10_000, 100_000), depth=50, width=100, rounds=2),
        "w5_w1_depth": dict(B=10_000, depths=(10, 50, 200), width=100, rounds=2),
        "w5_w1_width": dict(B=10_000, depth=50, widths=(32, 128, 512), rounds=2),
        "w5_w2_B": dict(Bs=(1_000, 10_000, 100_000), depth=10, width=32, rounds=1),
        "w5_w2_depth": dict(B=100, depths=(10, 50, 200), width=32, rounds=1),
        "w5_w2_width": dict(B=100, depth=10, widths=(32, 128, 512), rounds=1),
        "mem_w1": dict(Bs=(10_000, 100_000), depth=50, width=100),
        "mem_w2": dict(Bs=(1_000, 10_000), depth=10, width=100),
        "mem_cnn": dict(Bs=(2_000, 20_000), depth=3, width=16),
        "cifar": dict(B=50_000, n=3072, depth=50, width=100, classes=10),
        "sgemm": dict(n=2048, reps=5),
        "w6": dict(B=100, blocks=5, filters=32, size=32, rounds=3),
        "w7": dict(B=128, filters=16, size=16, chunks=(1, 2, 5), rounds=5),
        "w8": dict(B=10_000, depth=50, width=100, rounds=3),
    },
    "smoke": {
        "w1": dict(B=64, depth=4, width=19, rounds=1),
        "w2": dict(B=6, depth=3, width=11, rounds=1, pair_B=3, probes=4),
        "w3": dict(B=6, depth=3, width=11, rounds=1, func_B=2, chunks=(4,)),
        "w4": dict(B=32, depth=4, width=13, rounds=1),
        "w5_w1_B": dict(Bs=(16, 64), depth=3, width=11, rounds=1),
        "w5_w1_depth": dict(B=16, depths=(2, 4), width=11, rounds=1),
        "w5_w1_width": dict(B=16, depth=3, widths=(7, 13), rounds=1),
        "w5_w2_B": dict(Bs=(4, 8), depth=3, width=7, rounds=1),
        "w5_w2_depth": dict(B=4, depths=(2, 4), width=7, rounds=1),
        "w5_w2_width": dict(B=4, depth=3, widths=(5, 9), rounds=1),
        "mem_w1": dict(Bs=(64, 256), depth=3, width=11),
        "mem_w2": dict(Bs=(8, 32), depth=3, width=11),
        "mem_cnn": dict(Bs=(8, 32), depth=2, width=4),
        "cifar": dict(B=256, n=3072, depth=3, width=11, classes=10),
        "sgemm": dict(n=256, reps=2),
        "w6": dict(B=4, blocks=1, filters=4, size=8, rounds=1),
        "w7": dict(B=3, filters=4, size=8, chunks=(2,), rounds=1),
        "w8": dict(B=64, depth=4, width=19, rounds=1),
    },
}[SCALE]

ARCHS = {  # the 7 architectures of the Gaussian study
    "relu": ("relu", None),
    "layer-relu": ("relu", "layer"),
    "batch-relu": ("relu", "batch"),
    "tanh": ("tanh", None),
    "layer-tanh": ("tanh", "layer"),
    "batch-tanh": ("tanh", "batch"),
    "selu": ("selu", None),
}

BACKENDS = [b for b in available_backends("cpu") if b != "reference"]
"""gscfast backends measured here ("auto" is added per workload)."""


# ----------------------------------------------------------------------------- FLOP counts


def linear_dims(model: nn.Module) -> list[tuple[int, int]]:
    """``(d_out, d_in)`` of every nn.Linear in model order."""
    return [tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Linear)]


def flops_w1(model: nn.Module, B: int) -> float:
    """One forward and one backward GEMM per Linear: ``4 B sum(d_in d_out)``."""
    return 4.0 * B * sum(o * i for o, i in linear_dims(model))


def flops_w2(model: nn.Module, B: int, rows: int | None = None) -> float:
    """Chain GEMMs: from every start ``f_l`` with ``R_l`` rows (``d_l`` identity rows, or
    ``rows`` probes; one row, the error gradient, for ``l = 0``) through every layer ``i`` between
    it and ``f_L``: ``2 R_l d_out d_in`` each. For 50 x 100: ``B * sum over pairs of 2 d^3``.
    The forward pass is not counted."""
    dims = linear_dims(model)
    L = len(dims)  # model order: layer i outputs f_{L-i}; its GEMM is applied for i >= 1
    step = [2.0 * o * i for o, i in dims]
    total = sum(step[1:L])  # l = 0
    for l in range(1, L + 1):
        R = rows or dims[L - l][0]
        total += R * sum(step[1 : L - l + 1])
    return B * total


def flops_w3(model: nn.Module, B: int) -> float:
    """Input-to-output Jacobian: ``2 d_end d_out d_in`` per Linear (``d_end`` identity rows)."""
    dims = linear_dims(model)
    return B * sum(2.0 * dims[-1][0] * o * i for o, i in dims)


def flops_w4(model: nn.Module, B: int) -> float:
    """Effective depth: forward of the trained and the initial model at the same layer inputs
    (``2 x 2 B sum(d_in d_out)``), then per layer ``m`` two GEMMs (trained, initial) on the
    ``m`` rows of lambdas: ``2 x 2 m d_out d_in``."""
    dims = linear_dims(model)
    L = len(dims)
    fwd = 4.0 * sum(o * i for o, i in dims)
    bwd = sum(4.0 * m * dims[L - m][0] * dims[L - m][1] for m in range(1, L))
    return B * (fwd + bwd)


# ----------------------------------------------------------------------------- yardstick


# OpenBLAS reads these at load time: a CORETYPE forces its kernels (Haswell's AVX2 on an AVX-512
# machine: about half numpy's sgemm rate), L2_SIZE its blocking. The timing run unsets them
# (bench/README.md); the report names their state and warns when they were set.
OPENBLAS_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def openblas_env() -> dict[str, str | None]:
    """The OpenBLAS variables of this process's environment (None: unset)."""
    return {v: os.environ.get(v) for v in OPENBLAS_VARS}


KNOWN_OWNERS = ("numpy", "scipy", "torch", "jaxlib", "sklearn", "numba")


def blas_info() -> list[dict]:
    """The BLAS and OpenMP libraries loaded in this process (threadpoolctl), one entry each:
    ``owner`` (the package that ships it: numpy's OpenBLAS, scipy's, which numba's ``@`` calls,
    torch's MKL and OpenMP), ``internal_api``, ``version``, ``architecture`` (OpenBLAS's kernel
    name, "corename"), ``threading_layer``, ``num_threads``."""
    out = []
    for lib in threadpoolctl.threadpool_info():
        parts = lib.get("filepath", "").replace("\\", "/").split("/")
        owner = next(
            (p.split(".")[0] for p in reversed(parts) if p.split(".")[0] in KNOWN_OWNERS), "?"
        )
        out.append(
            {
                "owner": owner,
                "internal_api": lib.get("internal_api"),
                "version": lib.get("version"),
                "architecture": lib.get("architecture"),
                "threading_layer": lib.get("threading_layer"),
                "num_threads": lib.get("num_threads"),
            }
        )
    return out


def measure_sgemm() -> dict:
    """Best sgemm GFLOP/s of this machine right now (float32, n x n x n; one numpy call, one torch
    call, and single-threaded numpy GEMMs per thread: the package's ``gemm_rate``, the roof the
    report divides by), under the keys ``report.py`` reads,
    with the BLAS kernels that ran it and the OpenBLAS variables' state."""
    n, reps = SIZES["sgemm"]["n"], SIZES["sgemm"]["reps"]
    r = gemm_rate(n, n, n, reps=reps)
    return {
        "sgemm_gflops": r.flops / 1e9,
        "sgemm_library": r.library,
        "sgemm_torch_gflops": r.rates["torch"] / 1e9,
        "sgemm_numpy_gflops": r.rates["numpy"] / 1e9,
        "sgemm_per_thread_gflops": r.rates.get("numpy per thread", 0.0) / 1e9,
        "sgemm_own_gflops": r.rates.get("gscfast per thread", 0.0) / 1e9,
        "fma_peak_gflops": fma_peak() / 1e9,  # what no GEMM exceeds (float32)
        "blas": blas_info(),
        "openblas_env": openblas_env(),
    }


# ----------------------------------------------------------------------------- memory


def _status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak() -> int | None:
    """Reset the peak RSS (``VmHWM``) and return the current RSS, or None where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _status("VmRSS")


def peak_rss() -> int | None:
    return _status("VmHWM")


# ----------------------------------------------------------------------------- running


def conv_linear_flops(model: nn.Module, x: torch.Tensor) -> float:
    """FLOPs of one forward of ``model``'s convolutions and linear layers on ``x`` (2 per
    multiply-add), counted by forward hooks on one call."""
    total = 0.0

    def count(m, args, out):
        nonlocal total
        if isinstance(m, nn.Conv2d):
            total += 2 * out.numel() * m.in_channels // m.groups * math.prod(m.kernel_size)
        elif isinstance(m, nn.Linear):
            total += 2 * out.numel() * m.in_features

    hs = [m.register_forward_hook(count) for m in model.modules()]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hs:
            h.remove()
    return total


def run_checked(
    benchmark,
    fn: Callable,
    *,
    check: Callable | None,
    flops: float,
    rounds: int,
    sgemm: dict,
    scale: float = 1.0,
    **info,
) -> object:
    """Warm up (and compile) with one call, check its result, then time ``rounds`` calls.

    ``scale`` multiplies the measured time for baselines timed on a subset (``scale = B /
    subset``); GFLOP/s and the sgemm ratio are computed from the scaled time. Records in
    ``benchmark.extra_info``: FLOP count, GFLOP/s, ratio to sgemm measured just before, peak
    memory above the RSS at the start, and ``info``.
    """
    t0 = time.perf_counter()
    result = fn()
    first = time.perf_counter() - t0
    if check is not None:
        check(result)
    del result
    sg = measure_sgemm() if benchmark.enabled else sgemm
    base = reset_peak()
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)
    peak = peak_rss()
    ei = benchmark.extra_info
    ei.update(info)
    # gscfast's own rows (a backend, "auto", or gscfast another way) against the peers: the
    # report's best peer is the fastest row that is not gscfast's.
    ei["gscfast"] = info.get("impl") in (*GSCFAST_ROWS, *GSCFAST_BACKENDS)
    ei.update(sg)
    ei["sgemm_session_gflops"] = sgemm["sgemm_gflops"]
    ei["flops"] = flops
    ei["first_call_s"] = first
    ei["time_scale"] = scale
    if base is not None and peak is not None:
        ei["peak_mem_mb"] = (peak - base) / 2**20
        ei["peak_rss_mb"] = peak / 2**20
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        t = stats.stats.min * scale
        ei["time_s"] = t
        ei["gflops"] = flops / t / 1e9
        ei["sgemm_ratio"] = ei["gflops"] / sg["sgemm_gflops"]
    return ei


def as_tensor(a) -> torch.Tensor:
    """A torch tensor of ``a`` (a tensor, or an array such as a JAX peer's result)."""
    return a if isinstance(a, torch.Tensor) else torch.from_numpy(np.array(a))


def assert_log_close(got, ref: torch.Tensor, tol: float, what: str) -> None:
    """Same NaN pattern; finite positive entries agree to ``tol`` in log space."""
    got, ref = as_tensor(got).double().cpu(), ref.double().cpu()
    assert got.shape == ref.shape, what
    assert torch.equal(got.isnan(), ref.isnan()), f"{what}: NaN patterns differ"
    ok = ~ref.isnan() & (ref.abs() > 0)
    err = (got[ok].abs().log() - ref[ok].abs().log()).abs()
    assert err.numel() == 0 or err.max() <= tol, f"{what}: log error {err.max():.3g} > {tol}"


def assert_rel_close(got, ref: torch.Tensor, tol: float, what: str) -> None:
    """Entries agree to ``tol`` of each datapoint's largest entry (signed matrices)."""
    got, ref = as_tensor(got).double().cpu(), ref.double().cpu()
    assert got.shape == ref.shape, f"{what}: {tuple(got.shape)} vs {tuple(ref.shape)}"
    scale = ref.abs().flatten(1).max(1).values.clamp(min=1e-30)
    err = ((got - ref).abs().flatten(1).max(1).values / scale).max()
    assert err <= tol, f"{what}: error {err:.3g} of the largest entry > {tol}"


def auto_choice(model: nn.Module, x: torch.Tensor, y=None, method: str = "chain", **kw) -> str:
    """What ``backend="auto"`` runs for this problem: the backend, and for "numba" whether its
    fused kernels, the torch engine's path with spans on the kernels, or the torch engine's path
    alone take ``method`` (a backend method name: ``gsc`` is ``"sweep"``, ``gsc_matrix``
    ``"chain"``)."""
    from gscfast.validation import make_problem

    be = get_backend("auto", x.device)
    if be.name != "numba":
        return be.name
    pb, _ = make_problem(model, x, y, error="dot" if y is not None else None, **kw)
    if be.fused(pb, method=method):
        return "numba (fused)"
    spans = be.spans(pb)
    return f"numba (torch path, {len(spans)} fused spans)" if spans else "numba (torch path)"


# ----------------------------------------------------------------------------- models, data


def make_model(
    depth: int,
    width: int,
    act: str,
    norm: str | None,
    seed: int = 0,
    in_features: int | None = None,
    out_features: int | None = None,
) -> nn.Sequential:
    return gscfast.mlp(
        depth,
        width,
        act=act,
        norm=norm,
        seed=seed,
        in_features=in_features,
        out_features=out_features,
    )


def gaussian(B: int, n: int, m: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, n, generator=g), torch.randn(B, m, generator=g)


def layer_modules(model: nn.Module) -> list[nn.Sequential]:
    """The model split into gscfast's layers (each ends after an activation)."""
    prog = gscfast.compile_model(model)
    return [nn.Sequential(*layer.modules) for layer in prog.layers]


# ----------------------------------------------------------------------------- peers

JAX_MISSING = "jax is not installed (pip install 'gscfast[bench]'): no JAX peer rows"


def jax_peers() -> ModuleType:
    """``jaxpeers`` (the JAX formulations of W1-W3), or skip the calling test where jax is
    missing."""
    pytest.importorskip("jax", reason=JAX_MISSING)
    import jaxpeers

    return jaxpeers


# ----------------------------------------------------------------------------- baselines (W1)


def autograd_gsc(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """What a user writes: one forward with ``retain_grad`` on every layer output, one backward,
    then the expected GSC of definitions.md (whole batch = one datapoint with train-mode BN)."""
    layers = layer_modules(model)
    coupled = gscfast.compile_model(model).couples_batch
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # the generous version: no weight gradients, only the activations'
        p.requires_grad_(False)
    h = x.detach().requires_grad_()
    try:
        res = _autograd_gsc(layers, coupled, h, y)
    finally:
        for p in params:
            p.requires_grad_(True)
    return res


def _autograd_gsc(layers, coupled, h, y):
    outs = []
    for layer in layers:
        h = layer(h)
        h.retain_grad()
        outs.append(h)
    e = (h * y).sum(1)
    f0 = e.sum()
    f0.backward()
    with torch.no_grad():
        L = len(layers)
        res = torch.ones(L + 1, dtype=torch.float64)
        if coupled:
            e2 = f0.double() ** 2
            for i, o in enumerate(outs):
                l = L - i
                res[l] = o.grad.double().square().sum() / o.numel() * o.double().square().sum() / e2
        else:
            e2 = e.double().square().mean()
            for i, o in enumerate(outs):
                l = L - i
                g2 = o.grad.double().square().sum(1).mean()
                res[l] = g2 / o.shape[1] * o.double().square().sum(1).mean() / e2
    return res


def vmap_jacrev_gsc(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk_size: int | None = None
) -> torch.Tensor:
    """Per-sample gradients at every layer with ``torch.func``: ``vmap(jacrev)`` of the error
    with respect to zero offsets added to each layer output (per-sample datapoints only)."""
    from torch.func import jacrev, vmap

    layers = layer_modules(model)
    L = len(layers)

    def err(xi, yi, deltas):
        h = xi
        outs = []
        for layer, dl in zip(layers, deltas):
            h = layer(h) + dl
            outs.append(h)
        return (h * yi).sum(), outs

    zeros = tuple(torch.zeros(layer[0].out_features, dtype=x.dtype) for layer in layers)

    def per_sample(xi, yi):
        g, outs = jacrev(err, argnums=2, has_aux=True)(xi, yi, zeros)
        return g, outs

    with torch.no_grad():
        grads, outs = vmap(per_sample, chunk_size=chunk_size)(x, y)
        e = (outs[-1] * y).sum(1).double()
        res = torch.ones(L + 1, dtype=torch.float64)
        e2 = e.square().mean()
        for i in range(L):
            l = L - i
            g2 = grads[i].double().square().sum(1).mean()
            res[l] = g2 / grads[i].shape[1] * outs[i].double().square().sum(1).mean() / e2
    return res


# ----------------------------------------------------------------------------- baselines (W2)


def torch_chain_gsc_matrix(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 16
) -> torch.Tensor:
    """The best hand-written torch chain we found: per chunk of samples, one forward saving the
    activation derivatives, then for every start layer the identity pushed through the layers
    with in-place scaling and one big GEMM per layer (``[chunk*d, d] @ W``) into preallocated
    buffers. Tanh/ReLU MLPs without norms (what W2 measures)."""
    layers = layer_modules(model)
    L = len(layers)
    Ws = [layer[0].weight.detach() for layer in layers]
    acts = [layer[-1] for layer in layers]
    B = x.shape[0]
    sq = torch.zeros(L + 1, L + 1, dtype=torch.float64)
    fsq = torch.zeros(L + 1, dtype=torch.float64)
    with torch.no_grad():
        for c0 in range(0, B, chunk):
            xc, yc = x[c0 : c0 + chunk], y[c0 : c0 + chunk]
            c = xc.shape[0]
            h = xc
            ders = []
            for i in range(len(layers)):
                z = h @ Ws[i].T
                h = acts[i](z)
                if isinstance(acts[i], nn.Tanh):
                    ders.append(1 - h * h)
                else:
                    ders.append((z > 0).to(z.dtype))
                fsq[L - i] += h.double().square().sum()
            e = (h * yc).sum(1)
            fsq[0] += e.double().square().sum()
            d = Ws[0].shape[0]
            buf = torch.empty(2, c * d, d, dtype=x.dtype)
            # column 0: the error gradient (one row per sample)
            v = yc * ders[L - 1]
            sq[1, 0] += yc.double().square().sum()
            for i in range(L - 1, 0, -1):
                v = v @ Ws[i]
                sq[L - i + 1, 0] += v.double().square().sum()
                v = v * ders[i - 1]
            for l in range(1, L + 1):
                i0 = L - l
                sq[l, l] += c * d
                if i0 == 0:
                    continue
                V = buf[0].view(c, d, d)
                V.zero_()
                V.diagonal(dim1=1, dim2=2).copy_(ders[i0])
                cur, nxt = 0, 1
                for i in range(i0, 0, -1):
                    torch.mm(buf[cur], Ws[i], out=buf[nxt])
                    W = buf[nxt].view(c, d, d)
                    sq[L - i + 1, l] += torch.linalg.vector_norm(buf[nxt], dtype=torch.float64) ** 2
                    if i > 1:
                        W.mul_(ders[i - 1][:, None, :])
                    cur, nxt = nxt, cur
    sq /= B
    fsq /= B
    n = torch.tensor(
        [1.0] + [float(Ws[L - l].shape[0]) for l in range(1, L + 1)], dtype=torch.float64
    )
    res = sq / n[:, None] * fsq[:, None] / fsq[None, :]
    res[0, 0] = 1.0
    return res.masked_fill(torch.ones_like(res, dtype=torch.bool).triu(1), float("nan"))


def pairs_jacrev_gsc_matrix(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per pair ``(k, l)``: ``vmap(jacrev)`` of the layers between ``f_k`` and ``f_l`` at every
    sample's ``f_k``; what a user writes without a chain engine."""
    from torch.func import jacrev, vmap

    layers = layer_modules(model)
    L = len(layers)
    with torch.no_grad():
        fs = {L + 1: x}
        h = x
        for i, layer in enumerate(layers):
            h = layer(h)
            fs[L - i] = h
    e = (fs[1] * y).sum(1)
    res = torch.full((L + 1, L + 1), float("nan"), dtype=torch.float64)
    fsq = {l: fs[l].double().square().sum(1).mean() for l in range(1, L + 1)}
    fsq[0] = e.double().square().mean()

    def run(k: int, l: int):
        mods = layers[L - k + 1 : L - l + 1]  # f_k -> f_l (layer i outputs f_{L-i})

        def f(h):
            for m in mods:
                h = m(h)
            return h

        return f

    for k in range(1, L + 1):
        res[k, k] = 1.0
        for l in range(1, k):
            J = vmap(jacrev(run(k, l)))(fs[k])
            res[k, l] = J.double().square().sum((1, 2)).mean() / J.shape[2] * fsq[k] / fsq[l]

        # l = 0: the error's gradient
        def ef(h, yi, k=k):
            return (run(k, 0)(h) * yi).sum()

        g = vmap(jacrev(ef))(fs[k], y)
        res[k, 0] = g.double().square().sum(1).mean() / g.shape[1] * fsq[k] / fsq[0]
    res[0, 0] = 1.0
    return res


# ----------------------------------------------------------------------------- baselines (W3)


def vmap_jacrev_jacobian(model, x, chunk_size=None):
    from torch.func import jacrev, vmap

    with torch.no_grad():
        return vmap(jacrev(model), chunk_size=chunk_size)(x)


def functional_jacobian(model, x):
    """``torch.autograd.functional.jacobian`` one sample at a time."""
    return torch.stack([torch.autograd.functional.jacobian(model, xi) for xi in x])
