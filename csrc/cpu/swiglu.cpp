// CPU kernels of swiglu, swiglu_backward and swiglu_backward_ (in place into h).
//
// One pass over the rows each: the forward reads gate and up and writes silu(gate) * up; the
// backward reads gate, up and the incoming gradient and writes both gradient halves. That is the
// whole elementwise work of a SwiGLU layer in 3 (forward) and 5 (backward) row-sized streams,
// instead of the 6 and ~12 of the separate silu / mul / silu_backward / copy ops.
// The row loops are compiled for baseline x86-64 and with target("avx2,f16c") (no FMA: both
// builds give the same bits, see cpu_isa.h), using fast_math.h's branch-free exp so they
// vectorise.
//
// As in route.cpp: without -fno-trapping-math GCC keeps exp_acc's selects as branches and the
// loops do not vectorise; no FMA contraction, so the baseline and AVX2 builds round alike. Set
// before the includes so the inlined header math gets the same settings.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math", "fp-contract=off")
// The 64-byte lane vectors live in always-inline helpers: no call ABI involved.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#include "moe_framework/swiglu.h"

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

// Elements per parallel task below which another thread costs more than it saves.
constexpr int64_t kMinWorkPerTask = 1 << 15;

template <typename scalar_t>
struct Rows {
  const scalar_t* h;  // [rows, 2H], row stride sh
  int64_t sh;
  const scalar_t* g;  // backward: incoming gradient [rows, H], row stride sg
  int64_t sg;
  scalar_t* out;  // forward: [rows, H]; backward: [rows, 2H] (may be h itself), row stride so
  int64_t so;
  int64_t half;
};

// fp32 and bf16 rows run kW columns at a time on math::lanes vectors (16 lanes in the AVX-512
// build, 8 in the AVX2 build), each lane giving the scalar math's bits. GCC vectorises the scalar
// loop poorly (it evaluates exp's polynomial twice). fp16, fp64, the baseline build and the row
// tails run the scalar loop.
template <typename scalar_t>
constexpr bool kLanes =
    MOE_MATH_LANES && (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>);

#if MOE_MATH_LANES
template <int kW>
using LaneVec = std::conditional_t<kW == 16, math::lanes::VF, math::lanes::VF8>;
#endif

template <int kW, typename scalar_t>
MOE_ALWAYS_INLINE void forward_rows(const Rows<scalar_t>& p, int64_t r0, int64_t r1) {
  using acc = swiglu::acc_t<scalar_t>;
  const int64_t half = p.half;
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* __restrict__ gate = p.h + r * p.sh;
    const scalar_t* __restrict__ up = gate + half;
    scalar_t* __restrict__ o = p.out + r * p.so;
    int64_t i = 0;
#if MOE_MATH_LANES
    if constexpr (kW > 0 && kLanes<scalar_t>) {
      using V = LaneVec<kW>;
      using cpu::lanes::load;
      // Two independent vectors per step: exp's polynomial is one long dependency chain.
      for (; i + 2 * kW <= half; i += 2 * kW) {
        const V y0 = swiglu::forward(load<V>(gate + i), load<V>(up + i));
        const V y1 = swiglu::forward(load<V>(gate + i + kW), load<V>(up + i + kW));
        cpu::lanes::store(o + i, y0);
        cpu::lanes::store(o + i + kW, y1);
      }
      for (; i + kW <= half; i += kW) {
        cpu::lanes::store(o + i, swiglu::forward(load<V>(gate + i), load<V>(up + i)));
      }
    }
#endif
    for (; i < half; ++i) {
      o[i] = store_acc<scalar_t>(swiglu::forward<acc>(load_acc(gate[i]), load_acc(up[i])));
    }
  }
}

// Not __restrict__ between h and out: the in-place op writes each gradient element over the
// input element it was computed from (read before written, same index), which is safe.
template <int kW, typename scalar_t>
MOE_ALWAYS_INLINE void backward_rows(const Rows<scalar_t>& p, int64_t r0, int64_t r1) {
  using acc = swiglu::acc_t<scalar_t>;
  const int64_t half = p.half;
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* gate = p.h + r * p.sh;
    const scalar_t* up = gate + half;
    const scalar_t* __restrict__ dy = p.g + r * p.sg;
    scalar_t* dgate = p.out + r * p.so;
    scalar_t* dup = dgate + half;
    int64_t i = 0;
#if MOE_MATH_LANES
    if constexpr (kW > 0 && kLanes<scalar_t>) {
      using V = LaneVec<kW>;
      using cpu::lanes::load;
      for (; i + kW <= half; i += kW) {
        V dg, du;
        swiglu::backward(load<V>(dy + i), load<V>(gate + i), load<V>(up + i), dg, du);
        cpu::lanes::store(dgate + i, dg);
        cpu::lanes::store(dup + i, du);
      }
    }
#endif
#pragma GCC ivdep
    for (; i < half; ++i) {
      acc dg, du;
      swiglu::backward<acc>(load_acc(dy[i]), load_acc(gate[i]), load_acc(up[i]), dg, du);
      dgate[i] = store_acc<scalar_t>(dg);
      dup[i] = store_acc<scalar_t>(du);
    }
  }
}

// Builds of the row loops: baseline x86-64 (scalar), AVX2 (8-lane vectors) and AVX-512 (16-lane
// vectors). None contracts to FMA (pragma above), so all three
// give the same bits.
template <bool kBackward, int kW, typename scalar_t>
MOE_ALWAYS_INLINE void run_build(const Rows<scalar_t>& p, int64_t r0, int64_t r1) {
  if constexpr (kBackward) {
    backward_rows<kW>(p, r0, r1);
  } else {
    forward_rows<kW>(p, r0, r1);
  }
}

#if MOE_CPU_AVX2_CLONE
template <bool kBackward, typename scalar_t>
MOE_TARGET_AVX512 void rows_avx512(const Rows<scalar_t>& p, int64_t r0, int64_t r1) {
  run_build<kBackward, 16>(p, r0, r1);
}
template <bool kBackward, typename scalar_t>
MOE_TARGET_AVX2 void rows_avx2(const Rows<scalar_t>& p, int64_t r0, int64_t r1) {
  run_build<kBackward, 8>(p, r0, r1);
}
#endif
template <bool kBackward, typename scalar_t>
void rows_base(const Rows<scalar_t>& p, int64_t r0, int64_t r1) {
  run_build<kBackward, 0>(p, r0, r1);
}

template <bool kBackward, typename scalar_t>
void run_rows(const Rows<scalar_t>& p, int64_t rows) {
  const bool avx512 = use_avx512(), avx2 = use_avx2();
  const int64_t grain = std::max<int64_t>(1, kMinWorkPerTask / std::max<int64_t>(1, p.half));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
#if MOE_CPU_AVX2_CLONE
    if (avx512) return rows_avx512<kBackward>(p, r0, r1);
    if (avx2) return rows_avx2<kBackward>(p, r0, r1);
#endif
    rows_base<kBackward>(p, r0, r1);
  });
}

at::Tensor swiglu_cpu(const at::Tensor& h_in) {
  swiglu::check_h(h_in, "swiglu");
  const int64_t half = h_in.size(-1) / 2;
  at::Tensor out = swiglu::new_output(h_in, /*backward=*/false);
  if (out.numel() == 0) return out;
  const at::Tensor h = swiglu::as_rows(h_in);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "swiglu", [&] {
    const Rows<scalar_t> p{h.const_data_ptr<scalar_t>(),     h.stride(0), nullptr, 0,
                           out.mutable_data_ptr<scalar_t>(), half,        half};
    run_rows<false>(p, h.size(0));
  });
  return out;
}

void backward_into(const at::Tensor& grad_in, const at::Tensor& h, at::Tensor& out) {
  const at::Tensor g = swiglu::as_rows(grad_in);
  const int64_t half = h.size(1) / 2;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "swiglu_backward",
                                  [&] {
                                    const Rows<scalar_t> p{h.const_data_ptr<scalar_t>(),
                                                           h.stride(0),
                                                           g.const_data_ptr<scalar_t>(),
                                                           g.stride(0),
                                                           out.mutable_data_ptr<scalar_t>(),
                                                           out.stride(0),
                                                           half};
                                    run_rows<true>(p, h.size(0));
                                  });
}

at::Tensor swiglu_backward_cpu(const at::Tensor& grad, const at::Tensor& h_in) {
  swiglu::check_grad(grad, h_in, "swiglu_backward");
  at::Tensor out = swiglu::new_output(h_in, /*backward=*/true);
  if (out.numel() == 0) return out;
  const at::Tensor h = swiglu::as_rows(h_in);
  at::Tensor o = out.view({h.size(0), h.size(1)});
  backward_into(grad, h, o);
  return out;
}

void swiglu_backward_inplace_cpu(const at::Tensor& grad, const at::Tensor& h) {
  swiglu::check_inplace(grad, h);
  if (h.numel() == 0) return;
  at::Tensor hv = h.view({-1, h.size(-1)});
  backward_into(grad, hv, hv);
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_framework, CPU, m) {
  m.impl("swiglu", &swiglu_cpu);
  m.impl("swiglu_backward", &swiglu_backward_cpu);
  m.impl("swiglu_backward_", &swiglu_backward_inplace_cpu);
}

}  // namespace moe_framework
