// Fused forward of one layer: z = x W^T + b, then layer norm or a fixed (diagonal) batch norm,
// then the activation; writes y, the VJP state (ds = s'(pre) * batch-norm scale; xh, inv for
// layer norm), ||y||^2 per sample and per-block moments of the pre-activation.
//
// One block holds BM samples and every output column of them:
//   A. GEMM over column tiles of BN (k tiles of BK through shared memory); z is written to Y.
//   B1. (layer norm) mean and 1 / sqrt(var + eps) of each row (threads per row, then a reduction).
//   B2. each thread owns columns: pre, activation, stores, and the column's Welford moments over
//       the block's samples (mean, M2, #positive, #negative -> MOM[block, 0..3, column]).
//   B3. ||y||^2 of each row.
// Indices: N samples, DIN -> DOUT features, GROUP_ROWS samples per row of MEAN/GAMMA (batch norm).
#include "common/activations.cuh"
#include "common/block.cuh"
#include "common/codes.cuh"

namespace gsc {

template <typename T, int BM, int BN, int BK, int NT>
__device__ __forceinline__ void layer_fwd_body(
    const Block& blk, const T* __restrict__ X, const T* __restrict__ W, const T* BIAS,
    const T* GAMMA, const T* BETA, const T* MEAN, const T* PRM, T* Y, T* DS, T* XH, T* INV, T* SQ,
    T* MOM, long long N, long long DIN, long long DOUT, long long GROUP_ROWS, long long act,
    long long norm, long long flags) {
  constexpr int TN = BM * BN / NT;  // outputs per thread in the GEMM (one row, TN columns)
  constexpr int CG = BN / TN;       // column groups
  constexpr int TPR = NT / BM;      // threads per row in the row reductions
  static_assert(BM * CG == NT && TPR * BM == NT, "tile shape");
  __shared__ T Xs[BK][BM];
  __shared__ T Ws[BK][BN];
  __shared__ T red[NT];
  __shared__ T rowMean[BM];
  __shared__ T rowInv[BM];
  const long long row0 = blk.bid * BM;
  const T eps = PRM[0], p0 = PRM[1], p1 = PRM[2];
  PerThread<T, TN> acc(blk);

  // A. z = x W^T + b -> Y
  for (long long n0 = 0; n0 < DOUT; n0 += BN) {
    blk.threads([&](int t) {
#pragma unroll
      for (int j = 0; j < TN; ++j) acc(t)[j] = T(0);
    });
    for (long long k0 = 0; k0 < DIN; k0 += BK) {
      blk.threads([&](int t) {
        for (int e = t; e < BM * BK; e += NT) {
          int i = e / BK, kk = e % BK;
          long long r = row0 + i, k = k0 + kk;
          Xs[kk][i] = (r < N && k < DIN) ? X[r * DIN + k] : T(0);
        }
        for (int e = t; e < BN * BK; e += NT) {
          int c = e / BK, kk = e % BK;
          long long n = n0 + c, k = k0 + kk;
          Ws[kk][c] = (n < DOUT && k < DIN) ? W[n * DIN + k] : T(0);
        }
      });
      blk.sync();
      blk.threads([&](int t) {
        int i = t / CG, c = (t % CG) * TN;
        T* a = acc(t);
        for (int kk = 0; kk < BK; ++kk) {
          T x = Xs[kk][i];
#pragma unroll
          for (int j = 0; j < TN; ++j) a[j] += x * Ws[kk][c + j];
        }
      });
      blk.sync();
    }
    blk.threads([&](int t) {
      int i = t / CG, c = (t % CG) * TN;
      long long r = row0 + i;
      T* a = acc(t);
      if (r < N) {
#pragma unroll
        for (int j = 0; j < TN; ++j) {
          long long n = n0 + c + j;
          if (n < DOUT) Y[r * DOUT + n] = a[j] + ((flags & F_HAS_BIAS) ? BIAS[n] : T(0));
        }
      }
    });
  }
  blk.sync();

  // B1. layer-norm statistics of each row
  if (norm == NORM_LAYER) {
    blk.threads([&](int t) {
      int i = t / TPR, lane = t % TPR;
      long long r = row0 + i;
      T s = T(0);
      if (r < N)
        for (long long n = lane; n < DOUT; n += TPR) s += Y[r * DOUT + n];
      red[t] = s;
    });
    blk.sync();
    blk.threads([&](int t) {
      if (t < BM) {
        T s = T(0);
        for (int q = 0; q < TPR; ++q) s += red[t * TPR + q];
        rowMean[t] = s / T(DOUT);
      }
    });
    blk.sync();
    blk.threads([&](int t) {
      int i = t / TPR, lane = t % TPR;
      long long r = row0 + i;
      T s = T(0);
      if (r < N)
        for (long long n = lane; n < DOUT; n += TPR) {
          T dz = Y[r * DOUT + n] - rowMean[i];
          s += dz * dz;
        }
      red[t] = s;
    });
    blk.sync();
    blk.threads([&](int t) {
      if (t < BM) {
        T s = T(0);
        for (int q = 0; q < TPR; ++q) s += red[t * TPR + q];
        T var = s / T(DOUT);
        var += var - var;  // Inf (overflow) -> NaN: NaN outputs, refused as by every backend
        T inv = T(1) / sqrt(var + eps);
        rowInv[t] = inv;
        long long r = row0 + t;
        if (r < N && (flags & F_SAVE_LN)) INV[r] = inv;
      }
    });
    blk.sync();
  }

  // B2. per column: pre-activation, activation, saved state, moments
  blk.threads([&](int t) {
    for (long long n = t; n < DOUT; n += NT) {
      T cnt = T(0), mean = T(0), m2 = T(0), pos = T(0), neg = T(0);
      for (int i = 0; i < BM; ++i) {
        long long r = row0 + i;
        if (r >= N) break;
        long long o = r * DOUT + n;
        T z = Y[o], pre = z, scale = T(1);
        if (norm == NORM_LAYER) {
          T xh = (z - rowMean[i]) * rowInv[i];
          if (flags & F_SAVE_LN) XH[o] = xh;
          pre = xh;
          if (flags & F_HAS_GAMMA) pre = pre * GAMMA[n];
          if (flags & F_HAS_BETA) pre = pre + BETA[n];
        } else if (norm == NORM_DIAG) {
          long long g = (r / GROUP_ROWS) * DOUT + n;
          scale = GAMMA[g];
          pre = (z - MEAN[g]) * scale;
          if (flags & F_HAS_BETA) pre = pre + BETA[n];
        }
        T y = pre, d = T(1);
        if (act != ACT_NONE) activate<T>(int(act), pre, p0, p1, y, d);
        Y[o] = y;
        if (flags & F_SAVE_DS) DS[o] = d * scale;
        if (flags & F_STATS) {
          cnt += T(1);
          T delta = pre - mean;
          mean += delta / cnt;
          m2 += delta * (pre - mean);
          pos += pre > T(0) ? T(1) : T(0);
          neg += pre < T(0) ? T(1) : T(0);
        }
      }
      if (flags & F_STATS) {
        T* m = MOM + blk.bid * 4 * DOUT + n;
        m[0] = mean;
        m[DOUT] = m2;
        m[2 * DOUT] = pos;
        m[3 * DOUT] = neg;
      }
    }
  });
  blk.sync();

  // B3. ||y||^2 of each row
  if (flags & F_WRITE_SQ) {
    blk.threads([&](int t) {
      int i = t / TPR, lane = t % TPR;
      long long r = row0 + i;
      T s = T(0);
      if (r < N)
        for (long long n = lane; n < DOUT; n += TPR) {
          T y = Y[r * DOUT + n];
          s += y * y;
        }
      red[t] = s;
    });
    blk.sync();
    blk.threads([&](int t) {
      long long r = row0 + t;
      if (t < BM && r < N) {
        T s = T(0);
        for (int q = 0; q < TPR; ++q) s += red[t * TPR + q];
        SQ[r] = s;
      }
    });
  }
}

}  // namespace gsc

// Launch: grid = ceil(N / 16) blocks of 256 threads.
#define GSC_LAYER_FWD(NAME, T, BK)                                                       \
  GSC_KERNEL __launch_bounds__(256) void NAME(                                           \
      const T* X, const T* W, const T* BIAS, const T* GAMMA, const T* BETA,              \
      const T* MEAN, const T* PRM, T* Y, T* DS, T* XH, T* INV, T* SQ, T* MOM,            \
      long long N, long long DIN, long long DOUT, long long GROUP_ROWS, long long act,   \
      long long norm, long long flags) {                                                 \
    GSC_BLOCKS(blk) {                                                                    \
      gsc::layer_fwd_body<T, 16, 64, BK, 256>(blk, X, W, BIAS, GAMMA, BETA, MEAN, PRM,   \
                                              Y, DS, XH, INV, SQ, MOM, N, DIN, DOUT,     \
                                              GROUP_ROWS, act, norm, flags);             \
    }                                                                                    \
  }

GSC_LAYER_FWD(gsc_layer_fwd_f32, float, 16)
GSC_LAYER_FWD(gsc_layer_fwd_f64, double, 16)
