"""What the machine can do, measured: the best GEMM rate it reaches, and the line naming it.

One home for the yardstick that the Gaussian study's FLOP floor and the benchmarks' "x sgemm"
ratios divide by: the best rate the machine reaches, however it is reached (OpenBLAS through numpy
is often faster than torch's GEMM at the studies' sizes on a CPU; and for thin products such as
``[10000, 100] x [100, 100]`` one single-threaded GEMM per core on row tiles, which is what the
numba kernels run, beats one multi-threaded library call), not torch's alone.
"""

from __future__ import annotations

import contextlib
import platform
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import threadpoolctl
import torch

__all__ = ["GemmRate", "describe", "fma_peak", "gemm_rate"]

# OpenBLAS worker threads busy-wait for about 0.1 s after a call; this long lets them park, so that
# they do not steal cores from whatever is timed next.
_PARK_SECONDS = 0.3


@dataclass(frozen=True)
class GemmRate:
    """The result of ``gemm_rate``.

    Attributes:
        flops: the best rate, FLOP/s (``2 m k n`` per product over the fastest call's time).
        library: the formulation that reached it: ``"numpy"`` or ``"torch"`` (one library call,
            the library's own threads), ``"numpy per thread"`` (the rows split into tiles
            over ``threads`` threads, each calling single-threaded OpenBLAS), ``"numba per
            thread, small tiles"`` (the same in OpenBLAS's small-matrix tiles, from compiled
            code) or ``"gscfast per thread"`` (the numba kernels' own GEMM in their tiles).
        rates: every measured formulation's best rate, FLOP/s.
        device: where it was measured (``"cpu"``, ``"cuda:0"``, ...).
    """

    flops: float
    library: str
    rates: dict[str, float]
    device: str


def gemm_rate(
    m: int,
    k: int,
    n: int,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    reps: int = 3,
    seconds: float = 0.0,
    threads: int | None = None,
    tile: int = 1024,
) -> GemmRate:
    """The best rate of ``[m, k] @ [k, n]`` products on ``device``, over the formulations that
    can run there. On the CPU: one numpy (OpenBLAS) call and one torch call, each with its
    library's threads, and (with ``threads`` > 1) the rows split into ``tile``-row tiles dealt to
    ``threads`` threads round-robin, each thread calling numpy with one OpenBLAS thread on a tile that
    stays in its cache, as the numba kernels do (also in the kernels' smaller tiles where OpenBLAS
    runs such products unpacked: ``numba_backend.openblas_rows``), and, where the numba kernels run
    their own GEMM (``backends/_gemm.py``), that GEMM in their tiles. On a GPU: one torch call.

    Each formulation runs once untimed (warm-up), then timed, at least ``reps`` times and until
    ``seconds`` have passed; its rate is that of its fastest run (the least disturbed by other
    work on the machine).

    Args:
        threads: CPU threads for the per-thread formulation (default ``torch.get_num_threads()``).
        tile: rows per tile of the per-thread formulation.

    Raises:
        ValueError: a size, ``reps``, ``threads`` or ``tile`` below 1, ``seconds`` negative, or a
            device whose GEMMs cannot be timed (``meta``: no data).
    """
    if threads is None:
        threads = torch.get_num_threads()
    for name, v in (
        ("m", m),
        ("k", k),
        ("n", n),
        ("reps", reps),
        ("threads", threads),
        ("tile", tile),
    ):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"gemm_rate: {name} must be an integer >= 1, got {v!r}")
    if not seconds >= 0:
        raise ValueError(f"gemm_rate: seconds must be >= 0, got {seconds!r}")
    device = torch.device(device)
    # a GEMM on an accelerator is timed up to its device's synchronize; meta tensors hold no data
    synchronize = getattr(getattr(torch, device.type, None), "synchronize", None)
    if device.type != "cpu" and not callable(synchronize):
        raise ValueError(
            f"gemm_rate: cannot time a GEMM on {device} (no data or no synchronize); use a CPU "
            "or an accelerator such as cuda"
        )

    def sync() -> None:
        if synchronize is None or device.type == "cpu":
            return
        if device.type == "cuda":
            synchronize(device)
        else:  # torch.mps's synchronize takes no argument (one device)
            synchronize()

    a = torch.randn(m, k, dtype=dtype, device=device)
    b = torch.randn(k, n, dtype=dtype, device=device)
    c = torch.empty(m, n, dtype=dtype, device=device)
    calls: dict[str, Callable[[], object]] = {}
    limits: dict[str, Callable[[], contextlib.AbstractContextManager]] = {}
    pool = None
    if device.type == "cpu":
        an, bn, cn = a.numpy(), b.numpy(), c.numpy()
        calls["numpy"] = lambda: np.matmul(an, bn, out=cn)
        if threads > 1:
            pool = ThreadPoolExecutor(threads - 1)

            def rows(th: int, tile: int) -> None:
                # Every product of a thread reuses its first tile's rows: a tile of the kernels
                # stays in its core's cache while it passes through the layers, and so does this.
                t0 = th * tile
                for r in range(t0, m, threads * tile):
                    h = min(tile, m - r)
                    np.matmul(an[t0 : t0 + h], bn, out=cn[t0 : t0 + h])

            def per_thread(tile: int) -> Callable[[], None]:
                def run() -> None:
                    # numpy's matmul releases the GIL, so the threads' GEMMs run in parallel.
                    futures = [pool.submit(rows, th, tile) for th in range(1, threads)]
                    rows(0, tile)
                    for f in futures:
                        f.result()

                return run

            calls["numpy per thread"] = per_thread(tile)
            limits["numpy per thread"] = lambda: threadpoolctl.threadpool_limits(1, "blas")
            small = _small_tile(k, n)
            if small is not None and small != tile:
                # The tiles the numba kernels cut where OpenBLAS runs such products unpacked,
                # called from compiled code as the kernels do: from Python, each product of
                # about 10 us would wait for the GIL and the interpreter.
                from .backends import _numba_kernels, numba_backend

                def numba_tiles() -> None:
                    _numba_kernels.gemm_rows(an, bn, cn, small, threads)

                calls["numba per thread, small tiles"] = numba_tiles
                limits["numba per thread, small tiles"] = numba_backend.single_threaded_blas
            own = _own_gemm_tile(k, n)
            if own is not None:  # the numba kernels' own GEMM, in their tiles, B packed once
                from .backends import _gemm, _numba_kernels

                bp = _gemm.pack(bn)

                def own_tiles() -> None:
                    _numba_kernels.gemm_rows(an, bp, cn, own, threads)

                calls["gscfast per thread"] = own_tiles
    calls["torch"] = lambda: torch.mm(a, b, out=c)
    rates = {}
    try:
        for name, call in calls.items():
            with limits.get(name, contextlib.nullcontext)():
                call()
                sync()
                best, done, start = float("inf"), 0, time.perf_counter()
                while done < reps or time.perf_counter() - start < seconds:
                    t0 = time.perf_counter()
                    call()
                    sync()
                    best = min(best, time.perf_counter() - t0)
                    done += 1
            rates[name] = 2.0 * m * k * n / best
    finally:
        if pool is not None:
            pool.shutdown()
    if device.type == "cpu":
        time.sleep(_PARK_SECONDS)
    library = max(rates, key=rates.__getitem__)
    return GemmRate(rates[library], library, rates, str(device))


def _own_gemm_tile(k: int, n: int) -> int | None:
    """The rows per tile the numba kernels use for ``[rows, k] x [k, n]`` products on their own
    GEMM (``backends/_gemm.py``), else None (where they use OpenBLAS, or cannot run)."""
    from .backends import numba_backend

    if numba_backend.NumbaBackend.unavailable_reason() is not None:
        return None
    return numba_backend.tile_rows(k * n) if numba_backend.own_gemm() else None


def _small_tile(k: int, n: int) -> int | None:
    """The rows per tile the numba kernels use for ``[rows, k] x [k, n]`` products where
    OpenBLAS's small-matrix kernels apply (``numba_backend.openblas_rows``), else None (also where
    the numba backend cannot run: numba or scipy missing)."""
    from .backends import numba_backend

    if numba_backend.NumbaBackend.unavailable_reason() is not None:
        return None
    rows = numba_backend.openblas_rows(k * n)
    return rows if rows < numba_backend.ROWS else None


def fma_peak(
    dtype: torch.dtype = torch.float32, *, threads: int | None = None, reps: int = 3
) -> float:
    """The CPU's peak rate of fused multiply-adds, FLOP/s (2 per lane): ``threads`` threads
    (default ``torch.get_num_threads()``) each running 16 independent chains of the widest vector
    FMA the CPU has (numba's target CPU, JIT-compiled LLVM IR), the best of ``reps``. The rate no
    implementation of a GEMM exceeds; the roof of the benchmarks (``gemm_rate``) is what GEMMs
    reach of it.

    Raises:
        ValueError: ``dtype`` not float32/float64, or ``threads``/``reps`` below 1.
    """
    import ctypes

    from llvmlite import binding as llvm

    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"fma_peak: dtype must be torch.float32 or torch.float64, got {dtype}")
    threads = torch.get_num_threads() if threads is None else threads
    for name, v in (("threads", threads), ("reps", reps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"fma_peak: {name} must be an integer >= 1, got {v!r}")
    from .backends import _gemm, numba_cache  # numba's target CPU and its features

    bits = 512 if "+avx512f" in _gemm.target_features().split(",") else 256
    ty, size = ("float", 4) if dtype == torch.float32 else ("double", 8)
    lanes, chains = bits // (8 * size), 16
    vt = f"<{lanes} x {ty}>"
    fma = f"llvm.fma.v{lanes}f{8 * size}"

    def splat(name: str, value: str) -> list[str]:
        return [
            f"  %{name}.s = insertelement {vt} undef, {ty} {value}, i32 0",
            f"  %{name} = shufflevector {vt} %{name}.s, {vt} undef, <{lanes} x i32> zeroinitializer",
        ]

    # a_i <- a_i * 0.5 + 0.25 converges to 0.5: no overflow, no subnormals
    ir = [f"declare {vt} @{fma}({vt}, {vt}, {vt})", f"define {ty} @peak(i64 %n) #0 {{", "entry:"]
    ir += splat("x", "5.000000e-01") + splat("y", "2.500000e-01")
    for c in range(chains):
        ir += splat(f"i{c}", f"{1.0 + c / 64:e}")
    ir += ["  br label %loop", "loop:", "  %k = phi i64 [0, %entry], [%k1, %loop]"]
    ir += [f"  %a{c} = phi {vt} [%i{c}, %entry], [%b{c}, %loop]" for c in range(chains)]
    ir += [f"  %b{c} = call {vt} @{fma}({vt} %a{c}, {vt} %x, {vt} %y)" for c in range(chains)]
    ir += ["  %k1 = add i64 %k, 1", "  %more = icmp slt i64 %k1, %n"]
    ir += ["  br i1 %more, label %loop, label %done", "done:", "  %s0 = fadd " + vt + " %b0, %b1"]
    ir += [f"  %s{c - 1} = fadd {vt} %s{c - 2}, %b{c}" for c in range(2, chains)]
    ir += [f"  %r = extractelement {vt} %s{chains - 2}, i32 0", f"  ret {ty} %r", "}"]
    ir += [
        f'attributes #0 = {{ "min-legal-vector-width"="{bits}" "prefer-vector-width"="{bits}" }}'
    ]
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    target = llvm.Target.from_default_triple().create_target_machine(
        cpu=numba_cache.cpu_name(), features=_gemm.target_features(), opt=2
    )
    module = llvm.parse_assembly("\n".join(ir))
    engine = llvm.create_mcjit_compiler(module, target)
    engine.finalize_object()
    rtype = ctypes.c_float if size == 4 else ctypes.c_double
    peak = ctypes.CFUNCTYPE(rtype, ctypes.c_int64)(engine.get_function_address("peak"))
    n = 20_000_000  # about 40 ms a call: the threads overlap, whatever their start-up
    peak(1000)
    best = 0.0
    with ThreadPoolExecutor(threads) as pool:  # ctypes releases the GIL around the call
        for _ in range(reps):
            t0 = time.perf_counter()
            list(pool.map(peak, [n] * threads))
            best = max(best, 2.0 * lanes * chains * n * threads / (time.perf_counter() - t0))
    del engine  # owns the module and the target machine
    return best


def describe() -> str:
    """One line naming the machine (platform, processor, torch version), for summaries."""
    return (
        f"{platform.platform()}, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}"
    )
