// What every grouped_gemm CPU kernel file needs: the includes, the x86 switch (MOE_GG_X86), the
// instruction set the fp32 kernels run (gemm_isa) and two small helpers.
//
// The files of this folder are headers included by one translation unit, grouped_gemm.cpp: the
// kernels stay in one unit so the compiler inlines across them exactly as before the split.
// Everything lives in an anonymous namespace (internal linkage), as it did in the single file.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "moe_framework/cpu_isa.h"
#include "moe_framework/grouped_gemm.h"

#if defined(__x86_64__) || defined(_M_X64)
// GCC 12's AVX-512 headers build some intrinsics (reductions, conversions) on
// _mm512_undefined_*(), which -Wmaybe-uninitialized reports at every use: a false positive.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#define MOE_GG_X86 1
#else
#define MOE_GG_X86 0
#endif

namespace moe_framework {
namespace {

// Calls f(std::integral_constant<int, R>{}) with R = min(max(rows, 1), kMax): turns a run-time
// row count into the compile-time row count of a register tile (one instantiation per R).
template <int kMax, typename F>
MOE_ALWAYS_INLINE void with_tile_rows(int64_t rows, F&& f) {
  if constexpr (kMax > 1) {
    if (rows < kMax) return with_tile_rows<kMax - 1>(rows, f);
  }
  f(std::integral_constant<int, kMax>{});
}

using grouped_gemm::acc_t;
using grouped_gemm::ceil_div;

// Which micro-kernels run: picked once per process from the CPU and the MOE_FRAMEWORK_CPU_*
// switches of cpu_isa.h (baseline -> scalar, NO_AVX512 -> AVX2+FMA).
enum class Isa { kScalar, kAvx2, kAvx512 };
Isa gemm_isa() {
#if MOE_GG_X86
  static const Isa isa = use_avx512()                                    ? Isa::kAvx512
                         : (use_avx2() && __builtin_cpu_supports("fma")) ? Isa::kAvx2
                                                                         : Isa::kScalar;
  return isa;
#else
  return Isa::kScalar;
#endif
}

#if MOE_GG_X86
// Lane mask of an AVX-512 strip of 16 floats of which n (clamped to [0, 16]) are in range.
MOE_TARGET_AVX512 inline __mmask16 strip_mask(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF)
                 : (n <= 0 ? static_cast<__mmask16>(0) : static_cast<__mmask16>((1u << n) - 1));
}
#endif

}  // namespace
}  // namespace moe_framework
