"""bench/gpu/run.py's own code, run on the CPU at toy sizes (its GPU run cannot happen here):
the random-model checks through each backend's CPU test mode, the workload runners, the FLOP counts."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from gscfast.backends import cupy_backend as cb
from gscfast.backends import triton_backend as tb

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "gsc_bench_gpu", ROOT / "bench" / "gpu" / "run.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_checks_on_cpu(bench, monkeypatch):
    names = ["torch"]
    monkeypatch.setattr(cb, "HOST_EMULATION", True)
    from gscfast.backends import _gpu_host

    if _gpu_host.compiler() is not None and cb.CupyBackend.unavailable_reason() is None:
        names.append("cupy")
    recs = bench.check(names, seed=1234, n_models=1, device="cpu", max_width=20)
    assert recs and all(not r["errors"] for r in recs), [r["errors"] for r in recs]
    if "cupy" in names:
        assert all(r["fused"] for r in recs if r["backend"] == "cupy")


def test_checks_on_cpu_triton(bench):
    if importlib.util.find_spec("triton") is None or not tb.interpreter_ready():
        pytest.skip("needs triton importable in interpreter mode")
    with tb.interpret_on_cpu():
        recs = bench.check(["triton"], seed=99, n_models=1, device="cpu", max_width=20)
    assert all(not r["errors"] and r["fused"] for r in recs), recs


def test_workload_runners_and_flops(bench, monkeypatch):
    monkeypatch.setattr(bench, "DEPTH", 3)
    monkeypatch.setattr(bench, "WIDTH", 6)
    model, init = bench.make_model("tanh-layer", 0, "cpu"), bench.make_model("tanh-layer", 1, "cpu")
    xs, ys = [torch.randn(4, 6)], [torch.randn(4, 6)]
    for w in ("W1", "W2", "W3", "W4"):
        bench.runner(w, "torch", model, init, xs, ys)(0)
    # the FLOP formulas against counts by hand at L = 3, d = 6, B = 4
    L, d, B = 3, 6, 4
    fwd = B * L * 2 * d * d
    assert bench.flops("W1", B) == fwd + B * 2 * 2 * d * d
    assert bench.flops("W2", B) == fwd + B * (2 + 1 + 0) * 2 * d**3 + B * 2 * 2 * d * d
    assert bench.flops("W3", B) == fwd + B * 3 * 2 * d**3
    assert bench.flops("W4", B) == 2 * fwd + B * (1 + 2) * 2 * 2 * d * d


def test_refuses_without_gpu(bench, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert bench.main(["--check-only"]) == 2
    assert "needs one" in capsys.readouterr().out
