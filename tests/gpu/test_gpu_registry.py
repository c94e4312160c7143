"""Backend selection: ``backend="auto"`` picks triton on CUDA (cupy without triton, torch without
either) and never a GPU backend for CPU tensors, whatever test switches are on."""

from __future__ import annotations

import pytest
import torch

import gscfast
from gscfast import backends
from gscfast.backends import cupy_backend as cb
from gscfast.backends import triton_backend as tb


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("GSCFAST_BACKEND", raising=False)


def _usable(name: str) -> bool:
    return not isinstance(backends._load(name), str)


def test_auto_never_picks_a_gpu_backend_for_cpu_tensors(monkeypatch):
    monkeypatch.setattr(tb, "ALLOW_CPU", True)
    monkeypatch.setattr(cb, "HOST_EMULATION", True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    names = gscfast.available_backends("cpu")
    assert "triton" not in names and "cupy" not in names
    assert backends.get_backend("auto", "cpu").name not in ("triton", "cupy")
    for name in ("triton", "cupy"):
        if _usable(name):
            with pytest.raises(RuntimeError, match="does not run on cpu"):
                backends.get_backend(name, "cpu")


@pytest.mark.skipif(not _usable("triton"), reason="triton is not installed")
def test_auto_picks_triton_on_cuda():
    assert gscfast.available_backends("cuda")[0] == "triton"
    assert backends.get_backend("auto", torch.device("cuda")).name == "triton"


def test_auto_picks_cupy_then_torch_without_triton(monkeypatch):
    monkeypatch.setitem(backends._loaded, "triton", "triton is missing (simulated)")
    want = "cupy" if _usable("cupy") else "torch"
    assert backends.get_backend("auto", "cuda").name == want
    monkeypatch.setitem(backends._loaded, "cupy", "cupy is missing (simulated)")
    assert backends.get_backend("auto", "cuda").name == "torch"


def test_priorities():
    assert tb.TritonBackend.priority > cb.CupyBackend.priority > backends._load("torch").priority


def test_reasons_name_the_package(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "triton" else real(n, *a)
    )
    assert "pip install" in tb.TritonBackend.unavailable_reason()
    monkeypatch.setattr(cb, "kernel_sources", lambda: [])
    reason = cb.CupyBackend.unavailable_reason()
    assert reason and ("cupy" in reason)
