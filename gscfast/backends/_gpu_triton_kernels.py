"""Triton kernels of the ``"triton"`` backend (launchers in ``triton_backend.py``).

Conventions (flash-linear-attention style): ``i_*`` program indices, ``o_*`` offsets, ``m_*``
masks, ``b_*`` block values, ``p_*`` pointers; ``tl.constexpr`` flags in capitals; shapes as
``# [BM, BK]``. Rows are samples (``layer_fwd``) or stacked Jacobian rows (``chain_step``,
``contrib_step``); widths are padded to the block sizes with masks, so any width works.

Only ``tl`` built-ins are used (``tl.exp``, ``tl.log``, ``tl.math.erf``, ``tl.sqrt_rn``/``tl.sqrt``): they run
under ``TRITON_INTERPRET=1`` as well as on the GPU, which is how these kernels are tested without
one. ``tanh``, ``expm1`` and ``log1p`` are written here from ``exp``/``log`` with the small-argument
branches that keep them accurate to a few ulp in float32 and float64.

The activation and norm codes are ``lowering.Act`` and ``lowering.Norm`` (``ACT_*``, ``NORM_*`` here).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .lowering import Act, Norm

# globals a kernel reads must be tl.constexpr; write them after a tensor operand (``x * C``): the
# interpreter turns ``C * x`` into a constexpr wrapping a tensor
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
INV_SQRT_2 = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
SELU_ALPHA = tl.constexpr(1.6732632423543772848170429916717)
SELU_SCALE = tl.constexpr(1.0507009873554804934193349852946)
ACT_NONE = tl.constexpr(int(Act.NONE))
ACT_IDENTITY = tl.constexpr(int(Act.IDENTITY))
ACT_RELU = tl.constexpr(int(Act.RELU))
ACT_LEAKY = tl.constexpr(int(Act.LEAKY))
ACT_TANH = tl.constexpr(int(Act.TANH))
ACT_SIGMOID = tl.constexpr(int(Act.SIGMOID))
ACT_ELU = tl.constexpr(int(Act.ELU))
ACT_SELU = tl.constexpr(int(Act.SELU))
ACT_SOFTPLUS = tl.constexpr(int(Act.SOFTPLUS))
ACT_GELU = tl.constexpr(int(Act.GELU))
NORM_LAYER = tl.constexpr(int(Norm.LAYER))
NORM_DIAG = tl.constexpr(int(Norm.DIAG))


# ----------------------------------------------------------------------------- scalar helpers


@triton.jit
def _tanh(x):
    """tanh: ``(1 - e) / (1 + e)``, ``e = exp(-2|x|)`` for ``|x| >= 0.625``; below, Lambert's
    continued fraction to depth 17 (truncation error < 1e-19 there)."""
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    big = (1.0 - e) / (1.0 + e)
    big = tl.where(x < 0, -big, big)
    x2 = x * x
    t = 17.0 + x2 * 0.0
    t = 15.0 + x2 / t
    t = 13.0 + x2 / t
    t = 11.0 + x2 / t
    t = 9.0 + x2 / t
    t = 7.0 + x2 / t
    t = 5.0 + x2 / t
    t = 3.0 + x2 / t
    t = 1.0 + x2 / t
    return tl.where(ax < 0.625, x / t, big)


@triton.jit
def _sqrt(x):
    """Correctly rounded square root (``sqrt_rn`` takes float32 only; float64 ``sqrt`` is IEEE)."""
    if x.dtype == tl.float32:
        r = tl.sqrt_rn(x)
    else:
        r = tl.sqrt(x)
    return r


@triton.jit
def _expm1(x):
    """exp(x) - 1: a degree-6 Taylor polynomial for ``|x| < 0.01`` (relative error < 3e-16), else
    ``exp(x) - 1`` (relative error below 1e-14 there)."""
    p = x * (1.0 + x * 0.5 * (1.0 + x / 3.0 * (1.0 + x * 0.25 * (1.0 + x * 0.2 * (1.0 + x / 6.0)))))
    return tl.where(tl.abs(x) < 0.01, p, tl.exp(x) - 1.0)


@triton.jit
def _log1p(w):
    """log(1 + w) for ``w >= 0``: ``2 atanh(w / (2 + w))`` by its series for ``w < 0.5`` (10
    terms, ``s <= 0.2``), else ``log(1 + w)`` (no cancellation there)."""
    s = w / (2.0 + w)
    s2 = s * s
    q = 1.0 / 21.0 + s2 * 0.0
    q = 1.0 / 19.0 + s2 * q
    q = 1.0 / 17.0 + s2 * q
    q = 1.0 / 15.0 + s2 * q
    q = 1.0 / 13.0 + s2 * q
    q = 1.0 / 11.0 + s2 * q
    q = 1.0 / 9.0 + s2 * q
    q = 1.0 / 7.0 + s2 * q
    q = 1.0 / 5.0 + s2 * q
    q = 1.0 / 3.0 + s2 * q
    q = 1.0 + s2 * q
    return tl.where(w < 0.5, 2.0 * s * q, tl.log(1.0 + w))


@triton.jit
def _sigmoid(z):
    e = tl.exp(-tl.abs(z))
    return tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _activate(z, ACT: tl.constexpr, p0, p1):
    """``(s(z), s'(z))`` for activation code ``ACT`` (derivatives as ``gscfast.rules.activation``)."""
    one = z * 0.0 + 1.0
    if ACT == ACT_IDENTITY:
        y = z
        d = one
    elif ACT == ACT_RELU:  # s'(0) = 0
        y = tl.where(z > 0, z, 0.0)
        d = tl.where(z > 0, 1.0, 0.0) * one
    elif ACT == ACT_LEAKY:  # p0 = negative slope
        y = tl.where(z > 0, z, p0 * z)
        d = tl.where(z > 0, one, p0 * one)
    elif ACT == ACT_TANH:
        y = _tanh(z)
        d = 1.0 - y * y
    elif ACT == ACT_SIGMOID:
        y = _sigmoid(z)
        d = y * (1.0 - y)
    elif ACT == ACT_ELU:  # p0 = alpha
        zn = tl.minimum(z, 0.0)
        y = tl.where(z > 0, z, p0 * _expm1(zn))
        d = tl.where(z > 0, one, p0 * tl.exp(zn))
    elif ACT == ACT_SELU:
        zn = tl.minimum(z, 0.0)
        y = tl.where(z > 0, z, _expm1(zn) * SELU_ALPHA) * SELU_SCALE
        d = tl.where(z > 0, one, tl.exp(zn) * SELU_ALPHA) * SELU_SCALE
    elif ACT == ACT_SOFTPLUS:  # p0 = beta, p1 = threshold
        bz = p0 * z
        lin = bz > p1
        bzc = tl.where(lin, 0.0, bz)
        y = tl.where(lin, z, _log1p(tl.exp(bzc)) / p0)
        d = tl.where(lin, one, _sigmoid(bzc))
    elif ACT == ACT_GELU:  # erf form
        cdf = 0.5 * (1.0 + tl.math.erf(z * INV_SQRT_2))
        y = z * cdf
        d = cdf + z * tl.exp(-0.5 * z * z) * INV_SQRT_2PI
    else:  # ACT_GELU_TANH
        t = _tanh((z + 0.044715 * z * z * z) * SQRT_2_OVER_PI)
        y = 0.5 * z * (1.0 + t)
        d = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * SQRT_2_OVER_PI * (
            1.0 + 3.0 * 0.044715 * z * z
        )
    return y, d


# ----------------------------------------------------------------------------- forward


@triton.jit
def layer_fwd_kernel(
    X,
    W,
    BIAS,
    GAMMA,
    BETA,
    MEAN,
    PRM,
    Y,
    DS,
    XH,
    INV,
    SQ,
    MOM,
    N,
    DIN,
    DOUT,
    GROUP_ROWS,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    NORM: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    HAS_BETA: tl.constexpr,
    ACT: tl.constexpr,
    SAVE_DS: tl.constexpr,
    SAVE_LN: tl.constexpr,
    WRITE_SQ: tl.constexpr,
    STATS: tl.constexpr,
    PREC: tl.constexpr,
):
    """One tile of ``BM`` samples, whole output rows (``BN >= DOUT``): GEMM over ``DIN`` in ``BK``
    steps, then bias, norm, activation, ``||y||^2``, saved state and the tile's moments."""
    i_m = tl.program_id(0)
    o_m = i_m * BM + tl.arange(0, BM)
    o_n = tl.arange(0, BN)
    m_m = o_m < N
    m_n = o_n < DOUT
    m_mn = m_m[:, None] & m_n[None, :]
    o_m64 = o_m.to(tl.int64)
    b_z = tl.zeros((BM, BN), dtype=X.dtype.element_ty)
    for k0 in range(0, DIN, BK):
        o_k = k0 + tl.arange(0, BK)
        m_k = o_k < DIN
        b_x = tl.load(
            X + o_m64[:, None] * DIN + o_k[None, :], mask=m_m[:, None] & m_k[None, :], other=0.0
        )  # [BM, BK]
        b_w = tl.load(
            W + o_n[None, :] * DIN + o_k[:, None], mask=m_k[:, None] & m_n[None, :], other=0.0
        )  # [BK, BN] = W^T
        b_z = tl.dot(b_x, b_w, b_z, input_precision=PREC)
    if HAS_BIAS:
        b_z += tl.load(BIAS + o_n, mask=m_n, other=0.0)[None, :]
    eps = tl.load(PRM)
    p0 = tl.load(PRM + 1)
    p1 = tl.load(PRM + 2)
    if NORM == NORM_LAYER:  # layer norm over the row
        b_mu = tl.sum(tl.where(m_mn, b_z, 0.0), 1) / DOUT  # [BM]
        b_dz = tl.where(m_mn, b_z - b_mu[:, None], 0.0)
        b_var = tl.sum(b_dz * b_dz, 1) / DOUT  # [BM]
        # an overflowed variance gives NaN outputs (refused, as by every backend), not zeros
        b_var = tl.where(b_var < float("inf"), b_var, float("nan"))
        b_inv = 1.0 / _sqrt(b_var + eps)  # [BM]
        b_xh = b_dz * b_inv[:, None]
        b_pre = b_xh
        if HAS_GAMMA:
            b_pre = b_pre * tl.load(GAMMA + o_n, mask=m_n, other=0.0)[None, :]
        if HAS_BETA:
            b_pre += tl.load(BETA + o_n, mask=m_n, other=0.0)[None, :]
        if SAVE_LN:
            tl.store(XH + o_m64[:, None] * DOUT + o_n[None, :], b_xh, mask=m_mn)
            tl.store(INV + o_m64, b_inv, mask=m_m)
    elif NORM == NORM_DIAG:  # batch norm with fixed statistics: (z - mean) * scale + beta
        o_g = (o_m64 // GROUP_ROWS)[:, None] * DOUT + o_n[None, :]
        b_scale = tl.load(GAMMA + o_g, mask=m_mn, other=0.0)
        b_pre = (b_z - tl.load(MEAN + o_g, mask=m_mn, other=0.0)) * b_scale
        if HAS_BETA:
            b_pre += tl.load(BETA + o_n, mask=m_n, other=0.0)[None, :]
    else:
        b_pre = b_z
    if ACT != ACT_NONE:
        b_y, b_d = _activate(b_pre, ACT, p0, p1)
    else:
        b_y = b_pre
        b_d = b_pre * 0.0 + 1.0
    if NORM == NORM_DIAG:
        b_d = b_d * b_scale
    tl.store(Y + o_m64[:, None] * DOUT + o_n[None, :], b_y, mask=m_mn)
    if SAVE_DS:
        tl.store(DS + o_m64[:, None] * DOUT + o_n[None, :], b_d, mask=m_mn)
    if WRITE_SQ:
        tl.store(SQ + o_m64, tl.sum(tl.where(m_mn, b_y * b_y, 0.0), 1), mask=m_m)
    if STATS:  # this tile's mean, M2, #positive, #negative per neuron
        cnt = tl.sum(m_m.to(X.dtype.element_ty), 0)
        b_mean = tl.sum(tl.where(m_mn, b_pre, 0.0), 0) / cnt  # [BN]
        b_dev = tl.where(m_mn, b_pre - b_mean[None, :], 0.0)
        p_mom = MOM + i_m.to(tl.int64) * 4 * DOUT + o_n
        tl.store(p_mom, b_mean, mask=m_n)
        tl.store(p_mom + DOUT, tl.sum(b_dev * b_dev, 0), mask=m_n)
        tl.store(p_mom + 2 * DOUT, tl.sum(tl.where(m_mn & (b_pre > 0), 1.0, 0.0), 0), mask=m_n)
        tl.store(p_mom + 3 * DOUT, tl.sum(tl.where(m_mn & (b_pre < 0), 1.0, 0.0), 0), mask=m_n)


# ----------------------------------------------------------------------------- VJP steps


@triton.jit
def _load_u(
    p_row, m_r, o_s, o_k, m_k, DS, GAMMA, DOUT, HAS_DS: tl.constexpr, HAS_GAMMA: tl.constexpr
):
    """``v * ds * gamma`` for rows ``p_row [BM]`` (pointers) and columns ``o_k [BK]``."""
    m = m_r[:, None] & m_k[None, :]
    b_u = tl.load(p_row[:, None] + o_k[None, :], mask=m, other=0.0)  # [BM, BK]
    if HAS_DS:
        b_u = b_u * tl.load(DS + o_s[:, None] * DOUT + o_k[None, :], mask=m, other=0.0)
    if HAS_GAMMA:
        b_u = b_u * tl.load(GAMMA + o_k, mask=m_k, other=0.0)[None, :]
    return b_u


@triton.jit
def _ln_stats(
    p_row,
    m_r,
    o_s,
    DS,
    GAMMA,
    XH,
    DOUT,
    BK: tl.constexpr,
    BM: tl.constexpr,
    HAS_DS: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    dtype: tl.constexpr,
):
    """Row means of ``u`` and ``u * xh`` over the ``DOUT`` features (layer-norm projection)."""
    b_a = tl.zeros((BM,), dtype=dtype)
    b_b = tl.zeros((BM,), dtype=dtype)
    for k0 in range(0, DOUT, BK):
        o_k = k0 + tl.arange(0, BK)
        m_k = o_k < DOUT
        b_u = _load_u(p_row, m_r, o_s, o_k, m_k, DS, GAMMA, DOUT, HAS_DS, HAS_GAMMA)
        b_xh = tl.load(
            XH + o_s[:, None] * DOUT + o_k[None, :], mask=m_r[:, None] & m_k[None, :], other=0.0
        )
        b_a += tl.sum(b_u, 1)
        b_b += tl.sum(b_u * b_xh, 1)
    return b_a / DOUT, b_b / DOUT


@triton.jit
def _vjp_in(
    p_row,
    m_r,
    o_s,
    o_k,
    m_k,
    DS,
    GAMMA,
    XH,
    DOUT,
    b_a,
    b_b,
    b_inv,
    HAS_DS: tl.constexpr,
    LN: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
):
    """The GEMM input of the layer's VJP for one ``[BM, BK]`` tile: ``v * ds``, then the
    layer-norm projection ``(u - mean(u) - xh mean(u xh)) * inv`` with ``u = v * ds * gamma``."""
    b_u = _load_u(p_row, m_r, o_s, o_k, m_k, DS, GAMMA, DOUT, HAS_DS, HAS_GAMMA)
    if LN:
        m = m_r[:, None] & m_k[None, :]
        b_xh = tl.load(XH + o_s[:, None] * DOUT + o_k[None, :], mask=m, other=0.0)
        b_u = tl.where(m, (b_u - b_a[:, None] - b_xh * b_b[:, None]) * b_inv[:, None], 0.0)
    return b_u


@triton.jit
def chain_step_kernel(
    V,
    DS,
    GAMMA,
    XH,
    INV,
    W,
    OUT,
    SQR,
    ROWS,
    R,
    DOUT,
    DIN,
    SVN,
    SVR,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    HAS_DS: tl.constexpr,
    LN: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    STORE: tl.constexpr,
    WRITE_SQ: tl.constexpr,
    PREC: tl.constexpr,
):
    """Rows ``r`` of a tile (sample ``n = r // R``): ``out = P(v * ds) @ W`` over ``DIN`` in ``BN``
    column blocks (``DOUT`` in ``BK`` steps), ``sqr[r] = ||out_r||^2`` (the epilogue)."""
    i_m = tl.program_id(0)
    o_r = i_m * BM + tl.arange(0, BM)
    m_r = o_r < ROWS
    o_r64 = o_r.to(tl.int64)
    o_s = tl.where(m_r, o_r64 // R, 0)  # sample of each row
    p_row = V + o_s * SVN + (o_r64 % R) * SVR  # [BM]
    dtype = V.dtype.element_ty
    b_a = tl.zeros((BM,), dtype=dtype)
    b_b = tl.zeros((BM,), dtype=dtype)
    b_inv = tl.zeros((BM,), dtype=dtype)
    if LN:
        b_a, b_b = _ln_stats(p_row, m_r, o_s, DS, GAMMA, XH, DOUT, BK, BM, HAS_DS, HAS_GAMMA, dtype)
        b_inv = tl.load(INV + o_s, mask=m_r, other=0.0)
    b_sq = tl.zeros((BM,), dtype=dtype)
    for c0 in range(0, DIN, BN):
        o_c = c0 + tl.arange(0, BN)
        m_c = o_c < DIN
        b_acc = tl.zeros((BM, BN), dtype=dtype)
        for k0 in range(0, DOUT, BK):
            o_k = k0 + tl.arange(0, BK)
            m_k = o_k < DOUT
            b_u = _vjp_in(
                p_row,
                m_r,
                o_s,
                o_k,
                m_k,
                DS,
                GAMMA,
                XH,
                DOUT,
                b_a,
                b_b,
                b_inv,
                HAS_DS,
                LN,
                HAS_GAMMA,
            )  # [BM, BK]
            b_w = tl.load(
                W + o_k[:, None] * DIN + o_c[None, :], mask=m_k[:, None] & m_c[None, :], other=0.0
            )  # [BK, BN]
            b_acc = tl.dot(b_u, b_w, b_acc, input_precision=PREC)
        b_sq += tl.sum(b_acc * b_acc, 1)
        if STORE:
            tl.store(
                OUT + o_r64[:, None] * DIN + o_c[None, :], b_acc, mask=m_r[:, None] & m_c[None, :]
            )
    if WRITE_SQ:
        tl.store(SQR + o_r64, b_sq, mask=m_r)


@triton.jit
def contrib_step_kernel(
    V,
    DS,
    GAMMA,
    XH,
    INV,
    W,
    DS0,
    GAMMA0,
    XH0,
    INV0,
    W0,
    OUT,
    SQR,
    NS,
    M,
    DOUT,
    DIN,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    HAS_DS: tl.constexpr,
    LN: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    PREC: tl.constexpr,
):
    """Output row ``(n, j)``, ``j = 0..M``: ``v[n, j] S + (v[n, j-1] G - v[n, j-1] S)`` (missing rows
    zero; ``G`` from the trained layer, ``S`` from the initial one), and its squared norm. The
    difference is formed as ``G - S`` products of the same inputs, so it is exactly 0 if the two
    layers are equal."""
    i_m = tl.program_id(0)
    o_r = i_m * BM + tl.arange(0, BM)
    ROWS = NS * (M + 1)
    m_r = o_r < ROWS
    o_r64 = o_r.to(tl.int64)
    o_s = tl.where(m_r, o_r64 // (M + 1), 0)
    o_j = o_r64 % (M + 1)
    m_0 = m_r & (o_j < M)  # v[n, j] exists
    m_1 = m_r & (o_j >= 1)  # v[n, j-1] exists
    p_0 = V + (o_s * M + o_j) * DOUT
    p_1 = V + (o_s * M + o_j - 1) * DOUT
    dtype = V.dtype.element_ty
    b_a0 = tl.zeros((BM,), dtype=dtype)
    b_b0 = tl.zeros((BM,), dtype=dtype)
    b_a1 = tl.zeros((BM,), dtype=dtype)
    b_b1 = tl.zeros((BM,), dtype=dtype)
    b_a2 = tl.zeros((BM,), dtype=dtype)
    b_b2 = tl.zeros((BM,), dtype=dtype)
    b_inv = tl.zeros((BM,), dtype=dtype)
    b_inv0 = tl.zeros((BM,), dtype=dtype)
    if LN:
        b_a0, b_b0 = _ln_stats(
            p_0, m_0, o_s, DS0, GAMMA0, XH0, DOUT, BK, BM, HAS_DS, HAS_GAMMA, dtype
        )
        b_a1, b_b1 = _ln_stats(p_1, m_1, o_s, DS, GAMMA, XH, DOUT, BK, BM, HAS_DS, HAS_GAMMA, dtype)
        b_a2, b_b2 = _ln_stats(
            p_1, m_1, o_s, DS0, GAMMA0, XH0, DOUT, BK, BM, HAS_DS, HAS_GAMMA, dtype
        )
        b_inv = tl.load(INV + o_s, mask=m_r, other=0.0)
        b_inv0 = tl.load(INV0 + o_s, mask=m_r, other=0.0)
    b_sq = tl.zeros((BM,), dtype=dtype)
    for c0 in range(0, DIN, BN):
        o_c = c0 + tl.arange(0, BN)
        m_c = o_c < DIN
        m_w = m_c[None, :]
        b_s0 = tl.zeros((BM, BN), dtype=dtype)
        b_g1 = tl.zeros((BM, BN), dtype=dtype)
        b_s1 = tl.zeros((BM, BN), dtype=dtype)
        for k0 in range(0, DOUT, BK):
            o_k = k0 + tl.arange(0, BK)
            m_k = o_k < DOUT
            b_u0 = _vjp_in(
                p_0,
                m_0,
                o_s,
                o_k,
                m_k,
                DS0,
                GAMMA0,
                XH0,
                DOUT,
                b_a0,
                b_b0,
                b_inv0,
                HAS_DS,
                LN,
                HAS_GAMMA,
            )
            b_u1 = _vjp_in(
                p_1,
                m_1,
                o_s,
                o_k,
                m_k,
                DS,
                GAMMA,
                XH,
                DOUT,
                b_a1,
                b_b1,
                b_inv,
                HAS_DS,
                LN,
                HAS_GAMMA,
            )
            b_u2 = _vjp_in(
                p_1,
                m_1,
                o_s,
                o_k,
                m_k,
                DS0,
                GAMMA0,
                XH0,
                DOUT,
                b_a2,
                b_b2,
                b_inv0,
                HAS_DS,
                LN,
                HAS_GAMMA,
            )
            m_kw = m_k[:, None] & m_w
            b_w = tl.load(W + o_k[:, None] * DIN + o_c[None, :], mask=m_kw, other=0.0)  # [BK, BN]
            b_w0 = tl.load(W0 + o_k[:, None] * DIN + o_c[None, :], mask=m_kw, other=0.0)
            b_s0 = tl.dot(b_u0, b_w0, b_s0, input_precision=PREC)
            b_g1 = tl.dot(b_u1, b_w, b_g1, input_precision=PREC)
            b_s1 = tl.dot(b_u2, b_w0, b_s1, input_precision=PREC)
        b_out = b_s0 + (b_g1 - b_s1)
        b_sq += tl.sum(b_out * b_out, 1)
        tl.store(OUT + o_r64[:, None] * DIN + o_c[None, :], b_out, mask=m_r[:, None] & m_w)
    tl.store(SQR + o_r64, b_sq, mask=m_r)


INTERPRETED = type(layer_fwd_kernel).__name__ == "InterpretedFunction"
"""Whether this module was imported under ``TRITON_INTERPRET=1`` (kernels run on CPU tensors)."""
