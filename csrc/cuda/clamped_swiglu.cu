// CUDA kernels of clamped_swiglu and clamped_swiglu_backward (GPT-OSS's clamped SwiGLU gate).
//
// Elementwise over [rows, H] pairs: a block's threads cover consecutive pairs of one row, blocks
// stride over rows in grid y. The math is clamped_swiglu.h's, shared with the CPU kernels.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "moe_framework/clamped_swiglu.h"

namespace moe_framework {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGridY = 65535;

template <typename scalar_t>
__global__ void forward_kernel(const scalar_t* __restrict__ h, int64_t sh,
                               scalar_t* __restrict__ out, int64_t rows, int64_t half,
                               double alpha_f, double limit_f, bool interleaved) {
  using acc = clamped_swiglu::acc_t<scalar_t>;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= half) return;
  const int64_t cg = interleaved ? 2 * i : i, cu = interleaved ? 2 * i + 1 : half + i;
  const acc alpha = static_cast<acc>(alpha_f), limit = static_cast<acc>(limit_f);
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const scalar_t* row = h + r * sh;
    out[r * half + i] = static_cast<scalar_t>(clamped_swiglu::forward<acc>(
        static_cast<acc>(row[cg]), static_cast<acc>(row[cu]), alpha, limit));
  }
}

template <typename scalar_t>
__global__ void backward_kernel(const scalar_t* __restrict__ h, int64_t sh,
                                const scalar_t* __restrict__ grad, int64_t sg,
                                scalar_t* __restrict__ out, int64_t rows, int64_t half,
                                double alpha_f, double limit_f, bool interleaved) {
  using acc = clamped_swiglu::acc_t<scalar_t>;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= half) return;
  const int64_t cg = interleaved ? 2 * i : i, cu = interleaved ? 2 * i + 1 : half + i;
  const acc alpha = static_cast<acc>(alpha_f), limit = static_cast<acc>(limit_f);
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const scalar_t* row = h + r * sh;
    acc dg, du;
    clamped_swiglu::backward<acc>(static_cast<acc>(grad[r * sg + i]), static_cast<acc>(row[cg]),
                                  static_cast<acc>(row[cu]), alpha, limit, dg, du);
    out[r * 2 * half + cg] = static_cast<scalar_t>(dg);
    out[r * 2 * half + cu] = static_cast<scalar_t>(du);
  }
}

dim3 grid_for(int64_t rows, int64_t half) {
  const int64_t cols = (half + kThreads - 1) / kThreads;
  const int64_t by = std::min<int64_t>(rows, std::max<int64_t>(1, (kMaxGridY * 16) / cols));
  return dim3(static_cast<unsigned>(cols), static_cast<unsigned>(std::min(by, kMaxGridY)));
}

at::Tensor clamped_swiglu_cuda(const at::Tensor& h_in, double alpha, double limit,
                               bool interleaved) {
  clamped_swiglu::check_args(h_in, limit, "clamped_swiglu");
  const int64_t half = h_in.size(-1) / 2;
  at::Tensor out = swiglu::new_output(h_in, /*backward=*/false);
  if (out.numel() == 0) return out;
  const c10::cuda::CUDAGuard guard(h_in.device());
  const at::Tensor h = swiglu::as_rows(h_in);
  const int64_t rows = h.size(0);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "clamped_swiglu", [&] {
    forward_kernel<scalar_t><<<grid_for(rows, half), kThreads, 0, stream>>>(
        h.const_data_ptr<scalar_t>(), h.stride(0), out.mutable_data_ptr<scalar_t>(), rows, half,
        alpha, limit, interleaved);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor clamped_swiglu_backward_cuda(const at::Tensor& grad_in, const at::Tensor& h_in,
                                        double alpha, double limit, bool interleaved) {
  swiglu::check_grad(grad_in, h_in, "clamped_swiglu_backward");
  clamped_swiglu::check_args(h_in, limit, "clamped_swiglu_backward");
  const int64_t half = h_in.size(-1) / 2;
  at::Tensor out = swiglu::new_output(h_in, /*backward=*/true);
  if (out.numel() == 0) return out;
  const c10::cuda::CUDAGuard guard(h_in.device());
  const at::Tensor h = swiglu::as_rows(h_in);
  const at::Tensor g = swiglu::as_rows(grad_in);
  const int64_t rows = h.size(0);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, h.scalar_type(), "clamped_swiglu_backward", [&] {
        backward_kernel<scalar_t><<<grid_for(rows, half), kThreads, 0, stream>>>(
            h.const_data_ptr<scalar_t>(), h.stride(0), g.const_data_ptr<scalar_t>(), g.stride(0),
            out.mutable_data_ptr<scalar_t>(), rows, half, alpha, limit, interleaved);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_framework, CUDA, m) {
  m.impl("clamped_swiglu", &clamped_swiglu_cuda);
  m.impl("clamped_swiglu_backward", &clamped_swiglu_backward_cuda);
}

}  // namespace moe_framework
