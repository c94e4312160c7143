"""The GEMM bound of W1: the GEMMs of the numba backend's fused sweep alone, in its tiles, order and
threads, with nothing between them. gscfast's time over this one is how far its elementwise work,
its bookkeeping and its Python side keep it from what its GEMM allows; the roof ratio of this row
is what that GEMM reaches on the sweep's products (``bench/README.md``, "W1
against its GEMMs alone").

Per tile of ``T`` samples (``numba_backend.tile_rows``, as the sweep cuts them): the forward
GEMMs of every layer, each output saved in a per-layer store and fed to the next layer, then
the backward GEMMs from the output to layer 1 (the sweep runs no GEMM through layer 0 unless the
input's gradient is asked for) on ping-pong buffers; each GEMM on the GEMM the kernels run: their
own (``backends/_gemm.py``, weights packed) on AVX-512 CPUs, else one single-threaded BLAS call,
``numba.get_num_threads()`` threads each taking every ``nth`` tile (``_numba_kernels.launch``).
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from numba import njit
from torch import nn

from gscfast.backends import _gemm, numba_backend
from gscfast.backends import _numba_kernels as kernels


@njit(nogil=True)
def _sweep_gemms(th, nth, x, W, WT, store, G, U, T):
    N = x.shape[0]
    L = W.shape[0]
    for tile in range(th, (N + T - 1) // T, nth):
        r0 = tile * T
        n = min(N, r0 + T) - r0
        h = x[r0 : r0 + n]
        for i in range(L):
            out = store[th, i, :n]
            _gemm.mul(h, WT[i], out)  # the kernels' own GEMM where the weights are packed
            h = out
        g, u = G[th, :n], U[th, :n]
        g[:] = 0.01  # a fresh gradient per tile, as the error layer gives (never subnormal)
        for i in range(L - 1, 0, -1):
            _gemm.mul(g, W[i], u)
            g, u = u, g


class SweepGemms:
    """``run()`` does the GEMMs of ``gsc(model, x, y, backend="numba")``'s sweep on ``x``; for
    ``gscfast.mlp``-style models whose Linear layers are all ``d x d``."""

    def __init__(self, model: nn.Module, x: torch.Tensor):
        ws = [m.weight.detach() for m in model.modules() if isinstance(m, nn.Linear)]
        d = ws[0].shape[0]
        if any(w.shape != (d, d) for w in ws) or x.shape[1] != d:
            raise ValueError("SweepGemms takes square Linear layers of the input's width")
        dt = x.numpy().dtype
        self.x = np.ascontiguousarray(x.numpy())
        self.W = np.stack([w.numpy() for w in ws]).astype(dt)
        self.WT = np.ascontiguousarray(self.W.transpose(0, 2, 1))
        self.own = numba_backend.own_gemm()  # the GEMM the kernels run
        if self.own:  # packed as the kernels hold them: backward W_i, forward W_i^T
            self.W = np.stack([_gemm.pack(w) for w in self.W])
            self.WT = np.stack([_gemm.pack(w) for w in self.WT])
        self.nth = numba.get_num_threads()
        N = self.x.shape[0]
        self.T = max(1, min(numba_backend.tile_rows(d * d), -(-N // self.nth)))
        L = len(ws)
        self.store = np.zeros((self.nth, L, self.T, d), dt)
        self.G = np.zeros((self.nth, self.T, d), dt)
        self.U = np.zeros((self.nth, self.T, d), dt)

    def run(self) -> None:
        with numba_backend.single_threaded_blas():
            kernels.launch(
                _sweep_gemms,
                self.nth,
                self.x,
                self.W,
                self.WT,
                self.store,
                self.G,
                self.U,
                self.T,
            )
