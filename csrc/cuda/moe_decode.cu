// CUDA kernels of moe_decode: a gated MoE experts step for a few tokens (decode) without the
// permute / grouped GEMM / unpermute round trip. The gate is SwiGLU or GPT-OSS's clamped SwiGLU,
// gate/up concatenated or interleaved, with optional biases b_in [E, 2h] and b_out [E, d] (the
// CPU kernel's header has the formulas).
//
// Three launches, no host sync: (1) one warp per (slot, hidden column) dots the gate and up rows of
// the slot's expert with the token (fp32 accumulation, warp-shuffle reduction) and writes
// silu(gate) * up in fp32; (2) one warp per (slot, output column) dots the down projection with
// that activation; (3) one thread per (token, column) sums the k slot outputs with their weights in
// slot order (deterministic). Slots are not grouped by expert: a weight row read by several slots
// of one step is served from L2. Ids outside [0, E) are dropped slots, as in permute on CUDA.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "moe_framework/clamped_swiglu.h"
#include "moe_framework/common.h"

namespace moe_framework {
namespace {

constexpr int kWarps = 8;

template <typename acc>
__device__ acc warp_sum(acc v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// Element (row r, col c) of expert e's matrix, rows along dim 1 and cols along dim 2.
template <typename scalar_t>
__device__ __forceinline__ scalar_t at3(const scalar_t* w, int64_t se, int64_t s1, int64_t s2,
                                        int64_t e, int64_t r, int64_t c) {
  return w[e * se + r * s1 + c * s2];
}

// The gate's options, passed by value to up_kernel.
template <typename scalar_t, typename acc>
struct Gate {
  const scalar_t* bin;  // [E, 2h] contiguous, or nullptr
  bool clamped, interleaved;
  acc alpha, limit;
};

template <typename scalar_t, typename acc>
__global__ void up_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ ids,
                          const scalar_t* __restrict__ w, int64_t se, int64_t s1, int64_t s2,
                          bool trans_b, int64_t k, int64_t d, int64_t h, int64_t E,
                          Gate<scalar_t, acc> gate, acc* __restrict__ a) {
  const int64_t s = blockIdx.x;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (c >= h) return;
  const int64_t e = ids[s];
  if (e < 0 || e >= E) return;
  const scalar_t* xt = x + (s / k) * d;
  // Gate and up columns of hidden column c: c and h + c, or 2c and 2c + 1 (interleaved).
  const int64_t cg = gate.interleaved ? 2 * c : c, cu = gate.interleaved ? 2 * c + 1 : h + c;
  acc g = 0, u = 0;
  for (int64_t i = lane; i < d; i += 32) {
    const acc xi = static_cast<acc>(xt[i]);
    // trans_b: w[e] is [2h, d] (row c, column i); else [d, 2h] (row i, column c).
    const scalar_t wg = trans_b ? at3(w, se, s1, s2, e, cg, i) : at3(w, se, s1, s2, e, i, cg);
    const scalar_t wu = trans_b ? at3(w, se, s1, s2, e, cu, i) : at3(w, se, s1, s2, e, i, cu);
    g += xi * static_cast<acc>(wg);
    u += xi * static_cast<acc>(wu);
  }
  g = warp_sum(g);
  u = warp_sum(u);
  if (lane != 0) return;
  if (gate.bin != nullptr) {
    g += static_cast<acc>(gate.bin[e * 2 * h + cg]);
    u += static_cast<acc>(gate.bin[e * 2 * h + cu]);
  }
  if (!gate.clamped) {
    a[s * h + c] = g / (acc(1) + exp(-g)) * u;
    return;
  }
  a[s * h + c] = clamped_swiglu::forward(g, u, gate.alpha, gate.limit);  // the op's math
}

template <typename scalar_t, typename acc>
__global__ void down_kernel(const acc* __restrict__ a, const int64_t* __restrict__ ids,
                            const scalar_t* __restrict__ w, int64_t se, int64_t s1, int64_t s2,
                            bool trans_b, int64_t d, int64_t h, int64_t E,
                            const scalar_t* __restrict__ bout, acc* __restrict__ y) {
  const int64_t s = blockIdx.x;
  const int64_t i = static_cast<int64_t>(blockIdx.y) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (i >= d) return;
  const int64_t e = ids[s];
  if (e < 0 || e >= E) return;
  acc v = 0;
  for (int64_t c = lane; c < h; c += 32) {
    // trans_b: w[e] is [d, h] (row i, column c); else [h, d] (row c, column i).
    const scalar_t wv = trans_b ? at3(w, se, s1, s2, e, i, c) : at3(w, se, s1, s2, e, c, i);
    v += a[s * h + c] * static_cast<acc>(wv);
  }
  v = warp_sum(v);
  if (lane == 0) y[s * d + i] = bout != nullptr ? v + static_cast<acc>(bout[e * d + i]) : v;
}

template <typename scalar_t, typename acc>
__global__ void combine_kernel(const acc* __restrict__ y, const int64_t* __restrict__ ids,
                               const acc* __restrict__ weights, int64_t T, int64_t k, int64_t d,
                               int64_t E, scalar_t* __restrict__ out) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= T * d) return;
  const int64_t t = idx / d, i = idx % d;
  acc r = 0;
  for (int64_t j = 0; j < k; ++j) {
    const int64_t s = t * k + j, e = ids[s];
    if (e < 0 || e >= E) continue;
    r += weights[s] * y[s * d + i];
  }
  out[idx] = static_cast<scalar_t>(r);
}

at::Tensor moe_decode_cuda(const at::Tensor& x_in, const at::Tensor& ids_in,
                           const at::Tensor& weights_in, const at::Tensor& w_in,
                           const at::Tensor& w_out, bool trans_b,
                           const std::optional<at::Tensor>& b_in_in,
                           const std::optional<at::Tensor>& b_out_in, c10::string_view gate_name,
                           double alpha, double limit, bool interleaved) {
  const char* op = "moe_decode";
  check_same_device(
      op,
      {{"x", x_in}, {"ids", ids_in}, {"weights", weights_in}, {"w_in", w_in}, {"w_out", w_out}});
  TORCH_CHECK(x_in.dim() == 2 && ids_in.dim() == 2 && weights_in.sizes() == ids_in.sizes() &&
                  ids_in.size(0) == x_in.size(0),
              op, ": x must be [T, d], ids and weights [T, k], got ", x_in.sizes(), ", ",
              ids_in.sizes(), ", ", weights_in.sizes());
  TORCH_CHECK(w_in.dim() == 3 && w_out.dim() == 3 && w_in.scalar_type() == x_in.scalar_type() &&
                  w_out.scalar_type() == x_in.scalar_type(),
              op, ": w_in and w_out must be 3-D with x's dtype");
  const int64_t T = x_in.size(0), d = x_in.size(1), k = ids_in.size(1), E = w_in.size(0);
  const int64_t h = (trans_b ? w_in.size(1) : w_in.size(2)) / 2;
  TORCH_CHECK((trans_b ? w_in.size(2) : w_in.size(1)) == d, op, ": w_in's d must be ", d);
  TORCH_CHECK(w_out.size(0) == E && w_out.size(1) == (trans_b ? d : h) &&
                  w_out.size(2) == (trans_b ? h : d),
              op, ": w_out must be [E, d, h] (trans_b) or [E, h, d], got ", w_out.sizes());
  check_decode_extras(op, x_in, E, d, h, b_in_in, b_out_in, gate_name);
  at::Tensor out = at::empty({T, d}, x_in.options());
  if (out.numel() == 0) return out;
  const c10::cuda::CUDAGuard guard(x_in.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor x = x_in.contiguous();
  const at::Tensor ids = ids_in.to(at::kLong).contiguous();
  const int64_t n = T * k;
  const at::Tensor b_in = b_in_in.has_value() ? b_in_in->contiguous() : at::Tensor();
  const at::Tensor b_out = b_out_in.has_value() ? b_out_in->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "moe_decode", [&] {
    using acc = at::opmath_type<scalar_t>;
    const auto acc_opts = x.options().dtype(c10::CppTypeToScalarType<acc>::value);
    const at::Tensor wts = weights_in.to(acc_opts).contiguous();
    at::Tensor a = at::empty({n, h}, acc_opts);
    at::Tensor y = at::empty({n, d}, acc_opts);
    const dim3 block(32 * kWarps);
    const Gate<scalar_t, acc> gate{b_in.defined() ? b_in.const_data_ptr<scalar_t>() : nullptr,
                                   gate_name == "clamped", interleaved, static_cast<acc>(alpha),
                                   static_cast<acc>(limit)};
    if (n > 0 && h > 0) {
      up_kernel<scalar_t, acc><<<dim3(n, (h + kWarps - 1) / kWarps), block, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), ids.const_data_ptr<int64_t>(),
          w_in.const_data_ptr<scalar_t>(), w_in.stride(0), w_in.stride(1), w_in.stride(2), trans_b,
          k, d, h, E, gate, a.mutable_data_ptr<acc>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (n > 0) {  // also with h = 0: y = b_out (or 0)
      down_kernel<scalar_t, acc><<<dim3(n, (d + kWarps - 1) / kWarps), block, 0, stream>>>(
          a.const_data_ptr<acc>(), ids.const_data_ptr<int64_t>(), w_out.const_data_ptr<scalar_t>(),
          w_out.stride(0), w_out.stride(1), w_out.stride(2), trans_b, d, h, E,
          b_out.defined() ? b_out.const_data_ptr<scalar_t>() : nullptr, y.mutable_data_ptr<acc>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const int64_t total = T * d;
    combine_kernel<scalar_t, acc><<<(total + 255) / 256, 256, 0, stream>>>(
        y.const_data_ptr<acc>(), ids.const_data_ptr<int64_t>(), wts.const_data_ptr<acc>(), T, k, d,
        E, out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_framework, CUDA, m) {
  m.impl("moe_decode", &moe_decode_cuda);
}

}  // namespace moe_framework
