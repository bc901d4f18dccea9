// CPU kernels of clamped_swiglu and clamped_swiglu_backward (GPT-OSS's clamped SwiGLU gate).
//
// One pass over the rows each, rows split over the thread pool: the forward reads the (gate, up)
// pairs of a row (interleaved or concatenated) and writes (clamp(up) + 1) * glu(min(gate, limit));
// the backward reads them and the incoming gradient and writes both gradient halves in h's layout.
// That replaces GPT-OSS's 2 strided slices, 2 clamps, a sigmoid and 4 elementwise products
// (each a full pass, each rounded to the model dtype) by one pass and one rounding.
//
// The row loops are compiled for baseline x86-64 and, cloned, with target("avx2,f16c") and the
// AVX-512 target, where GCC vectorises them (the interleaved pairs with stride-2 loads). As in
// swiglu.cpp: without -fno-trapping-math GCC keeps fast_math.h's selects as branches and nothing
// vectorises; no FMA contraction, so every build gives the same bits. Set before the includes so
// the inlined header math gets the same settings.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math", "fp-contract=off")
// swiglu.h's 64-byte lane helpers are always-inline: no call ABI involved.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#include "moe_framework/clamped_swiglu.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "moe_framework/cpu_convert.h"
#include "moe_framework/cpu_isa.h"

namespace moe_framework {
namespace {

using cpu::load_acc;
using cpu::store_acc;

constexpr int64_t kMinWorkPerTask = 1 << 14;

int64_t grain_for(int64_t half) {
  return std::max<int64_t>(1, kMinWorkPerTask / std::max<int64_t>(1, half));
}

template <typename scalar_t, bool kInterleaved>
MOE_ALWAYS_INLINE void forward_rows(const scalar_t* h, int64_t sh, scalar_t* out, int64_t half,
                                    double alpha_d, double limit_d, int64_t r0, int64_t r1) {
  using acc = clamped_swiglu::acc_t<scalar_t>;
  const acc alpha = static_cast<acc>(alpha_d), limit = static_cast<acc>(limit_d);
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* __restrict__ row = h + r * sh;
    scalar_t* __restrict__ o = out + r * half;
    for (int64_t i = 0; i < half; ++i) {
      const acc g = load_acc(row[kInterleaved ? 2 * i : i]);
      const acc u = load_acc(row[kInterleaved ? 2 * i + 1 : half + i]);
      o[i] = store_acc<scalar_t>(clamped_swiglu::forward<acc>(g, u, alpha, limit));
    }
  }
}

template <typename scalar_t, bool kInterleaved>
MOE_ALWAYS_INLINE void backward_rows(const scalar_t* h, int64_t sh, const scalar_t* grad,
                                     int64_t sg, scalar_t* out, int64_t half, double alpha_d,
                                     double limit_d, int64_t r0, int64_t r1) {
  using acc = clamped_swiglu::acc_t<scalar_t>;
  const acc alpha = static_cast<acc>(alpha_d), limit = static_cast<acc>(limit_d);
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* __restrict__ row = h + r * sh;
    const scalar_t* __restrict__ dy = grad + r * sg;
    scalar_t* __restrict__ o = out + r * 2 * half;
    for (int64_t i = 0; i < half; ++i) {
      const int64_t cg = kInterleaved ? 2 * i : i, cu = kInterleaved ? 2 * i + 1 : half + i;
      acc dg, du;
      clamped_swiglu::backward<acc>(load_acc(dy[i]), load_acc(row[cg]), load_acc(row[cu]), alpha,
                                    limit, dg, du);
      o[cg] = store_acc<scalar_t>(dg);
      o[cu] = store_acc<scalar_t>(du);
    }
  }
}

// The ISA builds of both row loops (see the top of the file); run_rows picks one per call.
template <bool kBackward, typename scalar_t, bool kInterleaved>
MOE_ALWAYS_INLINE void rows_any(const scalar_t* h, int64_t sh, const scalar_t* g, int64_t sg,
                                scalar_t* out, int64_t half, double alpha, double limit, int64_t r0,
                                int64_t r1) {
  if constexpr (kBackward) {
    backward_rows<scalar_t, kInterleaved>(h, sh, g, sg, out, half, alpha, limit, r0, r1);
  } else {
    forward_rows<scalar_t, kInterleaved>(h, sh, out, half, alpha, limit, r0, r1);
  }
}

#if MOE_CPU_AVX2_CLONE
template <bool kBackward, typename scalar_t, bool kInterleaved>
MOE_TARGET_AVX512 void rows_avx512(const scalar_t* h, int64_t sh, const scalar_t* g, int64_t sg,
                                   scalar_t* out, int64_t half, double alpha, double limit,
                                   int64_t r0, int64_t r1) {
  rows_any<kBackward, scalar_t, kInterleaved>(h, sh, g, sg, out, half, alpha, limit, r0, r1);
}
template <bool kBackward, typename scalar_t, bool kInterleaved>
MOE_TARGET_AVX2 void rows_avx2(const scalar_t* h, int64_t sh, const scalar_t* g, int64_t sg,
                               scalar_t* out, int64_t half, double alpha, double limit, int64_t r0,
                               int64_t r1) {
  rows_any<kBackward, scalar_t, kInterleaved>(h, sh, g, sg, out, half, alpha, limit, r0, r1);
}
#endif
template <bool kBackward, typename scalar_t, bool kInterleaved>
void rows_base(const scalar_t* h, int64_t sh, const scalar_t* g, int64_t sg, scalar_t* out,
               int64_t half, double alpha, double limit, int64_t r0, int64_t r1) {
  rows_any<kBackward, scalar_t, kInterleaved>(h, sh, g, sg, out, half, alpha, limit, r0, r1);
}

template <bool kBackward, typename scalar_t>
void run_rows(bool interleaved, const scalar_t* h, int64_t sh, const scalar_t* g, int64_t sg,
              scalar_t* out, int64_t half, double alpha, double limit, int64_t rows) {
  const bool avx512 = use_avx512(), avx2 = use_avx2();
  at::parallel_for(0, rows, grain_for(half), [&](int64_t r0, int64_t r1) {
    auto run = [&](auto inter) {
      constexpr bool kI = decltype(inter)::value;
#if MOE_CPU_AVX2_CLONE
      if (avx512)
        return rows_avx512<kBackward, scalar_t, kI>(h, sh, g, sg, out, half, alpha, limit, r0, r1);
      if (avx2)
        return rows_avx2<kBackward, scalar_t, kI>(h, sh, g, sg, out, half, alpha, limit, r0, r1);
#endif
      rows_base<kBackward, scalar_t, kI>(h, sh, g, sg, out, half, alpha, limit, r0, r1);
    };
    if (interleaved) {
      run(std::true_type{});
    } else {
      run(std::false_type{});
    }
  });
}

at::Tensor clamped_swiglu_cpu(const at::Tensor& h_in, double alpha, double limit,
                              bool interleaved) {
  clamped_swiglu::check_args(h_in, limit, "clamped_swiglu");
  const int64_t half = h_in.size(-1) / 2;
  at::Tensor out = swiglu::new_output(h_in, /*backward=*/false);
  if (out.numel() == 0) return out;
  const at::Tensor h = swiglu::as_rows(h_in);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "clamped_swiglu", [&] {
    run_rows<false, scalar_t>(interleaved, h.const_data_ptr<scalar_t>(), h.stride(0), nullptr, 0,
                              out.mutable_data_ptr<scalar_t>(), half, alpha, limit, h.size(0));
  });
  return out;
}

at::Tensor clamped_swiglu_backward_cpu(const at::Tensor& grad_in, const at::Tensor& h_in,
                                       double alpha, double limit, bool interleaved) {
  swiglu::check_grad(grad_in, h_in, "clamped_swiglu_backward");
  clamped_swiglu::check_args(h_in, limit, "clamped_swiglu_backward");
  const int64_t half = h_in.size(-1) / 2;
  at::Tensor out = swiglu::new_output(h_in, /*backward=*/true);
  if (out.numel() == 0) return out;
  const at::Tensor h = swiglu::as_rows(h_in);
  const at::Tensor g = swiglu::as_rows(grad_in);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, h.scalar_type(), "clamped_swiglu_backward", [&] {
        run_rows<true, scalar_t>(interleaved, h.const_data_ptr<scalar_t>(), h.stride(0),
                                 g.const_data_ptr<scalar_t>(), g.stride(0),
                                 out.mutable_data_ptr<scalar_t>(), half, alpha, limit, h.size(0));
      });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_framework, CPU, m) {
  m.impl("clamped_swiglu", &clamped_swiglu_cpu);
  m.impl("clamped_swiglu_backward", &clamped_swiglu_backward_cpu);
}

}  // namespace moe_framework
