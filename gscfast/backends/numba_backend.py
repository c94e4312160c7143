"""The ``"numba"`` backend: fused CPU kernels (``_numba_kernels.py``) behind the backend interface.

What is fused (float32 and float64 CPU tensors): models whose every layer is
``nn.Linear -> [nn.LayerNorm (last dim) | nn.BatchNorm1d] -> [activation]`` with any of the
activations ReLU, LeakyReLU, Tanh, Sigmoid, ELU, SELU, Softplus, GELU (both forms) and Identity.

- Per-sample datapoints (no batch norm, eval-mode batch norm, or ``batchnorm="frozen"``): all four
  methods.

  * ``sweep``: forward with ``||f_l||^2`` and the pre-activation moments gathered in the same pass
    as the activation, and the backward sweep of ``GSC(l, 0)``;
  * ``chain``: every start layer's stack ``J_k^l`` (identity or probe rows), each GEMM followed by
    one pass that reduces every sample's squared Frobenius norm and applies the next layer's
    activation derivative (and norm) while the tile is in cache;
  * ``jacobian``: per-sample Jacobians, the last GEMM writing straight into the result;
  * ``contributions``: the residual-trick recursion, all lambdas of a tile in one GEMM per model.

- Batch datapoints (train-mode batch norm, ``batchnorm="batch"``): ``sweep`` (``gsc`` and
  ``preactivation_stats``), with the reductions over the batch done as per-thread partial sums;
  ``contributions`` (``effective_depth``) without layer norms: the torch engine's forward passes,
  then per layer the batch-norm projection's column sums of every lambda-row in one pass and one
  GEMM per tile of samples with both models' weights (``_contributions_coupled``).

Everything else falls back to the ``"torch"`` engine's code path (this class subclasses it), so
the numbers are the torch engine's: ``chain``/``jacobian`` of batch datapoints (and
``contributions`` of those with a layer norm), ``gscfast.nn.Residual`` blocks, layers of another
shape (two Linears in a row, an activation or a norm without a Linear before it, convolutions,
generic modules), other dtypes or devices, and a gradient asked for without an error layer.
For such a model with per-sample datapoints, every run of layers the kernels take runs on
``sweep_kernel`` (``span_forward``, ``span_backward``, ``span_tail``) and ``contrib_kernel``
(``span_contributions``): ``lowering.FusedBackend``.

Threads: ``numba.get_num_threads()`` workers (a thread pool, ``_numba_kernels.launch``); each
runs whole tiles of samples. On CPUs with AVX-512 the GEMMs are the kernels' own (``_gemm.py``:
a register-blocked micro-kernel, each weight packed once per call by ``build_net``) and a tile
is ``OWN_GEMM_ROWS`` GEMM rows. Elsewhere they are single-threaded BLAS GEMMs (the scipy OpenBLAS
that numba calls is switched to one thread for the duration of a kernel, then restored), a tile
is about ``ROWS`` GEMM rows, or, where that OpenBLAS has small-matrix kernels and the layers are
small enough, as many rows as those take (``openblas_rows``: 100 at width 100), and the forward
GEMM reads a transposed copy of each weight so that both directions are plain products. The workers borrow
their arrays without numba's reference counts (``_numba_kernels._unowned``). Working sets are
reused between calls (``workspace``) up to the memory
budget ``GSCFAST_MEMORY``; per-sample problems need ``T * (sum of widths)`` values per thread,
independent of B; batch datapoints need the whole batch's saved state (as the torch engine does).

Compilation: a kernel runs the machine code of the per-machine kernel cache (``numba_cache``); one
the cache lacks is compiled into it by a process of its own before its first call here (``_k``,
``compile_ahead``), so that a run on a cold cache gives the same bits as every later run.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import os
import subprocess
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..compiler import Layer, Program
from ..frozen import FrozenStats, frozen_stats
from ..validation import Problem
from .base import Moments, ProbeFn, Sweep
from .chunks import iter_chunks
from .lowering import (
    FusedBackend,
    Norm,
    Unsupported,
    coupled_recursion_takes,
    coupled_vjp,
    fused_or_fallback,
    lower,
)
from .torch_engine import SpanForward, forward

_ROWS_SET = os.environ.get("GSCFAST_NUMBA_ROWS")
ROWS = int(_ROWS_SET or "1024")
"""Target GEMM rows per tile (samples x stacked rows) where OpenBLAS packs its operands; measured
best on this project's 2-core CPUs. ``GSCFAST_NUMBA_ROWS`` sets it, for every product."""
SMALL_GEMM = 100**3
"""OpenBLAS's SkylakeX-family cores (those of AVX-512 CPUs) run a product ``[M, K] x [K, N]`` with
``M N K`` up to this in their small-matrix kernels, which skip packing the operands: 1.25-1.4x the
packed rate for ``[100, 100] x [100, 100]`` (float32 and float64; bench/README.md). So where the
layers are small enough, tiles are cut to that many GEMM rows (``tile_rows``)."""
_SMALL_ROWS_MIN = 32  # fewer rows than this per product: per-tile overheads outweigh the gain
_SMALL_GEMM_CORES = ("skylakex", "cooperlake", "sapphirerapids")
OWN_GEMM_ROWS = 256
"""Target GEMM rows per tile where the kernels run their own GEMM (``_gemm``, AVX-512 CPUs):
W1-W3 measured at 128, 256 and 512 rows, 256-512 best (bench/README.md, "gscfast's own GEMM")."""

_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}
# the kernels' optional arrays where not asked for (no rows)
_NONE = {np.dtype(t): np.zeros((0, 1), t) for t in _DTYPES.values()}
_NONE1 = {np.dtype(t): np.zeros(0, t) for t in _DTYPES.values()}
_NO_LABELS = np.zeros(1, np.int64)


def _k(kernel: str | None = None, dtype: torch.dtype | np.dtype | None = None):
    """The kernels module (imported lazily: importing it imports numba). With ``kernel`` and
    ``dtype`` (once per process and pair): makes sure the kernel's machine code comes from the
    kernel cache, as in every later process on this machine.

    Why: the kernels sum with fast-math reassociation, and LLVM picks the order of such a sum
    differently when it compiles a kernel in the running process than in the code the cache holds
    (measured: the layer-norm networks' GSC and pre-activation statistics differ in the last bits
    between a process that compiled the sweep kernel and one that loaded it). So a kernel the
    cache lacks is compiled into it by a process of its own (``compile_ahead``, or one started
    here), and this process waits for it, then loads the cached code: a run on a cold cache gives
    the same bits as every run after it. Where caching is off, or that process fails (a warning
    says so), the kernel compiles here, as numba would."""
    from . import _numba_kernels

    if kernel is not None:
        key = (kernel, _dtype_name(dtype))
        if key not in _READY:
            proc = _AHEAD.pop(key, None)
            if proc is None and _compiles_elsewhere(kernel, dtype):
                proc = _spawn(kernel, key[1])
            if proc is not None and proc.wait() != 0:
                warnings.warn(
                    f"gscfast: compiling the numba kernel {kernel} ({key[1]}) into the kernel "
                    f"cache in a separate process failed (exit status {proc.returncode}); it is "
                    "compiled in this process instead. Its numbers are right, but may differ in "
                    "the last bits from those of a process that loads the cached kernel.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            _READY.add(key)
    return _numba_kernels


# ----------------------------------------------------------------------------- BLAS threads


def _find_blas() -> list[tuple]:
    """(set, get, corename) functions of the OpenBLAS that numba's ``np.dot`` calls (scipy's;
    numpy's 64-bit-integer build exports other names and is left alone)."""
    import scipy.linalg.cython_blas  # noqa: F401  (loads the library numba uses)

    found: list[tuple] = []
    try:
        with open("/proc/self/maps") as f:
            libs = {line.split()[-1] for line in f if "openblas" in line.lower() and ".so" in line}
    except OSError:
        return found
    for path in sorted(libs):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in ("scipy_openblas_", "openblas_"):
            set_name, get_name = prefix + "set_num_threads", prefix + "get_num_threads"
            if hasattr(lib, set_name) and hasattr(lib, get_name):
                setter, getter = getattr(lib, set_name), getattr(lib, get_name)
                setter.argtypes, setter.restype = [ctypes.c_int], None
                getter.argtypes, getter.restype = [], ctypes.c_int
                core = getattr(lib, prefix + "get_corename", None)
                if core is not None:
                    core.argtypes, core.restype = [], ctypes.c_char_p
                found.append((setter, getter, core))
                break
    return found


@functools.lru_cache(maxsize=1)
def _blas() -> list[tuple]:
    """``_find_blas``, once per process (the libraries stay loaded)."""
    return _find_blas()


@functools.lru_cache(maxsize=1)
def small_gemm_kernels() -> bool:
    """Whether the OpenBLAS that numba calls runs small products unpacked (``SMALL_GEMM``): its
    core, chosen when it loads (by the CPU, or ``OPENBLAS_CORETYPE``), is of the SkylakeX family."""
    libs = _blas()
    if not libs:
        return False
    for _, _, core in libs:
        name = core().decode(errors="replace").lower() if core is not None else ""
        if name not in _SMALL_GEMM_CORES:
            return False
    return True


def own_gemm() -> bool:
    """Whether the kernels run their own GEMM (``_gemm.AVAILABLE``) rather than OpenBLAS's."""
    from . import _gemm  # imports numba

    return _gemm.AVAILABLE


def tile_rows(gemm: int) -> int:
    """Target GEMM rows per tile for products ``[rows, k] x [k, n]`` whose largest ``k n`` is
    ``gemm``: ``OWN_GEMM_ROWS`` where the kernels run their own GEMM, else ``openblas_rows``;
    ``ROWS`` wherever ``GSCFAST_NUMBA_ROWS`` is set."""
    if _ROWS_SET is None and own_gemm():
        return OWN_GEMM_ROWS
    return openblas_rows(gemm)


def openblas_rows(gemm: int) -> int:
    """Target GEMM rows per tile of OpenBLAS products ``[rows, k] x [k, n]`` whose largest ``k n``
    is ``gemm``: as many as its small-matrix kernels take (``SMALL_GEMM``) where it has them and
    that is at least ``_SMALL_ROWS_MIN``, else ``ROWS``."""
    if _ROWS_SET is None and gemm > 0 and small_gemm_kernels():
        rows = SMALL_GEMM // gemm
        if rows >= _SMALL_ROWS_MIN:
            return rows
    return ROWS


@contextlib.contextmanager
def single_threaded_blas():
    """Run numba kernels whose threads each call BLAS: one BLAS thread per call, restored after."""
    libs = _blas()
    old = [get() for _, get, _ in libs]
    for set_, _, _ in libs:
        set_(1)
    try:
        yield
    finally:
        for (set_, _, _), n in zip(libs, old):
            set_(n)


# ----------------------------------------------------------------------------- workspaces

_WS = threading.local()
POISON = os.environ.get("GSCFAST_POISON", "") == "1"
"""Fill every workspace and output with NaN before a kernel gets it (tests: a read of memory no
kernel wrote shows as NaN instead of passing or failing by chance on stale values)."""


def workspace(rows: int, cols: int, dtype, keep_bytes: int, slot: object = None) -> np.ndarray:
    """A ``[rows, cols]`` scratch array for the kernels' working sets, reused between calls (per
    Python thread and ``slot``) when it is at most ``keep_bytes`` (the memory budget): fresh
    pages cost a page fault each, which on some machines is as slow as the kernels."""
    need = rows * cols
    cache = getattr(_WS, "arrays", None)
    if cache is None:
        cache = _WS.arrays = {}
    key = (slot, np.dtype(dtype))
    buf = cache.get(key)
    if buf is None or buf.size < need:
        buf = np.empty(need, dtype)
        if need * buf.itemsize <= keep_bytes:
            cache[key] = buf
        else:
            cache.pop(key, None)
    if POISON:
        buf[:need] = np.nan
    return buf[:need].reshape(rows, cols)


def output(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialized kernel output (NaN under ``POISON``)."""
    out = np.empty(shape, dtype)
    if POISON:
        out.fill(np.nan)
    return out


def release_workspace() -> None:
    """Free this thread's cached kernel workspaces."""
    _WS.arrays = {}


def _targets(
    error: str | None, y: Tensor | None, dtype: torch.dtype
) -> tuple[int, np.ndarray, np.ndarray]:
    """The kernels' error code, targets ``y [N, m]`` (``"dot"``; else a dummy) and labels ``[N]``
    (``"kl"``; else a dummy), sharing memory with ``y`` where possible."""
    k = _k()
    yv = np.zeros((1, 1), _DTYPES[dtype])
    ylab = np.zeros(1, np.int64)
    if error == "dot":
        assert y is not None
        return k.E_DOT, y.to(dtype).contiguous().numpy(), ylab
    if error == "kl":
        assert y is not None
        return k.E_KL, yv, y.to(torch.int64).contiguous().numpy()
    return k.E_NONE, yv, ylab


# ----------------------------------------------------------------------------- the compiled net


@dataclass
class Net:
    """A program flattened for the kernels (see ``_numba_kernels`` module docstring)."""

    meta: np.ndarray
    fmeta: np.ndarray
    wflat: np.ndarray
    vflat: np.ndarray
    sto: np.ndarray
    rowsz: int
    dmax: int

    def args(self) -> tuple:
        return self.meta, self.fmeta, self.wflat, self.vflat, self.sto, self.rowsz

    @property
    def gemm(self) -> int:
        """The largest layer's ``d_in * d_out`` (``tile_rows``)."""
        k = _k()
        return int((self.meta[:, k.M_DIN] * self.meta[:, k.M_DOUT]).max(initial=0))


def _np(t: Tensor) -> np.ndarray:
    """``t``'s values as a flat numpy array in its own dtype (a view where it can be one)."""
    return t.detach().to("cpu").numpy().ravel()


def _packed(b: np.ndarray) -> np.ndarray:
    """``b`` as the kernels' GEMM reads it (``_gemm.mul``): packed for their own GEMM where they
    use it, else ``b`` itself."""
    from . import _gemm

    return _gemm.pack(b) if _gemm.AVAILABLE else b


def build_net(
    program: Program | list[Layer],
    dtype,
    n_in: int,
    frozen: FrozenStats | None,
    coupled: bool = False,
) -> Net:
    """Pack ``program``'s plans (``lowering.lower``, which ``frozen`` and ``coupled`` are passed
    to; a span of layers as if it were the model) into the kernels' flat arrays."""
    k = _k()
    from . import _gemm as gemm  # imports numba, as _k() does

    L = program.L if isinstance(program, Program) else len(program)
    meta = np.full((L, k.NMETA), -1, np.int64)
    fmeta = np.zeros((L, k.NFMETA), np.float64)
    sto = np.full((L, 4), -1, np.int64)
    weights: list[np.ndarray] = []
    vecs: list[np.ndarray] = []
    woff = voff = rowsz = 0
    dmax = 1

    def vec(t: Tensor) -> int:
        nonlocal voff
        a = _np(t)
        vecs.append(a)
        voff += a.size
        return voff - a.size

    d = n_in
    for i, plan in enumerate(lower(program, frozen, coupled=coupled)):
        dout, din = plan.dout, plan.din
        if din != d:
            raise Unsupported("width mismatch")
        m = meta[i]
        m[k.M_DIN], m[k.M_DOUT] = din, dout
        w = plan.weight.detach().to("cpu").numpy()
        if gemm.AVAILABLE:  # both products' B packed for gscfast's GEMM (_gemm.mm), aligned
            for col, b in ((k.M_PF, w.T), (k.M_PB, w)):  # forward h @ W^T, backward v @ W
                pad = -woff % (gemm.ALIGN // np.dtype(dtype).itemsize)
                weights.append(np.zeros(pad, dtype))
                woff += pad
                weights.append(gemm.pack(np.asarray(b, dtype)))
                m[col] = woff
                woff += weights[-1].size
        else:  # np.dot's operands: W, and W^T for the forward GEMM (_weight_t)
            weights.append(w.ravel())
            m[k.M_W] = woff
            woff += plan.weight.numel()
            weights.append(w.T.ravel())
            m[k.M_WT] = woff
            woff += plan.weight.numel()
        if plan.bias is not None:
            m[k.M_B] = vec(plan.bias)
        m[k.M_NORM] = plan.norm
        fmeta[i, k.F_EPS] = plan.eps
        if plan.mean is not None:
            m[k.M_MEAN] = vec(plan.mean)
        if plan.gamma is not None:
            m[k.M_G] = vec(plan.gamma)
        if plan.beta is not None:
            m[k.M_BETA] = vec(plan.beta)
        m[k.M_PRE] = int(plan.has_pre)
        dsave = k.saves_derivative(plan.act, plan.p0)
        m[k.M_ACT], m[k.M_DSAVE] = plan.act, int(dsave)
        fmeta[i, k.F_P0], fmeta[i, k.F_P1] = plan.p0, plan.p1
        sto[i, k.S_H] = rowsz
        rowsz += dout
        if dsave:
            sto[i, k.S_DER] = rowsz
            rowsz += dout
        if plan.norm in (Norm.LAYER, Norm.BATCH):
            sto[i, k.S_XH] = rowsz
            rowsz += dout
        if plan.norm == Norm.LAYER:
            sto[i, k.S_INV] = rowsz
            rowsz += 1
        dmax = max(dmax, dout, din if i > 0 else 1)
        d = dout

    def cat(parts: list) -> np.ndarray:
        # one pass that also casts to the kernels' dtype (float64 weights of a float32 problem),
        # into an array whose start is aligned as the packed weights' offsets assume
        out = gemm.aligned(max(1, sum(a.size for a in parts)), dtype)
        if parts:
            np.concatenate(parts, casting="same_kind", out=out)
        return out

    return Net(meta, fmeta, cat(weights), cat(vecs), sto, rowsz, dmax)


# ----------------------------------------------------------------------------- the backend


class NumbaBackend(FusedBackend):
    __doc__ = __doc__
    name = "numba"
    fuses_spans = True
    priority = 20  # CPU only; ahead of "torch" (see bench/README.md for the measured ratios)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        try:
            import numba  # noqa: F401
            import scipy.linalg.cython_blas  # noqa: F401
        except ImportError as e:
            return f"the 'numba' backend needs numba and scipy ({e}); pip install numba scipy"
        return None

    @classmethod
    def supports(cls, device: torch.device) -> bool:
        return torch.device(device).type == "cpu"

    # ---------------------------------------------------------------- helpers

    def takes(self, pb: Problem, method: str) -> bool:
        """CPU tensors of float32 or float64; batch datapoints (train-mode batch norm) for
        ``"sweep"``, and for ``"contributions"`` without a layer norm (its projection over the
        features is not in the coupled recursion's kernels)."""
        if pb.x.device.type != "cpu" or pb.x.dtype not in _DTYPES:
            return False
        if not pb.coupled or method == "sweep":
            return True
        return method == "contributions" and coupled_recursion_takes(pb.program)

    def _nets(self, pb: Problem, init: Program | None = None):
        """Yield ``(row slice, net, init net)`` per group of rows sharing constants: every dataset
        separately with frozen batch norm, all rows at once otherwise."""
        dt = _DTYPES[pb.x.dtype]
        n_in = pb.x.shape[-1]
        if not pb.frozen:
            net = build_net(pb.program, dt, n_in, None)
            net0 = None if init is None else build_net(init, dt, n_in, None)
            yield slice(0, pb.D * pb.B), net, net0
            return
        for d in range(pb.D):
            stats, stats0 = frozen_stats(pb.program, pb.x[d : d + 1], init)
            net = build_net(pb.program, dt, n_in, stats)
            net0 = None if init is None else build_net(init, dt, n_in, stats0)
            yield slice(d * pb.B, (d + 1) * pb.B), net, net0

    @staticmethod
    def _rows(pb: Problem) -> tuple[np.ndarray, int, np.ndarray, np.ndarray]:
        """``x [N, n]``, the error code, ``y [N, m]`` (or a dummy) and labels ``[N]`` (or a
        dummy), as numpy arrays sharing memory with the tensors where possible."""
        N = pb.D * pb.B
        x = pb.x.reshape(N, -1).contiguous().numpy()
        if pb.error is None:
            return (x, *_targets(None, None, pb.x.dtype))
        assert pb.y is not None  # validation: an error layer comes with targets
        y = pb.y.reshape(N) if pb.error == "kl" else pb.y.reshape(N, -1)
        return (x, *_targets(pb.error, y, pb.x.dtype))

    @staticmethod
    def _tile(
        pb: Problem, n_rows: int, rows_per_sample: int, bytes_per_sample: int, gemm: int
    ) -> int:
        """Samples per tile: about ``tile_rows(gemm)`` GEMM rows (``ROWS`` where one sample's
        rows alone are more than the small-matrix kernels take), within the memory budget per
        thread and ``chunk_size``, and small enough that every thread gets work."""
        import numba

        nth = numba.get_num_threads()
        rows_per_sample = max(1, rows_per_sample)
        rows = tile_rows(gemm)
        if rows_per_sample > rows:
            rows = ROWS
        T = max(1, rows // rows_per_sample)
        T = min(T, max(1, pb.memory // (nth * max(1, bytes_per_sample))))
        if pb.chunk_size is not None:
            T = min(T, pb.chunk_size)
        return max(1, min(T, -(-n_rows // nth)))

    # ---------------------------------------------------------------- the four methods

    @fused_or_fallback
    def sweep(self, pb: Problem, *, grads: bool, stats: bool) -> Sweep:
        if pb.coupled:
            return self._sweep_coupled(pb, grads, stats)
        x, err, yv, ylab = self._rows(pb)
        N, L, dt = x.shape[0], pb.L, x.dtype
        sqo = np.full((N, L + 1), np.nan, dt)
        sqg = np.full((N, L + 1), np.nan, dt) if grads else np.zeros((1, L + 1), dt)
        moments: list[Moments | None] | None = [None] * (L + 1) if stats else None
        for rows, net, _ in self._nets(pb):
            self._sweep_rows(pb, net, x, rows, err, yv, ylab, grads, stats, sqo, sqg, moments)
        if grads:
            sqg[:, 0] = 1
        out = torch.from_numpy(sqo)
        return Sweep(out, torch.from_numpy(sqg) if grads else None, moments)

    def span_forward(
        self, pb: Problem, span: list[Layer], h: Tensor, stats: bool, save: bool, rows: int = 1
    ) -> SpanForward:
        """``sweep_kernel``'s forward call on a span as if it were the model; with ``save``, the
        state of every tile is kept for ``span_backward`` (tiles sized for ``rows`` rows per
        sample there)."""
        k = _k("sweep_kernel", h.dtype)
        x = h.contiguous().numpy()
        N, Ls, dt = x.shape[0], len(span), x.dtype
        net = build_net(span, dt, x.shape[1], None)
        T = self._sweep_tile(pb, net, N, dt, rows)
        keep = None
        if save:  # one slot per span: the spans of a sweep are all alive until its backward
            size = -(-N // T) * T * net.rowsz
            keep = workspace(1, size, dt, pb.memory, ("span", span[0].index)).reshape(-1)
        sqo = np.full((N, Ls + 1), np.nan, dt)
        out = output((N, int(net.meta[-1, k.M_DOUT])), dt)
        moments: list[Moments | None] | None = [None] * (Ls + 1) if stats else None
        self._sweep_rows(
            pb,
            net,
            x,
            slice(0, N),
            k.E_NONE,
            _NONE[dt],
            _NO_LABELS,
            save,
            stats,
            sqo,
            _NONE[dt],
            moments,
            T=T,
            hout=out,
            keep=keep,
        )
        state = (net, x, T, keep) if save else None
        return SpanForward(torch.from_numpy(sqo), moments, torch.from_numpy(out), state)

    def span_backward(
        self,
        pb: Problem,
        span: list[Layer],
        state: tuple,
        grad: Tensor,
        grad_in: bool,
        at: int | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """``sweep_kernel``'s backward call: the rows at the span's output (or at ``f_at``)
        enter as the dot error's targets."""
        k = _k()
        net, x, T, keep = state
        N, dt = x.shape[0], x.dtype
        R = grad.shape[0] // N
        sqg = np.full((N, len(span) + 1), np.nan, dt)
        gin = output((N * R, x.shape[1]), dt) if grad_in else None
        self._sweep_rows(
            pb,
            net,
            x,
            slice(0, N),
            k.E_DOT,
            grad.contiguous().numpy(),
            _NO_LABELS,
            True,
            False,
            np.empty_like(sqg),
            sqg,
            None,
            T=T,
            gin=gin,
            keep=keep,
            fwd=False,
            i0=span[0].index - (span[-1].index if at is None else at),  # model order
        )
        return torch.from_numpy(sqg), None if gin is None else torch.from_numpy(gin)

    def span_tail(
        self, pb: Problem, span: list[Layer], h: Tensor, y: Tensor, stats: bool, grad_in: bool
    ) -> tuple[SpanForward, Tensor, Tensor | None]:
        """``sweep_kernel`` on the span that ends the model, with the error, in one call: no
        state leaves the tiles."""
        x = h.contiguous().numpy()
        N, Ls, dt = x.shape[0], len(span), x.dtype
        net = build_net(span, dt, x.shape[1], None)
        err, yv, ylab = _targets(pb.error, y, h.dtype)
        sqo = np.full((N, Ls + 1), np.nan, dt)
        sqg = np.full((N, Ls + 1), np.nan, dt)
        gin = output((N, x.shape[1]), dt) if grad_in else None
        moments: list[Moments | None] | None = [None] * (Ls + 1) if stats else None
        self._sweep_rows(
            pb, net, x, slice(0, N), err, yv, ylab, True, stats, sqo, sqg, moments, gin=gin
        )
        fw = SpanForward(torch.from_numpy(sqo), moments, None, None)
        return fw, torch.from_numpy(sqg), None if gin is None else torch.from_numpy(gin)

    def span_contributions(
        self,
        pb: Problem,
        span: list[Layer],
        init_span: list[Layer],
        h: Tensor,
        rows: Tensor,
        grad_in: bool,
    ) -> tuple[Tensor, Tensor | None]:
        """``contrib_kernel`` on a span, from the lambda-rows at its output (both models' forward
        passes at the span's input ``h`` are redone in its tiles)."""
        import numba

        k = _k("contrib_kernel", h.dtype)
        nth = numba.get_num_threads()
        x = h.contiguous().numpy()
        N, Ls, dt = x.shape[0], len(span), x.dtype
        lam0 = rows.shape[0] // N
        net = build_net(span, dt, x.shape[1], None)
        net0 = build_net(init_span, dt, x.shape[1], None)
        dmax = max(net.dmax, net0.dmax, x.shape[1])
        nl = lam0 + Ls
        T = self._tile(
            pb,
            N,
            nl,
            dt.itemsize * (net.rowsz + net0.rowsz + 4 * nl * dmax),
            max(net.gemm, net0.gemm),
        )
        ws = workspace(nth, k.contrib_ws(T, net.rowsz, net0.rowsz, dmax, Ls, lam0), dt, pb.memory)
        res = np.full((N, Ls + 1, nl), np.nan, dt)
        gin = output((N * nl, x.shape[1]), dt) if grad_in else None
        with single_threaded_blas():
            k.contrib_kernel(
                x,
                k.E_DOT,
                _NONE[dt],
                _NO_LABELS,
                *net.args(),
                *net0.args(),
                T,
                dmax,
                res,
                rows.contiguous().numpy(),
                np.int64(lam0),
                _NONE[dt] if gin is None else gin,
                nth,
                ws,
            )
        return torch.from_numpy(res), None if gin is None else torch.from_numpy(gin)

    def _sweep_tile(self, pb: Problem, net: Net, n: int, dt, R: int = 1) -> int:
        return self._tile(pb, n, R, dt.itemsize * (net.rowsz + (1 + 2 * R) * net.dmax), net.gemm)

    def _sweep_rows(
        self,
        pb: Problem,
        net: Net,
        x: np.ndarray,
        rows: slice,
        err: int,
        yv: np.ndarray,
        ylab: np.ndarray,
        grads: bool,
        stats: bool,
        sqo: np.ndarray,
        sqg: np.ndarray,
        moments: list[Moments | None] | None,
        *,
        T: int | None = None,
        hout: np.ndarray | None = None,
        gin: np.ndarray | None = None,
        keep: np.ndarray | None = None,
        fwd: bool = True,
        i0: int | None = None,
    ) -> None:
        """``sweep_kernel`` on ``rows`` of ``x`` with ``net`` (``T`` samples a tile, by default
        ``_sweep_tile``'s); merges the moments into ``moments``. ``hout``, ``gin``, ``keep`` and
        ``fwd``: a span's two calls (``sweep_kernel``)."""
        import numba

        k = _k("sweep_kernel", x.dtype)
        nth = numba.get_num_threads()
        dt = x.dtype
        L = net.meta.shape[0]
        n = rows.stop - rows.start
        T = self._sweep_tile(pb, net, n, dt) if T is None else T
        shape = (nth, L, net.dmax) if stats else (nth, 1, 1)
        mean, m2, pos, neg = (np.zeros(shape) for _ in range(4))
        cnt = np.zeros(nth, np.int64)
        R = 1 if fwd else yv.shape[0] // n  # rows per sample at a span's output
        rrows = slice(rows.start * R, rows.stop * R)
        ws = workspace(nth, k.sweep_ws(T, net.rowsz, net.dmax, R), dt, pb.memory)
        with single_threaded_blas():
            k.sweep_kernel(
                x[rows],
                err,
                yv[rrows] if err == k.E_DOT else yv,
                ylab[rows] if err == k.E_KL else ylab,
                *net.args(),
                T,
                net.dmax,
                grads,
                stats,
                sqo[rows],
                sqg[rows] if grads else sqg,
                _NONE[dt] if hout is None else hout[rows],
                _NONE[dt] if gin is None else gin[rrows],
                _NONE1[dt] if keep is None else keep,
                fwd,
                np.int64(R),
                np.int64(L - 1 if i0 is None else i0),
                mean,
                m2,
                pos,
                neg,
                cnt,
                ws,
            )
        if moments is not None:
            self._merge_moments(net, moments, mean, m2, pos, neg, cnt)

    def _sweep_coupled(self, pb: Problem, grads: bool, stats: bool) -> Sweep:
        """One batch datapoint per dataset: ``coupled_sweep_kernel`` on each."""
        import numba

        k = _k("coupled_sweep_kernel", pb.x.dtype)
        nth = numba.get_num_threads()
        x, err, yv, ylab = self._rows(pb)
        L, dt, B = pb.L, x.dtype, pb.B
        net = build_net(pb.program, dt, x.shape[1], None, coupled=True)
        sqo = np.full((pb.D, L + 1), np.nan, dt)
        sqg = np.full((pb.D, L + 1), np.nan, dt)
        moments: list[Moments | None] | None = [None] * (L + 1) if stats else None
        T = max(1, min(tile_rows(net.gemm), -(-B // nth)))
        for d in range(pb.D):
            rows = slice(d * B, (d + 1) * B)
            shape = (nth, L, net.dmax) if stats else (nth, 1, 1)
            mean, m2, pos, neg = (np.zeros(shape) for _ in range(4))
            cnt = np.zeros(nth, np.int64)
            o = np.zeros(L + 1)
            g = np.zeros(L + 1)
            ws = workspace(1, k.coupled_ws(B, T, net.rowsz, net.dmax, nth), dt, pb.memory)
            with single_threaded_blas():
                k.coupled_sweep_kernel(
                    x[rows],
                    err,
                    yv[rows] if err == k.E_DOT else yv,
                    ylab[rows] if err == k.E_KL else ylab,
                    *net.args(),
                    T,
                    net.dmax,
                    grads,
                    stats,
                    o,
                    g,
                    mean,
                    m2,
                    pos,
                    neg,
                    cnt,
                    nth,
                    ws,
                )
            sqo[d, 1:] = o[1:]
            if err != k.E_NONE:
                sqo[d, 0] = o[0]
            sqg[d, 1:] = g[1:]
            if moments is not None:
                self._merge_moments(net, moments, mean, m2, pos, neg, cnt)
        if grads:
            sqg[:, 0] = 1
        return Sweep(torch.from_numpy(sqo), torch.from_numpy(sqg) if grads else None, moments)

    @staticmethod
    def _merge_moments(net: Net, moments: list[Moments | None], mean, m2, pos, neg, cnt) -> None:
        """Merge the kernels' per-thread moments into ``moments`` (paper index)."""
        k = _k()
        L = net.meta.shape[0]
        for i in range(L):
            if net.meta[i, k.M_PRE] != 1:
                continue
            d = int(net.meta[i, k.M_DOUT])
            for th in range(len(cnt)):
                if cnt[th] == 0:
                    continue
                mo = Moments(
                    int(cnt[th]),
                    *(torch.from_numpy(a[th, i, :d].copy()) for a in (mean, m2, pos, neg)),
                )
                m = L - i
                moments[m] = mo if moments[m] is None else moments[m].merge(mo)

    @fused_or_fallback
    def chain(self, pb: Problem, probes: ProbeFn | None) -> Tensor:
        import numba

        k = _k("chain_kernel", pb.x.dtype)
        nth = numba.get_num_threads()
        x, err, yv, ylab = self._rows(pb)
        N, L, dt = x.shape[0], pb.L, x.dtype
        w = pb.widths
        res = np.full((N, L + 1, L + 1), np.nan, dt)
        res[:, 0, 0] = 1
        if probes is None:
            nprobe, rmax = 0, max(w[1 : L + 1])
            pflat, poff = np.zeros(1, dt), np.zeros(L + 1, np.int64)
        else:
            parts = [probes(l).to(pb.x.dtype).reshape(-1, w[l]) for l in range(1, L + 1)]
            nprobe = rmax = parts[0].shape[0]
            poff = np.zeros(L + 1, np.int64)
            poff[1:] = np.cumsum([0] + [p.numel() for p in parts[:-1]])
            pflat = torch.cat([p.reshape(-1) for p in parts]).contiguous().numpy()
        for rows, net, _ in self._nets(pb):
            n = rows.stop - rows.start
            T = self._tile(
                pb,
                n,
                rmax,
                dt.itemsize * (net.rowsz + net.dmax + 2 * rmax * net.dmax),
                net.gemm,
            )
            ws = workspace(nth, k.chain_ws(T, net.rowsz, net.dmax, rmax, L), dt, pb.memory)
            with single_threaded_blas():
                k.chain_kernel(
                    x[rows],
                    err,
                    yv[rows] if err == k.E_DOT else yv,
                    ylab[rows] if err == k.E_KL else ylab,
                    *net.args(),
                    T,
                    net.dmax,
                    rmax,
                    pflat,
                    poff,
                    nprobe,
                    res[rows],
                    nth,
                    ws,
                )
        return torch.from_numpy(res)

    @fused_or_fallback
    def jacobian(self, pb: Problem, start: int, end: int) -> Tensor:
        import numba

        k = _k("jacobian_kernel", pb.x.dtype)
        nth = numba.get_num_threads()
        x, _, _, _ = self._rows(pb)
        N, L, dt = x.shape[0], pb.L, x.dtype
        w = pb.widths
        out = output((N, w[end], w[start]), dt)
        if start == end:
            out[:] = np.eye(w[end], dtype=dt)
            return torch.from_numpy(out)
        for rows, net, _ in self._nets(pb):
            n = rows.stop - rows.start
            R = w[end]
            # S samples (R rows each) per backward block, as a tile of R-row products would be
            # cut; the forward in tiles of T >= S samples (one row each)
            S = self._tile(
                pb, n, R, dt.itemsize * (net.rowsz + net.dmax + 2 * R * net.dmax), net.gemm
            )
            T = max(S, self._tile(pb, n, 1, dt.itemsize * (net.rowsz + net.dmax + L + 1), net.gemm))
            ws = workspace(nth, k.jacobian_ws(T, S, net.rowsz, net.dmax, R, L), dt, pb.memory)
            with single_threaded_blas():
                k.jacobian_kernel(
                    x[rows],
                    *net.args(),
                    T,
                    S,
                    net.dmax,
                    L - end,
                    L + 1 - start,
                    out[rows],
                    nth,
                    ws,
                )
        return torch.from_numpy(out)

    @fused_or_fallback
    def contributions(self, pb: Problem, init: Program) -> Tensor:
        if pb.coupled:
            return self._contributions_coupled(pb, init)
        import numba

        k = _k("contrib_kernel", pb.x.dtype)
        nth = numba.get_num_threads()
        x, err, yv, ylab = self._rows(pb)
        N, L, dt = x.shape[0], pb.L, x.dtype
        res = np.full((N, L + 1, L + 1), np.nan, dt)
        res[:, 0, 0] = 1
        for rows, net, net0 in self._nets(pb, init):
            n = rows.stop - rows.start
            dmax = max(net.dmax, net0.dmax)
            T = self._tile(
                pb,
                n,
                L,
                dt.itemsize * (net.rowsz + net0.rowsz + 4 * L * dmax),
                max(net.gemm, net0.gemm),
            )
            ws = workspace(nth, k.contrib_ws(T, net.rowsz, net0.rowsz, dmax, L), dt, pb.memory)
            with single_threaded_blas():
                k.contrib_kernel(
                    x[rows],
                    err,
                    yv[rows] if err == k.E_DOT else yv,
                    ylab[rows] if err == k.E_KL else ylab,
                    *net.args(),
                    *net0.args(),
                    T,
                    dmax,
                    res[rows],
                    _NONE[dt],
                    np.int64(1),
                    _NONE[dt],
                    nth,
                    ws,
                )
        return torch.from_numpy(res)

    def _contributions_coupled(self, pb: Problem, init: Program) -> Tensor:
        """The residual-trick recursion of batch datapoints: the torch engine's forward passes
        (trained model, and the initial one at the trained inputs), the column sums of the first
        lambda-row (``coupled_colsums_kernel``), then per layer ``coupled_step_kernel``: one GEMM
        with ``[W_S; W_G - W_S]`` per tile of samples, and the next layer's column sums of its
        output while it is in cache."""
        import numba

        k = _k("coupled_step_kernel", pb.x.dtype)
        L, dt = pb.L, _DTYPES[pb.x.dtype]
        B = pb.B
        dmax = max(pb.widths[1 : L + 1])  # g_1 .. g_L
        # float64: the kernels sum the squares so (Backend.contributions)
        res = np.full((pb.D, L + 1, L + 1), np.nan)
        res[:, 0, 0] = 1
        nth = numba.get_num_threads()
        # GEMM rows per tile: [R, 2d] (400 KB at d = 100) and its output stay in L2 (measured: 512
        # rows 4% faster than 256 in float32, 256 rows 7% faster than 512 in float64)
        R = max(1, ROWS * 2 // np.dtype(dt).itemsize)
        ws = workspace(nth, k.coupled_step_ws(R, max(R, L), dmax), dt, pb.memory)
        S = L * dmax  # a sample's room in a buffer: g_L's L lambda-rows
        bufs: list[np.ndarray] = []
        d0 = 0
        for ds, bs, ctx in iter_chunks(pb, self._bytes(pb, pb.L), init=init):
            tr = forward(pb, pb.program, ds, bs, ctx, keep_inputs=True)
            ictx = ctx.for_init()
            assert tr.grad is not None  # make_problem: an error layer (fused_or_fallback checks)
            P = tr.grad.shape[0]
            # a buffer of g_m's lambda-rows per datapoint, overwritten layer by layer
            # (coupled_step_kernel) and kept between chunks (fresh pages fault on first touch)
            if len(bufs) < P:
                bufs = [np.empty(B * S, dt) for _ in range(P)]
                if POISON:
                    for buf in bufs:
                        buf.fill(np.nan)
            parts = []
            cur = _coupled_layer(pb, init, tr, ictx, 1, P)
            for p in range(P):
                (_, cG, xG, _), (_, cS, xS, _) = cur[p]
                v = tr.grad[p].reshape(B, 1, -1).contiguous().numpy()
                part = np.empty((nth, 1, 4 * cG.shape[1] + 1))
                k.coupled_colsums_kernel(v, cG, xG, cS, xS, np.int64(R), part, nth)
                parts.append(part)
                bufs[p].reshape(B, S)[:, : v.shape[2]] = v[:, 0]
            for m in range(1, L):
                nxt = _coupled_layer(pb, init, tr, ictx, m + 1, P) if m + 1 < L else None
                K = m  # g_m's lambda-rows: lambda = 0 .. m - 1
                for p in range(P):
                    (wG, cG, xG, projG), (wS, cS, xS, projS) = cur[p]
                    d = cG.shape[1]
                    tot = parts[p].sum(0)  # in thread order: the same bits for the same nth
                    res[d0 + p, m, :K] = tot[:, 4 * d]
                    # without a batch-statistics norm, u is not projected: no means
                    means = [
                        (tot[:, i * d : (i + 1) * d] / B if on else np.zeros((K, d))).astype(dt)
                        for i, on in enumerate((projG, projG, projS, projS))
                    ]
                    diffs = (means[0] - means[2], means[1] - means[3])
                    wcat = np.concatenate([wS, wG - wS])  # coupled_step_kernel: [W_S; W_G - W_S]
                    din = wcat.shape[1]
                    if nxt is not None:  # the next layer's c and x, for its column sums
                        (_, nG, nxG, _), (_, nS, nxS, _) = nxt[p]
                    else:  # the last step: only its squared norms are used
                        nG = nxG = nS = nxS = np.zeros((B, din), dt)
                    parts[p] = np.empty((nth, K + 1, 4 * din + 1))
                    with single_threaded_blas():
                        k.coupled_step_kernel(
                            bufs[p],
                            np.int64(S),
                            np.int64(K),
                            cG,
                            xG,
                            cS,
                            xS,
                            *means,
                            *diffs,
                            _packed(wcat),
                            np.int64(max(1, R // (K + 1))),
                            nG,
                            nxG,
                            nS,
                            nxS,
                            parts[p],
                            nth,
                            ws,
                        )
                if nxt is not None:  # the last step has no next layer
                    cur = nxt
            for p in range(P):
                res[d0 + p, L, :L] = parts[p].sum(0)[:, -1]
            d0 += P
        return torch.from_numpy(res)


def _coupled_layer(pb: Problem, init: Program, tr, ictx, m: int, P: int) -> list[tuple]:
    """Layer m's (trained, initial) ``_coupled_arrays`` for each of the chunk's ``P``
    datapoints. The initial layer runs on the whole chunk at the trained model's input, as the
    trained one ran: the same input then gives the same bits (exact zeros where the two models
    agree)."""
    _, s_init, _ = init.layer(m).forward(tr.inputs[m], ictx)
    return [
        (
            _coupled_arrays(pb.program.layer(m), tr.saved[m], p, pb.B, pb.x.dtype),
            _coupled_arrays(init.layer(m), s_init, p, pb.B, pb.x.dtype),
        )
        for p in range(P)
    ]


def _coupled_arrays(
    layer: Layer, saved: list, p: int, B: int, dtype: torch.dtype
) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """``lowering.coupled_vjp`` of ``layer`` as the kernels' arrays: ``(W, c [B, d], x [B, d],
    proj)``, ``x`` zeros without batch statistics (``proj`` False: no projection)."""
    w, c, x = coupled_vjp(layer, saved, p)
    d = w.shape[0]

    def full(t: Tensor) -> np.ndarray:
        return t.expand(B, d).to(dtype).contiguous().numpy()

    zero = torch.zeros((), dtype=dtype)
    return w.to(dtype).contiguous().numpy(), full(c), full(zero if x is None else x), x is not None


# What compiles each kernel: kernel -> the calls whose first run compiles (or loads) it, on a
# small network of the given dtype. Every kernel has one specialization per dtype for these calls.
def _warmup_calls(kernel: str, dtype: torch.dtype) -> None:
    import gscfast

    x = torch.randn(4, 3, dtype=dtype)
    y = torch.randn(4, 3, dtype=dtype)
    if kernel == "coupled_sweep_kernel":  # train-mode batch norm: one batch datapoint
        bn = gscfast.mlp(2, 3, act="relu", norm="batch", seed=0, dtype=dtype)
        gscfast.gsc(bn, x, y, backend="numba")
        return
    if kernel == "coupled_step_kernel":  # with coupled_colsums_kernel: coupled effective depth
        bn = gscfast.mlp(2, 3, act="tanh", norm="batch", seed=0, dtype=dtype)
        gscfast.effective_depth(bn, bn, x, y, backend="numba")
        return
    model = gscfast.mlp(2, 3, act="tanh", seed=0, dtype=dtype)
    if kernel == "sweep_kernel":
        gscfast.gsc(model, x, y, backend="numba")
        gscfast.preactivation_stats(model, x, backend="numba")
    elif kernel == "chain_kernel":
        gscfast.gsc_matrix(model, x, y, backend="numba")
        gscfast.gsc_matrix(model, x, y, backend="numba", method="sketch", probes=2)
    elif kernel == "jacobian_kernel":
        gscfast.jacobian(model, x, backend="numba")
    elif kernel == "contrib_kernel":
        gscfast.effective_depth(model, model, x, y, backend="numba")
    else:
        raise ValueError(f"unknown numba kernel {kernel!r}: use one of {', '.join(KERNELS)}")


KERNELS = (
    "sweep_kernel",
    "chain_kernel",
    "jacobian_kernel",
    "contrib_kernel",
    "coupled_sweep_kernel",
    "coupled_step_kernel",
)
# the workers whose machine code makes up each kernel (what the cache must hold for it)
_WORKERS = {
    "sweep_kernel": ("_sweep_worker",),
    "chain_kernel": ("_chain_worker",),
    "jacobian_kernel": ("_jacobian_worker",),
    "contrib_kernel": ("_contrib_worker",),
    "coupled_sweep_kernel": ("_coupled_sweep_worker",),
    "coupled_step_kernel": ("_coupled_colsums_worker", "_coupled_step_worker"),
}


def compile_times(
    dtypes=(torch.float32, torch.float64), kernels: tuple[str, ...] = KERNELS
) -> dict[str, float]:
    """Compile (or load from the cache, ``numba_cache``) each of ``kernels`` for each of
    ``dtypes``, in that order; returns ``{"<kernel>/<dtype>": seconds}``. The first entry also
    pays numba's own start-up (its first compilation initializes LLVM)."""
    import time

    out = {}
    for dtype in dtypes:
        for kernel in kernels:
            t0 = time.perf_counter()
            _warmup_calls(kernel, dtype)
            out[f"{kernel}/{str(dtype).removeprefix('torch.')}"] = time.perf_counter() - t0
    return out


def warmup(dtypes=(torch.float32, torch.float64)) -> float:
    """Compile (or load from the cache) every kernel for ``dtypes``; returns the seconds taken."""
    return sum(compile_times(dtypes).values())


def _dtype_name(dtype: torch.dtype | np.dtype | None) -> str:
    return str(dtype).removeprefix("torch.")


def is_cached(kernel: str, dtype: torch.dtype | np.dtype) -> bool:
    """Whether the kernel cache (``numba_cache``) holds ``kernel``'s machine code for ``dtype``:
    every worker of it has a cached signature whose first floating-point array is of ``dtype``
    (each worker's data arrays come before its float64 accumulators)."""
    from numba.core import types

    from .numba_cache import cached_signatures

    want = types.float32 if _dtype_name(dtype) == "float32" else types.float64

    def data_dtype(sig: tuple):
        floats = (a.dtype for a in sig if isinstance(a, types.Array))
        return next((t for t in floats if isinstance(t, types.Float)), None)

    return all(
        any(data_dtype(sig) == want for sig in cached_signatures(getattr(_k(), w)))
        for w in _WORKERS[kernel]
    )


# (kernel, dtype name) -> the process compiling it into the cache (compile_ahead, _k)
_AHEAD: dict[tuple[str, str], subprocess.Popen] = {}
# (kernel, dtype name) pairs whose machine code this process has made sure of (_k)
_READY: set[tuple[str, str]] = set()
# set in the processes that compile kernels into the cache: they compile in themselves
_COMPILER = "GSCFAST_NUMBA_CACHE_COMPILER"


def _compiles_elsewhere(kernel: str, dtype: torch.dtype | np.dtype | None) -> bool:
    """Whether ``kernel`` should be compiled into the cache by a process of its own: it is not
    cached, caching works here, and this is not such a process."""
    from .numba_cache import caches

    if os.environ.get(_COMPILER) or not caches(getattr(_k(), _WORKERS[kernel][0])):
        return False
    return not is_cached(kernel, dtype if dtype is not None else torch.float64)


def _spawn(kernel: str, dtype_name: str) -> subprocess.Popen:
    """A process that compiles ``kernel`` for ``dtype_name`` into the cache (``_warmup_calls``)."""
    import gscfast

    env = dict(os.environ, **{_COMPILER: "1"})
    root = str(Path(gscfast.__file__).resolve().parents[1])  # this gscfast, not another
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    code = (
        "import sys, torch; from gscfast.backends.numba_backend import _warmup_calls; "
        "_warmup_calls(sys.argv[1], getattr(torch, sys.argv[2]))"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code, kernel, dtype_name],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def compile_ahead(kernels: list[str], dtype: torch.dtype) -> list[str]:
    """Compile the numba kernels a run will need side by side rather than one after another.

    ``kernels`` are named in the order the run first calls them. Each one that the cache does not
    hold for ``dtype`` (``is_cached``) is compiled into the cache by ``_warmup_calls`` in a
    process of its own, at most one per CPU (the earliest first); a kernel left out is compiled
    the same way at its first call (``_k``). This process's first call of a kernel started here
    waits for that process and loads the machine code from the cache. The run then waits about
    as long as its slowest kernel takes to compile, not the sum (cold cache, the Gaussian study's
    two kernels: about 20 s -> 12 s on 2 cores). Where caching is off, nothing is started and
    the kernels compile in this process. Returns the kernels started.
    """
    order = list(dict.fromkeys(kernels))
    for k in order:
        if k not in _WORKERS:
            raise ValueError(f"unknown numba kernel {k!r}: use one of {', '.join(KERNELS)}")
    if dtype not in _DTYPES:
        raise ValueError(f"numba kernels are float32 or float64, not {dtype}")
    cpus = len(os.sched_getaffinity(0))
    started: list[str] = []
    for kernel in order:
        key = (kernel, _dtype_name(dtype))
        if len(started) >= cpus or key in _AHEAD or key in _READY:
            continue
        if _compiles_elsewhere(kernel, dtype):
            _AHEAD[key] = _spawn(kernel, key[1])
            started.append(kernel)
    return started


@atexit.register
def _stop_ahead() -> None:
    """A process that exits before it needed a kernel compiled ahead does not leave the compile
    running behind it."""
    for proc in _AHEAD.values():
        proc.kill()
    _AHEAD.clear()
