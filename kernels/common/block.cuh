// One CUDA thread block, written so that the same kernel source also runs on the host.
//
// Kernels in kernels/*.cu are written phase by phase: every piece of per-thread work is a lambda
// handed to `blk.threads(...)`, and phases are separated by `blk.sync()`. State that lives across
// a barrier is either `__shared__` or a `PerThread<T, N>` array (registers on the GPU).
//
// - On the GPU (nvcc, NVRTC): `threads(f)` calls `f(threadIdx.x)`, `sync()` is `__syncthreads()`,
//   `PerThread` is a register array, and `GSC_BLOCKS(blk)` runs the body once for `blockIdx.x`.
// - On the host (`-DGSC_HOST`, any C++17 compiler): `threads(f)` runs `f(t)` for every thread `t`
//   of the block in order, `sync()` does nothing (the phase already finished for all threads),
//   `PerThread` holds one array per thread, `__shared__` arrays are ordinary locals, and
//   `GSC_BLOCKS(blk)` loops over the grid set by `gsc_host_launch(grid, block)`.
//
// The host run computes exactly what the GPU computes as long as the kernel has no data race
// within a phase (which would be a bug on the GPU too) and uses no warp-level primitives
// (shuffles, votes, warp-synchronous code) or atomics: the kernels here use none.
#pragma once

#if defined(GSC_HOST)
#include <cmath>
#include <cstddef>
#include <vector>
#define __global__
#define __device__
#define __host__
#define __shared__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define GSC_KERNEL extern "C" __attribute__((visibility("default")))
#else
#define GSC_KERNEL extern "C" __global__
#endif

namespace gsc {

#if defined(GSC_HOST)
using std::erf;
using std::exp;
using std::expm1;
using std::fabs;
using std::log;
using std::log1p;
using std::sqrt;
using std::tanh;

struct LaunchConfig {
  long long grid = 1;
  int block = 1;
};

inline LaunchConfig& launch_config() {
  static thread_local LaunchConfig config;
  return config;
}

struct Block {
  long long bid;
  int nthreads;
  template <class F>
  void threads(F&& f) const {
    for (int t = 0; t < nthreads; ++t) f(t);
  }
  void sync() const {}
};

template <class T, int N>
struct PerThread {
  std::vector<T> v;
  explicit PerThread(const Block& b) : v(std::size_t(b.nthreads) * N, T(0)) {}
  T* operator()(int t) { return v.data() + std::size_t(t) * N; }
};

#define GSC_BLOCKS(blk)                                                        \
  for (::gsc::Block blk{0, ::gsc::launch_config().block};                      \
       blk.bid < ::gsc::launch_config().grid; ++blk.bid)

#else

struct Block {
  long long bid;
  int nthreads;
  template <class F>
  __device__ __forceinline__ void threads(F&& f) const { f(int(threadIdx.x)); }
  __device__ __forceinline__ void sync() const { __syncthreads(); }
};

template <class T, int N>
struct PerThread {
  T v[N];
  __device__ __forceinline__ explicit PerThread(const Block&) {}
  __device__ __forceinline__ T* operator()(int) { return v; }
};

#define GSC_BLOCKS(blk)                                                        \
  if (::gsc::Block blk{(long long)blockIdx.x, (int)blockDim.x}; true)

#endif

}  // namespace gsc
