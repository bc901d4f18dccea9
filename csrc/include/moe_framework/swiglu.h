// Math and input checks shared by the CPU and CUDA kernels of swiglu / swiglu_backward.
//
// Semantics (docs/operators.md, section swiglu): h [..., 2H] holds the gate in [..., :H] and the
// up projection in [..., H:]; swiglu(h) = silu(gate) * up, with silu(g) = g * sigmoid(g).
// Every element is computed in the accumulation type (fp32 for bf16/fp16/fp32, fp64 for fp64)
// and rounded once to the input dtype.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <vector>

#include "moe_framework/common.h"
#include "moe_framework/fast_math.h"

namespace moe_framework {
namespace swiglu {

template <typename scalar_t>
using acc_t = at::opmath_type<scalar_t>;

// sigmoid of one value (fast_math.h), or of 16 / 8 fp32 lanes on the CPU (math::lanes): the swiglu
// math below is written once for both, and each lane gives the scalar version's bits.
template <typename T>
MOE_HD T sigmoid_of(T x) {
  return math::sigmoid(x);
}
#if MOE_MATH_LANES
inline __attribute__((always_inline)) math::lanes::VF sigmoid_of(math::lanes::VF x) {
  return math::lanes::sigmoid(x);
}
inline __attribute__((always_inline)) math::lanes::VF8 sigmoid_of(math::lanes::VF8 x) {
  return math::lanes::sigmoid(x);
}
#endif

// silu(g) * u.
template <typename T>
MOE_HD T forward(T g, T u) {
  const T s = sigmoid_of(g);
  return g * s * u;
}

// Gradients of forward(g, u) for the incoming dy: du = dy * silu(g),
// dg = dy * u * silu'(g) with silu'(g) = s * (1 + g * (1 - s)), s = sigmoid(g).
template <typename T>
MOE_HD void backward(T dy, T g, T u, T& dg, T& du) {
  const T s = sigmoid_of(g);
  du = dy * (g * s);
  dg = dy * u * (s * (1.0f + g * (1.0f - s)));
}

inline void check_h(const at::Tensor& h, const char* op) {
  TORCH_CHECK(h.dim() >= 1, op, ": h must have at least 1 dimension [..., 2H], got a 0-dim tensor");
  TORCH_CHECK(h.size(-1) % 2 == 0, op, ": h's last dimension must be even (gate and up halves of ",
              "[..., 2H]), got ", h.size(-1), " (shape ", h.sizes(), ")");
  const auto st = h.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf, op,
              ": h must have dtype in {Float, Double, BFloat16, Half}, got ", st);
}

inline void check_grad(const at::Tensor& grad, const at::Tensor& h, const char* op) {
  check_same_device(op, {{"grad", grad}, {"h", h}});
  check_h(h, op);
  TORCH_CHECK(grad.dim() == h.dim(), op, ": grad must have h's ", h.dim(), " dimensions, got ",
              grad.dim(), " (shape ", grad.sizes(), ")");
  for (int64_t i = 0; i + 1 < h.dim(); ++i) {
    TORCH_CHECK(grad.size(i) == h.size(i), op,
                ": grad must be h.shape[:-1] + [H] = ", "leading shape of h ", h.sizes(),
                " with last size ", h.size(-1) / 2, ", got ", grad.sizes());
  }
  TORCH_CHECK(grad.size(-1) == h.size(-1) / 2, op,
              ": grad's last dimension must be H = ", h.size(-1) / 2, " (half of h's ", h.size(-1),
              "), got ", grad.size(-1));
  TORCH_CHECK(grad.scalar_type() == h.scalar_type(), op, ": grad must have h's dtype ",
              h.scalar_type(), ", got ", grad.scalar_type());
}

// t [..., w] as [rows, w] (a view where the leading dimensions flatten, else a copy) with a unit
// inner stride.
inline at::Tensor as_rows(const at::Tensor& t) {
  const int64_t w = t.size(-1);
  int64_t lead = 1;
  for (int64_t i = 0; i + 1 < t.dim(); ++i) lead *= t.size(i);
  at::Tensor r = t.reshape({lead, w});
  return (w <= 1 || r.stride(1) == 1) ? r : r.contiguous();
}

// A new [..., H] (forward) or [..., 2H] (backward) contiguous output for h.
inline at::Tensor new_output(const at::Tensor& h, bool backward) {
  std::vector<int64_t> shape = h.sizes().vec();
  if (!backward) shape.back() /= 2;
  return at::empty(shape, h.options().memory_format(at::MemoryFormat::Contiguous));
}

// Input checks of swiglu_backward_ (which writes the gradient over h).
inline void check_inplace(const at::Tensor& grad, const at::Tensor& h) {
  check_grad(grad, h, "swiglu_backward_");
  TORCH_CHECK(h.is_contiguous(), "swiglu_backward_: h must be contiguous (the gradient is written ",
              "over it in place), got strides ", h.strides(), " for shape ", h.sizes());
  TORCH_CHECK(!grad.is_alias_of(h), "swiglu_backward_: grad must not share memory with h");
}

}  // namespace swiglu
}  // namespace moe_framework
