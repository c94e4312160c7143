"""The numba kernels' own GEMM (``backends/_gemm.py``) against float64 numpy on random shapes:
row counts that are not a multiple of the micro-kernel's rows, more columns than one packed block,
more ``k`` than one block of ``KC``, row-strided views, empty sizes; and the numba backend on a
CPU without AVX-512, where the kernels call OpenBLAS instead (a process of its own)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("numba")
from gscfast.backends import _gemm

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
needs_own = pytest.mark.skipif(not _gemm.AVAILABLE, reason="the CPU has no AVX-512: np.dot runs")


def bound(a: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    """Elementwise bound of a dot product's rounding error: ``k eps |a| |b|`` (plus a tiny floor)."""
    k = a.shape[1]
    return (k + 2) * eps * (np.abs(a) @ np.abs(b)) + 1e-300


@needs_own
@SETTINGS
@given(
    m=st.integers(0, 41),
    k=st.one_of(st.integers(0, 40), st.integers(_gemm.KC - 3, 2 * _gemm.KC + 5)),
    n=st.integers(1, 2 * _gemm.block_cols(4) + 7),
    dtype=st.sampled_from([np.float32, np.float64]),
    pad=st.integers(0, 9),
    seed=st.integers(0, 2**32 - 1),
)
def test_mm_matches_float64(m, k, n, dtype, pad, seed):
    rng = np.random.default_rng(seed)
    # A and C as row-strided views of wider arrays (``pad`` columns more), B packed unaligned
    a = rng.standard_normal((m, k + pad)).astype(dtype)[:, :k]
    b = rng.standard_normal((k, n)).astype(dtype)
    c = np.full((m, n + pad), np.nan, dtype)[:, :n]
    off = int(rng.integers(0, 5))
    flat = np.full(off + _gemm.packed_len(k, n, a.itemsize), np.nan, dtype)
    _gemm.pack(b, flat[off:])
    _gemm.mm(a, flat, off, c)
    ref = a.astype(np.float64) @ b.astype(np.float64)
    assert not np.isnan(c).any()
    err = np.abs(c - ref)
    assert (err <= bound(a.astype(np.float64), b.astype(np.float64), np.finfo(dtype).eps)).all()


@needs_own
def test_mm_overwrites_and_refuses():
    a = np.ones((5, 3), np.float32)
    b = np.arange(6, dtype=np.float32).reshape(3, 2)
    c = np.full((5, 2), 7.0, np.float32)
    _gemm.mm(a, _gemm.pack(b), 0, c)  # C is overwritten, not added to
    assert (c == np.array([6.0, 9.0], np.float32)).all()
    with pytest.raises(ValueError, match="contiguous rows"):
        _gemm.mm(np.ones((3, 5), np.float32).T, _gemm.pack(b), 0, c)
    with pytest.raises(ValueError, match="do not match"):
        _gemm.mm(a, _gemm.pack(b)[:-1], 0, c)
    assert _gemm.aligned(10, np.float64).ctypes.data % _gemm.ALIGN == 0


CHECK = """
import json, torch, gscfast
from gscfast.backends import _gemm, numba_backend
torch.manual_seed(0)
m = gscfast.mlp(4, 23, act="tanh", norm="layer", in_features=17, out_features=5)
x, y = torch.randn(301, 17, dtype=torch.float64), torch.randn(301, 5, dtype=torch.float64)
m = m.double()
got = gscfast.gsc(m, x, y, backend="numba")
ref = gscfast.gsc(m, x, y, backend="torch")
print(json.dumps(dict(own=_gemm.AVAILABLE, own_tiles=numba_backend.own_gemm(),
                      err=float(((got - ref).abs() / ref.abs()).max()))))
"""


def test_numba_backend_without_avx512(tmp_path):
    """With numba generating code for an AVX2 CPU, the kernels run OpenBLAS's GEMM, and agree
    with the torch engine (a fresh process; its kernels compile into a cache of their own)."""
    env = dict(
        os.environ,
        NUMBA_CPU_NAME="haswell",
        NUMBA_CPU_FEATURES="+avx,+avx2,+fma,+sse4.2,+popcnt,+f16c,+bmi,+bmi2",
        GSCFAST_CACHE=str(tmp_path),
        PYTHONPATH=str(ROOT),
    )
    out = subprocess.run(
        [sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["own"] is False and res["own_tiles"] is False
    assert res["err"] < 1e-9
