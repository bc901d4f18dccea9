// Run-time ISA dispatch shared by the CPU kernels.
//
// Hot row loops are compiled twice, for baseline x86-64 and with target("avx2,f16c"), and picked
// at run time, so the build needs no -march flag. FMA is deliberately not enabled in these clones:
// both builds then round every product and sum the same way and give bitwise-identical results.
// MOE_FRAMEWORK_CPU_BASELINE=1 forces the baseline build (the tests compare both builds).
#pragma once

#include <cstdlib>

#define MOE_ALWAYS_INLINE inline __attribute__((always_inline))
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MOE_CPU_AVX2_CLONE 1
#define MOE_TARGET_AVX2 __attribute__((target("avx2,f16c")))
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

}  // namespace moe_framework
