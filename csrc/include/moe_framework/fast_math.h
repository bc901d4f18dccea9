// Branch-free scalar math shared by the CPU and CUDA kernels (route, swiglu).
//
// Written as selects with no library calls so that CPU loops applying them to whole rows
// vectorise (libm's expf does not without -ffast-math), and so that CPU and GPU evaluate one
// formula. The CPU clones that use them are compiled without FMA (cpu_isa.h): every build then
// rounds the same way and gives bitwise-identical results.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "moe_framework/common.h"

namespace moe_framework {
namespace math {

template <typename T>
MOE_HD T pos_inf() {
  return std::numeric_limits<T>::infinity();
}

template <typename T>
MOE_HD bool is_nan(T v) {
  return v != v;
}

// a > b and a < b without raising FP exceptions on NaN. The host versions (std::isgreater) let
// GCC turn the selects of exp_acc into vector blends under its default -ftrapping-math.
template <typename T>
MOE_HD bool quiet_greater(T a, T b) {
#if defined(__CUDA_ARCH__)
  return a > b;
#else
  return std::isgreater(a, b);
#endif
}
template <typename T>
MOE_HD bool quiet_less(T a, T b) {
#if defined(__CUDA_ARCH__)
  return a < b;
#else
  return std::isless(a, b);
#endif
}

MOE_HD float float_from_bits(int32_t bits) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
#endif
}

// exp for fp32 with no branches and no library call, so the CPU loops that apply it to a whole
// row vectorise (libm's expf does not without -ffast-math), and CPU and GPU use one formula.
// exp(x) = 2^n * exp(r), n = round(x / ln 2), |r| <= ln(2) / 2, exp(r) by the classic Cephes
// degree-6 polynomial: within 2 ulp of the exact result for normal outputs. Results below
// FLT_MIN flush to 0 (softmax probabilities under 1e-38), exp(-inf) = 0, exp(+inf) = +inf,
// exp(NaN) = NaN.
MOE_HD float exp_acc(float x) {
  constexpr float kHi = 88.3762626647949f;   // above: +inf
  constexpr float kLo = -87.3365447505531f;  // below: 0 (log of FLT_MIN)
  float xc = quiet_greater(x, kHi) ? kHi : x;
  xc = quiet_less(xc, kLo) ? kLo : xc;  // NaN passes both comparisons unchanged
  // Round to nearest integer by the 1.5 * 2^23 trick (no rint call, vectorises).
  float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  n = is_nan(n) ? 0.0f : n;  // keeps the int conversion below defined
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float er = (p * r * r + r) + 1.0f;
  const float scale = float_from_bits((static_cast<int32_t>(n) + 127) << 23);
  float y = er * scale;
  y = quiet_less(x, kLo) ? 0.0f : y;
  y = quiet_greater(x, kHi) ? pos_inf<float>() : y;
  return y;
}

MOE_HD double exp_acc(double x) {
  return ::exp(x);
}

template <typename T>
MOE_HD T sigmoid(T x) {
  return T(1) / (T(1) + exp_acc(-x));
}

#if !defined(__CUDACC__) && (defined(__GNUC__) || defined(__clang__))
// exp_acc on 16 (or 8) fp32 lanes at once (GCC vector extension: the CPU row-block kernel of
// route routes 16 tokens per vector, swiglu handles 16 or 8 columns). The same operations in the
// same order as exp_acc above, so every lane gives exp_acc's bits whichever ISA the vector is
// lowered to (no FMA: the clones that use this are compiled without it). Keep the two in step;
// tests/ops/test_route.py and tests/ops/test_swiglu.py compare the paths bitwise.
#define MOE_MATH_LANES 1
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"  // always-inline helpers: no call ABI involved
namespace lanes {
typedef float VF __attribute__((vector_size(64)));  // 16 lanes (AVX-512 builds)
typedef int32_t VI __attribute__((vector_size(64)));
typedef float VF8 __attribute__((vector_size(32)));  // 8 lanes (AVX2 builds)
typedef int32_t VI8 __attribute__((vector_size(32)));

template <typename V, typename VInt>
inline __attribute__((always_inline)) V exp_acc_v(V x) {
  const V hi = V{} + 88.3762626647949f;
  const V lo = V{} - 87.3365447505531f;
  V xc = x > hi ? hi : x;  // NaN compares false: passes unchanged
  xc = xc < lo ? lo : xc;
  V n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  n = n != n ? V{} : n;
  V r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const V er = (p * r * r + r) + 1.0f;
  const V scale = reinterpret_cast<V>((__builtin_convertvector(n, VInt) + 127) << 23);
  V y = er * scale;
  y = x < lo ? V{} : y;
  y = x > hi ? V{} + pos_inf<float>() : y;
  return y;
}

inline __attribute__((always_inline)) VF exp_acc(VF x) {
  return exp_acc_v<VF, VI>(x);
}
inline __attribute__((always_inline)) VF8 exp_acc(VF8 x) {
  return exp_acc_v<VF8, VI8>(x);
}

inline __attribute__((always_inline)) VF sigmoid(VF x) {
  return 1.0f / (1.0f + exp_acc(-x));
}
inline __attribute__((always_inline)) VF8 sigmoid(VF8 x) {
  return 1.0f / (1.0f + exp_acc(-x));
}
}  // namespace lanes
#pragma GCC diagnostic pop
#else
#define MOE_MATH_LANES 0
#endif

}  // namespace math
}  // namespace moe_framework
