// CUDA kernels of swiglu, swiglu_backward and swiglu_backward_ (in place into h).
//
// Elementwise over [rows, H]: a block's threads cover consecutive columns of one row (coalesced
// loads of the gate, up and gradient halves), blocks stride over rows in grid y, so there is no
// per-element division. The math is swiglu.h's, shared with the CPU kernels.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "moe_framework/swiglu.h"

namespace moe_framework {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGridY = 65535;

template <typename scalar_t>
__global__ void forward_kernel(const scalar_t* __restrict__ h, int64_t sh,
                               scalar_t* __restrict__ out, int64_t rows, int64_t half) {
  using acc = swiglu::acc_t<scalar_t>;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= half) return;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const scalar_t* gate = h + r * sh;
    const acc y = swiglu::forward<acc>(static_cast<acc>(gate[i]), static_cast<acc>(gate[half + i]));
    out[r * half + i] = static_cast<scalar_t>(y);
  }
}

// out may be h itself (the in-place op): each element is read before it is written, by the same
// thread, so no restrict between them.
template <typename scalar_t>
__global__ void backward_kernel(const scalar_t* h, int64_t sh, const scalar_t* __restrict__ grad,
                                int64_t sg, scalar_t* out, int64_t so, int64_t rows, int64_t half) {
  using acc = swiglu::acc_t<scalar_t>;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= half) return;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const scalar_t* gate = h + r * sh;
    const acc g = static_cast<acc>(gate[i]);
    const acc u = static_cast<acc>(gate[half + i]);
    acc dg, du;
    swiglu::backward<acc>(static_cast<acc>(grad[r * sg + i]), g, u, dg, du);
    out[r * so + i] = static_cast<scalar_t>(dg);
    out[r * so + half + i] = static_cast<scalar_t>(du);
  }
}

dim3 grid_for(int64_t rows, int64_t half) {
  const int64_t cols = (half + kThreads - 1) / kThreads;
  // Enough row blocks to fill the GPU many times over; each block loops over the rest.
  const int64_t by = std::min<int64_t>(rows, std::max<int64_t>(1, (kMaxGridY * 16) / cols));
  return dim3(static_cast<unsigned>(cols), static_cast<unsigned>(std::min(by, kMaxGridY)));
}

at::Tensor swiglu_cuda(const at::Tensor& h_in) {
  swiglu::check_h(h_in, "swiglu");
  const int64_t half = h_in.size(-1) / 2;
  at::Tensor out = swiglu::new_output(h_in, /*backward=*/false);
  if (out.numel() == 0) return out;
  const c10::cuda::CUDAGuard guard(h_in.device());
  const at::Tensor h = swiglu::as_rows(h_in);
  const int64_t rows = h.size(0);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "swiglu", [&] {
    forward_kernel<scalar_t><<<grid_for(rows, half), kThreads, 0, stream>>>(
        h.const_data_ptr<scalar_t>(), h.stride(0), out.mutable_data_ptr<scalar_t>(), rows, half);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

void backward_into(const at::Tensor& grad_in, const at::Tensor& h, at::Tensor& out) {
  const at::Tensor g = swiglu::as_rows(grad_in);
  const int64_t rows = h.size(0), half = h.size(1) / 2;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, h.scalar_type(), "swiglu_backward", [&] {
        backward_kernel<scalar_t><<<grid_for(rows, half), kThreads, 0, stream>>>(
            h.const_data_ptr<scalar_t>(), h.stride(0), g.const_data_ptr<scalar_t>(), g.stride(0),
            out.mutable_data_ptr<scalar_t>(), out.stride(0), rows, half);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

at::Tensor swiglu_backward_cuda(const at::Tensor& grad, const at::Tensor& h_in) {
  swiglu::check_grad(grad, h_in, "swiglu_backward");
  at::Tensor out = swiglu::new_output(h_in, /*backward=*/true);
  if (out.numel() == 0) return out;
  const c10::cuda::CUDAGuard guard(h_in.device());
  const at::Tensor h = swiglu::as_rows(h_in);
  at::Tensor o = out.view({h.size(0), h.size(1)});
  backward_into(grad, h, o);
  return out;
}

void swiglu_backward_inplace_cuda(const at::Tensor& grad, const at::Tensor& h) {
  swiglu::check_inplace(grad, h);
  if (h.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(h.device());
  at::Tensor hv = h.view({-1, h.size(-1)});
  backward_into(grad, hv, hv);
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_framework, CUDA, m) {
  m.impl("swiglu", &swiglu_cuda);
  m.impl("swiglu_backward", &swiglu_backward_cuda);
  m.impl("swiglu_backward_", &swiglu_backward_inplace_cuda);
}

}  // namespace moe_framework
