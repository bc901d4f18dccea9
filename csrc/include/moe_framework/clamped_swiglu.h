// Math and input checks shared by the CPU and CUDA kernels of clamped_swiglu (GPT-OSS's gate).
//
// Semantics (docs/operators.md, section clamped_swiglu): h [..., 2H] holds H (gate, up) pairs,
// interleaved (gate at even columns, up at odd ones: GPT-OSS's layout) or concatenated
// ([gate | up]). With g = min(gate, limit) and u = clamp(up, -limit, limit):
//   out = (u + 1) * g * sigmoid(alpha * g).
// Every element is computed in the accumulation type (fp32 for bf16/fp16/fp32, fp64 for fp64) and
// rounded once. The backward follows torch.clamp's gradient convention (gradient passes where the
// input lies inside the closed interval).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>

#include "moe_framework/common.h"
#include "moe_framework/fast_math.h"
#include "moe_framework/swiglu.h"

namespace moe_framework {
namespace clamped_swiglu {

template <typename scalar_t>
using acc_t = at::opmath_type<scalar_t>;

// fast_math.h's branch-free sigmoid, the one swiglu uses (same formula on CPU and GPU).
template <typename T>
MOE_HD T sigmoid_of(T x) {
  return math::sigmoid(x);
}

template <typename T>
MOE_HD T forward(T gate, T up, T alpha, T limit) {
  const T g = gate < limit ? gate : limit;
  const T u = up < -limit ? -limit : (up > limit ? limit : up);
  return (u + T(1)) * g * sigmoid_of(alpha * g);
}

// Gradients of forward for the incoming dy.
template <typename T>
MOE_HD void backward(T dy, T gate, T up, T alpha, T limit, T& dgate, T& dup) {
  const T g = gate < limit ? gate : limit;
  const T u = up < -limit ? -limit : (up > limit ? limit : up);
  const T s = sigmoid_of(alpha * g);
  const T glu = g * s;
  dup = (up >= -limit && up <= limit) ? dy * glu : T(0);
  dgate = gate <= limit ? dy * (u + T(1)) * (s + alpha * g * s * (T(1) - s)) : T(0);
}

inline void check_args(const at::Tensor& h, double limit, const char* op) {
  swiglu::check_h(h, op);
  TORCH_CHECK(std::isfinite(limit) && limit >= 0, op, ": limit must be a finite number >= 0, got ",
              limit);
}

}  // namespace clamped_swiglu
}  // namespace moe_framework
