"""The ``"cupy"`` backend: the CUDA C++ kernels of ``kernels/*.cu`` through ``cupy.RawModule``.

The same three fused kernels as the ``"triton"`` backend (see ``_gpu_engine`` for what is fused and
what falls back to the ``"torch"`` engine on the same device), written as CUDA C++ templates with
``extern "C"`` float32/float64 entry points:

- ``kernels/layer_fwd.cu``: GEMM + bias + norm + activation + ``||f_l||^2`` + moments;
- ``kernels/chain_step.cu``: derivative scale, layer-norm projection, product with ``W``, squared
  row norms (one 64-row tile per block, 4x4 register tiles, shared-memory k-steps);
- ``kernels/contrib_step.cu``: the effective-depth recursion step.

Loading: a prebuilt fatbin (``cmake -S . -B build && cmake --build build`` writes
``build/kernels/<name>.fatbin`` for sm_80 and sm_90; ``GSCFAST_FATBIN_DIR`` points elsewhere) is
used when present, else the source is compiled at run time with NVRTC. Torch tensors go to the
kernels as ``cupy`` arrays made from their ``__cuda_array_interface__`` (no copies), launched on
torch's current stream. Products are IEEE fp32/fp64 (no TF32 path).

The sources are found by ``cuda_sources.kernel_dir()``: the copy a wheel or ``pip install``
carries in ``gscfast/_kernels/``, else ``kernels/`` of a checkout.

Without a GPU, ``HOST_EMULATION = True`` lets ``CupyBackend()`` instances run the same sources,
built for the host with ``-DGSC_HOST`` (``_gpu_host.py``), on CPU tensors: the tests use it.
``supports()`` stays CUDA-only, so the registry (``backend="auto"``) never picks it for CPU tensors.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..io import cache_dir
from ._gpu_engine import FusedEngine, KernelCall, LayerSpec
from .cuda_sources import (
    CHECKOUT,
    Flag,
    find_kernel_dir,
    kernel_dir,
    kernel_sources,
    missing_reason,
)

HOST_EMULATION = False
"""Let ``CupyBackend()`` instances take CPU tensors, running the host build of the kernels (tests
only; the registry never does: ``supports`` is CUDA-only)."""

THREADS = 256
FWD_ROWS, STEP_ROWS = 16, 64  # rows per block (the template arguments of the entry points)
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


def fatbin_dir() -> Path:
    """Where prebuilt fatbins are looked for: ``$GSCFAST_FATBIN_DIR``; else, in a checkout (the
    sources are its ``kernels/``), CMake's ``build/kernels``; else ``cache_dir()/fatbin``, never a
    folder beside the installed package."""
    env = os.environ.get("GSCFAST_FATBIN_DIR")
    if env:
        return Path(env)
    if find_kernel_dir() == CHECKOUT:
        return CHECKOUT.parent / "build" / "kernels"
    return cache_dir() / "fatbin"


class CudaModule:
    """The kernels on a GPU: one ``cupy.RawModule`` per source file, loaded once."""

    def __init__(self) -> None:
        import cupy

        self.cupy = cupy
        self._mods: dict[tuple[int | None, str], Any] = {}  # cupy.RawModule, cupy's functions
        self._fns: dict[tuple[int | None, str], Any] = {}

    def _module(self, stem: str, dev: int | None):
        key = (dev, stem)  # a module is loaded into one device's context
        if key not in self._mods:
            fat = fatbin_dir() / f"{stem}.fatbin"
            if fat.is_file():
                self._mods[key] = self.cupy.RawModule(path=str(fat))
            else:
                kdir = kernel_dir()
                src = (kdir / f"{stem}.cu").read_text()
                self._mods[key] = self.cupy.RawModule(code=src, options=("-std=c++17", f"-I{kdir}"))
        return self._mods[key]

    def function(self, name: str, dev: int | None = None):
        if (dev, name) not in self._fns:
            stem = name[len("gsc_") :].rsplit("_", 1)[0]
            self._fns[dev, name] = self._module(stem, dev).get_function(name)
        return self._fns[dev, name]

    def launch(self, name: str, grid: int, block: int, args: tuple) -> None:
        import numpy as np

        cp = self.cupy
        dev = next(a.device for a in args if isinstance(a, Tensor))
        conv = [cp.asarray(a) if isinstance(a, Tensor) else np.int64(a) for a in args]
        with (
            cp.cuda.Device(dev.index),
            cp.cuda.ExternalStream(torch.cuda.current_stream(dev).cuda_stream),
        ):
            self.function(name, dev.index)((grid,), (block,), tuple(conv))


_modules: dict[str, object] = {}


def module(device: torch.device):
    """The kernels for ``device``: ``CudaModule`` on CUDA, the host build on the CPU."""
    kind = "host" if device.type == "cpu" else "cuda"
    if kind not in _modules:
        if kind == "host":
            from ._gpu_host import HostModule

            _modules[kind] = HostModule()
        else:
            _modules[kind] = CudaModule()
    return _modules[kind]


class CupyBackend(FusedEngine):
    __doc__ = __doc__
    name = "cupy"
    priority = 20  # on CUDA: after "triton" (30), ahead of "torch" (10)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        try:
            import cupy  # noqa: F401
        except ImportError as e:
            return f"the 'cupy' backend needs cupy ({e}); pip install cupy-cuda12x (or -cuda13x)"
        if not kernel_sources():
            return f"the 'cupy' backend cannot run: {missing_reason()}"
        return None

    @classmethod
    def supports(cls, device: torch.device) -> bool:
        return torch.device(device).type == "cuda"

    def _device_ok(self, device: torch.device) -> bool:
        """CUDA; or the CPU with ``HOST_EMULATION`` (tests). ``supports`` stays CUDA-only."""
        device = torch.device(device)
        return device.type == "cuda" or (device.type == "cpu" and HOST_EMULATION)

    def moment_tile(self, spec: LayerSpec) -> int:
        return FWD_ROWS

    def _launch(self, call: KernelCall) -> None:
        flags = Flag(0)
        for name, on in call.switches.items():
            if on:
                flags |= Flag[name]
        spec = call.spec
        extra = (spec.act, spec.norm, int(flags)) if call.kind == "fwd" else (int(flags),)
        rows_per_block = FWD_ROWS if call.kind == "fwd" else STEP_ROWS
        x = call.args[0]
        module(x.device).launch(
            f"{_KERNELS[call.kind]}_{_SUFFIX[x.dtype]}",
            -(-call.rows // rows_per_block),
            THREADS,
            call.args + extra,
        )


_KERNELS = {"fwd": "gsc_layer_fwd", "step": "gsc_chain_step", "contrib": "gsc_contrib_step"}
