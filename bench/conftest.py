"""Fixtures of the benchmark suite (helpers in ``benchlib.py``).

Run: ``pytest bench/ --benchmark-only --benchmark-json=results/bench.json`` then
``python bench/report.py results/bench.json``. ``GSCFAST_BENCH_SCALE=smoke`` for tiny sizes.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import benchlib


@pytest.fixture(scope="session")
def sgemm_session() -> dict:
    """sgemm GFLOP/s measured once at the start of the run (each benchmark also measures it
    right before its own timing)."""
    return benchlib.measure_sgemm()


@pytest.fixture(scope="session")
def expected() -> dict:
    """Results computed once per run and shared between benchmarks (the correctness checks)."""
    return {}


def pytest_benchmark_update_machine_info(config, machine_info):
    """The BLAS kernels loaded (threadpoolctl) and the OpenBLAS variables, in the JSON's machine
    info (each benchmark's ``extra_info`` has them too, from ``measure_sgemm``)."""
    machine_info["blas"] = benchlib.blas_info()
    machine_info["openblas_env"] = benchlib.openblas_env()


def pytest_report_header(config):
    return (
        f"gscfast bench: scale={benchlib.SCALE}, backends={benchlib.BACKENDS}, "
        f"torch threads={torch.get_num_threads()}"
    )
