"""gscfast.machine: the yardstick every FLOP floor and benchmark roof divides by."""

import pytest
import threadpoolctl

from gscfast.machine import gemm_rate


def test_the_rate_is_the_best_formulation_and_names_it(monkeypatch):
    from gscfast import machine

    monkeypatch.setattr(machine, "_own_gemm_tile", lambda k, n: None)
    r = gemm_rate(300, 20, 30, threads=2, tile=64, reps=2)
    assert set(r.rates) == {"numpy", "numpy per thread", "torch"}
    assert r.flops == max(r.rates.values()) == r.rates[r.library]
    assert all(v > 0 for v in r.rates.values()) and r.device == "cpu"


def test_small_tiles_are_timed_where_the_kernels_use_them(monkeypatch):
    """Where the numba kernels cut small tiles (OpenBLAS's unpacked small-matrix kernels), the
    rate includes their GEMMs run from compiled code on such tiles."""
    from gscfast import machine

    monkeypatch.setattr(machine, "_small_tile", lambda k, n: 16)
    monkeypatch.setattr(machine, "_own_gemm_tile", lambda k, n: None)
    r = gemm_rate(300, 20, 30, threads=2, tile=64, reps=2)
    assert set(r.rates) == {"numpy", "numpy per thread", "numba per thread, small tiles", "torch"}
    assert r.flops == max(r.rates.values())
    monkeypatch.setattr(machine, "_small_tile", lambda k, n: None)
    assert "numba per thread, small tiles" not in gemm_rate(300, 20, 30, threads=2, tile=64).rates


def test_no_small_tiles_without_numba(monkeypatch):
    from gscfast import machine
    from gscfast.backends import numba_backend

    monkeypatch.setattr(numba_backend, "small_gemm_kernels", lambda: True)
    monkeypatch.setattr(numba_backend, "_ROWS_SET", None)
    assert machine._small_tile(100, 100) == 100
    monkeypatch.setattr(
        numba_backend.NumbaBackend, "unavailable_reason", classmethod(lambda cls: "no numba")
    )
    assert machine._small_tile(100, 100) is None


def test_gemm_rows_computes_each_threads_first_tile():
    import numpy as np

    from gscfast.backends import _numba_kernels

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((100, 20)), rng.standard_normal((20, 30))
    c = np.full((100, 30), np.nan)
    _numba_kernels.gemm_rows(a, b, c, 16, 2)
    np.testing.assert_allclose(c[:32], a[:32] @ b, rtol=1e-12)  # tiles 0 (thread 0), 1 (thread 1)
    assert np.isnan(c[32:]).all()  # later tiles are never written: every product reuses the first
    from gscfast.backends import _gemm

    if _gemm.AVAILABLE:  # b packed: the kernels' own GEMM
        c[:] = np.nan
        _numba_kernels.gemm_rows(a, _gemm.pack(b), c, 16, 2)
        np.testing.assert_allclose(c[:32], a[:32] @ b, rtol=1e-12)
        assert np.isnan(c[32:]).all()


def test_one_thread_has_no_per_thread_formulation():
    assert set(gemm_rate(64, 8, 8, threads=1).rates) == {"numpy", "torch"}


def test_blas_threads_are_restored_after_the_per_thread_formulation():
    before = [lib["num_threads"] for lib in threadpoolctl.threadpool_info()]
    gemm_rate(200, 16, 16, threads=2, tile=32)
    assert [lib["num_threads"] for lib in threadpoolctl.threadpool_info()] == before


@pytest.mark.parametrize(
    "kw, what",
    [
        ({"m": 0}, "m must be"),
        ({"threads": 0}, "threads must be"),
        ({"tile": 0}, "tile must be"),
        ({"reps": True}, "reps must be"),
        ({"seconds": -1.0}, "seconds must be"),
        ({"device": "meta"}, "cannot time a GEMM on meta"),
    ],
)
def test_bad_arguments_are_refused(kw, what):
    args = {"m": 8, "k": 8, "n": 8, **kw}
    with pytest.raises(ValueError, match=what):
        gemm_rate(args.pop("m"), args.pop("k"), args.pop("n"), **args)


def test_the_own_gemm_is_timed_where_the_kernels_use_it(monkeypatch):
    """Where the numba kernels run their own GEMM (backends/_gemm.py), the rate includes it, in
    their tiles."""
    pytest.importorskip("numba")
    from gscfast import machine
    from gscfast.backends import _gemm

    if not _gemm.AVAILABLE:
        pytest.skip("the CPU has no AVX-512: the kernels run OpenBLAS")
    monkeypatch.setattr(machine, "_own_gemm_tile", lambda k, n: 16)
    r = gemm_rate(300, 20, 30, threads=2, tile=64, reps=2)
    assert "gscfast per thread" in r.rates and r.flops == max(r.rates.values())
    monkeypatch.setattr(machine, "_own_gemm_tile", lambda k, n: None)
    assert "gscfast per thread" not in gemm_rate(300, 20, 30, threads=2, tile=64).rates


def test_fma_peak_runs_and_refuses_bad_input():
    pytest.importorskip("numba")
    import torch

    from gscfast.machine import fma_peak

    assert fma_peak(threads=1, reps=1) > 0
    assert fma_peak(torch.float64, threads=2, reps=1) > 0
    with pytest.raises(ValueError, match="dtype"):
        fma_peak(torch.int32)
    with pytest.raises(ValueError, match="threads"):
        fma_peak(threads=0)
