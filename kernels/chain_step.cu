// Fused chain step: one layer's VJP applied to a tile of stacked Jacobian rows.
//
// Row r of V belongs to sample n = r / R (row r % R of it) and starts at V[n*SVN + (r%R)*SVR]
// (SVN = 0 broadcasts one R x DOUT matrix, e.g. the identity, over all samples). For each row:
//   u = v * ds[n] (* gamma),  layer norm: u = (u - mean(u) - xh[n] mean(u xh[n])) * inv[n],
//   out = u @ W  (W is DOUT x DIN, row-major),  sqr[r] = ||out||^2.
// One block: BM rows, all DIN columns in tiles of BN, DOUT in steps of BK through shared memory;
// each of the 256 threads accumulates a TM x TN register tile and its rows' squared norms.
#include "common/block.cuh"
#include "common/codes.cuh"
#include "common/vjp.cuh"

namespace gsc {

template <typename T, int BM, int BN, int BK, int TM, int TN>
__device__ __forceinline__ void chain_step_body(
    const Block& blk, const T* V, const T* DS, const T* GAMMA, const T* XH, const T* INV,
    const T* __restrict__ W, T* OUT, T* SQR, long long ROWS, long long R, long long DOUT,
    long long DIN, long long SVN, long long SVR, long long flags) {
  constexpr int CG = BN / TN, RG = BM / TM, NT = CG * RG;
  __shared__ T Us[BK][BM];
  __shared__ T Ws[BK][BN];
  __shared__ T sqp[BM][CG];
  __shared__ RowState<T> rs[BM];
  __shared__ T red[2][NT];
  const long long row0 = blk.bid * BM;
  const VjpIn<T> in{DS, GAMMA, XH, INV, DOUT, flags};

  blk.threads([&](int t) {
    if (t < BM) {
      long long r = row0 + t;
      clear_row(rs[t]);
      if (r < ROWS) {
        rs[t].n = r / R;
        rs[t].off = rs[t].n * SVN + (r % R) * SVR;
      }
    }
  });
  blk.sync();
  if (flags & F_LN) ln_stats<T, BM, NT>(blk, V, in, rs, red);

  PerThread<T, TM * TN> acc(blk);
  PerThread<T, TM> rsq(blk);
  blk.threads([&](int t) {
#pragma unroll
    for (int i = 0; i < TM; ++i) rsq(t)[i] = T(0);
  });
  for (long long c0 = 0; c0 < DIN; c0 += BN) {
    blk.threads([&](int t) {
#pragma unroll
      for (int q = 0; q < TM * TN; ++q) acc(t)[q] = T(0);
    });
    for (long long k0 = 0; k0 < DOUT; k0 += BK) {
      blk.threads([&](int t) {
        for (int e = t; e < BM * BK; e += NT) {
          int i = e / BK, kk = e % BK;
          Us[kk][i] = vjp_in(V, in, rs[i], k0 + kk);
        }
        for (int e = t; e < BK * BN; e += NT) {
          int kk = e / BN, c = e % BN;
          long long k = k0 + kk, cc = c0 + c;
          Ws[kk][c] = (k < DOUT && cc < DIN) ? W[k * DIN + cc] : T(0);
        }
      });
      blk.sync();
      blk.threads([&](int t) {
        int ty = t / CG, tx = t % CG;
        T* a = acc(t);
        for (int kk = 0; kk < BK; ++kk) {
          T ua[TM], wb[TN];
#pragma unroll
          for (int i = 0; i < TM; ++i) ua[i] = Us[kk][ty * TM + i];
#pragma unroll
          for (int j = 0; j < TN; ++j) wb[j] = Ws[kk][tx * TN + j];
#pragma unroll
          for (int i = 0; i < TM; ++i)
#pragma unroll
            for (int j = 0; j < TN; ++j) a[i * TN + j] += ua[i] * wb[j];
        }
      });
      blk.sync();
    }
    blk.threads([&](int t) {
      int ty = t / CG, tx = t % CG;
      T* a = acc(t);
#pragma unroll
      for (int i = 0; i < TM; ++i) {
        long long r = row0 + ty * TM + i;
#pragma unroll
        for (int j = 0; j < TN; ++j) {
          long long cc = c0 + tx * TN + j;
          T val = a[i * TN + j];
          rsq(t)[i] += val * val;  // padded rows and columns hold exact zeros
          if ((flags & F_STORE) && r < ROWS && cc < DIN) OUT[r * DIN + cc] = val;
        }
      }
    });
  }
  if (flags & F_WRITE_SQ) {
    blk.threads([&](int t) {
      int ty = t / CG, tx = t % CG;
#pragma unroll
      for (int i = 0; i < TM; ++i) sqp[ty * TM + i][tx] = rsq(t)[i];
    });
    blk.sync();
    blk.threads([&](int t) {
      long long r = row0 + t;
      if (t < BM && r < ROWS) {
        T s = T(0);
        for (int q = 0; q < CG; ++q) s += sqp[t][q];
        SQR[r] = s;
      }
    });
  }
}

}  // namespace gsc

// Launch: grid = ceil(ROWS / 64) blocks of 256 threads.
#define GSC_CHAIN_STEP(NAME, T, BK)                                                     \
  GSC_KERNEL __launch_bounds__(256) void NAME(                                          \
      const T* V, const T* DS, const T* GAMMA, const T* XH, const T* INV, const T* W,   \
      T* OUT, T* SQR, long long ROWS, long long R, long long DOUT, long long DIN,       \
      long long SVN, long long SVR, long long flags) {                                  \
    GSC_BLOCKS(blk) {                                                                   \
      gsc::chain_step_body<T, 64, 64, BK, 4, 4>(blk, V, DS, GAMMA, XH, INV, W, OUT, SQR, \
                                                ROWS, R, DOUT, DIN, SVN, SVR, flags);   \
    }                                                                                   \
  }

GSC_CHAIN_STEP(gsc_chain_step_f32, float, 16)
GSC_CHAIN_STEP(gsc_chain_step_f64, double, 8)
