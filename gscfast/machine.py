"""What the machine can do, measured: the best GEMM rate it reaches, and the line naming it.

One home for the yardstick that the Gaussian study's FLOP floor and the benchmarks' "x sgemm"
ratios divide by: the best rate the machine reaches, whichever library reaches it (OpenBLAS through
numpy is often faster than torch's GEMM at the studies' sizes on a CPU), not torch's alone.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["GemmRate", "describe", "gemm_rate"]

# OpenBLAS worker threads busy-wait for about 0.1 s after a call; this long lets them park, so that
# they do not steal cores from whatever is timed next.
_PARK_SECONDS = 0.3


@dataclass(frozen=True)
class GemmRate:
    """The result of ``gemm_rate``.

    Attributes:
        flops: the best rate, FLOP/s (``2 m k n`` per product over the fastest call's time).
        library: the library that reached it (``"numpy"`` or ``"torch"``).
        rates: every measured library's best rate, FLOP/s.
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
) -> GemmRate:
    """The best rate of ``[m, k] @ [k, n]`` products on ``device``, over the libraries that can
    run there: numpy (OpenBLAS) and torch on the CPU, torch on a GPU.

    Each library runs one untimed call (warm-up), then single timed calls, at least ``reps`` and
    until ``seconds`` have passed; its rate is that of its fastest call (the least disturbed by
    other work on the machine).

    Raises:
        ValueError: a size or ``reps`` below 1, or ``seconds`` negative.
    """
    for name, v in (("m", m), ("k", k), ("n", n), ("reps", reps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"gemm_rate: {name} must be an integer >= 1, got {v!r}")
    if not seconds >= 0:
        raise ValueError(f"gemm_rate: seconds must be >= 0, got {seconds!r}")
    device = torch.device(device)
    a = torch.randn(m, k, dtype=dtype, device=device)
    b = torch.randn(k, n, dtype=dtype, device=device)
    c = torch.empty(m, n, dtype=dtype, device=device)
    calls: dict[str, Callable[[], object]] = {}
    if device.type == "cpu":
        an, bn, cn = a.numpy(), b.numpy(), c.numpy()
        calls["numpy"] = lambda: np.matmul(an, bn, out=cn)
    calls["torch"] = lambda: torch.mm(a, b, out=c)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    rates = {}
    for name, call in calls.items():
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
    if "numpy" in calls:
        time.sleep(_PARK_SECONDS)
    library = max(rates, key=rates.__getitem__)
    return GemmRate(rates[library], library, rates, str(device))


def describe() -> str:
    """One line naming the machine (platform, processor, torch version), for summaries."""
    return (
        f"{platform.platform()}, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}"
    )
