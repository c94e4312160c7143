"""Every benchmark of ``bench/`` at tiny sizes with timing disabled, so the suite cannot rot.

Runs ``pytest bench --benchmark-disable`` in a subprocess with ``GSCFAST_BENCH_SCALE=smoke``:
each benchmark still checks its result against the torch backend before it would be timed.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_benchmark_runs_at_smoke_size():
    pytest.importorskip("pytest_benchmark")
    env = dict(os.environ, GSCFAST_BENCH_SCALE="smoke")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            os.path.join(ROOT, "bench"),
            "-q",
            "--benchmark-disable",
            "-p",
            "no:cacheprovider",
            "-W",
            "ignore::pytest_benchmark.logger.PytestBenchmarkWarning",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-3000:]
    assert " passed" in out.stdout
