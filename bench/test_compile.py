"""First-call cost of the numba kernels, reported apart from the workloads: compiling every
kernel for float32 and float64 into an empty cache, and loading them from the cache."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest
from benchlib import BACKENDS, SMOKE

CODE = (
    "import time, torch; t0 = time.perf_counter(); "
    "from gscfast.backends.numba_backend import warmup; warmup(); "
    "print(time.perf_counter() - t0)"
)


def _warmup(cache_dir: str | None) -> float:
    env = dict(os.environ)
    if cache_dir is not None:
        env["NUMBA_CACHE_DIR"] = cache_dir
    out = subprocess.run(
        [sys.executable, "-c", CODE], capture_output=True, text=True, env=env, timeout=1800
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif("numba" not in BACKENDS, reason="numba backend not available")
@pytest.mark.parametrize("cache", ["cold", "warm"])
def test_numba_compile(benchmark, cache):
    benchmark.group = "numba first call (float32 + float64, all kernels)"
    if cache == "cold" and SMOKE:
        pytest.skip("cold compilation does not depend on sizes (minutes); measured in full runs")
    res = {}
    if cache == "warm":  # numba's usual cache (next to the sources), filled first if need be
        _warmup(None)
        benchmark.pedantic(lambda: res.update(seconds=_warmup(None)), rounds=1, iterations=1)
    else:
        with tempfile.TemporaryDirectory() as d:
            benchmark.pedantic(lambda: res.update(seconds=_warmup(d)), rounds=1, iterations=1)
    benchmark.extra_info.update(workload="COMPILE", impl="numba", cache=cache, **res)
