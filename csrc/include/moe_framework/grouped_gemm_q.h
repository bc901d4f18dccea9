// The weight-only quantised grouped GEMM (grouped_gemm_q): storage format and input checks shared
// by the CPU and CUDA kernels.
//
// out[offsets[e]:offsets[e+1]] = a[offsets[e]:offsets[e+1]] @ W[e]^T, with W[e] [N, K] (the
// nn.Linear / "out_in" layout: one row of K weights per output channel) stored quantised:
//   bits = 8: qweight int8 [E, N, K],    W[e, n, k] = q * scale
//   bits = 4: qweight uint8 [E, N, K/2], W[e, n, k] = (u - zero) * scale, u in [0, 15]
// scale = scales[e, n, k / group_size] (float32 [E, N, G], G = K / group_size). group_size 0 means
// one group per output channel (G = 1). zero = zeros[e, n, k / group_size] (uint8 [E, N, G], the
// asymmetric scheme), or 8 when zeros is absent (symmetric INT4); INT8 is symmetric (no zeros).
// INT4 packing, in blocks of 32 consecutive k (the llama.cpp Q4_0 order, so that one 16-byte load
// gives 32 weights in k order after a mask and a shift): byte 16*b + i of a row holds element
// 32*b + i in its low nibble and element 32*b + 16 + i in its high nibble (i in [0, 16)). INT4
// therefore needs K and group_size to be multiples of 32. The Python packing helpers are
// moe_framework/ops/quant.py (quantize_weight / dequantize_weight / pack_int4 / unpack_int4).
//
// Every product is accumulated in fp32: per group, sum_k a_k * q_k (and sum_k a_k for the zero
// point), scaled once per group.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "moe_framework/common.h"
#include "moe_framework/grouped_gemm.h"

namespace moe_framework {
namespace grouped_gemm_q {

// The scheme of one call, derived from the shapes and checked.
struct Scheme {
  int64_t num_experts, n, k, groups, group_size;
  int bits;
  bool has_zeros;
  int act_bits;  // 0: weight-only (fp32 activations); 8: activations quantised to INT8 per group
};

inline Scheme check_inputs(const at::Tensor& a, const at::Tensor& qweight, const at::Tensor& scales,
                           const c10::optional<at::Tensor>& zeros, const at::Tensor& offsets,
                           int64_t bits, int64_t group_size, int64_t act_bits = 0) {
  constexpr const char* op = "grouped_gemm_q";
  if (zeros.has_value()) {
    check_same_device(op, {{"a", a},
                           {"qweight", qweight},
                           {"scales", scales},
                           {"zeros", *zeros},
                           {"offsets", offsets}});
  } else {
    check_same_device(op,
                      {{"a", a}, {"qweight", qweight}, {"scales", scales}, {"offsets", offsets}});
  }
  TORCH_CHECK(bits == 8 || bits == 4, op, ": bits must be 8 or 4, got ", bits);
  TORCH_CHECK(act_bits == 0 || act_bits == 8, op,
              ": act_bits must be 0 (weight-only) or 8 (INT8 activations), got ", act_bits);
  check_tensor(a, op, "a", 2, {at::kFloat, at::kBFloat16, at::kHalf});
  if (bits == 8) {
    check_tensor(qweight, op, "qweight", 3, {at::kChar});
  } else {
    check_tensor(qweight, op, "qweight", 3, {at::kByte});
  }
  check_tensor(scales, op, "scales", 3, {at::kFloat});
  grouped_gemm::check_offsets(op, offsets);
  const int64_t num_experts = qweight.size(0), n = qweight.size(1);
  const int64_t k = a.size(1);
  TORCH_CHECK(offsets.size(0) == num_experts + 1, op, ": offsets must have E+1 = ", num_experts + 1,
              " entries for qweight with E=", num_experts, " experts, got ", offsets.size(0));
  const int64_t packed_k = bits == 8 ? k : k / 2;
  TORCH_CHECK(qweight.size(2) == packed_k && (bits == 8 || k % 2 == 0), op,
              ": qweight must be [E, N, ", bits == 8 ? "K" : "K/2", "] = [", num_experts, ", ", n,
              ", ", packed_k, "] for a with K=", k, " (bits=", bits, "), got ", qweight.sizes());
  TORCH_CHECK(group_size >= 0, op,
              ": group_size must be >= 0 (0 = one group per output channel), got ", group_size);
  const int64_t gs = group_size == 0 ? k : group_size;
  TORCH_CHECK(k == 0 || (gs > 0 && k % gs == 0), op, ": group_size ", group_size,
              " must divide K = ", k);
  if (bits == 4) {
    TORCH_CHECK(
        k % 32 == 0 && (group_size == 0 || group_size % 32 == 0), op,
        ": bits=4 needs K and group_size to be multiples of 32 (the packing blocks), got K=", k,
        ", group_size=", group_size);
  }
  const int64_t groups = k == 0 ? 0 : k / gs;
  TORCH_CHECK(scales.size(0) == num_experts && scales.size(1) == n && scales.size(2) == groups, op,
              ": scales must be [E, N, G] = [", num_experts, ", ", n, ", ", groups,
              "] (G = K / group_size), got ", scales.sizes());
  if (zeros.has_value()) {
    TORCH_CHECK(bits == 4, op, ": zeros (asymmetric scheme) are only supported with bits=4");
    check_tensor(*zeros, op, "zeros", 3, {at::kByte});
    TORCH_CHECK(zeros->sizes() == scales.sizes(), op, ": zeros must have the shape of scales ",
                scales.sizes(), ", got ", zeros->sizes());
  }
  return Scheme{num_experts,
                n,
                k,
                groups,
                gs,
                static_cast<int>(bits),
                zeros.has_value(),
                static_cast<int>(act_bits)};
}

}  // namespace grouped_gemm_q
}  // namespace moe_framework
