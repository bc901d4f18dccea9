// Run-time ISA dispatch shared by the CPU kernels.
//
// Hot row loops are compiled twice, for baseline x86-64 and with target("avx2,f16c"), and picked
// at run time, so the build needs no -march flag. FMA is deliberately not enabled in these clones:
// both builds then round every product and sum the same way and give bitwise-identical results.
// MOE_FRAMEWORK_CPU_BASELINE=1 forces the baseline build (the tests compare both builds).
//
// GEMM-like kernels (grouped_gemm, kg_search, dedup) may also carry an AVX-512 clone
// (MOE_TARGET_AVX512: AVX-512F/BW/VL/DQ + FMA, and MOE_TARGET_AVX512_BF16 for vdpbf16ps). Those use
// FMA, so their results are deterministic for a given CPU and build but only close (not bitwise
// equal) across builds; every such kernel is tested against the plain-PyTorch reference under each
// build. MOE_FRAMEWORK_CPU_NO_AVX512=1 disables the AVX-512 clones (MOE_FRAMEWORK_CPU_BASELINE=1
// disables them too). MOE_TARGET_AVX512_VNNI adds AVX512-VNNI (vpdpbusd: the integer kernels of
// grouped_gemm_q with INT8 activations, exact integer sums).
#pragma once

#include <cstdlib>

#define MOE_ALWAYS_INLINE inline __attribute__((always_inline))
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MOE_CPU_AVX2_CLONE 1
#define MOE_TARGET_AVX2 __attribute__((target("avx2,f16c")))
#define MOE_TARGET_AVX2_FMA __attribute__((target("avx2,f16c,fma")))
#define MOE_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,f16c,fma")))
#define MOE_TARGET_AVX512_BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,f16c,fma")))
#define MOE_TARGET_AVX512_VNNI \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,f16c,fma")))
#else
#define MOE_CPU_AVX2_CLONE 0
#endif

namespace moe_framework {

// True when the AVX2 clones may run on this CPU (and the baseline is not forced).
inline bool use_avx2() {
#if MOE_CPU_AVX2_CLONE
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") &&
                          std::getenv("MOE_FRAMEWORK_CPU_BASELINE") == nullptr;
  return has;
#else
  return false;
#endif
}

// True when the AVX-512 clones (F, BW, VL, DQ + FMA) may run on this CPU.
inline bool use_avx512() {
#if MOE_CPU_AVX2_CLONE
  static const bool has =
      use_avx2() && __builtin_cpu_supports("fma") && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq") && std::getenv("MOE_FRAMEWORK_CPU_NO_AVX512") == nullptr;
  return has;
#else
  return false;
#endif
}

// True when, in addition, AVX512-BF16 (vdpbf16ps) may run.
inline bool use_avx512_bf16() {
#if MOE_CPU_AVX2_CLONE
  static const bool has = use_avx512() && __builtin_cpu_supports("avx512bf16");
  return has;
#else
  return false;
#endif
}

// True when, in addition, AVX512-VNNI (vpdpbusd) may run.
inline bool use_avx512_vnni() {
#if MOE_CPU_AVX2_CLONE
  static const bool has = use_avx512() && __builtin_cpu_supports("avx512vnni");
  return has;
#else
  return false;
#endif
}

}  // namespace moe_framework
