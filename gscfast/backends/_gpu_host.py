"""Run the CUDA kernels of ``kernels/*.cu`` on the host: a C++ build with ``-DGSC_HOST``.

``kernels/common/block.cuh`` turns every kernel into a host function that loops over the grid and,
within a block, runs each phase for all threads in turn (see that header for exactly what this
covers). This module compiles all kernel sources into one shared library with the system C++
compiler (``CXX``, else ``g++``/``c++``/``clang++``), caches it by content hash (in
``GSCFAST_HOST_BUILD``, else ``gscfast.io.cache_dir()/host``), and calls the
``extern "C"`` entry points through ``ctypes`` on CPU tensors, with the same arguments the
``"cupy"`` backend passes on the GPU. The tests use it to check the numbers the CUDA source
computes without a GPU.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import torch

from ..io import cache_dir
from .cuda_sources import SIGNATURES, kernel_dir, kernel_sources, missing_reason

FLAGS = (
    "-O2",
    "-std=c++17",
    "-shared",
    "-fPIC",
    "-DGSC_HOST",
    "-fvisibility=hidden",
    "-ffp-contract=off",
)


def compiler() -> str | None:
    """The C++ compiler to use, or None if there is none."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def unavailable_reason() -> str | None:
    if compiler() is None:
        return (
            "no C++ compiler (set CXX or install g++) to build the host emulation of kernels/*.cu"
        )
    if not kernel_sources():
        return missing_reason()
    return None


def build(out_dir: str | os.PathLike | None = None) -> Path:
    """Compile (or reuse) the host library of every ``kernels/*.cu``; returns its path."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError(unavailable_reason())
    kdir = kernel_dir()
    sources = kernel_sources()
    unity = "".join(f'#include "{p.name}"\n' for p in sources)
    unity += (
        'extern "C" __attribute__((visibility("default"))) void gsc_host_launch('
        "long long grid, long long block) {\n"
        "  gsc::launch_config().grid = grid;\n"
        "  gsc::launch_config().block = int(block);\n}\n"
    )
    h = hashlib.sha256(unity.encode())
    for p in sorted(kdir.rglob("*")):
        if p.suffix in (".cu", ".cuh", ".h") and p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    h.update(" ".join((cxx,) + FLAGS).encode())
    out_dir = Path(out_dir or os.environ.get("GSCFAST_HOST_BUILD") or cache_dir() / "host")
    out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / f"gsckernels-{h.hexdigest()[:16]}.so"
    if lib.exists():
        return lib
    src = out_dir / f"unity-{h.hexdigest()[:16]}.cpp"
    src.write_text(unity)
    tmp = lib.with_suffix(f".{os.getpid()}.tmp")
    cmd = [cxx, *FLAGS, "-x", "c++", f"-I{kdir}", str(src), "-o", str(tmp)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"host build of kernels/*.cu failed:\n{' '.join(cmd)}\n{res.stderr}")
    os.replace(tmp, lib)
    return lib


class HostModule:
    """The host library with the launch interface of ``cupy_backend.CudaModule``."""

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.lib = ctypes.CDLL(str(path or build()))
        self.lib.gsc_host_launch.argtypes = [ctypes.c_longlong, ctypes.c_longlong]
        self._fns: dict[str, object] = {}

    def function(self, name: str):
        if name not in self._fns:
            fn = getattr(self.lib, name)
            sig = SIGNATURES[name.rsplit("_", 1)[0]]
            fn.argtypes = [ctypes.c_void_p if c == "p" else ctypes.c_longlong for c in sig]
            fn.restype = None
            self._fns[name] = fn
        return self._fns[name]

    def launch(self, name: str, grid: int, block: int, args: tuple) -> None:
        """Run kernel ``name`` on ``grid`` blocks of ``block`` threads; tensors must be on the CPU."""
        conv = []
        for a in args:
            if isinstance(a, torch.Tensor):
                if a.device.type != "cpu" or not a.is_contiguous():
                    raise ValueError(f"{name}: host kernels take contiguous CPU tensors")
                conv.append(a.data_ptr())
            else:
                conv.append(int(a))
        self.lib.gsc_host_launch(grid, block)
        self.function(name)(*conv)
