// The GEMM input of a layer's VJP, shared by chain_step.cu and contrib_step.cu:
//   u = v * ds[n] (* gamma),  with layer norm  u = (u - mean(u) - xh[n] * mean(u * xh[n])) * inv[n].
#pragma once
#include "common/block.cuh"
#include "common/codes.cuh"

namespace gsc {

// Per-sample VJP state of one layer (see _gpu_engine.Saved); flags: F_HAS_DS, F_LN, F_HAS_GAMMA.
template <typename T>
struct VjpIn {
  const T* DS;
  const T* GAMMA;
  const T* XH;
  const T* INV;
  long long DOUT;
  long long flags;
};

// One row of a tile (in shared memory; plain data, no initializers): its sample n (< 0: no row),
// where it starts in V, and its layer-norm projection constants.
template <typename T>
struct RowState {
  long long n;
  long long off;
  T a, b, inv;
};

template <typename T>
__device__ __forceinline__ void clear_row(RowState<T>& s) {
  s.n = -1;
  s.off = 0;
  s.a = s.b = s.inv = T(0);
}

template <typename T>
__device__ __forceinline__ T load_u(const T* V, const VjpIn<T>& in, const RowState<T>& s,
                                    long long k) {
  if (s.n < 0 || k >= in.DOUT) return T(0);
  T u = V[s.off + k];
  if (in.flags & F_HAS_DS) u *= in.DS[s.n * in.DOUT + k];
  if ((in.flags & F_LN) && (in.flags & F_HAS_GAMMA)) u *= in.GAMMA[k];
  return u;
}

template <typename T>
__device__ __forceinline__ T vjp_in(const T* V, const VjpIn<T>& in, const RowState<T>& s,
                                    long long k) {
  T u = load_u(V, in, s, k);
  if ((in.flags & F_LN) && s.n >= 0 && k < in.DOUT)
    u = (u - s.a - in.XH[s.n * in.DOUT + k] * s.b) * s.inv;
  return u;
}

// Layer-norm constants of the BM rows `rs` (two phases; `red` is NT x 2 shared scratch).
template <typename T, int BM, int NT>
__device__ __forceinline__ void ln_stats(const Block& blk, const T* V, const VjpIn<T>& in,
                                         RowState<T>* rs, T (*red)[NT]) {
  constexpr int TPR = NT / BM;
  blk.threads([&](int t) {
    int i = t % BM, q = t / BM;
    const RowState<T>& s = rs[i];
    T a = T(0), b = T(0);
    if (s.n >= 0)
      for (long long k = q; k < in.DOUT; k += TPR) {
        T u = load_u(V, in, s, k);
        a += u;
        b += u * in.XH[s.n * in.DOUT + k];
      }
    red[0][t] = a;
    red[1][t] = b;
  });
  blk.sync();
  blk.threads([&](int t) {
    if (t < BM) {
      T a = T(0), b = T(0);
      for (int q = 0; q < TPR; ++q) {
        a += red[0][q * BM + t];
        b += red[1][q * BM + t];
      }
      RowState<T>& s = rs[t];
      s.a = a / T(in.DOUT);
      s.b = b / T(in.DOUT);
      s.inv = s.n >= 0 ? in.INV[s.n] : T(0);
    }
  });
  blk.sync();
}

}  // namespace gsc
