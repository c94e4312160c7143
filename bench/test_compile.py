"""First-call cost of the numba kernels, reported apart from the workloads.

- ``test_numba_compile[cold]``: every kernel for float32 and float64 compiled into an empty cache
  (``GSCFAST_CACHE`` pointed at a new folder, see ``backends/numba_cache.py``);
  ``[warm]``: the same loaded from the user's cache (filled first if need be). Seconds per kernel
  and dtype in ``extra_info["kernels"]`` (``numba_backend.compile_times``), their sum in
  ``extra_info["seconds"]``; process start excluded.
- ``test_gaussian_first_result[cold]``: what a user waits for the first result of ``gscfast
  gaussian``: a tiny run of all seven architectures (float32) in a new process with an empty
  cache, then the same run again with the cache it filled; ``extra_info["compile"]`` is the
  difference (what compiling costs before the first result). ``[warm]``: the tiny run with the
  user's cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import pytest
from benchlib import BACKENDS, SMOKE

CODE = (
    "import json, torch; "
    "from gscfast.backends.numba_backend import compile_times; "
    "print(json.dumps(compile_times()))"
)
# all seven paper architectures, tiny: the job's work is negligible beside compiling
GAUSSIAN = ["--datasets", "1", "--samples", "16", "--depth", "3", "--width", "8"]


def _env(cache_dir: str | None) -> dict[str, str]:
    env = dict(os.environ)
    if cache_dir is not None:
        env["GSCFAST_CACHE"] = cache_dir
    return env


def _compile_times(cache_dir: str | None) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", CODE],
        capture_output=True,
        text=True,
        env=_env(cache_dir),
        timeout=1800,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _gaussian(cache_dir: str | None) -> float:
    """Seconds for the tiny gaussian run in a new process, process start included."""
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        res = subprocess.run(
            [sys.executable, "-m", "gscfast", "gaussian", *GAUSSIAN, "--out", out, "--quiet"]
            + ["--backend", "numba", "--device", "cpu"],
            capture_output=True,
            text=True,
            env=_env(cache_dir),
            timeout=1800,
        )
        seconds = time.perf_counter() - t0
    assert res.returncode == 0, res.stderr[-3000:]
    return seconds


needs_numba = pytest.mark.skipif("numba" not in BACKENDS, reason="numba backend not available")
cold_is_slow = "cold compilation does not depend on sizes (minutes); measured in full runs"


@needs_numba
@pytest.mark.parametrize("cache", ["cold", "warm"])
def test_numba_compile(benchmark, cache):
    benchmark.group = "numba first call (float32 + float64, all kernels)"
    if cache == "cold" and SMOKE:
        pytest.skip(cold_is_slow)
    res: dict[str, float] = {}
    if cache == "warm":  # the user's cache (numba_cache), filled first if need be
        _compile_times(None)
        benchmark.pedantic(lambda: res.update(_compile_times(None)), rounds=1, iterations=1)
    else:
        with tempfile.TemporaryDirectory() as d:
            benchmark.pedantic(lambda: res.update(_compile_times(d)), rounds=1, iterations=1)
    benchmark.extra_info.update(
        workload="COMPILE", impl="numba", cache=cache, kernels=res, seconds=sum(res.values())
    )


@needs_numba
@pytest.mark.parametrize("cache", ["cold", "warm"])
def test_gaussian_first_result(benchmark, cache):
    benchmark.group = "gscfast gaussian, 7 architectures, tiny (process start included)"
    if cache == "cold" and SMOKE:
        pytest.skip(cold_is_slow)
    res: dict[str, float] = {}
    if cache == "warm":
        _gaussian(None)
        benchmark.pedantic(lambda: res.update(seconds=_gaussian(None)), rounds=1, iterations=1)
    else:
        with tempfile.TemporaryDirectory() as d:
            benchmark.pedantic(lambda: res.update(seconds=_gaussian(d)), rounds=1, iterations=1)
            res["warm_seconds"] = _gaussian(d)  # the same cache, now filled
        res["compile"] = res["seconds"] - res["warm_seconds"]
    benchmark.extra_info.update(workload="GAUSSIAN-FIRST", impl="numba", cache=cache, **res)
