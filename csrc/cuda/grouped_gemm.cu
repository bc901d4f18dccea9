// CUDA kernels of grouped_gemm and grouped_gemm_wgrad.
//
// Forward: one launch over a static grid of row_tile_bound(M, E, kBM) x ceil(N / kBN) blocks (a
// bound from shapes only, see moe_framework/grouped_gemm.h). Each block finds its expert and rows
// with a binary search over the device-side offsets and returns at once when it falls in a gap, so
// the offsets never reach the host and the launch is CUDA-graph safe. Rows outside
// [offsets[0], offsets[E]) are zeroed by a second, elementwise kernel.
// Weight gradient: one block per (expert, output tile); it reduces over the expert's rows in row
// order (no split over rows, no atomics: deterministic). An expert without rows writes zeros.
//
// Both are the same block-tile GEMM, C[kBM x kBN] = sum_p A(i, p) B(p, j), with A and B read
// through arbitrary strides (that is how trans_b, non-contiguous inputs and the transposed
// operands of wgrad are expressed). bf16/fp16 run on tensor cores (WMMA 16x16x16, fp32
// accumulate); fp32 and fp64 use plain FMA register tiles.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "moe_framework/grouped_gemm.h"

namespace moe_framework {
namespace {

using grouped_gemm::acc_t;
using grouped_gemm::ceil_div;

constexpr int kBM = 64;
constexpr int kBN = 64;
constexpr int kThreads = 256;

// Strided view of an operand: element (i, p) at ptr[i * s0 + p * s1].
template <typename T>
struct Strided {
  const T* ptr;
  int64_t s0, s1;
};

// The tensor-core element type of a torch half type.
template <typename T>
struct WmmaType {
  using type = void;
};
template <>
struct WmmaType<at::BFloat16> {
  using type = __nv_bfloat16;
};
template <>
struct WmmaType<at::Half> {
  using type = __half;
};
// Zero of a tensor-core element type (explicit intrinsics: torch builds with the implicit half
// conversions disabled).
__device__ __forceinline__ __nv_bfloat16 wmma_zero(__nv_bfloat16*) {
  return __float2bfloat16(0.f);
}
__device__ __forceinline__ __half wmma_zero(__half*) {
  return __float2half(0.f);
}

template <typename T>
constexpr bool kTensorCore = !std::is_same_v<typename WmmaType<T>::type, void>;

// ---------------------------------------------------------------------------------------------
// FMA block tile (fp32, fp64): 256 threads as 16 x 16, each owns a 4 x 4 register tile with rows
// ty + 16 r and columns tx + 16 c (conflict-free shared-memory reads).
template <typename T>
__device__ void block_gemm_fma(Strided<T> a, int64_t m_valid, Strided<T> b, int64_t n_valid,
                               int64_t kdim, T* c, int64_t ldc) {
  using acc = acc_t<T>;
  constexpr int kBK = 16;
  __shared__ acc as[kBK][kBM];
  __shared__ acc bs[kBK][kBN];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  acc r[4][4] = {};
  for (int64_t k0 = 0; k0 < kdim; k0 += kBK) {
    for (int idx = tid; idx < kBK * kBM; idx += kThreads) {
      const int i = idx / kBK, p = idx % kBK;
      as[p][i] = (i < m_valid && k0 + p < kdim)
                     ? static_cast<acc>(a.ptr[i * a.s0 + (k0 + p) * a.s1])
                     : acc(0);
    }
    for (int idx = tid; idx < kBK * kBN; idx += kThreads) {
      const int p = idx / kBN, j = idx % kBN;
      bs[p][j] = (j < n_valid && k0 + p < kdim)
                     ? static_cast<acc>(b.ptr[(k0 + p) * b.s0 + j * b.s1])
                     : acc(0);
    }
    __syncthreads();
#pragma unroll
    for (int p = 0; p < kBK; ++p) {
      acc av[4], bv[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        av[q] = as[p][ty + 16 * q];
        bv[q] = bs[p][tx + 16 * q];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) r[i][j] = fma(av[i], bv[j], r[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int row = ty + 16 * i;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int col = tx + 16 * j;
      if (row < m_valid && col < n_valid) c[row * ldc + col] = static_cast<T>(r[i][j]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Tensor-core block tile (bf16, fp16): 8 warps, warp w owns rows 16 (w % 4) and columns
// 32 (w / 4) .. +32 (two 16x16 fp32 accumulators). Operands are staged in shared memory with
// zero fill outside the valid rows, columns and depth.
template <typename T>
__device__ void block_gemm_wmma(Strided<T> a, int64_t m_valid, Strided<T> b, int64_t n_valid,
                                int64_t kdim, T* c, int64_t ldc) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  using W = typename WmmaType<T>::type;
  constexpr int kBK = 32;
  constexpr int kLdA = kBK + 8;  // padding keeps rows 32-byte aligned and spreads banks
  constexpr int kLdB = kBN + 8;
  constexpr int kLdC = kBN + 4;
  __shared__ __align__(32) W as[kBM * kLdA];
  __shared__ __align__(32) W bs[kBK * kLdB];
  __shared__ __align__(32) float cs[kBM * kLdC];
  const int tid = threadIdx.x, warp = tid / 32;
  const int wm = (warp % 4) * 16, wn = (warp / 4) * 32;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc0, acc1;
  wmma::fill_fragment(acc0, 0.f);
  wmma::fill_fragment(acc1, 0.f);
  const W zero = wmma_zero(static_cast<W*>(nullptr));
  for (int64_t k0 = 0; k0 < kdim; k0 += kBK) {
    for (int idx = tid; idx < kBM * kBK; idx += kThreads) {
      const int i = idx / kBK, p = idx % kBK;
      as[i * kLdA + p] = (i < m_valid && k0 + p < kdim)
                             ? reinterpret_cast<const W*>(a.ptr)[i * a.s0 + (k0 + p) * a.s1]
                             : zero;
    }
    for (int idx = tid; idx < kBK * kBN; idx += kThreads) {
      const int p = idx / kBN, j = idx % kBN;
      bs[p * kLdB + j] = (j < n_valid && k0 + p < kdim)
                             ? reinterpret_cast<const W*>(b.ptr)[(k0 + p) * b.s0 + j * b.s1]
                             : zero;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, W, wmma::row_major> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, W, wmma::row_major> fb0, fb1;
      wmma::load_matrix_sync(fa, as + wm * kLdA + kk, kLdA);
      wmma::load_matrix_sync(fb0, bs + kk * kLdB + wn, kLdB);
      wmma::load_matrix_sync(fb1, bs + kk * kLdB + wn + 16, kLdB);
      wmma::mma_sync(acc0, fa, fb0, acc0);
      wmma::mma_sync(acc1, fa, fb1, acc1);
    }
    __syncthreads();
  }
  wmma::store_matrix_sync(cs + wm * kLdC + wn, acc0, kLdC, wmma::mem_row_major);
  wmma::store_matrix_sync(cs + wm * kLdC + wn + 16, acc1, kLdC, wmma::mem_row_major);
  __syncthreads();
  for (int idx = tid; idx < kBM * kBN; idx += kThreads) {
    const int i = idx / kBN, j = idx % kBN;
    if (i < m_valid && j < n_valid) c[i * ldc + j] = static_cast<T>(cs[i * kLdC + j]);
  }
#endif
}

template <typename T>
__device__ __forceinline__ void block_gemm(Strided<T> a, int64_t m_valid, Strided<T> b,
                                           int64_t n_valid, int64_t kdim, T* c, int64_t ldc) {
  if constexpr (kTensorCore<T>) {
    block_gemm_wmma<T>(a, m_valid, b, n_valid, kdim, c, ldc);
  } else {
    block_gemm_fma<T>(a, m_valid, b, n_valid, kdim, c, ldc);
  }
}

// ---------------------------------------------------------------------------------------------
// Kernels

// grid: (row_tile_bound(M, E, kBM), ceil(N / kBN)). B(p, j) of expert e = b[e*sb0 + p*sbk + j*sbn].
template <typename T>
__global__ void __launch_bounds__(kThreads)
    grouped_gemm_kernel(const T* __restrict__ a, int64_t sa0, int64_t sa1, const T* __restrict__ b,
                        int64_t sb0, int64_t sbk, int64_t sbn, const int64_t* __restrict__ offsets,
                        int64_t num_experts, int64_t m, int64_t n, int64_t k, T* __restrict__ out) {
  const grouped_gemm::RowTile rt =
      grouped_gemm::locate_row_tile(offsets, num_experts, m, kBM, blockIdx.x);
  if (rt.row_begin >= rt.row_end) return;  // a gap between experts: no rows
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kBN;
  const Strided<T> av{a + rt.row_begin * sa0, sa0, sa1};
  const Strided<T> bv{b + rt.expert * sb0 + n0 * sbn, sbk, sbn};
  block_gemm<T>(av, rt.row_end - rt.row_begin, bv, n - n0 < kBN ? n - n0 : kBN, k,
                out + rt.row_begin * n + n0, n);
}

// Zero the rows outside [offsets[0], offsets[E]) (clamped), which no expert writes.
template <typename T>
__global__ void zero_outside_kernel(const int64_t* __restrict__ offsets, int64_t num_experts,
                                    int64_t m, int64_t n, T* __restrict__ out) {
  const int64_t first = grouped_gemm::clamp_offset(offsets[0], m);
  const int64_t last = grouped_gemm::clamp_offset(offsets[num_experts], m);
  const int64_t total = m * n;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = idx / n;
    if (row < first || row >= last) out[idx] = T(0);
  }
}

// grid: (ceil(Q / kBN), ceil(P / kBM), E). db[e] is [P, Q] = X_e^T Y_e, X [M, P], Y [M, Q].
template <typename T>
__global__ void __launch_bounds__(kThreads)
    wgrad_kernel(const T* __restrict__ x, int64_t sx0, int64_t sx1, const T* __restrict__ y,
                 int64_t sy0, int64_t sy1, const int64_t* __restrict__ offsets, int64_t m,
                 int64_t p_dim, int64_t q_dim, T* __restrict__ db) {
  const int64_t e = blockIdx.z;
  const int64_t lo = grouped_gemm::clamp_offset(offsets[e], m);
  const int64_t hi = grouped_gemm::clamp_offset(offsets[e + 1], m);
  const int64_t rows = hi > lo ? hi - lo : 0;  // non-monotone offsets: treated as empty
  const int64_t p0 = static_cast<int64_t>(blockIdx.y) * kBM;
  const int64_t q0 = static_cast<int64_t>(blockIdx.x) * kBN;
  // A(i, r) = X[lo + r, p0 + i], B(r, j) = Y[lo + r, q0 + j]: the reduction runs over rows r.
  const Strided<T> av{x + lo * sx0 + p0 * sx1, sx1, sx0};
  const Strided<T> bv{y + lo * sy0 + q0 * sy1, sy0, sy1};
  block_gemm<T>(av, p_dim - p0 < kBM ? p_dim - p0 : kBM, bv, q_dim - q0 < kBN ? q_dim - q0 : kBN,
                rows, db + e * p_dim * q_dim + p0 * q_dim + q0, q_dim);
}

unsigned grid_dim(int64_t v, const char* op, const char* what, int64_t limit) {
  TORCH_CHECK(v <= limit, op, ": ", what, " = ", v, " exceeds the CUDA grid limit ", limit);
  return static_cast<unsigned>(v);
}

// ---------------------------------------------------------------------------------------------
// Host entry points

at::Tensor grouped_gemm_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets_in,
                             bool trans_b) {
  grouped_gemm::check_grouped_gemm_inputs(a, b, offsets_in, trans_b);
  const c10::cuda::CUDAGuard guard(a.device());
  const int64_t m = a.size(0), k = a.size(1), num_experts = b.size(0);
  const int64_t n = trans_b ? b.size(1) : b.size(2);
  at::Tensor out = at::empty({m, n}, a.options());
  if (m == 0 || n == 0) return out;
  const at::Tensor offsets = offsets_in.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t sbk = trans_b ? b.stride(2) : b.stride(1);
  const int64_t sbn = trans_b ? b.stride(1) : b.stride(2);
  const dim3 grid(grid_dim(grouped_gemm::row_tile_bound(m, num_experts, kBM), "grouped_gemm",
                           "row tiles", 2147483647LL),
                  grid_dim(ceil_div(n, kBN), "grouped_gemm", "column tiles", 65535));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, a.scalar_type(), "grouped_gemm_cuda", [&] {
        scalar_t* o = out.mutable_data_ptr<scalar_t>();
        const int64_t* off = offsets.const_data_ptr<int64_t>();
        const int64_t blocks = std::min<int64_t>(ceil_div(m * n, kThreads), 4096);
        zero_outside_kernel<scalar_t>
            <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(off, num_experts, m, n, o);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        grouped_gemm_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
            a.const_data_ptr<scalar_t>(), a.stride(0), a.stride(1), b.const_data_ptr<scalar_t>(),
            b.stride(0), sbk, sbn, off, num_experts, m, n, k, o);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return out;
}

at::Tensor grouped_gemm_wgrad_cuda(const at::Tensor& a, const at::Tensor& grad_out,
                                   const at::Tensor& offsets_in, bool trans_b) {
  grouped_gemm::check_grouped_gemm_wgrad_inputs(a, grad_out, offsets_in);
  const c10::cuda::CUDAGuard guard(a.device());
  const int64_t m = a.size(0), k = a.size(1), n = grad_out.size(1);
  const int64_t num_experts = offsets_in.size(0) - 1;
  at::Tensor db = trans_b ? at::empty({num_experts, n, k}, a.options())
                          : at::empty({num_experts, k, n}, a.options());
  if (db.numel() == 0) return db;
  const at::Tensor offsets = offsets_in.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // db[e] = X_e^T Y_e with X = a, Y = grad_out ([E, K, N]) or X = grad_out, Y = a ([E, N, K]).
  const at::Tensor& x = trans_b ? grad_out : a;
  const at::Tensor& y = trans_b ? a : grad_out;
  const int64_t p_dim = db.size(1), q_dim = db.size(2);
  const dim3 grid(
      grid_dim(ceil_div(q_dim, kBN), "grouped_gemm_wgrad", "column tiles", 2147483647LL),
      grid_dim(ceil_div(p_dim, kBM), "grouped_gemm_wgrad", "row tiles", 65535),
      grid_dim(num_experts, "grouped_gemm_wgrad", "experts", 65535));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, a.scalar_type(), "grouped_gemm_wgrad_cuda", [&] {
        wgrad_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
            x.const_data_ptr<scalar_t>(), x.stride(0), x.stride(1), y.const_data_ptr<scalar_t>(),
            y.stride(0), y.stride(1), offsets.const_data_ptr<int64_t>(), m, p_dim, q_dim,
            db.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return db;
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_framework, CUDA, m) {
  m.impl("grouped_gemm", &grouped_gemm_cuda);
  m.impl("grouped_gemm_wgrad", &grouped_gemm_wgrad_cuda);
}

}  // namespace moe_framework
