// Activations and their derivatives, as gscfast/rules/activation.py defines them.
#pragma once
#include "common/block.cuh"
#include "common/codes.cuh"

namespace gsc {

template <typename T>
__device__ __forceinline__ T sigmoid(T z) {
  T e = exp(-fabs(z));
  return z >= T(0) ? T(1) / (T(1) + e) : e / (T(1) + e);
}

// y = s(z) and d = s'(z) for activation `act`; p0, p1 its parameters (negative slope, alpha,
// softplus beta and threshold).
template <typename T>
__device__ __forceinline__ void activate(int act, T z, T p0, T p1, T& y, T& d) {
  const T selu_alpha = T(1.6732632423543772848170429916717);
  const T selu_scale = T(1.0507009873554804934193349852946);
  const T k = T(0.7978845608028654);  // sqrt(2 / pi)
  switch (act) {
    case ACT_RELU:  // s'(0) = 0
      y = z > T(0) ? z : T(0);
      d = z > T(0) ? T(1) : T(0);
      break;
    case ACT_LEAKY:
      y = z > T(0) ? z : p0 * z;
      d = z > T(0) ? T(1) : p0;
      break;
    case ACT_TANH:
      y = tanh(z);
      d = T(1) - y * y;
      break;
    case ACT_SIGMOID:
      y = sigmoid(z);
      d = y * (T(1) - y);
      break;
    case ACT_ELU:
      y = z > T(0) ? z : p0 * expm1(z);
      d = z > T(0) ? T(1) : p0 * exp(z);
      break;
    case ACT_SELU:
      y = selu_scale * (z > T(0) ? z : selu_alpha * expm1(z));
      d = selu_scale * (z > T(0) ? T(1) : selu_alpha * exp(z));
      break;
    case ACT_SOFTPLUS: {
      T bz = p0 * z;
      if (bz > p1) {
        y = z;
        d = T(1);
      } else {
        y = log1p(exp(bz)) / p0;
        d = sigmoid(bz);
      }
      break;
    }
    case ACT_GELU: {
      T cdf = T(0.5) * (T(1) + erf(z * T(0.7071067811865476)));
      y = z * cdf;
      d = cdf + z * exp(T(-0.5) * z * z) * T(0.3989422804014327);
      break;
    }
    case ACT_GELU_TANH: {
      T t = tanh(k * (z + T(0.044715) * z * z * z));
      y = T(0.5) * z * (T(1) + t);
      d = T(0.5) * (T(1) + t) +
          T(0.5) * z * (T(1) - t * t) * k * (T(1) + T(3 * 0.044715) * z * z);
      break;
    }
    default:  // ACT_IDENTITY (ACT_NONE never calls this)
      y = z;
      d = T(1);
  }
}

}  // namespace gsc
