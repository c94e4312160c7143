"""The numba kernels' GEMM alone: their own (``gscfast/backends/_gemm.py``, B packed once) against
OpenBLAS (``np.dot`` from compiled code, one thread each), on the products the kernels run:
``[rows, 100] x [100, 100]`` per tile (W1-W3) and ``[rows, 200] x [200, 100]`` (the coupled
effective depth's step), float32 and float64, each thread repeating the product on its own
tile (operands in its cache), and W1's pattern (fresh weights every product) in ``gemmbound.py``.
Rows: ``own`` and ``openblas``, the row counts of each one's tiles (``tile``)."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from benchlib import SCALE, run_checked
from numba import njit

from gscfast.backends import _gemm, numba_backend
from gscfast.backends import _numba_kernels as kernels

SHAPES = [(100, 100), (200, 100)] if SCALE == "full" else [(20, 10)]
TILES = [100, 256, 512] if SCALE == "full" else [16]
FLOP = 4e9 if SCALE == "full" else 1e6  # per timed call, over all threads


@njit(nogil=True)
def _repeat(th, nth, a, b, c, reps):
    for _ in range(reps):
        _gemm.mul(a[th], b, c[th])  # the own GEMM where b is packed, else OpenBLAS


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("rows", TILES)
@pytest.mark.parametrize("impl", ["own", "openblas"])
def test_gemm_tiles(benchmark, sgemm_session, impl, rows, k, n, dtype):
    if impl == "own" and not _gemm.AVAILABLE:
        pytest.skip("the CPU has no AVX-512: the kernels run OpenBLAS")
    nth = numba.get_num_threads()
    rng = np.random.default_rng(0)
    a = rng.standard_normal((nth, rows, k)).astype(dtype)
    b = rng.standard_normal((k, n)).astype(dtype)
    c = np.zeros((nth, rows, n), dtype)
    reps = max(1, int(FLOP / (2 * rows * k * n * nth)))
    bp = _gemm.pack(b) if _gemm.AVAILABLE else b.ravel()

    def run():
        with numba_backend.single_threaded_blas():
            kernels.launch(_repeat, nth, a, bp if impl == "own" else b, c, np.int64(reps))
        return c

    def check(out):
        ref = np.einsum("trk,kn->trn", a.astype(np.float64), b.astype(np.float64))
        tol = 1e-4 if dtype == "float32" else 1e-12
        assert np.abs(out - ref).max() <= tol * np.abs(ref).max()

    benchmark.group = f"GEMM tiles [rows, {k}] x [{k}, {n}] {dtype}"
    run_checked(
        benchmark,
        run,
        check=check,
        flops=2.0 * rows * k * n * nth * reps,
        rounds=5,
        sgemm=sgemm_session,
        workload="GEMM",
        impl=impl,
        arch=f"[{rows},{k}]x[{k},{n}]",
        dtype=dtype,
        tile=rows,
    )
