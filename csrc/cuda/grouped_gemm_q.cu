// CUDA kernel of grouped_gemm_q, the weight-only INT8 / INT4 grouped GEMM (storage format and
// input checks: moe_framework/grouped_gemm_q.h).
//
// A decode-oriented weight-streaming kernel: one warp per output column n and row tile of up to
// kBM rows of one expert. The warp's lanes stride over the column's packed row of K weights in
// 16-byte loads (32 INT4 or 16 INT8 weights per lane and step), dequantise in registers, and
// accumulate a * w for every row of the tile in fp32; a butterfly shuffle sums the lanes. The row
// tiles come from the static schedule of moe_framework/grouped_gemm.h (row_tile_bound / a binary
// search over the device-side offsets), so the offsets never reach the host, nothing syncs, and the
// launch is CUDA-graph safe; offsets are clamped into [0, M]. Rows outside
// [offsets[0], offsets[E]) are zeroed by a second, elementwise kernel.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "moe_framework/grouped_gemm.h"
#include "moe_framework/grouped_gemm_q.h"

namespace moe_framework {
namespace {

using grouped_gemm::ceil_div;

constexpr int kBM = 8;     // rows per tile (decode: a few tokens per expert)
constexpr int kWarps = 8;  // columns per block, one per warp
constexpr int kThreads = 32 * kWarps;

struct QArgs {
  const uint8_t* w;      // packed weights, row of row_bytes per (expert, column)
  const float* scales;   // [E, N, G]
  const uint8_t* zeros;  // [E, N, G] or nullptr
  int64_t n, k, groups, group_size, row_bytes;
  int bits;
  bool vec;  // 16-byte loads (rows 16-byte aligned and a multiple of 16 bytes)
};

template <typename T>
__device__ __forceinline__ void fma_rows(float (&acc)[kBM], const T* a, int64_t sa0, int64_t sa1,
                                         int rows, int64_t kk, float w) {
#pragma unroll
  for (int r = 0; r < kBM; ++r) {
    if (r < rows) acc[r] += static_cast<float>(a[r * sa0 + kk * sa1]) * w;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    grouped_gemm_q_kernel(const T* __restrict__ a, int64_t sa0, int64_t sa1, QArgs q,
                          const int64_t* __restrict__ offsets, int64_t num_experts, int64_t m,
                          T* __restrict__ out) {
  const grouped_gemm::RowTile rt =
      grouped_gemm::locate_row_tile(offsets, num_experts, m, kBM, blockIdx.x);
  if (rt.row_begin >= rt.row_end) return;  // a gap between experts: no rows
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t n = static_cast<int64_t>(blockIdx.y) * kWarps + warp;
  if (n >= q.n) return;
  const int rows = static_cast<int>(rt.row_end - rt.row_begin);
  const int64_t col = rt.expert * q.n + n;
  const uint8_t* w = q.w + col * q.row_bytes;
  const float* sc = q.scales + col * q.groups;
  const uint8_t* zp = q.zeros == nullptr ? nullptr : q.zeros + col * q.groups;
  const T* ar = a + rt.row_begin * sa0;
  float acc[kBM];
#pragma unroll
  for (int r = 0; r < kBM; ++r) acc[r] = 0.f;
  if (q.bits == 4) {
    // 32 weights per 16-byte chunk, all in one group (group_size is a multiple of 32).
    for (int64_t c = lane; c < q.k / 32; c += 32) {
      const int64_t k0 = c * 32;
      const int64_t g = k0 / q.group_size;
      const float s = sc[g];
      const float z = zp == nullptr ? 8.f : static_cast<float>(zp[g]);
      uint8_t bytes[16];
      if (q.vec) {
        *reinterpret_cast<uint4*>(bytes) = *reinterpret_cast<const uint4*>(w + c * 16);
      } else {
#pragma unroll
        for (int i = 0; i < 16; ++i) bytes[i] = w[c * 16 + i];
      }
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        fma_rows(acc, ar, sa0, sa1, rows, k0 + i, (static_cast<float>(bytes[i] & 15) - z) * s);
        fma_rows(acc, ar, sa0, sa1, rows, k0 + 16 + i, (static_cast<float>(bytes[i] >> 4) - z) * s);
      }
    }
  } else {
    // INT8: 16 weights per chunk; the scale is looked up per weight (any group size).
    const int64_t chunks = ceil_div(q.k, 16);
    for (int64_t c = lane; c < chunks; c += 32) {
      const int64_t k0 = c * 16;
      int8_t vals[16];
      if (q.vec) {
        *reinterpret_cast<uint4*>(vals) = *reinterpret_cast<const uint4*>(w + k0);
      } else {
#pragma unroll
        for (int i = 0; i < 16; ++i) {
          vals[i] = k0 + i < q.k ? static_cast<int8_t>(w[k0 + i]) : int8_t{0};
        }
      }
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        const int64_t kk = k0 + i;
        if (kk < q.k) {
          fma_rows(acc, ar, sa0, sa1, rows, kk,
                   static_cast<float>(vals[i]) * sc[kk / q.group_size]);
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kBM; ++r) {
    float v = acc[r];
#pragma unroll
    for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0 && r < rows) out[(rt.row_begin + r) * q.n + n] = static_cast<T>(v);
  }
}

// Zero the rows outside [offsets[0], offsets[E]) (clamped), which no expert writes.
template <typename T>
__global__ void zero_outside_q_kernel(const int64_t* __restrict__ offsets, int64_t num_experts,
                                      int64_t m, int64_t n, T* __restrict__ out) {
  const int64_t first = grouped_gemm::clamp_offset(offsets[0], m);
  const int64_t last = grouped_gemm::clamp_offset(offsets[num_experts], m);
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < m * n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = idx / n;
    if (row < first || row >= last) out[idx] = T(0);
  }
}

at::Tensor grouped_gemm_q_cuda(const at::Tensor& a, const at::Tensor& qweight_in,
                               const at::Tensor& scales_in,
                               const c10::optional<at::Tensor>& zeros_in,
                               const at::Tensor& offsets_in, int64_t bits, int64_t group_size,
                               int64_t act_bits) {
  const grouped_gemm_q::Scheme s = grouped_gemm_q::check_inputs(
      a, qweight_in, scales_in, zeros_in, offsets_in, bits, group_size, act_bits);
  const c10::cuda::CUDAGuard guard(a.device());
  const int64_t m = a.size(0);
  if (s.act_bits == 8 && m > 0 && s.k > 0) {
    // INT8 activations: the same per-(row, group) quantisation as the CPU kernel (scale =
    // max|a| / 127, q = round(a / scale)), applied on the device with ATen ops (no host sync) as
    // the activations q * scale, then the weight-only kernel in fp32: equal to the CPU's integer
    // dot products up to fp32 summation order.
    const at::Tensor a32 = a.to(at::kFloat).reshape({m, s.groups, s.group_size});
    const at::Tensor scale = a32.abs().amax(-1, true).div(127.f);
    const at::Tensor q =
        at::where(scale.gt(0), a32.div(scale).round().clamp(-127, 127), at::zeros_like(a32));
    const at::Tensor aq = q.mul(scale).reshape({m, s.k});
    return grouped_gemm_q_cuda(aq, qweight_in, scales_in, zeros_in, offsets_in, bits, group_size, 0)
        .to(a.scalar_type());
  }
  at::Tensor out = at::empty({m, s.n}, a.options());
  if (m == 0 || s.n == 0) return out;
  const at::Tensor qweight = qweight_in.contiguous();
  const at::Tensor scales = scales_in.contiguous();
  at::Tensor zeros;
  if (zeros_in.has_value()) zeros = zeros_in->contiguous();
  const at::Tensor offsets = offsets_in.contiguous();
  const int64_t row_bytes = s.bits == 8 ? s.k : s.k / 2;
  const bool vec = row_bytes % 16 == 0 && reinterpret_cast<uintptr_t>(qweight.data_ptr()) % 16 == 0;
  const QArgs q{static_cast<const uint8_t*>(qweight.data_ptr()),
                scales.const_data_ptr<float>(),
                zeros.defined() ? zeros.const_data_ptr<uint8_t>() : nullptr,
                s.n,
                s.k,
                s.groups,
                s.group_size,
                row_bytes,
                s.bits,
                vec};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t tiles = grouped_gemm::row_tile_bound(m, s.num_experts, kBM);
  const int64_t col_blocks = ceil_div(s.n, kWarps);
  TORCH_CHECK(tiles <= 2147483647LL && col_blocks <= 65535, "grouped_gemm_q: grid too large (",
              tiles, " row tiles x ", col_blocks, " column blocks)");
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(col_blocks));
  const int64_t* off = offsets.const_data_ptr<int64_t>();
  // Only the three activation dtypes are instantiated (check_inputs refused the others).
  const auto launch = [&](auto tag) {
    using scalar_t = decltype(tag);
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const int64_t blocks = std::min<int64_t>(ceil_div(m * s.n, 256), 4096);
    zero_outside_q_kernel<scalar_t>
        <<<static_cast<unsigned>(blocks), 256, 0, stream>>>(off, s.num_experts, m, s.n, o);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (s.k == 0) {
      out.zero_();
      return;
    }
    grouped_gemm_q_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        a.const_data_ptr<scalar_t>(), a.stride(0), a.stride(1), q, off, s.num_experts, m, o);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  switch (a.scalar_type()) {
    case at::kFloat:
      launch(float{});
      break;
    case at::kBFloat16:
      launch(at::BFloat16{});
      break;
    default:
      launch(at::Half{});
      break;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_framework, CUDA, m) {
  m.impl("grouped_gemm_q", &grouped_gemm_q_cuda);
}

}  // namespace moe_framework
