"""The ``"triton"`` backend: fused Triton kernels (``_gpu_triton_kernels.py``) on CUDA tensors.

What is fused (see ``_gpu_engine`` for the exact model class; everything else takes the ``"torch"``
engine's path on the same device):

- ``layer_fwd``: GEMM + bias + layer norm / fixed batch norm + activation + ``||f_l||^2`` +
  per-tile pre-activation moments, one kernel per layer (the forward of every method, and the
  pre-activation statistics);
- ``chain_step``: load a tile of Jacobian rows, scale by the activation derivative, apply the
  layer-norm projection, ``tl.dot`` with the layer weight, squared norm of every row in the
  epilogue, store the rows for the next step. One kernel per layer and start layer: the backward
  sweep of ``GSC(l, 0)`` (one row per sample), ``gsc_matrix`` (``d_l`` identity rows or ``R``
  probe rows, broadcast over samples at the first step), ``jacobian`` (the last step writes the
  result in place);
- ``contrib_step``: the effective-depth recursion, all ``lambda`` of a tile in one kernel with three
  ``tl.dot`` per block (``v S``, ``v G``, ``v S`` of the shifted rows).

Block sizes: widths are padded to powers of two (at least 16) with masks. On the GPU the kernels
are autotuned over a few configurations per (width in, width out, dtype), among them width-100
tiles padded to 128 (``BK = BN = 128``, one block) and smaller ``BK`` steps for widths up to
1024; ``GSCFAST_TRITON_AUTOTUNE=0`` uses the heuristic configuration instead. float32 products use
IEEE fp32 unless ``torch.get_float32_matmul_precision()`` is ``"high"``/``"medium"`` (then TF32,
as torch's own matmuls); float64 is always IEEE.

Without a GPU the same kernels run under ``TRITON_INTERPRET=1`` on CPU tensors, for the tests:
with ``ALLOW_CPU = True`` (or inside ``interpret_on_cpu()``) a ``TritonBackend()`` instance takes
CPU tensors. ``supports()`` stays CUDA-only, so ``backend="auto"`` (and ``backend="triton"``)
never run it on CPU tensors.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from typing import Any

import torch

from ._gpu_engine import FusedEngine, KernelCall, LayerSpec

ALLOW_CPU = False
"""Let ``TritonBackend()`` instances take CPU tensors when ``TRITON_INTERPRET=1`` (tests only; the
registry never does: ``supports`` is CUDA-only)."""

FORCE_CONFIG: dict[str, dict] | None = None
"""Block sizes for every launch, e.g. ``{"fwd": {"BM": 16, "BK": 16}, "step": {"BM": 16, "BN": 16,
"BK": 16}, "contrib": {...}}`` (tests: exercise several tiles per width)."""

AUTOTUNE = os.environ.get("GSCFAST_TRITON_AUTOTUNE", "1") != "0"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreter_ready() -> bool:
    """Whether this process can interpret the kernels: triton must be imported (or not yet imported)
    under ``TRITON_INTERPRET=1``, since it fixes its own ``tl`` helpers' mode at import."""
    if "triton" not in sys.modules:
        return True
    import triton.language as tl

    return type(tl.zeros).__name__ == "InterpretedFunction"


@contextlib.contextmanager
def interpret_on_cpu():
    """Run the Triton kernels on CPU tensors under the interpreter for the duration (tests).

    ``RuntimeError`` if triton was already imported without ``TRITON_INTERPRET=1`` in this process
    (then run in a fresh process with ``TRITON_INTERPRET=1`` set before anything imports triton)."""
    global ALLOW_CPU
    if not interpreter_ready():
        raise RuntimeError(
            "triton was imported without TRITON_INTERPRET=1 in this process; "
            "set it before the first import of triton to interpret kernels on CPU"
        )
    old_env, old_allow = os.environ.get("TRITON_INTERPRET"), ALLOW_CPU
    os.environ["TRITON_INTERPRET"] = "1"
    ALLOW_CPU = True
    try:
        yield
    finally:
        ALLOW_CPU = old_allow
        if old_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old_env


_mod = None
_tuned: dict = {}


def kernels():
    """The kernels module, imported (or re-imported) in the mode ``TRITON_INTERPRET`` asks for."""
    global _mod
    want = interpreting()
    if _mod is None or _mod.INTERPRETED != want:
        mod = importlib.import_module("._gpu_triton_kernels", __package__)
        if mod.INTERPRETED != want:
            mod = importlib.reload(mod)
        _mod = mod
        _tuned.clear()
    return _mod


def _p2(n: int) -> int:
    """Padded block width: the next power of two, at least 16 (``tl.dot``'s minimum)."""
    return max(16, 1 << (max(1, n) - 1).bit_length())


# ----------------------------------------------------------------------------- configurations

SMEM_BUDGET = 160 * 1024
"""Shared memory a configuration may plan for without a device to ask (sm_80 has 163 KB per
block, sm_90 227 KB); on a GPU the device's own limit is used."""

STEP_SMEM_FACTOR = 1.8
"""Shared memory of the step kernels over their operand tiles x stages (layout-conversion buffers
of the scaled/projected tile; the largest ratio measured in the sm_90 AOT compiles)."""


def fwd_config(din: int, dout: int, dtype: torch.dtype) -> dict:
    """``layer_fwd``: whole output rows per tile (``BN >= dout``, needed by layer norm and the
    squared norms); ``BM`` and ``BK`` shrink as rows widen (width 100 -> 128-wide rows, 64 x 64
    steps in float32; width 1024 -> 16 rows, 16-deep steps, one stage)."""
    wide = 2 if dtype == torch.float64 else 1
    BN = _p2(dout)
    BM = max(16, min(64, 8192 // BN // wide))
    BK = max(16, min(_p2(din), 64 // wide, 16384 // (BN * wide)))
    stages = 1 if BK * BN * 4 * wide > 64 * 1024 else 2
    warps = 4 if BM * BN <= 2048 else 8 if BM * BN <= 8192 else 16
    return dict(BM=BM, BN=BN, BK=BK, num_warps=warps, num_stages=stages)


def step_config(din: int, dout: int, dtype: torch.dtype, contrib: bool = False) -> dict:
    """``chain_step``/``contrib_step`` heuristic: ``BM`` rows, ``BN`` output columns (looped over
    ``din``), ``BK`` steps (looped over ``dout``): 64 x 128 x 64 for width 100 in float32."""
    wide = 2 if dtype == torch.float64 else 1
    BM = (32 if contrib else 64) // wide
    BN = min(_p2(din), 128 // (2 if contrib else 1) // wide)
    BK = min(_p2(dout), 64 // wide)
    return dict(BM=max(16, BM), BN=max(16, BN), BK=max(16, BK), num_warps=4, num_stages=2)


def _configs(kind: str, dtype: torch.dtype):
    import triton

    C = triton.Config
    if (
        kind == "fwd"
    ):  # BM, BN come from fwd_config (moments are per BM-tile); tune BK, warps, stages
        return [
            C(dict(BK=bk), num_warps=w, num_stages=s)
            for bk in (16, 32, 64)
            for w in (4, 8, 16)
            for s in (1, 2, 3)
        ]
    if dtype == torch.float64:
        step = [
            (32, 64, 32, 4, 2),
            (64, 64, 32, 4, 2),
            (32, 128, 16, 4, 2),
            (64, 128, 16, 8, 2),
            (32, 32, 16, 4, 2),
        ]
        contrib = [(32, 64, 16, 4, 2), (32, 32, 32, 4, 2), (16, 64, 32, 4, 2), (16, 32, 16, 4, 2)]
    else:  # (BM, BN, BK, warps, stages); the third is width 100 padded to one 128 x 128 block
        step = [
            (64, 128, 32, 4, 3),
            (64, 128, 64, 4, 2),
            (64, 128, 128, 8, 1),
            (128, 128, 32, 8, 3),
            (128, 64, 32, 4, 3),
            (32, 128, 64, 4, 2),
            (64, 64, 64, 4, 2),
            (64, 32, 32, 4, 2),
        ]
        contrib = [
            (64, 64, 32, 4, 2),
            (32, 128, 32, 4, 2),
            (64, 128, 32, 8, 2),
            (32, 64, 64, 4, 2),
            (32, 32, 32, 4, 2),
        ]
    return [
        C(dict(BM=bm, BN=bn, BK=bk), num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in (contrib if kind == "contrib" else step)
    ]


def prune(configs, named_args, *, kind: str, item: int, smem: int | None = None, **kwargs):
    """Drop configurations much wider than the problem (width 100 keeps the 128 tiles, width 16
    keeps 16-32) or needing more shared memory than the device has (``smem``, else the device of
    the weight ``W``, else ``SMEM_BUDGET``); keep at least one."""
    din, dout = named_args["DIN"], named_args["DOUT"]
    budget = smem or SMEM_BUDGET
    t = named_args.get("W")
    if smem is None and isinstance(t, torch.Tensor) and t.is_cuda:
        props = torch.cuda.get_device_properties(t.device)
        budget = getattr(props, "shared_memory_per_block_optin", budget) or budget
    keep = []
    for c in configs:
        k = {**kwargs, **c.kwargs}
        BM, BN, BK = k["BM"], k["BN"], k["BK"]
        ops = 3 if kind == "contrib" else 1
        if kind == "fwd":
            fits = BK <= max(16, 2 * _p2(din))
            need = (BM * BK + BK * BN) * item * max(1, c.num_stages)
        else:
            fits = BN <= max(16, 2 * _p2(din)) and BK <= max(16, 2 * _p2(dout))
            need = (
                (ops * BM * BK + (2 if kind == "contrib" else 1) * BK * BN)
                * item
                * max(1, c.num_stages)
            )
            need *= STEP_SMEM_FACTOR
        if fits and need <= budget:
            keep.append(c)
    return keep or configs[:1]


def _kernel(kind: str, dtype: torch.dtype):
    """The jit kernel, autotuned on a GPU unless ``GSCFAST_TRITON_AUTOTUNE=0`` or forced."""
    k = kernels()
    raw = {
        "fwd": k.layer_fwd_kernel,
        "step": k.chain_step_kernel,
        "contrib": k.contrib_step_kernel,
    }[kind]
    if not AUTOTUNE or k.INTERPRETED or FORCE_CONFIG is not None:
        return raw, False
    return autotuned(kind, dtype), True


def autotuned(kind: str, dtype: torch.dtype):
    """``triton.autotune`` around the kernel for ``dtype``, keyed by the widths and the norm."""
    key = (kind, dtype)
    if key not in _tuned:
        import functools

        import triton

        k = kernels()
        raw = {
            "fwd": k.layer_fwd_kernel,
            "step": k.chain_step_kernel,
            "contrib": k.contrib_step_kernel,
        }[kind]
        keys = ["DIN", "DOUT", "NORM"] if kind == "fwd" else ["DIN", "DOUT", "LN"]
        item = 8 if dtype == torch.float64 else 4
        _tuned[key] = triton.autotune(
            _configs(kind, dtype),
            key=keys,
            prune_configs_by={"early_config_prune": functools.partial(prune, kind=kind, item=item)},
        )(raw)
    return _tuned[key]


# ----------------------------------------------------------------------------- the backend


class TritonBackend(FusedEngine):
    __doc__ = __doc__
    name = "triton"
    priority = 30  # on CUDA: ahead of "cupy" (20) and "torch" (10)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        # find_spec, not import: triton decides at import whether it interprets (TRITON_INTERPRET)
        if importlib.util.find_spec("triton") is None:
            return "the 'triton' backend needs triton; pip install 'triton>=3.0'"
        return None

    @classmethod
    def supports(cls, device: torch.device) -> bool:
        return torch.device(device).type == "cuda"

    def _device_ok(self, device: torch.device) -> bool:
        """CUDA; or the CPU when the tests allow it (``ALLOW_CPU`` under ``TRITON_INTERPRET=1``).
        ``supports`` stays CUDA-only, so the registry never hands this backend CPU tensors."""
        device = torch.device(device)
        return device.type == "cuda" or (device.type == "cpu" and ALLOW_CPU and interpreting())

    @staticmethod
    def _prec(dtype: torch.dtype) -> str:
        if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
            return "tf32"
        return "ieee"

    @staticmethod
    def _fwd_cfg(spec: LayerSpec) -> dict:
        return {
            **fwd_config(spec.din, spec.dout, spec.weight.dtype),
            **(FORCE_CONFIG or {}).get("fwd", {}),
        }

    def moment_tile(self, spec: LayerSpec) -> int:
        return self._fwd_cfg(spec)["BM"]

    def _launch(self, call: KernelCall) -> None:
        spec, x = call.spec, call.args[0]
        dt = x.dtype
        fn, tuned = _kernel(call.kind, dt)
        meta: dict[str, Any] = {**call.switches, "PREC": self._prec(dt)}
        grid: Callable[[dict], tuple[int]] | tuple[int]
        if call.kind == "fwd":
            cfg = self._fwd_cfg(spec)
            # plain ints: constexpr specialization keys
            meta.update(BM=cfg["BM"], BN=cfg["BN"], NORM=int(spec.norm), ACT=int(spec.act))
            if not tuned:
                meta.update(BK=cfg["BK"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
            grid = (-(-call.rows // cfg["BM"]),)
        elif tuned:
            grid = lambda m: (-(-call.rows // m["BM"]),)  # noqa: E731
        else:
            cfg = {
                **step_config(spec.din, spec.dout, dt, contrib=call.kind == "contrib"),
                **(FORCE_CONFIG or {}).get(call.kind, {}),
            }
            meta.update(
                BM=cfg["BM"],
                BN=cfg["BN"],
                BK=cfg["BK"],
                num_warps=cfg["num_warps"],
                num_stages=cfg["num_stages"],
            )
            grid = (-(-call.rows // cfg["BM"]),)
        with _on(x.device):
            fn[grid](*call.args, **meta)


def _on(device: torch.device):
    """Launch on ``device`` (Triton launches on the current CUDA device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
