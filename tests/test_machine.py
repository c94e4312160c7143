"""gscfast.machine: the yardstick every FLOP floor and benchmark roof divides by."""

import pytest
import threadpoolctl

from gscfast.machine import gemm_rate


def test_the_rate_is_the_best_formulation_and_names_it():
    r = gemm_rate(300, 20, 30, threads=2, tile=64, reps=2)
    assert set(r.rates) == {"numpy", "numpy per thread", "torch"}
    assert r.flops == max(r.rates.values()) == r.rates[r.library]
    assert all(v > 0 for v in r.rates.values()) and r.device == "cpu"


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
