"""The "triton" backend without a GPU.

- Interpreter: the real kernels run under ``TRITON_INTERPRET=1`` on CPU tensors and are compared
  with the reference backend in float64 and float32 (widths 5..70, not multiples of the blocks;
  forced 16-wide tiles so every loop runs several blocks; poisoned buffers; fallbacks).
- Compiler: the same kernels compiled ahead of time to SASS for sm_80 and sm_90 by Triton's own
  ptxas, in a separate process (``_triton_aot.py``): this catches what the interpreter accepts but
  the compiler rejects (non-constexpr globals, dtype rules, shared-memory limits).

Triton fixes its mode at import, so interpreting needs ``TRITON_INTERPRET=1`` before the first
``import triton`` (``conftest.py`` sets it on machines without CUDA). Where triton was already
imported compiled, the interpreter tests run again in a fresh process instead.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _gpu_cases import (
    cases,
    check_backend,
    check_overflow_refused,
    check_spans,
    fallback_cases,
    mixed_cases,
)

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (pip install 'triton>=3.0')", allow_module_level=True)

from gscfast.backends import triton_backend as tb

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DTYPES = [torch.float64, torch.float32]
SMALL_TILES = {
    "fwd": {"BM": 16, "BK": 16},
    "step": {"BM": 16, "BN": 16, "BK": 16},
    "contrib": {"BM": 16, "BN": 16, "BK": 16},
}


@pytest.fixture
def interp():
    if not tb.interpreter_ready():
        pytest.skip(
            "triton was imported compiled in this process: "
            "test_interpreter_in_fresh_process runs these tests"
        )
    with tb.interpret_on_cpu():
        yield tb.TritonBackend()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", cases(), ids=lambda c: c.id)
def test_kernels_match_reference(interp, case, dtype):
    assert interp.fused(case.to(dtype).problem()), "the fused kernels must take this case"
    check_backend(interp, case, dtype)


SMALL_TILE_CASES = [
    (c, dt)
    for c in cases()
    for name, dt in (("ln-affine-gelu-softplus-37", torch.float32), ("wide-70", torch.float64))
    if c.id == name
]


@pytest.mark.parametrize("case,dtype", SMALL_TILE_CASES, ids=lambda v: getattr(v, "id", str(v)))
def test_small_tiles(interp, case, dtype, monkeypatch):
    """16-wide tiles: widths 37/70 take 3-5 blocks in every loop (K steps, column blocks, rows)."""
    monkeypatch.setattr(tb, "FORCE_CONFIG", SMALL_TILES)
    check_backend(interp, case, dtype, methods=("sweep", "chain", "jacobian", "contributions"))


@pytest.mark.parametrize("case", fallback_cases(), ids=lambda c: c.id)
def test_fallback_is_the_torch_path(interp, case):
    assert not interp.fused(case.problem())
    check_backend(interp, case, torch.float64, methods=("sweep", "chain"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", mixed_cases(), ids=lambda c: c.id)
def test_spans_run_on_the_kernels(interp, case, dtype):
    check_spans(interp, case, dtype)


def test_cpu_needs_the_switch():
    be = tb.TritonBackend()
    assert not tb.TritonBackend.supports(torch.device("cpu"))
    assert not be._device_ok(torch.device("cpu"))  # ALLOW_CPU is off outside interpret_on_cpu()
    assert tb.TritonBackend.supports(torch.device("cuda"))


def test_interpreter_in_fresh_process():
    """Where this process cannot interpret (triton imported compiled), run the tests above in a
    fresh one with TRITON_INTERPRET=1."""
    if tb.interpreter_ready():
        pytest.skip("the interpreter tests ran in this process")
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(HERE / "test_gpu_triton.py"),
            "-k",
            "match_reference or small_tiles or fallback",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]


def test_compiles_for_sm80_and_sm90():
    """Every activation and norm variant of the forward kernel (small tiles, sm_90), and every
    kernel at its width-100 production tiles (float64 for sm_80, TF32 for sm_90), compile to SASS
    and fit the shared memory. ``GSCFAST_TRITON_COMPILE_ALL=1``: many more (slow)."""
    args = [sys.executable, str(HERE / "_triton_aot.py")]
    if os.environ.get("GSCFAST_TRITON_COMPILE_ALL") == "1":
        args.append("--all")
    # the script's folder, not cwd, heads sys.path: put this checkout first, or an installed
    # gscfast (another checkout's editable install) would be the one compiled
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=path)
    res = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3000)
    recs = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    bad = [r for r in recs if "error" in r or not r.get("fits")]
    assert recs and not bad and res.returncode == 0, bad or res.stderr[-4000:]
    assert {r.get("arch") for r in recs} >= {80, 90}
    assert {r["kind"] for r in recs} >= {"fwd", "step", "contrib", "autotune-fwd", "autotune-step"}


def test_overflowed_layer_norm_variance_is_refused(interp):
    check_overflow_refused(interp)
