"""GPU benchmark: check every GPU kernel, then time W1-W4 for triton, cupy and torch on CUDA.

    python bench/gpu/run.py                      # checks, then W1-W4, fp32 and tf32; JSON next to it
    python bench/gpu/run.py --quick              # 1/10 of the sizes (a smoke run)
    python bench/gpu/run.py --check-only         # only the correctness checks
    python bench/gpu/run.py --workloads W2 --backends triton --precisions tf32 --reps 50

1. Checks: fresh random models and inputs (a new seed each run, printed and saved) through every
   method of every GPU backend, on CUDA, against the reference backend (CPU, float64): float64 to
   1e-9, float32 to 2e-4 relative (per entry, relative to its column's scale; Jacobians relative
   to each sample's Jacobian norm, 1e-4). Any failure stops the run before timing (``--force``
   times anyway).
2. Timing: W1-W4 (sizes below; a 50-layer width-100 network, ``--arch``), each backend and
   precision: ``--warmup`` calls (Triton autotuning and NVRTC compiles happen there), then
   ``--reps`` calls timed with CUDA events, inputs rotated among ``--rotate`` sets, median and
   10/90th percentiles. Achieved TFLOP/s use the workload's useful FLOPs (``flops()``; the GEMMs of
   the analytic method, as the "torch" engine computes them). cuBLAS reference GEMMs are timed in
   the same run: a 8192^3 GEMM (peak) and a GEMM of the chain-step shape, fp32 (sgemm) and TF32.
3. JSON: device, versions, checks, GEMMs and every timing sample (``--json``).

Workloads (as the CPU issue's W1-W4): W1 ``gsc`` B=10,000; W2 ``gsc_matrix`` exact B=1,000;
W3 ``jacobian`` input -> output B=1,000; W4 ``effective_depth`` B=10,000.
See bench/gpu/README.md for the H100 FLOP and byte floors these numbers should be read against.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

import gscfast  # noqa: E402
from gscfast import backends  # noqa: E402
from gscfast.backends.reference import ReferenceBackend  # noqa: E402
from gscfast.validation import make_problem  # noqa: E402

BACKENDS = ("triton", "cupy", "torch")
SIZES = {"W1": 10_000, "W2": 1_000, "W3": 1_000, "W4": 10_000}
DEPTH, WIDTH = 50, 100


# ----------------------------------------------------------------------------- checks


def _random_model(rng: random.Random, dtype, max_width: int = 130):
    """A random fusable model: widths 5..max_width, every activation, LN / eval BN / train BN (frozen)."""
    acts = [
        torch.nn.ReLU(),
        torch.nn.Tanh(),
        torch.nn.SELU(),
        torch.nn.Sigmoid(),
        torch.nn.GELU(),
        torch.nn.GELU(approximate="tanh"),
        torch.nn.LeakyReLU(0.05),
        torch.nn.ELU(0.7),
        torch.nn.Softplus(beta=1.5, threshold=3.0),
        torch.nn.Identity(),
    ]
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    d = n_in = rng.randrange(5, max_width + 1)
    mods = []
    for _ in range(rng.randrange(2, 6)):
        out = rng.randrange(5, max_width + 1)
        lin = torch.nn.Linear(d, out, bias=rng.random() < 0.5)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(out, d, generator=g) * math.sqrt(1.5 / d))
        mods.append(lin)
        norm = rng.choice([None, "ln", "ln_affine", "bn_eval", "bn_train"])
        if norm and norm.startswith("ln"):
            mods.append(torch.nn.LayerNorm(out, elementwise_affine=norm == "ln_affine"))
        elif norm:
            bn = torch.nn.BatchNorm1d(out)
            with torch.no_grad():
                bn.running_mean.normal_(0, 0.3, generator=g)
                bn.running_var.uniform_(0.5, 1.5, generator=g)
                bn.weight.normal_(1, 0.3, generator=g)
                bn.bias.normal_(0, 0.3, generator=g)
            mods.append(bn.eval() if norm == "bn_eval" else bn)
        mods.append(copy.deepcopy(rng.choice(acts)))
        d = out
    if rng.random() < 0.5:
        mods.append(torch.nn.Linear(d, rng.randrange(5, max_width + 1)))
    return torch.nn.Sequential(*mods).to(dtype), n_in, g


def _close(got, ref, dtype, what):
    got, ref = got.double().cpu(), ref.double().cpu()
    if not torch.equal(got.isnan(), ref.isnan()):
        return f"{what}: NaN pattern differs"
    g, r = got.nan_to_num(), ref.nan_to_num()
    scale = r.abs().amax(0, keepdim=True)
    rtol, atol = (1e-9, 1e-12) if dtype == torch.float64 else (2e-4, 2e-6)
    bad = ((g - r).abs() > rtol * r.abs() + atol * scale).sum()
    return f"{what}: {int(bad)} entries off (max err {(g - r).abs().max():.3g})" if bad else None


def _close_jac(got, ref, dtype):
    """Jacobians: error relative to each sample's Jacobian norm (signed entries cancel)."""
    got, ref = got.double().cpu().flatten(1), ref.double().cpu().flatten(1)
    err = ((got - ref).norm(dim=1) / ref.norm(dim=1).clamp(min=1e-300)).max()
    return (
        f"jacobian: relative error {err:.3g}"
        if err > (1e-9 if dtype == torch.float64 else 1e-4)
        else None
    )


def check(
    names, seed: int, n_models: int, device: str = "cuda", max_width: int = 130
) -> list[dict]:
    """Every method of every backend on random models; returns one record per (model, dtype, backend).

    ``device="cpu"`` is for the test suite (the backends' CPU test modes)."""
    rng = random.Random(seed)
    ref = ReferenceBackend()
    out = []
    for i in range(n_models):
        for dtype in (torch.float64, torch.float32):
            model, n_in, g = _random_model(
                random.Random(rng.randrange(2**31)), torch.float64, max_width
            )
            D, B = rng.choice([1, 2]), rng.randrange(2, 9)
            x = torch.randn(D, B, n_in, generator=g, dtype=torch.float64)
            m = [mm for mm in model.modules() if isinstance(mm, torch.nn.Linear)][-1].out_features
            y = torch.randn(D, B, m, generator=g, dtype=torch.float64)
            init = copy.deepcopy(model)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype) * p.abs().mean())
            pb64, _ = make_problem(model, x, y, error="dot", batchnorm="frozen")
            i64 = gscfast.compile_model(init)
            want = dict(
                sweep=ref.sweep(pb64, grads=True, stats=False),
                chain=ref.chain(pb64, None),
                jac=ref.jacobian(pb64, pb64.L + 1, 1),
                contrib=ref.contributions(pb64, i64),
            )
            mc, xc, yc = (
                copy.deepcopy(model).to(device, dtype),
                x.to(device, dtype),
                y.to(device, dtype),
            )
            pb, _ = make_problem(mc, xc, yc, error="dot", batchnorm="frozen")
            ic = gscfast.compile_model(copy.deepcopy(init).to(device, dtype))
            for name in names:
                be = backends._load(name)()
                errs = [
                    e
                    for e in (
                        _close(
                            be.sweep(pb, grads=True, stats=False).sq_grad,
                            want["sweep"].sq_grad,
                            dtype,
                            "sweep",
                        ),
                        _close(be.chain(pb, None), want["chain"], dtype, "chain"),
                        _close_jac(be.jacobian(pb, pb.L + 1, 1), want["jac"], dtype),
                        _close(be.contributions(pb, ic), want["contrib"], dtype, "contributions"),
                    )
                    if e
                ]
                fused = getattr(be, "fused", lambda pb: None)(pb)
                out.append(
                    dict(
                        model=i,
                        dtype=str(dtype),
                        backend=name,
                        fused=fused,
                        errors=errs,
                        arch=repr(model),
                    )
                )
                print(
                    f"  check model {i} {dtype!s:14s} {name:7s} fused={fused!s:5s} "
                    f"{'ok' if not errs else 'FAIL ' + '; '.join(errs)}",
                    flush=True,
                )
    return out


# ----------------------------------------------------------------------------- workloads


def make_model(arch: str, seed: int, device: str = "cuda"):
    act, _, norm = arch.partition("-")
    norm = {"": None, "none": None, "layer": "layer", "batch": "batch"}[norm]
    return gscfast.mlp(DEPTH, WIDTH, act=act, norm=norm, seed=seed, dtype=torch.float32).to(device)


def flops(w: str, B: int) -> float:
    """Useful FLOPs of workload ``w`` at batch ``B`` (2 per multiply-add of the method's GEMMs)."""
    L, d = DEPTH, WIDTH
    fwd = B * L * 2 * d * d
    if w == "W1":  # forward + backward vector chain
        return fwd + B * (L - 1) * 2 * d * d
    if w == "W2":  # forward + every start layer's d x d chain + the l = 0 row
        return fwd + B * (L * (L - 1) // 2) * 2 * d**3 + B * (L - 1) * 2 * d * d
    if w == "W3":  # forward + L steps of d rows
        return fwd + B * L * 2 * d**3
    if w == "W4":  # two forwards + v G and v S for m rows at step m
        return 2 * fwd + B * sum(2 * m * 2 * d * d for m in range(1, L))
    raise ValueError(w)


def runner(w: str, name: str, model, init, xs, ys):
    if w == "W1":
        return lambda i: gscfast.gsc(model, xs[i], ys[i], backend=name, batchnorm="frozen")
    if w == "W2":
        return lambda i: gscfast.gsc_matrix(model, xs[i], ys[i], backend=name, batchnorm="frozen")
    if w == "W3":
        return lambda i: gscfast.jacobian(model, xs[i], backend=name, batchnorm="frozen")
    return lambda i: gscfast.effective_depth(
        model, init, xs[i], ys[i], backend=name, batchnorm="frozen"
    )


def time_calls(fn, warmup: int, reps: int, rotate: int) -> list[float]:
    for i in range(warmup):
        fn(i % rotate)
    torch.cuda.synchronize()
    times = []
    for i in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(i % rotate)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def gemm(M: int, K: int, N: int, tf32: bool, reps: int) -> dict:
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        a = torch.randn(M, K, device="cuda")
        b = torch.randn(K, N, device="cuda")
        ts = time_calls(lambda i: a @ b, 3, reps, 1)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    med = statistics.median(ts)
    return dict(shape=[M, K, N], tf32=tf32, median_s=med, tflops=2 * M * K * N / med / 1e12)


def pct(ts, q):
    s = sorted(ts)
    return s[min(len(s) - 1, int(q * len(s)))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workloads", default="W1,W2,W3,W4")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--precisions", default="fp32,tf32", help="fp32 (IEEE) and/or tf32")
    ap.add_argument(
        "--arch", default="tanh-layer", help="ACT-NORM of the 50x100 network (NORM: none|layer)"
    )
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rotate", type=int, default=3, help="input sets cycled through")
    ap.add_argument("--quick", action="store_true", help="batch sizes / 10, 5 reps")
    ap.add_argument("--check-only", action="store_true")
    ap.add_argument("--check-models", type=int, default=4)
    ap.add_argument("--seed", type=int, default=None, help="checks' seed (default: fresh)")
    ap.add_argument("--force", action="store_true", help="time even if a check fails")
    ap.add_argument("--memory", default="16G", help="GSCFAST_MEMORY for the timed calls")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU: this benchmark needs one (the CPU checks live in tests/gpu/)")
        return 2
    os.environ["GSCFAST_MEMORY"] = args.memory
    names = [n for n in args.backends.split(",") if n]
    for n in list(names):
        b = backends._load(n)
        if isinstance(b, str):
            print(f"skipping {n}: {b}")
            names.remove(n)
    seed = args.seed if args.seed is not None else int(time.time())
    props = torch.cuda.get_device_properties(0)
    result = dict(
        device=props.name,
        sm=f"{props.major}{props.minor}",
        host=platform.node(),
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        versions=_versions(),
        seed=seed,
        args=vars(args),
    )
    print(
        f"device {props.name} (sm_{props.major}{props.minor}), backends {names}, check seed {seed}"
    )

    torch.set_float32_matmul_precision("highest")
    result["checks"] = check(names, seed, args.check_models)
    failed = [
        c
        for c in result["checks"]
        if c["errors"] or (c["backend"] != "torch" and c["fused"] is False)
    ]
    result["checks_passed"] = not failed
    print(f"checks: {len(result['checks']) - len(failed)}/{len(result['checks'])} passed")
    if args.check_only or (failed and not args.force):
        _write(result, args)
        return 0 if not failed else 1

    reps = 5 if args.quick else args.reps
    scale = 10 if args.quick else 1
    result["gemm"] = [gemm(8192, 8192, 8192, tf32, reps) for tf32 in (False, True)]
    result["gemm"] += [
        gemm(SIZES["W2"] // scale * WIDTH, WIDTH, WIDTH, tf32, reps) for tf32 in (False, True)
    ]
    for gm in result["gemm"]:
        print(
            f"cuBLAS {'tf32' if gm['tf32'] else 'sgemm'} {gm['shape']}: {gm['tflops']:.1f} TFLOP/s"
        )
    peak = {gm["tf32"]: gm["tflops"] for gm in result["gemm"][:2]}
    shaped = {gm["tf32"]: gm["tflops"] for gm in result["gemm"][2:]}

    rows = []
    model = make_model(args.arch, 0)
    init = make_model(args.arch, 1)
    for w in args.workloads.split(","):
        B = SIZES[w] // scale
        g = torch.Generator(device="cuda").manual_seed(seed)
        xs = [torch.randn(B, WIDTH, device="cuda", generator=g) for _ in range(args.rotate)]
        xs = [10 * x / x.norm(dim=1, keepdim=True) for x in xs]
        ys = [torch.randn(B, WIDTH, device="cuda", generator=g) / 10 for _ in range(args.rotate)]
        for prec in args.precisions.split(","):
            torch.set_float32_matmul_precision("highest" if prec == "fp32" else "high")
            for name in names:
                if name == "cupy" and prec == "tf32":
                    continue  # the CUDA kernels have no TF32 path
                try:
                    ts = time_calls(
                        runner(w, name, model, init, xs, ys), args.warmup, reps, args.rotate
                    )
                except torch.cuda.OutOfMemoryError as e:
                    print(f"{w} {name} {prec}: out of memory ({e})")
                    continue
                med = statistics.median(ts)
                tf = flops(w, B) / med / 1e12
                row = dict(
                    workload=w,
                    B=B,
                    backend=name,
                    precision=prec,
                    median_s=med,
                    p10_s=pct(ts, 0.1),
                    p90_s=pct(ts, 0.9),
                    tflops=tf,
                    vs_cublas_peak=tf / peak[prec == "tf32"],
                    vs_cublas_shape=tf / shaped[prec == "tf32"],
                    flops=flops(w, B),
                    samples_s=ts,
                )
                rows.append(row)
                print(
                    f"{w} B={B:6d} {name:7s} {prec}: {med * 1e3:9.2f} ms  {tf:7.2f} TFLOP/s  "
                    f"{100 * row['vs_cublas_peak']:5.1f}% of cuBLAS peak",
                    flush=True,
                )
    torch.set_float32_matmul_precision("highest")
    result["timings"] = rows
    _table(rows)
    _write(result, args)
    return 0


def _versions() -> dict:
    v = dict(torch=torch.__version__, cuda=torch.version.cuda, python=sys.version.split()[0])
    for mod in ("triton", "cupy"):
        try:
            v[mod] = __import__(mod).__version__
        except Exception:
            v[mod] = None
    return v


def _table(rows) -> None:
    print()
    print(
        "| workload | B | backend | precision | median ms | p10-p90 ms | TFLOP/s | / cuBLAS peak | / cuBLAS same-shape |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['workload']} | {r['B']} | {r['backend']} | {r['precision']} | {r['median_s'] * 1e3:.2f} "
            f"| {r['p10_s'] * 1e3:.2f}-{r['p90_s'] * 1e3:.2f} | {r['tflops']:.2f} | {r['vs_cublas_peak']:.2f} "
            f"| {r['vs_cublas_shape']:.2f} |"
        )


def _write(result: dict, args) -> None:
    path = (
        Path(args.json)
        if args.json
        else HERE / f"results-{result['host']}-{result['date'][:10]}.json"
    )
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
