"""Fused Numba CPU kernels behind the ``"numba"`` backend (``numba_backend.py``).

Layout (index letters as in ``backends/base.py``): a network is ``L`` layers in *model order*
``i = 0 .. L-1`` (layer ``i`` outputs ``f_{L-i}``), each ``Linear -> [LayerNorm | diagonal
BatchNorm] -> [activation]``, described by three flat arrays built in ``numba_backend.py``:

- ``meta [L, NMETA]`` int64: widths, offsets of the weights (``wflat``) and vectors (``vflat``),
  the norm and activation codes, whether the activation derivative is stored;
- ``fmeta [L, NFMETA]`` float64: norm ``eps``, activation parameters;
- ``wflat``/``vflat``: all weights (each packed twice for ``_gemm.mm``, or as ``[d_out, d_in]`` and
  its transpose for ``np.dot``) and vectors (bias, gamma/scale, beta, mean).

Rows are samples (``N = D * B`` of them). Every kernel runs a nogil worker on each of ``nth``
threads (``launch``, at the end of this file); each thread owns a private working set (``store`` for what the backward pass needs, GEMM buffers) and
processes tiles of ``T`` samples one after the other, so intermediate Jacobians never leave the
thread's cache. Per layer and tile there is one GEMM on a ``[T*R, d]`` row stack (``_wmm``: the
kernels' own, ``_gemm.mm``, with the weights packed once per call, on AVX-512 CPUs; else
OpenBLAS's ``np.dot``, single-threaded inside the thread) and one fused elementwise pass
(activation derivative, norm projection, squared norms, statistics) over the GEMM's output while
it is in cache.

Activations save only their output where the derivative follows from it (``tanh'(z) = 1 - y^2``,
``relu'(z) = [y > 0]``, ...), so the saved state is also the next layer's GEMM input.
float32 uses vectorizable approximations of ``tanh``/``exp`` (a few ulp); float64 uses ``math``.

Compile time (a user's first call pays it): a helper compiled with ``HELP`` is compiled once per
argument signature, and numba types a constant argument as a literal (``Literal[int](0)``), a
signature of its own; calls therefore pass constants as ``np.int64(...)``/``np.bool_(...)``.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from . import _gemm, lowering, numba_cache
from .lowering import Act, Norm

# numba's cache for this file: shared by every clone and environment on the machine, keyed by
# the content of this file and of lowering.py, whose codes it freezes in (numba_cache); False
# (no caching) where that cache cannot be written.
CACHE = numba_cache.register(__file__, lowering.__file__, _gemm.__file__)
MM = _gemm.AVAILABLE  # GEMMs on _gemm.mm with packed weights, else np.dot (OpenBLAS)
# 'fast' without nnan/ninf: reductions vectorize, and inf/NaN still propagate as in torch.
FM = {"reassoc", "contract", "nsz", "arcp", "afn"}
INL: dict[str, Any] = dict(
    fastmath=FM, error_model="numpy", inline="always"
)  # small helpers: inlined in numba IR
HELP: dict[str, Any] = dict(
    fastmath=FM, error_model="numpy", cache=CACHE, nogil=True
)  # compiled once, LLVM-inlined

# Activation and norm codes: lowering.Act / lowering.Norm as plain ints (numba freezes module-level
# ints into the compiled kernels; its cache keys on this file, so the codes are ABI, never renumbered).
A_NONE = int(Act.NONE)
A_IDENTITY = int(Act.IDENTITY)
A_RELU = int(Act.RELU)
A_LEAKY = int(Act.LEAKY)
A_TANH = int(Act.TANH)
A_SIGMOID = int(Act.SIGMOID)
A_ELU = int(Act.ELU)
A_SELU = int(Act.SELU)
A_SOFTPLUS = int(Act.SOFTPLUS)
A_GELU = int(Act.GELU)
A_GELU_TANH = int(Act.GELU_TANH)
N_NONE = int(Norm.NONE)
N_LAYER = int(Norm.LAYER)
N_DIAG = int(Norm.DIAG)
N_BATCH = int(Norm.BATCH)  # batch statistics, coupled
# meta columns
# M_PF, M_PB: W^T and W packed for _gemm.mm (forward and backward GEMM) where _gemm.AVAILABLE;
# else M_W, M_WT: W and W^T for np.dot (the others -1)
M_DIN, M_DOUT, M_W, M_B, M_NORM, M_G, M_BETA, M_MEAN, M_ACT, M_DSAVE, M_PRE, M_WT, M_PF, M_PB = (
    range(14)
)
NMETA = 14
F_EPS, F_P0, F_P1 = range(3)
NFMETA = 3
# storage columns (per-row offsets into a thread's ``store``; -1 = absent)
S_H, S_DER, S_XH, S_INV = range(4)
# error codes
E_NONE, E_DOT, E_KL = range(3)

SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946
SQRT_2_PI = math.sqrt(2.0 / math.pi)
INV_SQRT_2 = 1.0 / math.sqrt(2.0)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


# ------------------------------------------------------------------ scalar helpers


def _c(like, value):
    """``value`` as the float type of ``like`` (a scalar or an array)."""


@overload(_c)
def _c_impl(like, value):
    t = like.dtype if isinstance(like, types.Array) else like
    return lambda like, value: t(value)


@intrinsic
def _unowned(typingctx, arr):
    """``arr`` as a borrowed view: the same data, shape and strides, without numba's reference
    count (its meminfo set to null). numba increments and decrements that count, with an atomic
    instruction each, for every view it makes (``Z[t]``, ``store[o : o + d]``, ...) and every
    array an inlined helper receives; the kernels do that several times per row and layer, and
    those atomics took about 30% of a sweep's time. Views of a borrowed array carry no count
    either. The caller must keep ``arr`` alive while the view is used: the workers borrow their
    arguments, which their Python caller holds for the length of the call, and never return or
    keep such a view."""
    if not isinstance(arr, types.Array):
        return None

    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, value=args[0])
        a.meminfo = cgutils.get_null_value(a.meminfo.type)
        a.parent = cgutils.get_null_value(a.parent.type)
        return a._getvalue()

    return arr(arr), codegen


@intrinsic
def _bits_as_f32(typingctx, n):
    """Reinterpret the low 32 bits of an integer as a float32 (for ``2**n``)."""

    def codegen(context, builder, sig, args):
        v = args[0]
        if v.type.width != 32:
            v = builder.trunc(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())

    return types.float32(n), codegen


@njit(**INL)
def _exp32(x):
    """float32 ``exp`` (Cephes ``expf`` polynomial, exact ``2**n`` by bit construction);
    vectorizes. Relative error ~2 ulp; saturates below -87 (returns ~1e-38) and above 88."""
    x = min(max(x, np.float32(-87.0)), np.float32(88.0))
    n = np.floor(x * np.float32(1.44269504088896341) + np.float32(0.5))
    r = x - n * np.float32(0.693359375) - n * np.float32(-2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    e = p * r * r + r + np.float32(1.0)
    return e * _bits_as_f32((np.int32(n) + 127) << 23)


@njit(**INL)
def _tanh32(x):
    """float32 ``tanh``; vectorizes. Below ``|x| = 0.625`` Eigen's rational approximation (a few
    ulp, where ``1 - tanh^2`` is large); above, ``1 - 2 / (exp(2|x|) + 1)``, whose error is a few
    ulp of ``1 - |tanh|``, not of ``tanh``: near saturation the derivative ``1 - y^2`` that the
    backward takes from ``y`` (as torch's does) is then as precise as from torch's own tanh (with
    the rational form alone, a tanh layer at ``z = 3.5`` put 1e-4 into float32 GSCs, ten times
    torch's error). NaN takes the rational branch and stays NaN."""
    ax = abs(x)
    c = np.float32(7.90531110763549805)
    xr = min(max(x, -c), c)
    x2 = xr * xr
    p = np.float32(-2.76076847742355e-16)
    p = p * x2 + np.float32(2.00018790482477e-13)
    p = p * x2 + np.float32(-8.60467152213735e-11)
    p = p * x2 + np.float32(5.12229709037114e-08)
    p = p * x2 + np.float32(1.48572235717979e-05)
    p = p * x2 + np.float32(6.37261928875436e-04)
    p = p * x2 + np.float32(4.89352455891786e-03)
    q = np.float32(1.19825839466702e-06)
    q = q * x2 + np.float32(1.18534705686654e-04)
    q = q * x2 + np.float32(2.26843463243900e-03)
    q = q * x2 + np.float32(4.89352518554385e-03)
    # both branches, then a select: the loops that call this stay vectorized (~11% of W1 tanh)
    big = math.copysign(np.float32(1.0) - np.float32(2.0) / (_exp32(ax + ax) + np.float32(1.0)), x)
    small = xr * p / q
    return big if ax >= np.float32(0.625) else small


def _tanh(x):
    """``tanh`` in ``x``'s precision."""


@overload(_tanh)
def _tanh_impl(x):
    if x == types.float32:
        return lambda x: _tanh32(x)
    return lambda x: math.tanh(x)


def _exp(x):
    """``exp`` in ``x``'s precision."""


@overload(_exp)
def _exp_impl(x):
    if x == types.float32:
        return lambda x: _exp32(x)
    return lambda x: math.exp(x)


def _expm1_exp(x):
    """``(exp(x) - 1, exp(x))`` in ``x``'s precision, the first accurate near 0: in float32 from
    one ``exp`` (ELU's and SELU's output and derivative at the cost of one)."""


@overload(_expm1_exp)
def _expm1_exp_impl(x):
    if x == types.float32:

        def impl(x):
            small = x * (
                np.float32(1.0)
                + x
                * (
                    np.float32(0.5)
                    + x
                    * (
                        np.float32(1.0 / 6.0)
                        + x * (np.float32(1.0 / 24.0) + x * np.float32(1.0 / 120.0))
                    )
                )
            )
            e = _exp32(x)
            return (small if abs(x) < np.float32(0.03) else e - np.float32(1.0)), e

        return impl
    return lambda x: (math.expm1(x), math.exp(x))


@njit(**INL)
def _elu(z, a):
    """``(alpha (exp(z) - 1), alpha exp(z))`` for ``z <= 0``, else ``(z, 1)``: ELU's output and
    derivative (SELU's up to its scale); the derivative from ``z``, never as ``y + alpha``
    (``saves_derivative``)."""
    if z > 0:
        return z, _c(z, 1.0)
    em, e = _expm1_exp(z)
    return a * em, a * e


# ------------------------------------------------------------------ views


@njit(**INL)
def _weight(wflat, meta, i):
    """``W_i [d_out, d_in]``."""
    o = meta[i, M_W]
    return wflat[o : o + meta[i, M_DOUT] * meta[i, M_DIN]].reshape(
        (meta[i, M_DOUT], meta[i, M_DIN])
    )


@njit(**INL)
def _weight_t(wflat, meta, i):
    """``W_i^T [d_in, d_out]``, a contiguous copy: the forward GEMM ``h @ W^T`` is then a
    plain (NN) product, which OpenBLAS's small-matrix kernels run without packing."""
    o = meta[i, M_WT]
    return wflat[o : o + meta[i, M_DOUT] * meta[i, M_DIN]].reshape(
        (meta[i, M_DIN], meta[i, M_DOUT])
    )


@njit(**INL)
def _wmm(A, wflat, meta, i, fwd, C):
    """``C = A @ W_i^T`` (``fwd``, the forward product) or ``C = A @ W_i``: on ``_gemm.mm`` with the
    packed weights where the CPU allows (``MM``), else OpenBLAS."""
    if MM:
        _gemm.mm(A, wflat, meta[i, M_PF] if fwd else meta[i, M_PB], C)
    elif fwd:
        np.dot(A, _weight_t(wflat, meta, i), C)
    else:
        np.dot(A, _weight(wflat, meta, i), C)


@njit(**INL)
def _vec(vflat, off, d):
    return vflat[off : off + d]


@njit(**INL)
def _rows_at(store, sto, T, i, col, r0, n, d):
    """Rows ``r0 .. r0+n`` (``[n, d]``) of layer ``i``'s saved item ``col`` in a ``store`` of
    ``T`` rows per item."""
    o = sto[i, col] * T + r0 * d
    return store[o : o + n * d].reshape((n, d))


# ------------------------------------------------------------------ forward


@njit(**HELP)
def _act_rows(code, p0, p1, Z, Y, DER, dsave, sq):
    """``Y = s(Z)`` on the rows ``Z [n, d]`` (``DER = s'(Z)`` if ``dsave``); ``sq[t] = ||Y[t]||^2``.

    One branch on the activation per tile, its row loops inside: dispatching per row of 100
    values cost a sixth of W1's forward (bench/README, "Elementwise passes per tile"). Compiled
    once and called, like ``_norm_rows`` and ``_dvec_rows``: inlined in numba's IR at every call
    site, these loops made the cold compile of the sweeps a quarter to a third longer.
    ``DER`` may alias ``Z`` when ``dsave`` is false (nothing is saved then): ``Z`` must survive,
    since it is the pre-activation the statistics read."""
    n, d = Z.shape
    if code == A_NONE or code == A_IDENTITY:
        for t in range(n):
            z, y = Z[t], Y[t]
            s = _c(Z, 0.0)
            for j in range(d):
                v = z[j]
                y[j] = v
                s += v * v
            sq[t] = s
    elif code == A_RELU:
        for t in range(n):
            z, y = Z[t], Y[t]
            s = _c(Z, 0.0)
            for j in range(d):
                v = z[j]
                v = v if v > 0 else _c(Z, 0.0)
                y[j] = v
                s += v * v
            sq[t] = s
    elif code == A_LEAKY:
        a = _c(Z, p0)
        for t in range(n):
            z, y = Z[t], Y[t]
            s = _c(Z, 0.0)
            for j in range(d):
                v = z[j]
                v = v if v > 0 else v * a
                y[j] = v
                s += v * v
            sq[t] = s
            if dsave:
                der = DER[t]
                for j in range(d):
                    der[j] = _c(Z, 1.0) if z[j] > 0 else a
    elif code == A_TANH:
        for t in range(n):
            z, y = Z[t], Y[t]
            s = _c(Z, 0.0)
            for j in range(d):
                v = _tanh(z[j])
                y[j] = v
                s += v * v
            sq[t] = s
    elif code == A_SIGMOID:
        for t in range(n):
            z, y = Z[t], Y[t]
            s = _c(Z, 0.0)
            for j in range(d):
                v = _c(Z, 1.0) / (_c(Z, 1.0) + _exp(-z[j]))
                y[j] = v
                s += v * v
            sq[t] = s
    elif code == A_ELU or code == A_SELU:
        a = _c(Z, p0 if code == A_ELU else SELU_ALPHA)
        sc = _c(Z, 1.0 if code == A_ELU else SELU_SCALE)
        for t in range(n):
            z, y, der = Z[t], Y[t], DER[t]
            s = _c(Z, 0.0)
            if dsave:
                for j in range(d):
                    v, g = _elu(z[j], a)
                    v = sc * v
                    y[j] = v
                    der[j] = sc * g
                    s += v * v
            else:
                for j in range(d):
                    v = sc * _elu(z[j], a)[0]
                    y[j] = v
                    s += v * v
            sq[t] = s
    elif code == A_SOFTPLUS:
        b = _c(Z, p0)
        th = _c(Z, p1)
        one = _c(Z, 1.0)
        for t in range(n):
            z, y, der = Z[t], Y[t], DER[t]
            s = _c(Z, 0.0)
            for j in range(d):
                bz = b * z[j]
                if bz > th:
                    v = z[j]
                    g = one
                else:
                    e = _exp(bz)
                    v = math.log1p(e) / b
                    g = e / (one + e)
                y[j] = v
                if dsave:
                    der[j] = g
                s += v * v
            sq[t] = s
    elif code == A_GELU:
        half = _c(Z, 0.5)
        for t in range(n):
            z, y, der = Z[t], Y[t], DER[t]
            s = _c(Z, 0.0)
            for j in range(d):
                x = z[j]
                cdf = half * (_c(Z, 1.0) + math.erf(x * _c(Z, INV_SQRT_2)))
                pdf = _exp(-half * x * x) * _c(Z, INV_SQRT_2PI)
                v = x * cdf
                y[j] = v
                if dsave:
                    der[j] = cdf + x * pdf
                s += v * v
            sq[t] = s
    else:  # A_GELU_TANH
        half = _c(Z, 0.5)
        k = _c(Z, SQRT_2_PI)
        c3 = _c(Z, 0.044715)
        one = _c(Z, 1.0)
        for t in range(n):
            z, y, der = Z[t], Y[t], DER[t]
            s = _c(Z, 0.0)
            for j in range(d):
                x = z[j]
                tt = _tanh(k * (x + c3 * x * x * x))
                v = half * x * (one + tt)
                y[j] = v
                if dsave:
                    der[j] = half * (one + tt) + half * x * (one - tt * tt) * k * (
                        one + 3 * c3 * x * x
                    )
                s += v * v
            sq[t] = s


@njit(**HELP)
def _norm_rows(meta, fmeta, vflat, i, Z, XH, INV, save):
    """Bias and norm of layer ``i`` in place on the rows ``Z [n, d]``; with ``save``, LayerNorm
    saves ``XH [n, d]`` and ``INV[t] = 1/sigma``."""
    n, d = Z.shape
    bo = meta[i, M_B]
    norm = meta[i, M_NORM]
    if norm == N_LAYER:
        go = meta[i, M_G]
        beo = meta[i, M_BETA]
        eps = _c(Z, fmeta[i, F_EPS])
        for t in range(n):
            z = Z[t]
            if bo >= 0:
                b = _vec(vflat, bo, d)
                for j in range(d):
                    z[j] += b[j]
            m = _c(Z, 0.0)
            for j in range(d):
                m += z[j]
            m = m / d
            var = _c(Z, 0.0)
            for j in range(d):
                tt = z[j] - m
                var += tt * tt
            var = var / d
            if not _c(Z, var) < math.inf:  # beyond the data dtype's range (var may be wider):
                var = math.nan  # NaN outputs (refused, as by every backend), not silent zeros
            inv = _c(Z, 1.0) / math.sqrt(var + eps)
            for j in range(d):
                z[j] = (z[j] - m) * inv
            if save:
                xh = XH[t]
                for j in range(d):
                    xh[j] = z[j]
                INV[t] = inv
            if go >= 0:
                g = _vec(vflat, go, d)
                for j in range(d):
                    z[j] *= g[j]
            if beo >= 0:
                be = _vec(vflat, beo, d)
                for j in range(d):
                    z[j] += be[j]
    elif norm == N_DIAG:
        mean = _vec(vflat, meta[i, M_MEAN], d)
        sc = _vec(vflat, meta[i, M_G], d)
        beo = meta[i, M_BETA]
        for t in range(n):
            z = Z[t]
            if bo >= 0:
                b = _vec(vflat, bo, d)
                for j in range(d):
                    z[j] += b[j]
            for j in range(d):
                z[j] = (z[j] - mean[j]) * sc[j]
            if beo >= 0:
                be = _vec(vflat, beo, d)
                for j in range(d):
                    z[j] += be[j]
    elif bo >= 0:
        b = _vec(vflat, bo, d)
        for t in range(n):
            z = Z[t]
            for j in range(d):
                z[j] += b[j]


@njit(**INL)
def _layer_rows(i, Zm, r0, meta, fmeta, vflat, store, sto, T, save, sq):
    """Everything of layer ``i`` after its GEMM on the rows ``Zm [n, d_out]`` (rows ``r0..`` of
    the ``store``, ``T`` rows per item): bias, norm, activation in place, the output and (if
    ``save``) the VJP state into the ``store``, ``sq[t] = ||f[t]||^2``."""
    n, dout = Zm.shape
    ln = save and meta[i, M_NORM] == N_LAYER
    dsave = save and meta[i, M_DSAVE] == 1
    XH = _rows_at(store, sto, T, i, S_XH, r0, n, dout) if ln else Zm
    INV = store[sto[i, S_INV] * T + r0 : sto[i, S_INV] * T + r0 + n] if ln else sq
    _norm_rows(meta, fmeta, vflat, i, Zm, XH, INV, ln)
    DER = _rows_at(store, sto, T, i, S_DER, r0, n, dout) if dsave else Zm
    _act_rows(
        meta[i, M_ACT],
        fmeta[i, F_P0],
        fmeta[i, F_P1],
        Zm,
        _rows_at(store, sto, T, i, S_H, r0, n, dout),
        DER,
        dsave,
        sq,
    )


@njit(**HELP)
def _moments_tile(Z, n, d, mi, mean, m2, pos, neg, cnt, tmp):
    """Merge the per-neuron moments of ``Z [n, d]`` into row ``mi`` of the accumulators (Chan et
    al.). The tile's own in one pass over it, four rows at a time (the float64 accumulators are
    loaded and stored once per four rows: the two-pass form stored them twice per row, which
    bound it), shifted by the tile's first row (the shifted-data algorithm: no cancellation
    where a neuron's mean is far from zero). ``tmp [5, >= d]`` is scratch."""
    K, s1, s2, p, ng = tmp[0], tmp[1], tmp[2], tmp[3], tmp[4]
    for j in range(d):
        K[j] = Z[0, j]
        s1[j] = 0.0
        s2[j] = 0.0
        p[j] = 0.0
        ng[j] = 0.0
    t = 0
    while t + 4 <= n:
        z0, z1, z2, z3 = Z[t], Z[t + 1], Z[t + 2], Z[t + 3]
        for j in range(d):
            k = K[j]
            a0 = z0[j] - k
            a1 = z1[j] - k
            a2 = z2[j] - k
            a3 = z3[j] - k
            s1[j] += (a0 + a1) + (a2 + a3)
            s2[j] += (a0 * a0 + a1 * a1) + (a2 * a2 + a3 * a3)
            p[j] += ((1.0 if z0[j] > 0 else 0.0) + (1.0 if z1[j] > 0 else 0.0)) + (
                (1.0 if z2[j] > 0 else 0.0) + (1.0 if z3[j] > 0 else 0.0)
            )
            ng[j] += ((1.0 if z0[j] < 0 else 0.0) + (1.0 if z1[j] < 0 else 0.0)) + (
                (1.0 if z2[j] < 0 else 0.0) + (1.0 if z3[j] < 0 else 0.0)
            )
        t += 4
    for r in range(t, n):
        z = Z[r]
        for j in range(d):
            a = z[j] - K[j]
            s1[j] += a
            s2[j] += a * a
            p[j] += 1.0 if z[j] > 0 else 0.0
            ng[j] += 1.0 if z[j] < 0 else 0.0
    na = cnt
    tot = na + n
    for j in range(d):
        tm = K[j] + s1[j] / n
        delta = tm - mean[mi, j]
        mean[mi, j] += delta * (n / tot)
        m2[mi, j] += (s2[j] - s1[j] * s1[j] / n) + delta * delta * (na * n / tot)
        pos[mi, j] += p[j]
        neg[mi, j] += ng[j]


@njit(**HELP)
def _layer_fwd(i, hin, n, meta, fmeta, wflat, vflat, store, sto, T, Z, sqo, so, L, save):
    """Layer ``i`` on ``hin [n, d_in]``: GEMM into ``Z``, then bias, norm, activation,
    ``||f||^2`` into ``sqo[so + t, L - i]`` and the saved state (``_layer_rows``). Leaves the
    pre-activation in ``Z [n, d_out]`` (returned) and the output in ``store`` item ``S_H``."""
    dout = meta[i, M_DOUT]
    Zm = Z[: n * dout].reshape((n, dout))
    _wmm(hin, wflat, meta, i, True, Zm)
    _layer_rows(i, Zm, 0, meta, fmeta, vflat, store, sto, T, save, sqo[so : so + n, L - i])
    return Zm


@njit(**HELP)
def _error_rows(err, out, yv, ylab, r0, n, d, G, sqo, so):
    """The error layer on the model outputs ``out [n, d]`` (rows ``r0..`` of ``yv``/``ylab``):
    ``f_0^2`` into ``sqo[so + t, 0]`` and the
    gradient ``d e / d f_1`` into ``G [n * d]``."""
    for t in range(n):
        o = out[t]
        if err == E_DOT:
            y = yv[r0 + t]
            e = 0.0
            for j in range(d):
                e += o[j] * y[j]
                G[t * d + j] = y[j]
        else:
            c = ylab[r0 + t]
            mx = o[0]
            for j in range(d):
                mx = max(mx, o[j])
            s = 0.0
            for j in range(d):
                s += math.exp(float(o[j]) - mx)
            lse = mx + math.log(s)
            e = lse - o[c]
            for j in range(d):
                G[t * d + j] = math.exp(float(o[j]) - lse) - (1.0 if j == c else 0.0)
        sqo[so + t, 0] = e * e


# ------------------------------------------------------------------ backward


def saves_derivative(act: int, p0: float) -> bool:
    """Whether a layer stores its activation derivative (``M_DSAVE``). ``_dvec_rows`` computes it
    from the saved output ``y``, which saves a row per sample, where torch's autograd does too:
    relu and leaky relu of a slope >= 0 (exact: the sign of ``y`` tells the branch), tanh ``1 -
    y^2`` and sigmoid ``y (1 - y)`` (near saturation both lose relative precision in the tiny
    derivative, exactly as torch's backward does: float32 tanh at ``z = 5``, 2e-4). Not ELU and
    SELU, whose derivative torch takes from ``z``: their negative branch's ``alpha exp(z)`` is
    ``y + alpha`` in exact arithmetic, but from a rounded ``y`` it cancels where ``z`` is very
    negative (1.4-2.2% at ``z = -14`` in float32, found as a float32 Jacobian 1000x further from
    float64 than torch's); they save ``alpha exp(z)`` computed from ``z``."""
    if act == A_LEAKY:
        return p0 < 0
    return act in (A_ELU, A_SELU, A_SOFTPLUS, A_GELU, A_GELU_TANH)


@njit(**HELP)
def _dvec_rows(DV, t0, i, meta, fmeta, vflat, store, sto, T):
    """``DV [n, d_out]``: the diagonal part of layer ``i``'s elementwise VJP for the samples
    ``t0 .. t0+n`` of ``store``: the activation derivative times the batch-norm scale or the
    layer-norm gamma. One branch per tile, as in ``_act_rows``."""
    n, d = DV.shape
    code = meta[i, M_ACT]
    if meta[i, M_DSAVE] == 1:
        DER = _rows_at(store, sto, T, i, S_DER, t0, n, d)
        for t in range(n):
            for j in range(d):
                DV[t, j] = DER[t, j]
    elif code == A_RELU or code == A_LEAKY:
        H = _rows_at(store, sto, T, i, S_H, t0, n, d)
        a = _c(DV, 0.0) if code == A_RELU else _c(DV, fmeta[i, F_P0])
        for t in range(n):
            for j in range(d):
                DV[t, j] = _c(DV, 1.0) if H[t, j] > 0 else a
    elif code == A_TANH:
        H = _rows_at(store, sto, T, i, S_H, t0, n, d)
        for t in range(n):
            for j in range(d):
                DV[t, j] = _c(DV, 1.0) - H[t, j] * H[t, j]
    elif code == A_SIGMOID:
        H = _rows_at(store, sto, T, i, S_H, t0, n, d)
        for t in range(n):
            for j in range(d):
                DV[t, j] = H[t, j] * (_c(DV, 1.0) - H[t, j])
    else:  # A_NONE, A_IDENTITY (every other activation saves its derivative)
        for t in range(n):
            for j in range(d):
                DV[t, j] = 1
    norm = meta[i, M_NORM]
    if norm != N_NONE and meta[i, M_G] >= 0:  # layer-norm gamma or batch-norm scale
        g = _vec(vflat, meta[i, M_G], d)
        for t in range(n):
            for j in range(d):
                DV[t, j] *= g[j]


@njit(**HELP)
def _ebwd_rows(U, rows, d, R, i, meta, fmeta, vflat, store, sto, T, sq, do_sq, do_ebwd, t0):
    """For the rows ``U[k*d:(k+1)*d]``, ``k < rows`` (``R`` consecutive rows per sample), in one
    pass: ``sq[k] = ||row||^2`` if ``do_sq``, then, if ``do_ebwd``, layer ``i``'s elementwise VJP
    in place (activation derivative, norm) — everything of its VJP but the GEMM with ``W_i``.
    Row ``k`` belongs to sample ``t0 + k // R`` of ``store``. Batch statistics (``N_BATCH``): only
    the diagonal part here; the projection over samples is the caller's."""
    if not do_ebwd:
        for k in range(rows):
            sq[k] = _sq(U[k * d : (k + 1) * d])
        return
    ns = rows // R
    DV = np.empty((ns, d), U.dtype)
    _dvec_rows(DV, t0, i, meta, fmeta, vflat, store, sto, T)
    layer = meta[i, M_NORM] == N_LAYER
    XH = _rows_at(store, sto, T, i, S_XH, t0, ns, d) if layer else DV
    io = sto[i, S_INV] * T + t0 if layer else 0
    for t in range(ns):
        dv = DV[t]
        for r in range(R):
            k = t * R + r
            row = U[k * d : (k + 1) * d]
            s = _c(row, 0.0)
            for j in range(d):
                v = row[j]
                s += v * v
                row[j] = v * dv[j]
            if do_sq:
                sq[k] = s
            if layer:
                xh = XH[t]
                inv = store[io + t]
                mu = _c(row, 0.0)
                c = _c(row, 0.0)
                for j in range(d):
                    mu += row[j]
                    c += row[j] * xh[j]
                mu = mu / d
                c = c / d
                for j in range(d):
                    row[j] = (row[j] - mu - xh[j] * c) * inv


@njit(**INL)
def _sq(g):
    s = _c(g, 0.0)
    for j in range(g.shape[0]):
        s += g[j] * g[j]
    return s


@njit(**HELP)
def _gemm_bwd(V, rows, i, meta, wflat, U):
    """``U[:rows*d_in] = V[:rows*d_out] @ W_i`` (flat buffers, as matrices)."""
    dout = meta[i, M_DOUT]
    din = meta[i, M_DIN]
    _wmm(
        V[: rows * dout].reshape((rows, dout)),
        wflat,
        meta,
        i,
        False,
        U[: rows * din].reshape((rows, din)),
    )


@njit(**HELP)
def _chain_tile(
    V, U, n, R, i_first, meta, fmeta, wflat, vflat, store, sto, T, res, r0, col, rdiv, L, sq
):
    """Push the row stack ``V [n*R, d]`` (already through layer ``i_first``'s elementwise VJP)
    through the GEMMs of layers ``i_first .. 1``; after each, in the same pass, the squared norm
    of every sample's rows into ``res[r0 + t, L - i + 1, col]`` and the next layer's elementwise
    VJP. Returns the buffer holding the last stack."""
    for i in range(i_first, 0, -1):
        _gemm_bwd(V, n * R, i, meta, wflat, U)
        d = meta[i, M_DIN]
        k = L - i + 1
        _ebwd_rows(
            U,
            n * R,
            d,
            R,
            i - 1,
            meta,
            fmeta,
            vflat,
            store,
            sto,
            T,
            sq,
            np.bool_(True),
            i >= 2,
            np.int64(0),
        )
        for t in range(n):
            acc = 0.0
            for r in range(R):
                acc += sq[t * R + r]
            res[r0 + t, k, col] = acc / rdiv
        V, U = U, V
    return V


# ------------------------------------------------------------------ tiles and kernels


@njit(**HELP)
def _forward(
    x,
    r0,
    n,
    i_stop,
    meta,
    fmeta,
    wflat,
    vflat,
    store,
    sto,
    T,
    Z,
    sqo,
    so,
    save,
    stats,
    mean,
    m2,
    pos,
    neg,
    cnt,
    tmp,
):
    """Layers ``0 .. i_stop-1`` on rows ``r0 .. r0+n`` of ``x``: outputs (and, if ``save``, the
    VJP state) in ``store``, ``||f||^2`` into ``sqo[so + t]``, moments if ``stats``."""
    L = meta.shape[0]
    for i in range(i_stop):
        if i == 0:
            hin = x[r0 : r0 + n]
        else:
            hin = _rows_at(store, sto, T, i - 1, S_H, 0, n, meta[i, M_DIN])
        Zm = _layer_fwd(i, hin, n, meta, fmeta, wflat, vflat, store, sto, T, Z, sqo, so, L, save)
        if stats and meta[i, M_PRE] == 1:
            _moments_tile(Zm, n, meta[i, M_DOUT], i, mean, m2, pos, neg, cnt, tmp)


@njit(**HELP)
def _start_rows(
    V, n, R, l, i0, apply, nprobe, probes, poff, meta, fmeta, vflat, store, sto, T, res, r0, sq, t0
):
    """Start rows at ``f_l`` (identity or probes) for the ``n`` samples from ``t0`` of ``store``,
    through layer ``i0``'s elementwise VJP if ``apply``; ``res[r0 + t, l, l] = ||V||^2 / R``
    (probes) or ``d_l`` (identity)."""
    d = meta[i0, M_DOUT]
    for t in range(n):
        for r in range(R):
            row = V[(t * R + r) * d : (t * R + r + 1) * d]
            if nprobe == 0:
                for j in range(d):
                    row[j] = 0
                row[r] = 1
            else:
                src = probes[poff[l] + r * d : poff[l] + (r + 1) * d]
                for j in range(d):
                    row[j] = src[j]
    _ebwd_rows(
        V,
        n * R,
        d,
        R,
        i0,
        meta,
        fmeta,
        vflat,
        store,
        sto,
        T,
        sq,
        np.bool_(True),
        apply,
        t0,
    )
    if res.shape[0] > 0:
        for t in range(n):
            acc = 0.0
            for r in range(R):
                acc += sq[t * R + r]
            res[r0 + t, l, l] = acc / (1.0 if nprobe == 0 else R)


@njit(**HELP)
def _sweep_worker(
    th,
    nth,
    x,
    err,
    yv,
    ylab,
    meta,
    fmeta,
    wflat,
    vflat,
    sto,
    rowsz,
    T,
    dmax,
    grads,
    stats,
    sqo,
    sqg,
    hout,
    gin,
    keep,
    fwd,
    R,
    i0,
    mean,
    m2,
    pos,
    neg,
    cnt,
    ws,
):
    # borrowed views of the arguments (_unowned): no atomic reference counting per view
    x, yv, ylab, meta = _unowned(x), _unowned(yv), _unowned(ylab), _unowned(meta)
    fmeta, wflat, vflat, sto = _unowned(fmeta), _unowned(wflat), _unowned(vflat), _unowned(sto)
    sqo, sqg, hout, gin = _unowned(sqo), _unowned(sqg), _unowned(hout), _unowned(gin)
    keep, mean, m2, pos = _unowned(keep), _unowned(mean), _unowned(m2), _unowned(pos)
    neg, cnt, ws = _unowned(neg), _unowned(cnt), _unowned(ws)
    N = x.shape[0]
    L = meta.shape[0]
    ntiles = (N + T - 1) // T
    res = sqg.reshape((sqg.shape[0], sqg.shape[1], 1))
    w = ws[th]  # this thread's workspace: sweep_ws(...) elements
    store = w[: T * rowsz]
    o = T * rowsz
    Z = w[o : o + T * dmax]
    G = w[o + T * dmax : o + (1 + R) * T * dmax]
    U = w[o + (1 + R) * T * dmax : o + (1 + 2 * R) * T * dmax]
    tmp = np.zeros((5, dmax))
    sq = np.empty(T * R)
    for tile in range(th, ntiles, nth):
        r0 = tile * T
        n = min(N, r0 + T) - r0
        if keep.shape[0] > 0:  # a span's state, kept from its forward call to its backward call
            store = keep[r0 * rowsz : (r0 + T) * rowsz]
        if fwd:
            _forward(
                x,
                r0,
                n,
                L,
                meta,
                fmeta,
                wflat,
                vflat,
                store,
                sto,
                T,
                Z,
                sqo,
                r0,
                grads,
                stats,
                mean[th],
                m2[th],
                pos[th],
                neg[th],
                cnt[th],
                tmp,
            )
            cnt[th] += n
        d1 = meta[L - 1, M_DOUT]
        if fwd and hout.shape[0] > 0:
            hout[r0 : r0 + n] = _rows_at(store, sto, T, L - 1, S_H, 0, n, d1)
        if err == E_NONE:
            continue
        if fwd:
            out = _rows_at(store, sto, T, L - 1, S_H, 0, n, d1)
            _error_rows(err, out, yv, ylab, r0, n, d1, G, sqo, r0)
        else:  # a span's backward call: R rows per sample at the output of its layer i0
            d1 = meta[i0, M_DOUT]
            for k in range(n * R):
                src = yv[r0 * R + k]
                for j in range(d1):
                    G[k * d1 + j] = src[j]
        if not grads:
            continue
        _ebwd_rows(
            G,
            n * R,
            d1,
            R,
            i0,
            meta,
            fmeta,
            vflat,
            store,
            sto,
            T,
            sq,
            np.bool_(True),
            i0 >= 1,
            np.int64(0),
        )
        for t in range(n):
            acc = 0.0
            for r in range(R):
                acc += sq[t * R + r]
            sqg[r0 + t, L - i0] = acc
        V = _chain_tile(
            G,
            U,
            n,
            R,
            i0,
            meta,
            fmeta,
            wflat,
            vflat,
            store,
            sto,
            T,
            res,
            r0,
            np.int64(0),
            1.0,
            L,
            sq,
        )
        if gin.shape[0] > 0:  # the gradient at the input: layer 0's whole VJP
            d = meta[0, M_DOUT]
            _ebwd_rows(
                V,
                n * R,
                d,
                R,
                np.int64(0),
                meta,
                fmeta,
                vflat,
                store,
                sto,
                T,
                sq,
                np.bool_(False),
                np.bool_(True),
                np.int64(0),
            )
            rows = n * R
            _wmm(
                V[: rows * d].reshape((rows, d)),
                wflat,
                meta,
                np.int64(0),
                False,
                gin[r0 * R : r0 * R + rows],
            )


def sweep_kernel(
    x,
    err,
    yv,
    ylab,
    meta,
    fmeta,
    wflat,
    vflat,
    sto,
    rowsz,
    T,
    dmax,
    grads,
    stats,
    sqo,
    sqg,
    hout,
    gin,
    keep,
    fwd,
    R,
    i0,
    mean,
    m2,
    pos,
    neg,
    cnt,
    ws,
):
    """Forward (and backward if ``grads``) sweep of every row of ``x [N, n]``.

    Writes ``sqo [N, L+1]`` (``||f_l||^2``; column 0 the squared error if ``err``), ``sqg [N, L+1]``
    (``||d f_0 / d f_l||^2`` for ``l >= 1``) and, if ``stats``, per-thread pre-activation moments
    ``mean, m2, pos, neg [nth, L, dmax]`` with sample counts ``cnt [nth]``.

    A span of a mixed model runs in two calls (unused outputs have no rows). The forward call
    (``fwd``, ``grads`` to save the VJP state, ``err = E_NONE``) writes ``sqo``, the moments,
    the output ``hout [N, d_1]`` and the state of every tile of ``T`` samples into ``keep
    [N_tiles * T * rowsz]``; the backward call (not ``fwd``, same ``T`` and ``keep``, ``err =
    E_DOT``) takes ``R`` rows per sample at the output of its layer ``i0`` (model order; the
    span's output for ``i0 = L - 1``), ``yv [N * R, d]`` (a gradient, or the rows of a Jacobian),
    and writes ``sqg`` from column ``L - i0`` on (each sample's sum over its rows) and ``gin
    [N * R, n]``, the rows at the input. Other calls have ``R = 1`` and ``i0 = L - 1``.
    """
    launch(
        _sweep_worker,
        cnt.shape[0],
        x,
        err,
        yv,
        ylab,
        meta,
        fmeta,
        wflat,
        vflat,
        sto,
        rowsz,
        T,
        dmax,
        grads,
        stats,
        sqo,
        sqg,
        hout,
        gin,
        keep,
        fwd,
        R,
        i0,
        mean,
        m2,
        pos,
        neg,
        cnt,
        ws,
    )


@njit(**HELP)
def _chain_worker(
    th,
    nth,
    x,
    err,
    yv,
    ylab,
    meta,
    fmeta,
    wflat,
    vflat,
    sto,
    rowsz,
    T,
    dmax,
    rmax,
    probes,
    poff,
    nprobe,
    res,
    ws,
):
    # borrowed views of the arguments (_unowned): no atomic reference counting per view
    x, yv, ylab, meta = _unowned(x), _unowned(yv), _unowned(ylab), _unowned(meta)
    fmeta, wflat, vflat, sto = _unowned(fmeta), _unowned(wflat), _unowned(vflat), _unowned(sto)
    probes, poff, res, ws = _unowned(probes), _unowned(poff), _unowned(res), _unowned(ws)
    N = x.shape[0]
    L = meta.shape[0]
    ntiles = (N + T - 1) // T
    w = ws[th]  # chain_ws(...) elements
    store = w[: T * rowsz]
    o = T * rowsz
    Z = w[o : o + T * dmax]
    o += T * dmax
    V = w[o : o + T * rmax * dmax]
    o += T * rmax * dmax
    U = w[o : o + T * rmax * dmax]
    o += T * rmax * dmax
    sqo = w[o : o + T * (L + 1)].reshape((T, L + 1))
    tmp = np.zeros((5, dmax))
    dummy = np.zeros((1, 1))
    sq = np.empty(T * rmax)
    for tile in range(th, ntiles, nth):
        r0 = tile * T
        n = min(N, r0 + T) - r0
        _forward(
            x,
            r0,
            n,
            L,
            meta,
            fmeta,
            wflat,
            vflat,
            store,
            sto,
            T,
            Z,
            sqo,
            np.int64(0),
            np.bool_(True),
            np.bool_(False),
            dummy,
            dummy,
            dummy,
            dummy,
            np.int64(0),
            tmp,
        )
        if err != E_NONE:
            d1 = meta[L - 1, M_DOUT]
            _error_rows(
                err,
                _rows_at(store, sto, T, L - 1, S_H, 0, n, d1),
                yv,
                ylab,
                r0,
                n,
                d1,
                V,
                sqo,
                np.int64(0),
            )
            _ebwd_rows(
                V,
                n,
                d1,
                np.int64(1),
                L - 1,
                meta,
                fmeta,
                vflat,
                store,
                sto,
                T,
                sq,
                np.bool_(True),
                L >= 2,
                np.int64(0),
            )
            for t in range(n):
                res[r0 + t, 1, 0] = sq[t]
            _chain_tile(
                V,
                U,
                n,
                np.int64(1),
                L - 1,
                meta,
                fmeta,
                wflat,
                vflat,
                store,
                sto,
                T,
                res,
                r0,
                np.int64(0),
                1.0,
                L,
                sq,
            )
        for l in range(1, L + 1):
            i0 = L - l
            R = meta[i0, M_DOUT] if nprobe == 0 else nprobe
            _start_rows(
                V,
                n,
                R,
                l,
                i0,
                i0 >= 1,
                nprobe,
                probes,
                poff,
                meta,
                fmeta,
                vflat,
                store,
                sto,
                T,
                res,
                r0,
                sq,
                np.int64(0),
            )
            if i0 >= 1:
                _chain_tile(
                    V,
                    U,
                    n,
                    R,
                    i0,
                    meta,
                    fmeta,
                    wflat,
                    vflat,
                    store,
                    sto,
                    T,
                    res,
                    r0,
                    l,
                    1.0 if nprobe == 0 else float(R),
                    L,
                    sq,
                )


def chain_kernel(
    x,
    err,
    yv,
    ylab,
    meta,
    fmeta,
    wflat,
    vflat,
    sto,
    rowsz,
    T,
    dmax,
    rmax,
    probes,
    poff,
    nprobe,
    res,
    nth,
    ws,
):
    """``res [N, L+1, L+1]`` (pre-filled with NaN by the caller): for every start ``l``, the
    squared Frobenius norms of ``J_k^l``, ``k = l .. L``.

    Start rows: the error gradient for ``l = 0`` (if ``err``); for ``l >= 1`` the identity if
    ``nprobe == 0``, else the ``nprobe`` rows ``probes[poff[l]:]`` (``[nprobe, d_l]``), norms
    then divided by ``nprobe``.
    """
    launch(
        _chain_worker,
        nth,
        x,
        err,
        yv,
        ylab,
        meta,
        fmeta,
        wflat,
        vflat,
        sto,
        rowsz,
        T,
        dmax,
        rmax,
        probes,
        poff,
        nprobe,
        res,
        ws,
    )


@njit(**HELP)
def _jacobian_worker(
    th, nth, x, meta, fmeta, wflat, vflat, sto, rowsz, T, S, dmax, i_end, i_start, out, ws
):
    """The forward of ``T`` samples a tile, then their Jacobians ``S`` samples at a time: a
    sample's ``R`` rows are what the small-matrix GEMMs take, while the forward's ``[T, d]``
    products amortize their calls over many samples."""
    # borrowed views of the arguments (_unowned): no atomic reference counting per view
    x, meta, fmeta, wflat = _unowned(x), _unowned(meta), _unowned(fmeta), _unowned(wflat)
    vflat, sto, out, ws = _unowned(vflat), _unowned(sto), _unowned(out), _unowned(ws)
    N = x.shape[0]
    L = meta.shape[0]
    ntiles = (N + T - 1) // T
    dt = x.dtype
    R = meta[i_end, M_DOUT]
    dst = meta[i_start, M_DIN]
    noprobe = np.zeros(1, dt)
    nooff = np.zeros(L + 1, np.int64)
    nores = np.zeros((0, 1, 1), dt)
    w = ws[th]  # jacobian_ws(...) elements
    store = w[: T * rowsz]
    o = T * rowsz
    Z = w[o : o + T * dmax]
    o += T * dmax
    V = w[o : o + S * R * dmax]
    o += S * R * dmax
    U = w[o : o + S * R * dmax]
    o += S * R * dmax
    sqo = w[o : o + T * (L + 1)].reshape((T, L + 1))
    tmp = np.zeros((5, dmax))
    dummy = np.zeros((1, 1))
    sq = np.empty(S * R)
    for tile in range(th, ntiles, nth):
        r0 = tile * T
        n = min(N, r0 + T) - r0
        _forward(
            x,
            r0,
            n,
            i_end + 1,
            meta,
            fmeta,
            wflat,
            vflat,
            store,
            sto,
            T,
            Z,
            sqo,
            np.int64(0),
            np.bool_(True),
            np.bool_(False),
            dummy,
            dummy,
            dummy,
            dummy,
            np.int64(0),
            tmp,
        )
        for s0 in range(0, n, S):
            m = min(S, n - s0)
            Vb, Ub = V, U
            _start_rows(
                Vb,
                m,
                R,
                L - i_end,
                i_end,
                np.bool_(True),
                np.int64(0),
                noprobe,
                nooff,
                meta,
                fmeta,
                vflat,
                store,
                sto,
                T,
                nores,
                r0 + s0,
                sq,
                np.int64(s0),
            )
            for i in range(i_end, i_start - 1, -1):
                if i == i_start:  # the last GEMM writes the result
                    _wmm(
                        Vb[: m * R * meta[i, M_DOUT]].reshape((m * R, meta[i, M_DOUT])),
                        wflat,
                        meta,
                        i,
                        False,
                        out[r0 + s0 : r0 + s0 + m].reshape((m * R, dst)),
                    )
                else:
                    _gemm_bwd(Vb, m * R, i, meta, wflat, Ub)
                    _ebwd_rows(
                        Ub,
                        m * R,
                        meta[i, M_DIN],
                        R,
                        i - 1,
                        meta,
                        fmeta,
                        vflat,
                        store,
                        sto,
                        T,
                        sq,
                        np.bool_(False),
                        np.bool_(True),
                        np.int64(s0),
                    )
                    Vb, Ub = Ub, Vb


def jacobian_kernel(
    x, meta, fmeta, wflat, vflat, sto, rowsz, T, S, dmax, i_end, i_start, out, nth, ws
):
    """``out [N, d_end, d_start]``: ``J = d f_end / d f_start`` per row, where ``i_end`` is the
    layer that outputs ``f_end`` and ``i_start <= i_end`` the layer whose input is ``f_start``
    (the forward ``T`` rows a tile, the Jacobians ``S <= T`` rows at a time)."""
    launch(
        _jacobian_worker,
        nth,
        x,
        meta,
        fmeta,
        wflat,
        vflat,
        sto,
        rowsz,
        T,
        S,
        dmax,
        i_end,
        i_start,
        out,
        ws,
    )


@njit(**HELP)
def _contrib_worker(
    th,
    nth,
    x,
    err,
    yv,
    ylab,
    meta,
    fmeta,
    wflat,
    vflat,
    sto,
    rowsz,
    meta0,
    fmeta0,
    wflat0,
    vflat0,
    sto0,
    rowsz0,
    T,
    dmax,
    res,
    vin,
    lam0,
    gin,
    ws,
):
    # borrowed views of the arguments (_unowned): no atomic reference counting per view
    x, yv, ylab, meta = _unowned(x), _unowned(yv), _unowned(ylab), _unowned(meta)
    fmeta, wflat, vflat, sto = _unowned(fmeta), _unowned(wflat), _unowned(vflat), _unowned(sto)
    meta0, fmeta0, wflat0 = _unowned(meta0), _unowned(fmeta0), _unowned(wflat0)
    vflat0, sto0, res, vin = _unowned(vflat0), _unowned(sto0), _unowned(res), _unowned(vin)
    gin, ws = _unowned(gin), _unowned(ws)
    N = x.shape[0]
    L = meta.shape[0]
    ntiles = (N + T - 1) // T
    dt = x.dtype
    w = ws[th]  # contrib_ws(...) elements
    store = w[: T * rowsz]
    o = T * rowsz
    store0 = w[o : o + T * rowsz0]
    o += T * rowsz0
    Z = w[o : o + T * dmax]
    o += T * dmax
    big = T * (lam0 + L - 1) * dmax  # at most lam0 + L - 1 rows per sample in the buffers
    Vt = w[o : o + big]
    Vi = w[o + big : o + 2 * big]
    A = w[o + 2 * big : o + 3 * big]
    S = w[o + 3 * big : o + 4 * big]
    o += 4 * big
    sqo = w[o : o + T * (L + 1)].reshape((T, L + 1))
    nxt = np.empty(dmax, dt)
    sq = np.empty(T)
    tmp = np.zeros((5, dmax))
    dummy = np.zeros((1, 1))
    for tile in range(th, ntiles, nth):
        r0 = tile * T
        n = min(N, r0 + T) - r0
        _forward(
            x,
            r0,
            n,
            L,
            meta,
            fmeta,
            wflat,
            vflat,
            store,
            sto,
            T,
            Z,
            sqo,
            np.int64(0),
            np.bool_(True),
            np.bool_(False),
            dummy,
            dummy,
            dummy,
            dummy,
            np.int64(0),
            tmp,
        )
        for i in range(L):  # the initial layers at the trained layers' inputs
            if i == 0:
                hin = x[r0 : r0 + n]
            else:
                hin = _rows_at(store, sto, T, i - 1, S_H, 0, n, meta[i, M_DIN])
            _layer_fwd(
                i,
                hin,
                n,
                meta0,
                fmeta0,
                wflat0,
                vflat0,
                store0,
                sto0,
                T,
                Z,
                sqo,
                np.int64(0),
                L,
                np.bool_(True),
            )
        d1 = meta[L - 1, M_DOUT]
        if vin.shape[0] == 0:
            out = _rows_at(store, sto, T, L - 1, S_H, 0, n, d1)
            _error_rows(err, out, yv, ylab, r0, n, d1, A, sqo, np.int64(0))
        else:  # a span: lam0 rows per sample at its output (g^(0) .. g^(lam0-1))
            for k in range(n * lam0):
                src = vin[r0 * lam0 + k]
                for j in range(d1):
                    A[k * d1 + j] = src[j]
        for t in range(n):
            for j in range(lam0):
                res[r0 + t, 1, j] = _sq(A[(t * lam0 + j) * d1 : (t * lam0 + j + 1) * d1])
        last = 1 if gin.shape[0] > 0 else 2  # the lowest layer whose VJP is taken: 0 for gin
        if L < last:
            continue
        for k in range(n * lam0 * d1):
            Vt[k] = A[k]
            Vi[k] = A[k]
        _ebwd_rows(
            Vt,
            n * lam0,
            d1,
            lam0,
            L - 1,
            meta,
            fmeta,
            vflat,
            store,
            sto,
            T,
            sq,
            np.bool_(False),
            np.bool_(True),
            np.int64(0),
        )
        _ebwd_rows(
            Vi,
            n * lam0,
            d1,
            lam0,
            L - 1,
            meta0,
            fmeta0,
            vflat0,
            store0,
            sto0,
            T,
            sq,
            np.bool_(False),
            np.bool_(True),
            np.int64(0),
        )
        for m in range(1, L + 2 - last):
            i = L - m
            lam = lam0 + m - 1  # g_m has lambdas 0 .. lam-1
            _gemm_bwd(Vt, n * lam, i, meta, wflat, A)  # v G_m
            _gemm_bwd(Vi, n * lam, i, meta0, wflat0, S)  # v S_m
            d = meta[i, M_DIN]
            nl = lam + 1
            if i == 0:  # a span's rows at its input
                for t in range(n):
                    for j in range(nl):
                        g = gin[(r0 + t) * nl + j]
                        for q in range(d):
                            g[q] = 0
                        if j < lam:
                            s = S[(t * lam + j) * d : (t * lam + j + 1) * d]
                            for q in range(d):
                                g[q] += s[q]
                        if j >= 1:
                            a = A[(t * lam + j - 1) * d : (t * lam + j) * d]
                            s = S[(t * lam + j - 1) * d : (t * lam + j) * d]
                            for q in range(d):
                                g[q] += a[q] - s[q]
                continue
            for t in range(n):
                for j in range(nl):
                    # g_{m+1}^(j) = g_m^(j) S_m + g_m^(j-1) R_m,  R_m = G_m - S_m
                    for q in range(d):
                        nxt[q] = 0
                    if j < lam:
                        s = S[(t * lam + j) * d : (t * lam + j + 1) * d]
                        for q in range(d):
                            nxt[q] += s[q]
                    if j >= 1:
                        a = A[(t * lam + j - 1) * d : (t * lam + j) * d]
                        s = S[(t * lam + j - 1) * d : (t * lam + j) * d]
                        for q in range(d):
                            nxt[q] += a[q] - s[q]
                    res[r0 + t, m + 1, j] = _sq(nxt[:d])
                    if i >= last:
                        vt = Vt[(t * nl + j) * d : (t * nl + j + 1) * d]
                        vi = Vi[(t * nl + j) * d : (t * nl + j + 1) * d]
                        for q in range(d):
                            vt[q] = nxt[q]
                            vi[q] = nxt[q]
            if i >= last:  # the next layer's elementwise VJPs, trained and initial, while in cache
                _ebwd_rows(
                    Vt,
                    n * nl,
                    d,
                    nl,
                    i - 1,
                    meta,
                    fmeta,
                    vflat,
                    store,
                    sto,
                    T,
                    sq,
                    np.bool_(False),
                    np.bool_(True),
                    np.int64(0),
                )
                _ebwd_rows(
                    Vi,
                    n * nl,
                    d,
                    nl,
                    i - 1,
                    meta0,
                    fmeta0,
                    vflat0,
                    store0,
                    sto0,
                    T,
                    sq,
                    np.bool_(False),
                    np.bool_(True),
                    np.int64(0),
                )


def contrib_kernel(
    x,
    err,
    yv,
    ylab,
    meta,
    fmeta,
    wflat,
    vflat,
    sto,
    rowsz,
    meta0,
    fmeta0,
    wflat0,
    vflat0,
    sto0,
    rowsz0,
    T,
    dmax,
    res,
    vin,
    lam0,
    gin,
    nth,
    ws,
):
    """``res [N, L+1, L+1]`` (pre-filled with NaN): ``res[:, l, lam] = ||g_l^(lam)||^2`` by the
    residual-trick recursion, ``meta0 ...`` the initial model (its layers evaluated at the
    trained model's layer inputs), from the error (``vin`` without rows, ``lam0 = 1``).

    A span of a mixed model: ``vin [N * lam0, d_1]`` are the rows ``g^(0) .. g^(lam0-1)`` at its
    output, ``res [N, L+1, lam0+L]``, and ``gin [N * (lam0+L), n]`` (unless it has no rows) gets
    the rows at its input (the last layer's VJPs and mixing too)."""
    launch(
        _contrib_worker,
        nth,
        x,
        err,
        yv,
        ylab,
        meta,
        fmeta,
        wflat,
        vflat,
        sto,
        rowsz,
        meta0,
        fmeta0,
        wflat0,
        vflat0,
        sto0,
        rowsz0,
        T,
        dmax,
        res,
        vin,
        lam0,
        gin,
        ws,
    )


# ------------------------------------------------------------------ coupled batch norm (sweep)
# One batch datapoint (B samples) per call. Each worker thread owns the tiles of rows
# th, th + nth, ...; per layer there is one GEMM per tile and the reductions over samples that
# batch statistics need (forward: mean, variance; backward: the projection's two means) are
# per-thread partial sums combined after a barrier. The gradient rows of a tile start at
# ``r0 * dmax`` whatever the layer's width, so that no thread's rows of one layer overlap another
# thread's rows of the next (the threads meet only at batch-norm layers). ``store`` holds every
# layer's saved state for all B rows (``T = B`` in the ``_row`` helpers).


@njit(**INL)
def _colsums(V, n, d, a, b, xh_store, sto, B, i, r0, with_xh):
    """``a[j] += sum_t V[t, j]``, ``b[j] += sum_t V[t, j] * w[t, j]`` (``w = V`` or the saved
    ``xh`` rows), in float64, for the ``n`` rows ``V [n*d]`` (flat)."""
    W = _rows_at(xh_store, sto, B, i, S_XH, r0, n, d) if with_xh else V[: n * d].reshape((n, d))
    for t in range(n):
        w = W[t]
        for j in range(d):
            v = float(V[t * d + j])
            a[j] += v
            b[j] += v * float(w[j])


@njit(**HELP)
def _cb_fwd1(
    th,
    nth,
    i,
    x,
    B,
    T,
    meta,
    fmeta,
    wflat,
    vflat,
    store,
    sto,
    Z,
    save,
    stats,
    ps1,
    ps2,
    psq,
    mean,
    m2,
    pos,
    neg,
    tmp,
    L,
):
    """Forward of layer ``i`` for this thread's tiles: the GEMM, then either (batch statistics)
    the bias and partial column sums, the normalization waiting for them, or the whole layer."""
    dout = meta[i, M_DOUT]
    din = meta[i, M_DIN]
    ntiles = (B + T - 1) // T
    cnt = np.int64(0)
    batch = meta[i, M_NORM] == N_BATCH
    a = np.zeros(dout)
    b2 = np.zeros(dout)
    sq = np.empty(T, store.dtype)
    for tile in range(th, ntiles, nth):
        r0 = tile * T
        n = min(B, r0 + T) - r0
        hin = x[r0 : r0 + n] if i == 0 else _rows_at(store, sto, B, i - 1, S_H, r0, n, din)
        if batch:  # pre-normalization values go to the xh slot until the statistics are known
            Zm = _rows_at(store, sto, B, i, S_XH, r0, n, dout)
            _wmm(hin, wflat, meta, i, True, Zm)
            bo = meta[i, M_B]
            if bo >= 0:
                b = _vec(vflat, bo, dout)
                for t in range(n):
                    for j in range(dout):
                        Zm[t, j] += b[j]
            _colsums(Zm.reshape(n * dout), n, dout, a, b2, store, sto, B, i, r0, np.bool_(False))
        else:
            Zm = Z[: n * dout].reshape((n, dout))
            _wmm(hin, wflat, meta, i, True, Zm)
            _layer_rows(i, Zm, r0, meta, fmeta, vflat, store, sto, B, save, sq)
            for t in range(n):
                psq[th, L - i] += sq[t]
            if stats and meta[i, M_PRE] == 1:
                _moments_tile(Zm, n, dout, i, mean, m2, pos, neg, cnt, tmp)
                cnt += n
    for j in range(dout):
        ps1[th, j] += a[j]
        ps2[th, j] += b2[j]


@njit(**HELP)
def _cb_fwd2(
    th,
    nth,
    i,
    B,
    T,
    meta,
    fmeta,
    vflat,
    store,
    sto,
    Z,
    save,
    stats,
    cmean,
    cinv,
    psq,
    mean,
    m2,
    pos,
    neg,
    tmp,
    L,
):
    """Second half of a batch-statistics layer: normalize, affine, activation, norms, moments."""
    dout = meta[i, M_DOUT]
    ntiles = (B + T - 1) // T
    cnt = np.int64(0)
    dsave = meta[i, M_DSAVE] == 1 and save
    go = meta[i, M_G]
    bo = meta[i, M_BETA]
    sq = np.empty(T, store.dtype)
    for tile in range(th, ntiles, nth):
        r0 = tile * T
        n = min(B, r0 + T) - r0
        Zm = Z[: n * dout].reshape((n, dout))
        XH = _rows_at(store, sto, B, i, S_XH, r0, n, dout)
        for t in range(n):
            xh = XH[t]
            z = Zm[t]
            for j in range(dout):
                v = (xh[j] - cmean[j]) * cinv[j]
                xh[j] = v
                z[j] = v
        if go >= 0:
            g = _vec(vflat, go, dout)
            for t in range(n):
                for j in range(dout):
                    Zm[t, j] *= g[j]
        if bo >= 0:
            b = _vec(vflat, bo, dout)
            for t in range(n):
                for j in range(dout):
                    Zm[t, j] += b[j]
        if stats and meta[i, M_PRE] == 1:
            _moments_tile(Zm, n, dout, i, mean, m2, pos, neg, cnt, tmp)
            cnt += n
        _act_rows(
            meta[i, M_ACT],
            fmeta[i, F_P0],
            fmeta[i, F_P1],
            Zm,
            _rows_at(store, sto, B, i, S_H, r0, n, dout),
            _rows_at(store, sto, B, i, S_DER, r0, n, dout) if dsave else Zm,
            dsave,
            sq,
        )
        for t in range(n):
            psq[th, L - i] += sq[t]


@njit(**HELP)
def _cb_bwd_diag(th, nth, i, U, B, T, d, rs, meta, fmeta, vflat, store, sto, sqrow, ps1, ps2):
    """Diagonal part of layer ``i``'s VJP on this thread's rows of ``U`` (row ``b`` of a tile
    starting at sample ``r0`` at ``r0 * rs + (b - r0) * d``) in place, and,
    for batch statistics, the partial sums of ``u`` and ``u * xh`` over samples."""
    ntiles = (B + T - 1) // T
    batch = meta[i, M_NORM] == N_BATCH
    a = np.zeros(d)
    b = np.zeros(d)
    for tile in range(th, ntiles, nth):
        r0 = tile * T
        n = min(B, r0 + T) - r0
        V = U[r0 * rs : r0 * rs + n * d]
        _ebwd_rows(
            V,
            n,
            d,
            np.int64(1),
            i,
            meta,
            fmeta,
            vflat,
            store,
            sto,
            B,
            sqrow,
            np.bool_(False),
            np.bool_(True),
            r0,
        )
        if batch:
            _colsums(V, n, d, a, b, store, sto, B, i, r0, np.bool_(True))
    for j in range(d):
        ps1[th, j] += a[j]
        ps2[th, j] += b[j]


@njit(**HELP)
def _cb_bwd_gemm(
    th,
    nth,
    i,
    U,
    Un,
    B,
    T,
    rs,
    meta,
    fmeta,
    wflat,
    vflat,
    store,
    sto,
    umean,
    uc,
    cinv,
    psq,
    ps1,
    ps2,
    L,
):
    """Finish layer ``i``'s VJP on this thread's rows (the projection over samples for batch
    statistics), its GEMM into ``Un``, the squared norms, and the next layer's diagonal part."""
    dout = meta[i, M_DOUT]
    din = meta[i, M_DIN]
    ntiles = (B + T - 1) // T
    batch = meta[i, M_NORM] == N_BATCH
    sq = np.empty(T)
    a = np.zeros(din)
    b = np.zeros(din)
    for tile in range(th, ntiles, nth):
        r0 = tile * T
        n = min(B, r0 + T) - r0
        V = U[r0 * rs : r0 * rs + n * dout]
        if batch:
            XH = _rows_at(store, sto, B, i, S_XH, r0, n, dout)
            for t in range(n):
                xh = XH[t]
                for j in range(dout):
                    V[t * dout + j] = (V[t * dout + j] - umean[j] - xh[j] * uc[j]) * cinv[j]
        Vn = Un[r0 * rs : r0 * rs + n * din]
        _wmm(V.reshape((n, dout)), wflat, meta, i, False, Vn.reshape((n, din)))
        if i >= 2:
            _ebwd_rows(
                Vn,
                n,
                din,
                np.int64(1),
                i - 1,
                meta,
                fmeta,
                vflat,
                store,
                sto,
                B,
                sq,
                np.bool_(True),
                np.bool_(True),
                r0,
            )
            if meta[i - 1, M_NORM] == N_BATCH:
                _colsums(Vn, n, din, a, b, store, sto, B, i - 1, r0, np.bool_(True))
        else:
            for t in range(n):
                sq[t] = _sq(Vn[t * din : (t + 1) * din])
        for t in range(n):
            psq[th, L - i + 1] += sq[t]
    for j in range(din):
        ps1[th, j] += a[j]
        ps2[th, j] += b[j]


@njit(**HELP)
def _cb_error(th, nth, err, yv, ylab, B, T, d1, rs, meta, store, sto, G, pe, psq, L):
    """The error layer on this thread's rows: ``sum e_i`` into ``pe[th]``, gradients into ``G``."""
    ntiles = (B + T - 1) // T
    for tile in range(th, ntiles, nth):
        r0 = tile * T
        n = min(B, r0 + T) - r0
        out = _rows_at(store, sto, B, L - 1, S_H, r0, n, d1)
        Gt = G[r0 * rs : r0 * rs + n * d1]
        for t in range(n):
            o = out[t]
            if err == E_DOT:
                e = 0.0
                for j in range(d1):
                    e += float(o[j]) * float(yv[r0 + t, j])
                    Gt[t * d1 + j] = yv[r0 + t, j]
            else:
                c = ylab[r0 + t]
                mx = float(o[0])
                for j in range(d1):
                    mx = max(mx, float(o[j]))
                s = 0.0
                for j in range(d1):
                    s += math.exp(float(o[j]) - mx)
                lse = mx + math.log(s)
                e = lse - float(o[c])
                for j in range(d1):
                    Gt[t * d1 + j] = math.exp(float(o[j]) - lse) - (1.0 if j == c else 0.0)
            pe[th] += e
            psq[th, 1] += _sq(Gt[t * d1 : (t + 1) * d1])


def coupled_sweep_kernel(
    x,
    err,
    yv,
    ylab,
    meta,
    fmeta,
    wflat,
    vflat,
    sto,
    rowsz,
    T,
    dmax,
    grads,
    stats,
    sqo,
    sqg,
    mean,
    m2,
    pos,
    neg,
    cnt,
    nth,
    ws,
):
    """Forward (and backward if ``grads``) sweep of ONE batch datapoint ``x [B, n]`` whose batch
    norms use batch statistics (``N_BATCH``); the other layers as in ``sweep_kernel``.

    Writes ``sqo [L+1]`` (``||f_l||^2`` over the whole batch; ``[0] = (sum_i e_i)^2`` if ``err``),
    ``sqg [L+1]`` (``||d f_0 / d f_l||^2``, ``l >= 1``), per-thread moments as ``sweep_kernel``.
    """
    L = meta.shape[0]
    shared = (
        np.zeros((2, nth, dmax)),  # partial column sums per phase parity (ps1, ps2) ...
        np.zeros((2, nth, dmax)),
        np.zeros((nth, L + 1)),  # partial ||f_l||^2
        np.zeros((nth, L + 1)),  # partial ||d f_0 / d f_l||^2
        np.zeros(nth),  # partial sum of the errors
    )
    launch(
        _coupled_sweep_worker,
        nth,
        x,
        err,
        yv,
        ylab,
        meta,
        fmeta,
        wflat,
        vflat,
        sto,
        rowsz,
        T,
        dmax,
        grads,
        stats,
        sqo,
        sqg,
        mean,
        m2,
        pos,
        neg,
        cnt,
        ws,
        *shared,
        sync=True,
    )


@njit(**HELP)
def _batch_stats(ps1, ps2, nth, B, dout, eps, cmean, cinv):
    """Mean and ``1/sqrt(var + eps)`` per neuron from the threads' partial sums (``ps1``,
    ``ps2 [nth, d]``); an overflowed variance gives NaN (refused), not silent zeros."""
    for j in range(dout):
        s1 = 0.0
        s2 = 0.0
        for th in range(nth):
            s1 += ps1[th, j]
            s2 += ps2[th, j]
        mu = s1 / B
        var = max(s2 / B - mu * mu, 0.0)
        cmean[j] = mu
        cinv[j] = var  # in the data's dtype: a variance beyond its range is Inf
        if cinv[j] < math.inf:
            cinv[j] = 1.0 / math.sqrt(var + eps)
        else:
            cinv[j] = math.nan


@njit(**HELP)
def _coupled_sweep_worker(
    th,
    nth,
    sync,
    x,
    err,
    yv,
    ylab,
    meta,
    fmeta,
    wflat,
    vflat,
    sto,
    rowsz,
    T,
    dmax,
    grads,
    stats,
    sqo,
    sqg,
    mean,
    m2,
    pos,
    neg,
    cnt,
    ws,
    ps1,
    ps2,
    psq,
    psqg,
    pe,
):
    """Thread ``th``'s part of ``coupled_sweep_kernel``: it owns the tiles ``th, th + nth, ...``
    of the batch in every phase, so the only data that crosses threads are the partial sums over
    samples (batch statistics, the projection's means), read after a barrier. They alternate
    between two buffers (``ps1[p]``, ``ps2[p]``, ``p`` the phase's parity), so a thread never
    overwrites sums another is still reading, and one barrier per batch-norm layer suffices.
    Every thread combines the sums itself (the same code on the same data: the same numbers)."""
    # borrowed views of the arguments (_unowned): no atomic reference counting per view
    sync, x, yv, ylab = _unowned(sync), _unowned(x), _unowned(yv), _unowned(ylab)
    meta, fmeta, wflat, vflat = _unowned(meta), _unowned(fmeta), _unowned(wflat), _unowned(vflat)
    sto, sqo, sqg, mean = _unowned(sto), _unowned(sqo), _unowned(sqg), _unowned(mean)
    m2, pos, neg, cnt, ws = _unowned(m2), _unowned(pos), _unowned(neg), _unowned(cnt), _unowned(ws)
    ps1, ps2, psq, psqg = _unowned(ps1), _unowned(ps2), _unowned(psq), _unowned(psqg)
    pe = _unowned(pe)
    B = x.shape[0]
    L = meta.shape[0]
    dt = x.dtype
    w = ws[0]  # coupled_ws(...) elements
    store = w[: B * rowsz]
    o = B * rowsz
    Z = w[o + th * T * dmax : o + (th + 1) * T * dmax]
    o += nth * T * dmax
    G = w[o : o + B * dmax]
    Gn = w[o + B * dmax : o + 2 * B * dmax]
    cmean = np.zeros(dmax, dt)
    cinv = np.zeros((L, dmax), dt)
    tmp = np.zeros((5, dmax))
    p = 0  # parity of the current phase's partial-sum buffer
    for i in range(L):
        ps1[p, th, :] = 0.0
        ps2[p, th, :] = 0.0
        _cb_fwd1(
            th,
            nth,
            i,
            x,
            B,
            T,
            meta,
            fmeta,
            wflat,
            vflat,
            store,
            sto,
            Z,
            grads,
            stats,
            ps1[p],
            ps2[p],
            psq,
            mean[th],
            m2[th],
            pos[th],
            neg[th],
            tmp,
            L,
        )
        if meta[i, M_NORM] == N_BATCH:
            if _barrier(sync, nth):
                return
            _batch_stats(ps1[p], ps2[p], nth, B, meta[i, M_DOUT], fmeta[i, F_EPS], cmean, cinv[i])
            p = 1 - p
            _cb_fwd2(
                th,
                nth,
                i,
                B,
                T,
                meta,
                fmeta,
                vflat,
                store,
                sto,
                Z,
                grads,
                stats,
                cmean,
                cinv[i],
                psq,
                mean[th],
                m2[th],
                pos[th],
                neg[th],
                tmp,
                L,
            )
    if err != E_NONE:
        d1 = meta[L - 1, M_DOUT]
        _cb_error(th, nth, err, yv, ylab, B, T, d1, dmax, meta, store, sto, G, pe, psqg, L)
        if grads:
            umean = np.zeros(dmax)
            uc = np.zeros(dmax)
            ps1[p, th, :] = 0.0
            ps2[p, th, :] = 0.0
            if L >= 2:
                sqrow = np.empty(1)
                _cb_bwd_diag(
                    th,
                    nth,
                    L - 1,
                    G,
                    B,
                    T,
                    d1,
                    dmax,
                    meta,
                    fmeta,
                    vflat,
                    store,
                    sto,
                    sqrow,
                    ps1[p],
                    ps2[p],
                )
            for i in range(L - 1, 0, -1):
                dout = meta[i, M_DOUT]
                if meta[i, M_NORM] == N_BATCH:
                    if _barrier(sync, nth):
                        return
                    for j in range(dout):
                        s1 = 0.0
                        s2 = 0.0
                        for k in range(nth):
                            s1 += ps1[p, k, j]
                            s2 += ps2[p, k, j]
                        umean[j] = s1 / B
                        uc[j] = s2 / B
                    p = 1 - p
                ps1[p, th, :] = 0.0
                ps2[p, th, :] = 0.0
                _cb_bwd_gemm(
                    th,
                    nth,
                    i,
                    G,
                    Gn,
                    B,
                    T,
                    dmax,
                    meta,
                    fmeta,
                    wflat,
                    vflat,
                    store,
                    sto,
                    umean,
                    uc,
                    cinv[i],
                    psqg,
                    ps1[p],
                    ps2[p],
                    L,
                )
                G, Gn = Gn, G
    if _barrier(sync, nth) or th != 0:
        return
    # thread 0, after every thread's last phase: the totals
    ntiles = (B + T - 1) // T
    for k in range(nth):
        cnt[k] = 0
        for tile in range(k, ntiles, nth):
            cnt[k] += min(B, tile * T + T) - tile * T
    for l in range(1, L + 1):
        s = 0.0
        for k in range(nth):
            s += psq[k, l]
        sqo[l] = s
    if err == E_NONE:
        return
    f0 = 0.0
    for k in range(nth):
        f0 += pe[k]
    sqo[0] = f0 * f0
    if grads:
        for l in range(1, L + 1):
            s = 0.0
            for k in range(nth):
                s += psqg[k, l]
            sqg[l] = s


# ------------------------------------------------------------------ coupled contributions
# The residual-trick recursion of a batch datapoint (numba_backend._contributions_coupled): every
# lambda-row of ``g_m`` is a ``[B, d]`` matrix, stored sample-major in one flat buffer: sample
# ``b``'s ``K`` rows together at ``buf[b * S : b * S + K * d]`` (``S``: room for the last layer's
# rows). A layer's VJP is ``u = v * c`` (activation derivative, batch-norm scale), the batch-norm
# projection ``u - mean_B(u) - x * mean_B(u * x)`` (``x`` the standardized input; ``x = 0`` and no
# mean without one), then the GEMM. One pass over ``v`` per layer: each thread takes tiles of
# samples, builds all their lambda-rows of both models as one ``[rows, 2d]`` GEMM input (so that
# one GEMM with ``[W_S; W_G - W_S]`` gives ``v^(k) S + v^(k-1) (G - S)``), GEMMs it into a tile
# in cache, adds the tile's column sums for the next layer and writes it back over the tile's
# samples in ``buf`` (``coupled_step_kernel``): the tile's input is all in the GEMM input by
# then, and no other tile reads these samples, so one buffer serves every layer (half the memory
# of reading one buffer and writing another). Tiles of samples, not of one lambda-row: a tile's
# ``c`` and ``x`` rows stay in cache across its lambda-rows.


@njit(**HELP)
def _colsums_rows(V, cG, xG, cS, xS, acc, t):
    """Adds a tile of samples, ``V [n, K, d]`` with its ``cX``, ``xX [n, d]``, to ``acc [K, 4d +
    1]`` (float64): per lambda-row ``k``, the column sums ``sum_b u`` and ``sum_b u * xX`` of
    ``u = V[b, k] * cX`` for X = G, S in column blocks ``[s1G | s2G | s1S | s2S]``, and
    ``||V[:, k]||^2`` last. The column sums gather the tile in ``t [4d]`` (``V``'s dtype), then
    add to ``acc``: in float32 that is half the vector work of float64 and no conversions (a
    tile's sum of at most a few hundred rows errs far below the rounding of ``u`` itself); the
    squares stay float64, where a float32 square of the high orders (about 1e-20) would
    underflow. Lambda-row outermost, one short loop per pair of sums and rows taken as views:
    each loop vectorizes (one loop doing all of it ran 1.6x slower; indexing ``t[j]`` and
    ``t[d + j]`` of one array 2.8x slower, measured alone)."""
    n, K, d = V.shape
    s1G, s2G, s1S, s2S = t[:d], t[d : 2 * d], t[2 * d : 3 * d], t[3 * d : 4 * d]
    for k in range(K):
        a = acc[k]
        sq = 0.0
        for b in range(n):
            r = V[b, k]
            for j in range(d):
                v = np.float64(r[j])
                sq += v * v
        a[4 * d] += sq
        t[:] = 0
        for b in range(n):
            r, c, x = V[b, k], cG[b], xG[b]
            for j in range(d):
                u = r[j] * c[j]
                s1G[j] += u
                s2G[j] += u * x[j]
        for b in range(n):
            r, c, x = V[b, k], cS[b], xS[b]
            for j in range(d):
                u = r[j] * c[j]
                s1S[j] += u
                s2S[j] += u * x[j]
        for j in range(4 * d):
            a[j] += np.float64(t[j])


def coupled_colsums_kernel(V, cG, xG, cS, xS, TB, part, nth):
    """``part[th] [K, 4d + 1]`` (float64): thread ``th``'s share of ``_colsums_rows`` over all of
    ``V [B, K, d]``, in tiles of ``TB`` samples; the caller sums ``part`` over threads (a fixed
    order: the same bits for the same thread count)."""
    launch(_coupled_colsums_worker, nth, V, cG, xG, cS, xS, TB, part)


@njit(**HELP)
def _coupled_colsums_worker(th, nth, V, cG, xG, cS, xS, TB, part):
    # borrowed views of the arguments (_unowned): no atomic reference counting per view
    V, cG, xG, cS, xS = _unowned(V), _unowned(cG), _unowned(xG), _unowned(cS), _unowned(xS)
    part = _unowned(part)
    B = V.shape[0]
    acc = part[th]
    acc[:] = 0.0
    t = np.empty(4 * V.shape[2], V.dtype)
    for b0 in range(th * TB, B, nth * TB):
        b1 = min(b0 + TB, B)
        _colsums_rows(V[b0:b1], cG[b0:b1], xG[b0:b1], cS[b0:b1], xS[b0:b1], acc, t)


@njit(**HELP)
def _coupled_step_worker(
    th,
    nth,
    buf,
    S,
    K,
    cG,
    xG,
    cS,
    xS,
    m1G,
    m2G,
    m1S,
    m2S,
    dm1,
    dm2,
    Wcat,
    TB,
    nG,
    nxG,
    nS,
    nxS,
    part,
    ws,
):
    # borrowed views of the arguments (_unowned): no atomic reference counting per view
    buf, cG, xG, cS, xS = _unowned(buf), _unowned(cG), _unowned(xG), _unowned(cS), _unowned(xS)
    m1G, m2G, m1S, m2S = _unowned(m1G), _unowned(m2G), _unowned(m1S), _unowned(m2S)
    dm1, dm2, Wcat = _unowned(dm1), _unowned(dm2), _unowned(Wcat)
    nG, nxG, nS, nxS = _unowned(nG), _unowned(nxG), _unowned(nS), _unowned(nxS)
    part, ws = _unowned(part), _unowned(ws)
    B, d = cG.shape
    din = nG.shape[1]
    K1 = K + 1
    w = ws[th]
    acc = part[th]
    acc[:] = 0.0
    t = w[-4 * din :]  # _colsums_rows' tile sums
    for b0 in range(th * TB, B, nth * TB):
        n = min(TB, B - b0)
        b1 = b0 + n
        # the tile's c and x differences once, not once per lambda-row; each loop below reads
        # few arrays, so that LLVM vectorizes it (with many, its alias checks give up)
        dc = w[: n * d].reshape((n, d))
        dx = w[n * d : 2 * n * d].reshape((n, d))
        for r in range(n):
            for j in range(d):
                dc[r, j] = cG[b0 + r, j] - cS[b0 + r, j]
                dx[r, j] = xG[b0 + r, j] - xS[b0 + r, j]
        e = 2 * n * d + n * K1 * 2 * d
        U = w[2 * n * d : e].reshape((n * K1, 2 * d))
        for r in range(n):
            b = b0 + r
            V = buf[b * S : b * S + K * d].reshape((K, d))
            cs, xs, cg, xg, dcr, dxr = cS[b], xS[b], cG[b], xG[b], dc[r], dx[r]
            for k in range(K1):
                ua, ub = U[r * K1 + k, :d], U[r * K1 + k, d:]
                if k < K:
                    v, m1, m2 = V[k], m1S[k], m2S[k]
                    for j in range(d):
                        ua[j] = v[j] * cs[j] - m1[j] - xs[j] * m2[j]
                else:
                    ua[:] = 0.0
                if k >= 1:
                    # u_G - u_S from the differences of its factors: exactly 0 where the two
                    # models agree (fastmath's contraction of g - s into an FMA would leave the
                    # rounding error of one product)
                    v, e1, m2, e2 = V[k - 1], dm1[k - 1], m2G[k - 1], dm2[k - 1]
                    for j in range(d):
                        ua[j] += v[j] * dcr[j] - e1[j] - dxr[j] * m2[j] - xs[j] * e2[j]
                    m1 = m1G[k - 1]
                    for j in range(d):
                        ub[j] = v[j] * cg[j] - m1[j] - xg[j] * m2[j]
                else:
                    ub[:] = 0.0
        O = w[e : e + n * K1 * din].reshape((n * K1, din))
        _gemm.mul(U, Wcat, O)
        O3 = O.reshape((n, K1, din))
        _colsums_rows(O3, nG[b0:b1], nxG[b0:b1], nS[b0:b1], nxS[b0:b1], acc, t)
        for r in range(n):  # over the tile's input, which U holds now
            buf[(b0 + r) * S : (b0 + r) * S + K1 * din] = O3[r].reshape(K1 * din)


def coupled_step_kernel(
    buf,
    S,
    K,
    cG,
    xG,
    cS,
    xS,
    m1G,
    m2G,
    m1S,
    m2S,
    dm1,
    dm2,
    Wcat,
    TB,
    nG,
    nxG,
    nS,
    nxS,
    part,
    nth,
    ws,
):
    """One layer of the coupled recursion on ``buf`` (flat; sample ``b``'s rows at ``b * S``):
    its ``K`` rows ``V [K, d]`` per sample become the ``K + 1`` rows ``[K + 1, d_in]`` that hold,
    for each ``k = 0 .. K``, ``[u_S(k) + (u_G(k-1) - u_S(k-1)) | u_G(k-1)] @ Wcat`` with ``Wcat
    = [W_S; W_G - W_S]`` (packed for ``_gemm.mm`` where ``MM``: ``_gemm.mul``), which is ``u_S(k)
    W_S + u_G(k-1) W_G - u_S(k-1) W_S``; ``u_X(k) =
    V[k] * cX - m1X[k] - xX * m2X[k]`` are the projected rows (``u_X(-1) = u_X(K) = 0``),
    ``m1X``/``m2X`` the column means ``s1X / B``, ``s2X / B`` (``dm1 = m1G - m1S``, ``dm2 = m2G -
    m2S``). Written with the differences, a model equal to its initial one gives exact zeros for
    every ``lambda >= 1`` (no cancellation of two products). Each thread builds tiles of ``TB``
    samples (all their lambda-rows) in its ``ws`` row, GEMMs them there, adds the output's
    ``_colsums_rows`` with the next layer's ``nG, nxG, nS, nxS`` to ``part[th]``
    (``coupled_colsums_kernel``'s), and writes the output over the tile's samples in ``buf``."""
    launch(
        _coupled_step_worker,
        nth,
        buf,
        S,
        K,
        cG,
        xG,
        cS,
        xS,
        m1G,
        m2G,
        m1S,
        m2S,
        dm1,
        dm2,
        Wcat,
        TB,
        nG,
        nxG,
        nS,
        nxS,
        part,
        ws,
    )


# ------------------------------------------------------------------ the GEMM floor


@njit(**HELP)
def _gemm_rows_worker(th, nth, a, b, c, tile):
    """``c = a @ b`` on ``tile``-row tiles dealt round-robin, every product of a thread on its
    first tile's rows (as a kernel's tile stays in cache through the layers): the rate of the
    kernels' GEMMs alone (``machine.gemm_rate``); on their own GEMM where ``b`` is packed
    (``_gemm.pack``, 1-D), else on OpenBLAS."""
    m = a.shape[0]
    t0 = th * tile
    h = min(tile, m - t0)
    if h <= 0:
        return
    for _ in range(t0, m, nth * tile):
        _gemm.mul(a[t0 : t0 + h], b, c[t0 : t0 + h])


def gemm_rows(a, b, c, tile, nth):
    """``_gemm_rows_worker`` on ``nth`` threads (one BLAS thread each: the caller's business)."""
    launch(_gemm_rows_worker, nth, a, b, c, np.int64(tile))


# ------------------------------------------------------------------ launching workers
# Every kernel is a nogil worker ``_x_worker(th, nth, ...)`` that owns the tiles ``th, th + nth,
# ...``, run on ``nth`` threads from Python (the calling thread is worker 0). Not numba's
# ``prange``: each parallel region is a function numba compiles again with everything it calls,
# which made the kernels' cold compile several times longer. One launch at a time (a lock): the
# workers of a launch must all run at once (they meet at barriers), and each launch uses every
# core anyway.

_POOL: tuple[ThreadPoolExecutor, int] | None = None  # the pool and its size
_LAUNCH = threading.Lock()


def launch(worker, nth: int, *args, sync: bool = False) -> None:
    """``worker(th, nth, *args)`` for ``th < nth`` on ``nth`` threads; with ``sync``, every
    worker gets a ``sync`` array for ``_barrier`` as its third argument. A worker that raises
    releases the others from their barriers, and the first error is raised here."""
    global _POOL
    flag = np.zeros(3, np.int64)
    a = (flag, *args) if sync else args

    def run(th: int) -> None:
        try:
            worker(th, nth, *a)
        except BaseException:
            flag[2] = 1  # the others leave their barriers (_barrier returns True)
            raise

    with _LAUNCH:
        if nth <= 1:
            worker(0, 1, *a)
            return
        if _POOL is None or _POOL[1] < nth - 1:  # more threads than before: a bigger pool
            if _POOL is not None:
                _POOL[0].shutdown(wait=False)
            _POOL = (ThreadPoolExecutor(nth - 1, thread_name_prefix="gscfast-numba"), nth - 1)
        futures = [_POOL[0].submit(run, th) for th in range(1, nth)]
        error: BaseException | None = None
        try:
            run(0)
        except BaseException as e:
            error = e
        for f in futures:  # every worker has finished before the launch returns
            other = f.exception()
            if error is None and other is not None:
                error = other
        if error is not None:
            raise error


@intrinsic
def _atomic_add(typingctx, ary, i, v):
    """``ary[i] += v`` atomically (sequentially consistent); returns the old value."""
    sig = types.int64(ary, types.intp, types.int64)

    def codegen(context, builder, sig, args):
        aryty = sig.args[0]
        a = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, a, [args[1]])
        return builder.atomic_rmw("add", ptr, args[2], "seq_cst")

    return sig, codegen


@intrinsic
def _atomic_load(typingctx, ary, i):
    """``ary[i]``, loaded atomically (sequentially consistent)."""
    sig = types.int64(ary, types.intp)

    def codegen(context, builder, sig, args):
        aryty = sig.args[0]
        a = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, a, [args[1]])
        return builder.load_atomic(ptr, "seq_cst", 8)

    return sig, codegen


@intrinsic
def _yield_cpu(typingctx):
    """``sched_yield()``: a waiting worker gives its core to one that has not arrived yet (more
    threads than cores)."""
    sig = types.int32()

    def codegen(context, builder, sig, args):
        fnty = ir.FunctionType(ir.IntType(32), [])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "sched_yield")
        return builder.call(fn, [])

    return sig, codegen


@njit(**INL)
def _barrier(sync, nth):
    """Wait until all ``nth`` workers of a launch got here (``sync``: arrivals, generation,
    abort). Atomic operations order every worker's writes before the barrier before every
    worker's reads after it. Returns True if a worker raised (the caller returns at once)."""
    gen = _atomic_load(sync, 1)
    if _atomic_add(sync, 0, 1) == nth - 1:
        _atomic_add(sync, 0, -nth)
        _atomic_add(sync, 1, 1)
    else:
        spins = 0
        while _atomic_load(sync, 1) == gen:
            if _atomic_load(sync, 2) != 0:
                return True
            spins += 1
            if spins > 256:
                _yield_cpu()
    return _atomic_load(sync, 2) != 0


# ------------------------------------------------------------------ workspace sizes (elements)


def sweep_ws(T, rowsz, dmax, R=1):
    return T * (rowsz + (1 + 2 * R) * dmax)


def chain_ws(T, rowsz, dmax, rmax, L):
    return T * (rowsz + dmax + 2 * rmax * dmax + L + 1)


def jacobian_ws(T, S, rowsz, dmax, R, L):
    return T * (rowsz + dmax + L + 1) + 2 * S * R * dmax


def contrib_ws(T, rowsz, rowsz0, dmax, L, lam0=1):
    return T * (rowsz + rowsz0 + dmax + 4 * (lam0 + L - 1) * dmax + L + 1)


def coupled_ws(B, T, rowsz, dmax, nth):
    return B * rowsz + nth * T * dmax + 2 * B * dmax


def coupled_step_ws(TB, rows, dmax):
    """``TB`` samples' c and x differences, ``rows`` rows of the GEMM input and of its output,
    and the column sums of a tile (``_colsums_rows``)."""
    return 2 * TB * dmax + rows * 3 * dmax + 4 * dmax


# every kernel above: race-free data files in the shared cache (numba_cache.attach)
numba_cache.attach(globals())
