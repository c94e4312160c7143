"""``bench/report.py`` on a hand-made result: the roof column, the best peer and its ratio, the
"gscfast >= 1.2x the best peer" target, the BLAS kernels and the loud OpenBLAS warning."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import report

BLAS = [
    {"owner": "numpy", "internal_api": "openblas", "version": "0.3.30", "architecture": "SkylakeX",
     "threading_layer": "pthreads", "num_threads": 2},
]  # fmt: skip


def bench(impl: str, t: float, gscfast: bool, env: dict) -> dict:
    return {
        "name": f"test_w1_gsc[tanh-{impl}]",
        "group": "W1 gsc tanh",
        "stats": {"min": t, "median": t},
        "extra_info": {
            "workload": "W1",
            "arch": "tanh",
            "impl": impl,
            "gscfast": gscfast,
            "flops": 1e9,
            "gflops": 1.0 / t,
            "sgemm_gflops": 10.0,
            "sgemm_session_gflops": 8.0,
            "sgemm_library": "numpy",
            "time_s": t,
            "blas": BLAS,
            "openblas_env": env,
            **({"compile_s": 1.25} if impl.startswith("jax_") else {}),
        },
    }


def write(tmp_path, env: dict) -> str:
    data = {
        "machine_info": {"cpu": {"brand_raw": "CPU", "count": 2}, "python_version": "3"},
        "datetime": "now",
        "benchmarks": [
            bench("auto", 0.10, True, env),
            bench("torch", 0.12, True, env),
            bench("autograd", 0.30, False, env),
            bench("jax_vjp", 0.15, False, env),
            bench("jax_grad", 0.20, False, env),
        ],
    }
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize("env_set", [False, True])
def test_report_marks_best_peer_roof_and_kernels(tmp_path, capsys, env_set):
    env = {"OPENBLAS_CORETYPE": "Haswell" if env_set else None, "OPENBLAS_L2_SIZE": None}
    report.main(write(tmp_path, env))
    out = capsys.readouterr().out
    assert "x sgemm" not in out and "| x roof |" in out
    # the roof is the better of the two sgemm measurements: 10 GFLOP/s; auto at 10 GFLOP/s
    assert "| auto | 0.1 | 10.0 | 1.00 | 1.00x |" in out
    # the fastest non-gscfast row (torch is gscfast's backend, not a peer) is the best peer
    assert (
        "| jax_vjp | 0.15 | 6.7 | 0.67 | 1.50x | **best peer**: gscfast 1.50x faster; "
        "compile 1.25 s, not timed |"
    ) in out
    assert out.count("best peer**") == 1
    assert "| W1 tanh | >= 1.2x faster than best_peer (jax_vjp) | 1.50x | yes |" in out
    assert "- W1 gsc tanh, jax_vjp: 1.25 s (tracing and XLA compilation, not timed)" in out
    assert "| jax_grad | 0.2 | 5.0 | 0.50 | 2.00x | compile 1.25 s, not timed |" in out
    assert "BLAS: numpy openblas 0.3.30 SkylakeX pthreads x2" in out
    assert ("WARNING: OPENBLAS_CORETYPE=Haswell was set" in out) == env_set
    assert ("OPENBLAS_CORETYPE unset" in out) == (not env_set)


@pytest.mark.parametrize("compile_s", [11.8, 15.5])
def test_report_cold_start_target(tmp_path, capsys, compile_s):
    """The tiny Gaussian run's compile part (``test_compile.py``) is checked against 15 s."""
    cold = {"workload": "GAUSSIAN-FIRST", "impl": "numba", "cache": "cold"}
    cold.update(seconds=compile_s + 5.1, warm_seconds=5.1, compile=compile_s)
    data = {
        "machine_info": {"cpu": {"brand_raw": "CPU", "count": 2}, "python_version": "3"},
        "datetime": "now",
        "benchmarks": [
            {"name": "test_gaussian_first_result[cold]", "group": "gaussian first",
             "stats": {"min": compile_s + 5.1, "median": compile_s + 5.1}, "extra_info": cold},
        ],
    }  # fmt: skip
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(data))
    report.main(str(path))
    out = capsys.readouterr().out
    met = "yes" if compile_s <= 15 else "NO"
    assert f"result | {compile_s:.1f} s | {met} |" in out
    assert f"cold cache: {compile_s + 5.1:.1f} s, of which compiling {compile_s:.1f} s" in out


def test_the_gemm_bound_is_reported_apart_and_never_a_peer(tmp_path):
    """The W1 sweep's GEMMs alone (``bench/gemmbound.py``) get their own table, gscfast's time
    against theirs, and never stand as a peer even where they are the fastest row."""
    path = write(tmp_path, {})
    data = json.loads(Path(path).read_text())
    b = bench("gemm_bound", 0.05, False, {})
    b["group"] = "W1 GEMM bound"
    b["extra_info"].update(workload="W1-BOUND", arch=None, tile=100)
    data["benchmarks"].append(b)
    rs = report.rows(data)
    text = report.bounds(rs)
    assert "50.0 ms" in text and "tiles of 100 samples" in text
    assert "| tanh | 0.1 | 1.00 | 0.50 |" in text, text  # 10 GFLOP/s against a roof of 10
    assert report.best_peer([r for r in rs if r["impl"] in ("auto", "gemm_bound")]) is None
    assert report.best_peer(rs)["impl"] == "jax_vjp"
