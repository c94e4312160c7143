"""Every GPU check in one command (``scripts/gpu-check``), written up as one markdown report.

On a machine with a CUDA GPU, in this order, each step's output in ``OUT/<step>.log``:

1. ``tests``: every ``gpu``-marked test (``pytest tests/gpu -m gpu``).
2. ``bench``: ``bench/gpu/run.py`` (every GPU backend checked against the reference backend on
   fresh random models, then W1-W4 timed; ``OUT/bench.json``).
3. ``gaussian``: the Gaussian study at full scale on the CPU (``--device cpu``, the reference
   numbers) and with ``--device cuda`` for each available fused GPU backend (``triton``,
   ``cupy``); per architecture the pooled
   GSC(l, 0) and the explosion rate must agree with the CPU run's (``GSC_RTOL``, ``RATE_ATOL``).

``OUT/report.md`` then gives each step's pass/fail and wall time, the largest GPU-CPU differences,
and the W1-W4 timings against the floors of ``bench/gpu/README.md``: the useful FLOPs at the cuBLAS
peak measured in the same run, and the bytes a layer-by-layer design moves at the device-to-device
copy bandwidth measured here. The exit status is 0 when every step passed, 1 otherwise. Without a
CUDA GPU nothing runs: it says so and exits 0. ``--quick``: the benchmark at 1/10 of its sizes and
the study on 10 datasets (a smoke run, about a minute).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GSC_RTOL = 2e-3  # float32 on both sides, different summation orders
RATE_ATOL = 2e-4
# Bytes a layer-by-layer design moves through device memory (bench/gpu/README.md), full sizes.
LAYER_BYTES = {"W1": 1.59e9, "W2": 99.6e9, "W3": 4.14e9, "W4": 12.4e9}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def step(name: str, cmd: list[str], out: Path, timeout: float) -> dict:
    """Run ``cmd`` from the repository root with its output in ``out/<name>.log``."""
    t0 = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        try:
            rc = subprocess.run(
                cmd, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    seconds = time.perf_counter() - t0
    print(f"{name}: {'ok' if rc == 0 else f'FAILED ({rc})'} in {seconds:.0f} s", flush=True)
    return {"name": name, "rc": rc, "seconds": seconds, "log": f"{name}.log"}


def compare(cpu: dict, gpu: dict) -> list[dict]:
    """Per architecture of two Gaussian ``results.json``: the largest relative difference of the
    pooled GSC(l, 0) and the difference of the pooled rate, and whether both are within tolerance."""
    rows = []
    for arch, a in cpu["archs"].items():
        b = gpu["archs"].get(arch)
        if b is None:
            rows.append({"arch": arch, "gsc_rel": math.inf, "rate_abs": math.inf, "ok": False})
            continue
        rel = max(
            abs(x - y) / max(abs(x), 1e-300) for x, y in zip(a["pooled"]["gsc"], b["pooled"]["gsc"])
        )
        rate = abs(a["rate"]["pooled"] - b["rate"]["pooled"])
        rows.append(
            {
                "arch": arch,
                "gsc_rel": rel,
                "rate_abs": rate,
                "ok": rel <= GSC_RTOL and rate <= RATE_ATOL,
            }
        )
    return rows


def bench_rows(bench: dict, bandwidth: float | None) -> list[dict]:
    """W1-W4 timings with their compute floor (useful FLOPs at the same run's cuBLAS peak, fp32 or
    TF32) and memory floor (layer-by-layer bytes, scaled to the batch, at ``bandwidth`` bytes/s)."""
    peak = {g["tf32"]: g["tflops"] * 1e12 for g in bench.get("gemm", [])[:2]}
    full = {"W1": 10_000, "W2": 1_000, "W3": 1_000, "W4": 10_000}
    rows = []
    for r in bench.get("timings", []):
        tf32 = r["precision"] == "tf32"
        compute = r["flops"] / peak[tf32] if tf32 in peak else math.nan
        memory = (
            LAYER_BYTES[r["workload"]] * r["B"] / full[r["workload"]] / bandwidth
            if bandwidth
            else math.nan
        )
        floor = max(compute, memory)
        rows.append(
            {
                **{
                    k: r[k] for k in ("workload", "B", "backend", "precision", "median_s", "tflops")
                },
                "compute_floor_s": compute,
                "memory_floor_s": memory,
                "x_floor": r["median_s"] / floor if floor == floor else math.nan,
            }
        )
    return rows


def _ms(s: float) -> str:
    return "n/a" if s != s else f"{s * 1e3:.3g}"


def report(
    device: str,
    steps: list[dict],
    gaussian: dict[str, list[dict]],
    bench: dict | None,
    bandwidth: float | None,
    quick: bool,
) -> str:
    ok = all(s["rc"] == 0 for s in steps) and all(
        r["ok"] for rows in gaussian.values() for r in rows
    )
    lines = [
        f"# gscfast GPU check: {'PASS' if ok else 'FAIL'}",
        "",
        f"Device: {device}; {'quick' if quick else 'full'} run; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "| step | result | wall s | log |",
        "| --- | --- | --- | --- |",
    ]
    for s in steps:
        result = "pass" if s["rc"] == 0 else f"FAIL ({s['rc']})"
        lines.append(f"| {s['name']} | {result} | {s['seconds']:.0f} | `{s['log']}` |")
    if gaussian:
        lines += [
            "",
            "## Gaussian study: GPU against CPU",
            "",
            f"Pooled GSC(l, 0): largest relative difference over l (tolerance {GSC_RTOL:g}); "
            f"pooled rate: absolute difference (tolerance {RATE_ATOL:g}).",
            "",
            "| backend | architecture | GSC rel. diff | rate diff | result |",
            "| --- | --- | --- | --- | --- |",
        ]
        for backend, rows in gaussian.items():
            for r in rows:
                lines.append(
                    f"| {backend} | {r['arch']} | {r['gsc_rel']:.2e} | {r['rate_abs']:.2e} "
                    f"| {'pass' if r['ok'] else 'FAIL'} |"
                )
    if bench is not None:
        lines += [
            "",
            "## W1-W4 against the floors",
            "",
            f"Checks against the reference backend: {'passed' if bench.get('checks_passed') else 'FAILED'} "
            f"(seed {bench.get('seed')}). Floors: useful FLOPs at this run's cuBLAS 8192^3 peak "
            "(sgemm or TF32), and the bytes of a layer-by-layer design (bench/gpu/README.md) at "
            + (
                f"the device-to-device copy bandwidth measured here, {bandwidth / 1e12:.2f} TB/s."
                if bandwidth
                else "an unmeasured bandwidth (not computed)."
            ),
            "",
            "| workload | B | backend | precision | median ms | TFLOP/s | compute floor ms "
            "| memory floor ms | x floor |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in bench_rows(bench, bandwidth):
            lines.append(
                f"| {r['workload']} | {r['B']} | {r['backend']} | {r['precision']} "
                f"| {_ms(r['median_s'])} | {r['tflops']:.2f} | {_ms(r['compute_floor_s'])} "
                f"| {_ms(r['memory_floor_s'])} | {r['x_floor']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def copy_bandwidth() -> float | None:
    """Bytes per second of a large device-to-device copy (read + write), the memory roof."""
    import torch

    a = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize()
    return 2 * 10 * a.numel() / (start.elapsed_time(end) / 1e3)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--out",
        default=str(ROOT / "results" / "gpu-check"),
        help="folder for report.md, logs and results (default results/gpu-check)",
    )
    ap.add_argument(
        "--quick", action="store_true", help="benchmark at 1/10 size, study on 10 datasets"
    )
    ap.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=("tests", "bench", "gaussian"),
        help="steps to leave out",
    )
    args = ap.parse_args(argv)
    try:
        import torch
    except ImportError:
        print(
            "no PyTorch in this Python: nothing to check here (scripts/gpu-check needs a CUDA GPU)"
        )
        return 0
    if not torch.cuda.is_available():
        print(
            f"no CUDA GPU here (torch {torch.__version__}: torch.cuda.is_available() is False): "
            "nothing to check; scripts/gpu-check runs the GPU checks on a machine with one"
        )
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name(0)
    print(f"GPU check on {device} into {out}", flush=True)
    py = sys.executable
    steps: list[dict] = []
    if "tests" not in args.skip:
        steps.append(
            step(
                "tests",
                [py, "-m", "pytest", "tests/gpu", "-m", "gpu", "-q", "-p", "no:cacheprovider"],
                out,
                300,
            )
        )
    bench = None
    bandwidth = copy_bandwidth()
    if "bench" not in args.skip:
        steps.append(
            step(
                "bench",
                [
                    py,
                    "bench/gpu/run.py",
                    "--json",
                    str(out / "bench.json"),
                    *(["--quick"] if args.quick else []),
                ],
                out,
                300,
            )
        )
        if (out / "bench.json").exists():
            bench = json.loads((out / "bench.json").read_text())
    gaussian: dict[str, list[dict]] = {}
    if "gaussian" not in args.skip:
        from gscfast.backends import available_backends

        size = ["--datasets", "10"] if args.quick else []
        common = [py, "-m", "gscfast", "gaussian", "--quiet", *size]
        cpu_dir = out / "gaussian-cpu"
        steps.append(
            step(
                "gaussian-cpu",
                [*common, "--out", str(cpu_dir), "--device", "cpu", "--resume"],
                out,
                600,
            )
        )
        for backend in [b for b in available_backends("cuda") if b in ("triton", "cupy")]:
            d = out / f"gaussian-{backend}"
            steps.append(
                step(
                    f"gaussian-{backend}",
                    [
                        *common,
                        "--out",
                        str(d),
                        "--device",
                        "cuda",
                        "--backend",
                        backend,
                        "--resume",
                    ],
                    out,
                    600,
                )
            )
            if (cpu_dir / "results.json").exists() and (d / "results.json").exists():
                gaussian[backend] = compare(
                    json.loads((cpu_dir / "results.json").read_text()),
                    json.loads((d / "results.json").read_text()),
                )
    text = report(device, steps, gaussian, bench, bandwidth, args.quick)
    (out / "report.md").write_text(text)
    print(text)
    return 0 if text.startswith("# gscfast GPU check: PASS") else 1


if __name__ == "__main__":
    sys.exit(main())
