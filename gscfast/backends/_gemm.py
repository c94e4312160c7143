"""The numba kernels' own GEMM: ``C = A @ B`` for a weight ``B`` packed once per call, on a
register-blocked AVX-512 micro-kernel written in LLVM IR (a numba ``intrinsic``).

Why not OpenBLAS (``np.dot``, which numba calls through scipy): the kernels run thousands of small
products ``[rows, K] x [K, N]`` with the same ``B`` (a layer's weights), and OpenBLAS packs ``B``
again at every call, or runs unpacked "small-matrix" kernels only up to ``M N K = 100^3``; on
taller tiles, ``[512, 100] x [100, 100]`` float32 on two threads, it reaches 269 GFLOP/s where this
kernel reaches 313, and 120 against 149 in float64 (FMA peak about 480 and 240;
``bench/test_gemm.py``, bench/README.md, "gscfast's own GEMM, and the FMA peak").
OpenBLAS also honours ``OPENBLAS_CORETYPE``, which this project's machines set to Haswell (AVX2):
this kernel runs AVX-512 wherever the CPU has it.

The micro-kernel keeps an ``MR x (NV * lanes)`` block of ``C`` in registers (``MR * NV`` vector
accumulators of 512 bits) and runs over ``k``: per ``k``, ``MR`` broadcasts of ``A[i, k]`` and ``NV``
vector loads of row ``k`` of the packed ``B``, ``MR * NV`` fused multiply-adds. Each element of
``C`` is one FMA chain over ``k`` in order (in blocks of ``KC``), so results do not depend on the
thread count or tile size, and no reassociation happens.

Packed ``B`` (``pack``): ``B [K, N]`` cut into column blocks of ``NB = NV * lanes`` columns, each
block ``[K, NB]`` row-major and zero-padded to ``NB`` columns, the blocks one after the other; its
offset in a flat array should be 64-byte aligned (``aligned``), for speed only.

Where the target CPU (numba's: ``NUMBA_CPU_NAME``/``NUMBA_CPU_FEATURES``, else the host) lacks
AVX-512, ``AVAILABLE`` is False and the kernels call ``np.dot`` on the unpacked weights instead.
"""

from __future__ import annotations

import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils, config
from numba.extending import intrinsic, overload

from . import numba_cache


def target_features() -> str:
    """The CPU features numba generates code for (``NUMBA_CPU_FEATURES``, else the host's)."""
    features = getattr(config, "CPU_FEATURES", None)  # numba's config sets it at import
    if features is not None:
        return str(features)
    return str(llvm.get_host_cpu_features().flatten())


AVAILABLE = "+avx512f" in target_features().split(",")
"""Whether the kernels use this GEMM (the target CPU has AVX-512) rather than ``np.dot``."""

CACHE = numba_cache.register(__file__)

# (MR rows, NV vectors) per element size: MR * NV accumulators + MR broadcasts + 1 loaded row
# fit the 32 vector registers; measured best among 2x7 .. 6x4 (bench/README.md).
NV = 7
_SHAPE = {4: (4, NV), 8: (3, NV)}
KC = 128
"""``k`` per block: a block of packed ``B`` (``KC x NB``) stays in L1 while ``A``'s rows pass."""
ALIGN = 64  # bytes


def block_cols(itemsize: int) -> int:
    """Columns per packed block (``NB``) for elements of ``itemsize`` bytes."""
    return _SHAPE[itemsize][1] * 64 // itemsize


@njit(cache=CACHE)
def packed_len(k: int, n: int, itemsize: int) -> int:
    """Elements of ``B [k, n]`` packed."""
    nb = NV * 64 // itemsize
    return (n + nb - 1) // nb * k * nb


def pack(b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``b [K, N]`` packed (module docstring) into ``out`` (flat, ``packed_len`` long; a new
    aligned array if None), which is returned."""
    k, n = b.shape
    nb = block_cols(b.itemsize)
    nblk = -(-n // nb)
    if out is None:
        out = aligned(packed_len(k, n, b.itemsize), b.dtype)
    blocks = out.reshape(nblk, k, nb)
    blocks[...] = 0
    for j in range(nblk):
        w = min(nb, n - j * nb)
        blocks[j, :, :w] = b[:, j * nb : j * nb + w]
    return out


def aligned(size: int, dtype) -> np.ndarray:
    """A zeroed flat array of ``size`` elements whose first element is ``ALIGN``-byte aligned."""
    dt = np.dtype(dtype)
    raw = np.zeros(size + ALIGN // dt.itemsize, dt)
    skip = (-raw.ctypes.data % ALIGN) // dt.itemsize
    return raw[skip : skip + size]


def _splat(builder, value, vty):
    i32 = ir.IntType(32)
    v = builder.insert_element(ir.Constant(vty, None), value, ir.Constant(i32, 0))
    zeros = ir.Constant(ir.VectorType(i32, vty.count), [ir.Constant(i32, 0)] * vty.count)
    return builder.shuffle_vector(v, v, zeros)


PREFETCH = 8  # rows of B ahead, in the first pass over a block of B (from L2 or beyond)


def _micro(mr: int, prefetch: bool = False):
    """The intrinsic ``tile(a, ia, lda, bp, ib, c, ic, ldc, n, kc, acc)``: for ``r < mr`` and
    ``j < n`` (``n <= NB``), ``c[ic + r ldc + j] (+)= sum_{k < kc} a[ia + r lda + k] bp[ib + k NB
    + j]`` (``+=`` where ``acc`` is nonzero). ``a``, ``bp``, ``c``: arrays of one float dtype."""

    @intrinsic
    def tile(typingctx, a, ia, lda, bp, ib, c, ic, ldc, n, kc, acc):
        i64 = types.int64
        sig = types.void(a, i64, i64, bp, i64, c, i64, i64, i64, i64, i64)

        def codegen(context, builder, signature, args):
            aty, _, _, bty, _, cty = signature.args[:6]
            a, ia, lda, bp, ib, c, ic, ldc, n, kc, acc = args
            size = aty.dtype.bitwidth // 8
            nv = _SHAPE[size][1]
            lanes = 64 // size
            nb = nv * lanes
            ety = context.get_value_type(aty.dtype)
            vty = ir.VectorType(ety, lanes)
            pvty = vty.as_pointer()
            ll64, ll32 = ir.IntType(64), ir.IntType(32)
            mty = ir.VectorType(ir.IntType(1), lanes)
            name = f"v{lanes}f{aty.dtype.bitwidth}"
            mod = builder.module
            fma = cgutils.get_or_insert_function(
                mod, ir.FunctionType(vty, [vty, vty, vty]), f"llvm.fma.{name}"
            )
            mload = cgutils.get_or_insert_function(
                mod, ir.FunctionType(vty, [pvty, ll32, mty, vty]), f"llvm.masked.load.{name}.p0"
            )
            mstore = cgutils.get_or_insert_function(
                mod,
                ir.FunctionType(ir.VoidType(), [vty, pvty, ll32, mty]),
                f"llvm.masked.store.{name}.p0",
            )
            pa = context.make_array(aty)(context, builder, a).data
            pb = context.make_array(bty)(context, builder, bp).data
            pc = context.make_array(cty)(context, builder, c).data
            align = ir.Constant(ll32, size)
            iota = ir.Constant(
                ir.VectorType(ll32, lanes), [ir.Constant(ll32, i) for i in range(lanes)]
            )
            masks = []  # lanes of C's columns < n, per vector
            for v in range(nv):
                left = builder.trunc(builder.sub(n, ir.Constant(ll64, v * lanes)), ll32)
                masks.append(
                    builder.icmp_signed(
                        "<", iota, _splat(builder, left, ir.VectorType(ll32, lanes))
                    )
                )
            zero = ir.Constant(vty, None)
            pre = builder.block
            loop = builder.append_basic_block("mk.loop")
            done = builder.append_basic_block("mk.done")
            builder.cbranch(builder.icmp_signed(">", kc, ir.Constant(ll64, 0)), loop, done)

            builder.position_at_end(loop)
            k = builder.phi(ll64)
            k.add_incoming(ir.Constant(ll64, 0), pre)
            accs = [[builder.phi(vty) for _ in range(nv)] for _ in range(mr)]
            for row in accs:
                for p in row:
                    p.add_incoming(zero, pre)
            brow = builder.add(ib, builder.mul(k, ir.Constant(ll64, nb)))
            bcast = [
                _splat(
                    builder,
                    builder.load(
                        builder.gep(
                            pa,
                            [
                                builder.add(
                                    builder.add(ia, builder.mul(ir.Constant(ll64, r), lda)), k
                                )
                            ],
                        )
                    ),
                    vty,
                )
                for r in range(mr)
            ]
            if prefetch:  # the rows of B a few iterations ahead, one per cache line
                pf = cgutils.get_or_insert_function(
                    mod,
                    ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer(), ll32, ll32, ll32]),
                    "llvm.prefetch.p0",
                )
                ahead = builder.add(brow, ir.Constant(ll64, PREFETCH * nb))
                for v in range(nv):
                    ptr = builder.gep(pb, [builder.add(ahead, ir.Constant(ll64, v * lanes))])
                    builder.call(
                        pf,
                        [
                            builder.bitcast(ptr, ir.IntType(8).as_pointer()),
                            ir.Constant(ll32, 0),
                            ir.Constant(ll32, 3),
                            ir.Constant(ll32, 1),
                        ],
                    )
            new = [[None] * nv for _ in range(mr)]
            for v in range(nv):  # one row vector of B live at a time: no spills
                ptr = builder.gep(pb, [builder.add(brow, ir.Constant(ll64, v * lanes))])
                bv = builder.load(builder.bitcast(ptr, pvty), align=size)
                for r in range(mr):
                    new[r][v] = builder.call(fma, [bcast[r], bv, accs[r][v]])
            k1 = builder.add(k, ir.Constant(ll64, 1))
            k.add_incoming(k1, loop)
            for r in range(mr):
                for v in range(nv):
                    accs[r][v].add_incoming(new[r][v], loop)
            builder.cbranch(builder.icmp_signed("<", k1, kc), loop, done)

            builder.position_at_end(done)
            outs = [[builder.phi(vty) for _ in range(nv)] for _ in range(mr)]
            for r in range(mr):
                for v in range(nv):
                    outs[r][v].add_incoming(zero, pre)
                    outs[r][v].add_incoming(new[r][v], loop)
            # C is read only where added to: a store alone does not wait for C's cache lines
            with builder.if_else(builder.icmp_signed("!=", acc, ir.Constant(ll64, 0))) as (
                add,
                put,
            ):
                for adding in (True, False):
                    with add if adding else put:
                        for r in range(mr):
                            crow = builder.add(ic, builder.mul(ir.Constant(ll64, r), ldc))
                            for v in range(nv):
                                col = builder.add(crow, ir.Constant(ll64, v * lanes))
                                ptr = builder.bitcast(builder.gep(pc, [col]), pvty)
                                out = outs[r][v]
                                if adding:
                                    old = builder.call(mload, [ptr, align, masks[v], zero])
                                    out = builder.fadd(old, out)
                                builder.call(mstore, [out, ptr, align, masks[v]])
            return context.get_dummy_value()

        return sig, codegen

    return tile


@intrinsic
def _prefetch(typingctx, a, i):
    """Prefetch the cache line of ``a[i]`` (flat index into ``a``'s data) into L1."""
    sig = types.void(a, types.int64)

    def codegen(context, builder, signature, args):
        aty = signature.args[0]
        ptr = builder.gep(context.make_array(aty)(context, builder, args[0]).data, [args[1]])
        i8p, ll32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        pf = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(ir.VoidType(), [i8p, ll32, ll32, ll32]),
            "llvm.prefetch.p0",
        )
        builder.call(
            pf,
            [
                builder.bitcast(ptr, i8p),
                ir.Constant(ll32, 0),
                ir.Constant(ll32, 3),
                ir.Constant(ll32, 1),
            ],
        )
        return context.get_dummy_value()

    return sig, codegen


_tile4, _tile3, _tile1 = _micro(4), _micro(3), _micro(1)
_tile4p, _tile3p = _micro(4, True), _micro(3, True)


@njit(nogil=True, cache=CACHE)
def mm(A, bp, boff, C):
    """``C = A @ B`` for ``A [M, K]`` and ``C [M, N]`` (rows of contiguous elements, any row
    stride) and ``B [K, N]`` packed in ``bp`` at ``boff`` (``pack``). Only where ``AVAILABLE``."""
    M, K = A.shape
    N = C.shape[1]
    if C.shape[0] != M or bp.size < boff + packed_len(K, N, A.itemsize):
        raise ValueError("_gemm.mm: shapes of A, C and packed B do not match")
    if M == 0 or N == 0:
        return
    if (K > 1 and A.strides[1] != A.itemsize) or (N > 1 and C.strides[1] != C.itemsize):
        raise ValueError("_gemm.mm: A and C need contiguous rows")
    if K == 0:
        C[:] = 0
        return
    lda = A.strides[0] // A.itemsize
    ldc = C.strides[0] // C.itemsize
    nb = NV * 64 // A.itemsize
    mr = 4 if A.itemsize == 4 else 3
    for j0 in range(0, N, nb):
        n = min(nb, N - j0)
        b0 = boff + (j0 // nb) * K * nb
        for k0 in range(0, K, KC):
            kc = min(KC, K - k0)
            acc = np.int64(k0 > 0)
            i = 0
            while i + mr <= M:
                # the next rows of A, a micro-tile ahead: rows that start cold (a layer's output
                # in a whole batch's store) would otherwise stall every micro-tile
                for r in range(i + mr, min(i + 2 * mr, M)):
                    for kk in range(k0, k0 + kc, 64 // A.itemsize):
                        _prefetch(A, r * lda + kk)
                    _prefetch(A, r * lda + k0 + kc - 1)
                ia, ib, ic = i * lda + k0, b0 + k0 * nb, i * ldc + j0
                if i == 0:  # the first rows fetch the block of B: with prefetches
                    if mr == 4:
                        _tile4p(A, ia, lda, bp, ib, C, ic, ldc, n, kc, acc)
                    else:
                        _tile3p(A, ia, lda, bp, ib, C, ic, ldc, n, kc, acc)
                elif mr == 4:
                    _tile4(A, ia, lda, bp, ib, C, ic, ldc, n, kc, acc)
                else:
                    _tile3(A, ia, lda, bp, ib, C, ic, ldc, n, kc, acc)
                i += mr
            while i < M:
                _tile1(A, i * lda + k0, lda, bp, b0 + k0 * nb, C, i * ldc + j0, ldc, n, kc, acc)
                i += 1


def mul(A, B, C):
    """``C = A @ B`` in compiled code: ``mm`` where ``B`` is packed (1-D, at offset 0), else
    ``np.dot`` (OpenBLAS) on ``B`` ``[K, N]``; for code that times either GEMM."""
    raise NotImplementedError("mul is for numba-compiled code")


@overload(mul)
def _mul(A, B, C):
    if B.ndim == 1:
        return lambda A, B, C: mm(A, B, 0, C)
    return lambda A, B, C: np.dot(A, B, C)


numba_cache.attach(globals())
