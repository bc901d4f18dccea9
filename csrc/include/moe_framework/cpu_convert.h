// Element conversions to and from the accumulation type for the CPU row loops, written so that
// those loops vectorise (bf16 <-> fp32 as bit operations without branches).
#pragma once

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

#include "moe_framework/cpu_isa.h"
#include "moe_framework/fast_math.h"

namespace moe_framework {
namespace cpu {

template <typename scalar_t>
MOE_ALWAYS_INLINE at::opmath_type<scalar_t> load_acc(scalar_t v) {
  return static_cast<at::opmath_type<scalar_t>>(v);
}
template <>
MOE_ALWAYS_INLINE float load_acc<c10::BFloat16>(c10::BFloat16 v) {
  return c10::detail::f32_from_bits(v.x);
}

template <typename scalar_t>
MOE_ALWAYS_INLINE scalar_t store_acc(at::opmath_type<scalar_t> v) {
  return static_cast<scalar_t>(v);
}
// Same rounding as c10::BFloat16(float) (round to nearest even, NaN -> 0x7FC0), written without a
// branch so the loops that use it vectorise.
template <>
MOE_ALWAYS_INLINE c10::BFloat16 store_acc<c10::BFloat16>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  const uint32_t rounded = (u + UINT32_C(0x7FFF) + ((u >> 16) & 1u)) >> 16;
  const uint16_t bits = v != v ? UINT16_C(0x7FC0) : static_cast<uint16_t>(rounded);
  return c10::BFloat16(bits, c10::BFloat16::from_bits());
}

#if MOE_MATH_LANES
// 16 (or 8) consecutive elements as fp32 lanes (math::lanes::VF / VF8), and back with store_acc's
// rounding.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"  // always-inline helpers: no call ABI involved
namespace lanes {
// V: math::lanes::VF (16 lanes) or VF8 (8 lanes); VH / VU: its lanes as uint16 / uint32.
template <int kLanes>
struct Bits;
template <>
struct Bits<16> {
  typedef uint16_t VH __attribute__((vector_size(32)));
  typedef uint32_t VU __attribute__((vector_size(64)));
};
template <>
struct Bits<8> {
  typedef uint16_t VH __attribute__((vector_size(16)));
  typedef uint32_t VU __attribute__((vector_size(32)));
};

template <typename V>
MOE_ALWAYS_INLINE V load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename V>
MOE_ALWAYS_INLINE V load(const c10::BFloat16* p) {
  using VH = typename Bits<sizeof(V) / sizeof(float)>::VH;
  using VU = typename Bits<sizeof(V) / sizeof(float)>::VU;
  VH h;
  std::memcpy(&h, p, sizeof(h));
  return reinterpret_cast<V>(__builtin_convertvector(h, VU) << 16);
}
template <typename V>
MOE_ALWAYS_INLINE void store(float* p, V v) {
  std::memcpy(p, &v, sizeof(v));
}
template <typename V>
MOE_ALWAYS_INLINE void store(c10::BFloat16* p, V v) {
  using VH = typename Bits<sizeof(V) / sizeof(float)>::VH;
  using VU = typename Bits<sizeof(V) / sizeof(float)>::VU;
  const VU u = reinterpret_cast<VU>(v);
  VU r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  r = v != v ? VU{} + 0x7FC0u : r;
  const VH h = __builtin_convertvector(r, VH);
  std::memcpy(p, &h, sizeof(h));
}
}  // namespace lanes
#pragma GCC diagnostic pop
#endif

}  // namespace cpu
}  // namespace moe_framework
