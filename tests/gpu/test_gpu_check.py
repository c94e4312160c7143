"""scripts/gpu-check: without a GPU it says so and exits 0; its comparison and report logic."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu" / "check.py")
check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would run")
def test_without_a_gpu_it_says_so_and_exits_0(tmp_path):
    proc = subprocess.run(
        [str(ROOT / "scripts" / "gpu-check"), "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA GPU here" in proc.stdout and not (tmp_path / "r").exists()


def _results(gsc, rate):
    return {"archs": {"batch-ReLU": {"pooled": {"gsc": gsc}, "rate": {"pooled": rate}}}}


def test_gpu_numbers_are_compared_with_the_cpu_run():
    cpu = _results([1.0, 2.0, 1e7], 1.42)
    same = check.compare(cpu, _results([1.0, 2.0 * (1 + 1e-4), 1e7 * (1 - 1e-4)], 1.42 + 1e-5))
    assert same[0]["ok"] and same[0]["gsc_rel"] == pytest.approx(1e-4)
    off = check.compare(cpu, _results([1.0, 2.0, 1.1e7], 1.42))
    assert not off[0]["ok"] and off[0]["gsc_rel"] == pytest.approx(0.1)
    missing = check.compare(cpu, {"archs": {}})
    assert not missing[0]["ok"]


def test_report_gives_pass_or_fail_and_the_floors():
    steps = [{"name": "tests", "rc": 0, "seconds": 12.0, "log": "tests.log"}]
    bench = {
        "checks_passed": True,
        "seed": 1,
        "gemm": [{"tf32": False, "tflops": 50.0}, {"tf32": True, "tflops": 400.0}],
        "timings": [
            {
                "workload": "W1",
                "B": 10_000,
                "backend": "triton",
                "precision": "fp32",
                "median_s": 1e-3,
                "tflops": 19.8,
                "flops": 1.98e10,
            }
        ],
    }
    good = {"triton": check.compare(_results([1.0, 2.0], 1.4), _results([1.0, 2.0], 1.4))}
    text = check.report("NVIDIA H200", steps, good, bench, 4e12, quick=False)
    assert text.startswith("# gscfast GPU check: PASS")
    row = check.bench_rows(bench, 4e12)[0]
    # W1: 1.98e10 FLOPs at 50 TFLOP/s = 0.396 ms; 1.59 GB at 4 TB/s = 0.3975 ms: the larger counts
    assert row["compute_floor_s"] == pytest.approx(3.96e-4) and row[
        "memory_floor_s"
    ] == pytest.approx(3.975e-4)
    assert row["x_floor"] == pytest.approx(1e-3 / 3.975e-4)
    assert "| W1 | 10000 | triton | fp32 | 1 | 19.80 | 0.396 | 0.398 | 2.5 |" in text
    failed = check.report("NVIDIA H200", [{**steps[0], "rc": 1}], {}, None, None, quick=True)
    assert failed.startswith("# gscfast GPU check: FAIL") and "| tests | FAIL (1) |" in failed
