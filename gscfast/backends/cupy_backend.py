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

from ._gpu_engine import FusedEngine, LayerSpec
from .cuda_sources import (
    CHECKOUT,
    Flag,
    cache_dir,
    find_kernel_dir,
    kernel_dir,
    kernel_sources,
    missing_reason,
)
from .lowering import Norm

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

    def _layer_fwd(self, x, spec, group_rows, y, saved, sq, mom) -> None:
        N = x.shape[0]
        d = x.new_empty(1)
        flags = (
            (Flag.HAS_BIAS if spec.bias is not None else 0)
            | (Flag.HAS_GAMMA if spec.gamma is not None else 0)
            | (Flag.HAS_BETA if spec.beta is not None else 0)
            | (Flag.SAVE_DS if saved.ds is not None else 0)
            | (Flag.SAVE_LN if saved.xh is not None else 0)
            | (Flag.WRITE_SQ if sq is not None else 0)
            | (Flag.STATS if mom is not None else 0)
        )
        args = (
            x,
            spec.weight,
            _or(spec.bias, d),
            _or(spec.gamma, d),
            _or(spec.beta, d),
            _or(spec.mean, d),
            spec.params,
            y,
            _or(saved.ds, d),
            _or(saved.xh, d),
            _or(saved.inv, d),
            _or(sq, d),
            _or(mom, d),
            N,
            spec.din,
            spec.dout,
            group_rows,
            spec.act,
            spec.norm,
            flags,
        )
        module(x.device).launch(
            f"gsc_layer_fwd_{_SUFFIX[x.dtype]}", -(-N // FWD_ROWS), THREADS, args
        )

    @staticmethod
    def _vjp_flags(spec: LayerSpec) -> int:
        ln = spec.norm == Norm.LAYER
        return (
            (Flag.HAS_DS if spec.has_ds else 0)
            | (Flag.LN if ln else 0)
            | (Flag.HAS_GAMMA if ln and spec.gamma is not None else 0)
        )

    def _chain_step(self, v, rows, R, svn, svr, spec, saved, out, sqr) -> None:
        d = v.new_empty(1)
        ln = spec.norm == Norm.LAYER
        flags = (
            self._vjp_flags(spec)
            | (Flag.STORE if out is not None else 0)
            | (Flag.WRITE_SQ if sqr is not None else 0)
        )
        args = (
            v,
            _or(saved.ds, d),
            _or(spec.gamma if ln else None, d),
            _or(saved.xh, d),
            _or(saved.inv, d),
            spec.weight,
            _or(out, d),
            _or(sqr, d),
            rows,
            R,
            spec.dout,
            spec.din,
            svn,
            svr,
            flags,
        )
        module(v.device).launch(
            f"gsc_chain_step_{_SUFFIX[v.dtype]}", -(-rows // STEP_ROWS), THREADS, args
        )

    def _contrib_step(self, v, N, M, spec, saved, spec0, saved0, out, sqr) -> None:
        d = v.new_empty(1)
        ln = spec.norm == Norm.LAYER
        args = (
            v,
            _or(saved.ds, d),
            _or(spec.gamma if ln else None, d),
            _or(saved.xh, d),
            _or(saved.inv, d),
            spec.weight,
            _or(saved0.ds, d),
            _or(spec0.gamma if ln else None, d),
            _or(saved0.xh, d),
            _or(saved0.inv, d),
            spec0.weight,
            out,
            sqr,
            N,
            M,
            spec.dout,
            spec.din,
            self._vjp_flags(spec),
        )
        rows = N * (M + 1)
        module(v.device).launch(
            f"gsc_contrib_step_{_SUFFIX[v.dtype]}", -(-rows // STEP_ROWS), THREADS, args
        )


def _or(t: Tensor | None, dummy: Tensor) -> Tensor:
    return dummy if t is None else t
