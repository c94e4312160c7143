"""The "cupy" backend's CUDA sources without a GPU.

- Host emulation: ``kernels/*.cu`` built for the host with ``-DGSC_HOST`` (``kernels/common/
  block.cuh`` runs each block's threads phase by phase between barriers) and driven by the real
  ``CupyBackend`` on CPU tensors, compared with the reference backend in float64 and float32.
- Compilation for sm_80 and sm_90: nvcc directly, ``cupy.cuda.compiler.compile_using_nvcc``, NVRTC
  with the options ``CudaModule`` uses at run time, and the CMake project's test list.
- The launch glue (``CudaModule``) against a stand-in for ``cupy``: names, options, argument types.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import types
from pathlib import Path

import numpy as np
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

from gscfast.backends import _gpu_host
from gscfast.backends import cuda_sources as cs
from gscfast.backends import cupy_backend as cb
from gscfast.backends.cuda_sources import Flag, codes_header
from gscfast.backends.lowering import Act, Norm
from gscfast.io import cache_dir

ROOT = Path(__file__).resolve().parents[2]
KDIR = ROOT / "kernels"
SOURCES = sorted(KDIR.glob("*.cu"))
DTYPES = [torch.float64, torch.float32]
ARCHS = [80, 90]
nvcc = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(
    nvcc is None, reason="nvcc is not on PATH (install the CUDA toolkit)"
)
needs_cxx = pytest.mark.skipif(
    _gpu_host.compiler() is None,
    reason="no C++ compiler (g++/clang++) for the host build of kernels/*.cu",
)


def test_sources_present():
    assert {p.stem for p in SOURCES} >= {"layer_fwd", "chain_step", "contrib_step"}


# ----------------------------------------------------------------------------- host emulation


@pytest.fixture
def host(monkeypatch):
    if _gpu_host.compiler() is None:
        pytest.skip("no C++ compiler (g++/clang++) for the host build of kernels/*.cu")
    monkeypatch.setattr(cb, "HOST_EMULATION", True)
    return cb.CupyBackend()


def test_overflowed_layer_norm_variance_is_refused(host):
    check_overflow_refused(host)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", cases(), ids=lambda c: c.id)
def test_cuda_source_matches_reference(host, case, dtype):
    assert host.fused(case.to(dtype).problem()), "the fused kernels must take this case"
    check_backend(host, case, dtype)


@pytest.mark.parametrize("case", fallback_cases(), ids=lambda c: c.id)
def test_fallback_is_the_torch_path(host, case):
    assert not host.fused(case.problem())
    check_backend(host, case, torch.float64, methods=("sweep", "chain"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", mixed_cases(), ids=lambda c: c.id)
def test_spans_run_on_the_kernels(host, case, dtype):
    check_spans(host, case, dtype)


def test_cpu_needs_the_switch():
    assert not cb.CupyBackend.supports(torch.device("cpu"))
    assert not cb.CupyBackend()._device_ok(torch.device("cpu"))
    assert cb.CupyBackend.supports(torch.device("cuda"))


# ----------------------------------------------------------------------------- consistency


def _enum(text: str, prefix: str) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(rf"\b({prefix}[A-Z_0-9]+)\s*=\s*(\d+)", text)}


def test_codes_agree_with_python():
    text = (KDIR / "common" / "codes.cuh").read_text()
    acts, norms, flags = _enum(text, "ACT_"), _enum(text, "NORM_"), _enum(text, "F_")
    assert acts and norms and flags
    assert acts == {f"ACT_{m.name}": int(m) for m in Act}
    assert norms == {f"NORM_{m.name}": int(m) for m in Norm}
    assert flags == {f"F_{m.name}": int(m) for m in Flag}


def test_codes_header_is_generated():
    """``kernels/common/codes.cuh`` is what ``scripts/gen-codes`` writes from the Python codes."""
    assert (KDIR / "common" / "codes.cuh").read_text() == codes_header(), (
        "kernels/common/codes.cuh differs from the Python codes: run scripts/gen-codes"
    )


def test_entry_signatures_agree_with_python():
    """Each entry point's parameters (pointers, then long longs) as ``SIGNATURES`` says: the host
    launcher passes arguments by these, so a mismatch would be silent."""
    seen = set()
    for src in SOURCES:
        text = src.read_text().replace("\\\n", " ")
        (params,) = re.findall(r"void NAME\(([^)]*)\)", text)
        kinds = "".join("p" if "*" in p else "i" for p in params.split(","))
        for name in re.findall(r"^GSC_\w+\((gsc_\w+), \w+, \d+\)", text, re.M):
            base = name.rsplit("_", 1)[0]
            assert cs.SIGNATURES[base] == kinds, name
            seen.add(base)
    assert seen == set(cs.SIGNATURES)


# ----------------------------------------------------------------------------- compile


@needs_nvcc
@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.name)
def test_nvcc_sm80_sm90(src, tmp_path):
    out = tmp_path / f"{src.stem}.fatbin"
    cmd = [nvcc, "-std=c++17", f"-I{KDIR}", "-fatbin", "-o", str(out), str(src)]
    cmd[1:1] = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert out.stat().st_size > 0


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.name)
def test_cupy_compile_using_nvcc(src, arch):
    compiler = pytest.importorskip("cupy.cuda.compiler", reason="cupy is not installed")
    cubin = compiler.compile_using_nvcc(
        src.read_text(),
        options=("-std=c++17", f"-I{KDIR}"),
        arch=str(arch),
        filename=src.name,
        code_type="cubin",
    )
    assert len(cubin) > 0


def _nvrtc():
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
        return nvrtc
    except Exception as e:  # no cupy, or no libnvrtc (pip install nvidia-cuda-nvrtc)
        pytest.skip(f"NVRTC is not usable here ({type(e).__name__}: {str(e)[:120]})")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.name)
def test_nvrtc_runtime_path(src, arch):
    """What ``CudaModule`` does without a fatbin: NVRTC with ``-std=c++17 -I kernels`` (the
    architecture given here, as no device can be asked)."""
    nvrtc = _nvrtc()
    prog = nvrtc.createProgram(src.read_text(), src.name, [], [])
    try:
        nvrtc.compileProgram(prog, ["-std=c++17", f"-I{KDIR}", f"--gpu-architecture=sm_{arch}"])
    except Exception:
        pytest.fail(nvrtc.getProgramLog(prog))
    assert len(nvrtc.getCUBIN(prog)) > 0


@pytest.mark.skipif(
    shutil.which("cmake") is None or shutil.which("ctest") is None,
    reason="cmake/ctest are not installed",
)
@needs_nvcc
def test_cmake_declares_a_compile_test_per_kernel_and_arch(tmp_path):
    res = subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(tmp_path)], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stdout + res.stderr
    res = subprocess.run(
        ["ctest", "-N", "--test-dir", str(tmp_path)], capture_output=True, text=True
    )
    names = set(re.findall(r"Test\s+#\d+: (\S+)", res.stdout))
    for src in SOURCES:
        for a in ARCHS:
            assert f"compile_{src.stem}_sm{a}" in names, res.stdout


# ----------------------------------------------------------------------------- launch glue


class _FakeCupy(types.SimpleNamespace):
    """Records what ``CudaModule`` asks of cupy (no GPU needed)."""


def _fake_cupy(calls):
    class RawModule:
        def __init__(self, code=None, path=None, options=()):
            calls.append(("module", path, options, code is not None))

        def get_function(self, name):
            return lambda grid, block, args: calls.append(("launch", name, grid, block, args))

    class _Ctx:
        def __init__(self, *a):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    cuda = types.SimpleNamespace(Device=_Ctx, ExternalStream=_Ctx)
    return _FakeCupy(RawModule=RawModule, asarray=lambda t: ("array", tuple(t.shape)), cuda=cuda)


@pytest.mark.parametrize("with_fatbin", [False, True])
def test_cuda_module_glue(monkeypatch, tmp_path, with_fatbin):
    calls = []
    mod = cb.CudaModule.__new__(cb.CudaModule)
    mod.cupy, mod._mods, mod._fns = _fake_cupy(calls), {}, {}
    if with_fatbin:
        (tmp_path / "chain_step.fatbin").write_bytes(b"\0")
    monkeypatch.setenv("GSCFAST_FATBIN_DIR", str(tmp_path))
    monkeypatch.setattr(
        torch.cuda, "current_stream", lambda dev=None: types.SimpleNamespace(cuda_stream=0)
    )
    v = torch.zeros(3, 4)
    mod.launch("gsc_chain_step_f32", 5, 256, (v, 7, 2))
    kind, path, options, from_code = calls[0]
    assert kind == "module"
    if with_fatbin:
        assert path == str(tmp_path / "chain_step.fatbin") and not from_code
    else:
        assert from_code and "-std=c++17" in options and f"-I{cb.kernel_dir()}" in options
    _, name, grid, block, args = calls[1]
    assert (name, grid, block) == ("gsc_chain_step_f32", (5,), (256,))
    assert args[0] == ("array", (3, 4)) and all(isinstance(a, np.int64) for a in args[1:])


def test_cache_dir_and_fatbin_dir(monkeypatch, tmp_path):
    """Builds go to the user's cache (``GSCFAST_CACHE``, else XDG's, else ``~/.cache``); fatbins
    are looked for in CMake's ``build/kernels`` of a checkout, else in that cache: never beside an
    installed package."""
    for name in ("GSCFAST_CACHE", "XDG_CACHE_HOME", "GSCFAST_FATBIN_DIR", cs.ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "gscfast"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "gscfast"
    monkeypatch.setenv("GSCFAST_CACHE", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache"
    assert cb.fatbin_dir() == ROOT / "build" / "kernels"  # this checkout's sources
    (tmp_path / "k").mkdir()
    (tmp_path / "k" / "layer_fwd.cu").write_text("")
    monkeypatch.setenv(cs.ENV, str(tmp_path / "k"))  # sources elsewhere, as in an installation
    assert cb.fatbin_dir() == tmp_path / "cache" / "fatbin"
    monkeypatch.setenv("GSCFAST_FATBIN_DIR", str(tmp_path / "fb"))
    assert cb.fatbin_dir() == tmp_path / "fb"
