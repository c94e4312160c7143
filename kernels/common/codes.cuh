// Codes shared with gscfast/backends/_gpu_engine.py (ACT_*, NORM_*) and
// gscfast/backends/cupy_backend.py (F_*); tests/gpu checks that the numbers agree.
#pragma once

namespace gsc {

enum Act : int {
  ACT_NONE = 0,
  ACT_IDENTITY = 1,
  ACT_RELU = 2,
  ACT_LEAKY = 3,
  ACT_TANH = 4,
  ACT_SIGMOID = 5,
  ACT_ELU = 6,
  ACT_SELU = 7,
  ACT_SOFTPLUS = 8,
  ACT_GELU = 9,
  ACT_GELU_TANH = 10,
};

enum Norm : int {
  NORM_NONE = 0,
  NORM_LAYER = 1,
  NORM_DIAG = 2,
};

// bits of a kernel's `flags` argument
enum Flag : long long {
  F_HAS_BIAS = 1,
  F_HAS_GAMMA = 2,
  F_HAS_BETA = 4,
  F_SAVE_DS = 8,
  F_SAVE_LN = 16,
  F_WRITE_SQ = 32,
  F_STATS = 64,
  F_HAS_DS = 128,
  F_LN = 256,
  F_STORE = 512,
};

}  // namespace gsc
