// Row norms and normalisation: sum_of_squares (fixed order), row_inv_norm (fp64 redo on
// overflow or underflow), normalize_rows / normalize_all, first_bad_row (validation only).
#pragma once

#include "common.h"

namespace moe_framework {
namespace {

// Sum of squares of x[0:d] in T with 16 independent accumulators (vectorisable, fixed order).
template <typename T, typename scalar_t>
T sum_of_squares(const scalar_t* x, int64_t d) {
  constexpr int kLanes = 16;
  T part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const T v = static_cast<T>(x[i + l]);
      part[l] += v * v;
    }
  }
  for (; i < d; ++i) {
    const T v = static_cast<T>(x[i]);
    part[0] += v * v;
  }
  for (int w = kLanes / 2; w > 0; w /= 2) {
    for (int l = 0; l < w; ++l) part[l] += part[l + w];
  }
  return part[0];
}

// 1/||x|| of a row, or 0 when the row has no direction (zero, NaN or Inf entries). The sum runs in
// the accumulation type; fp32 rows whose squares overflow or underflow fp32 are redone in fp64,
// so only rows that are really zero or non-finite are refused.
template <typename acc_t, typename scalar_t>
double row_inv_norm(const scalar_t* x, int64_t d) {
  const acc_t ss = sum_of_squares<acc_t>(x, d);
  if (norm_ok(ss)) return inv_norm(static_cast<double>(ss));
  const double ss64 = sum_of_squares<double>(x, d);
  return norm_ok(ss64) ? inv_norm(ss64) : 0.0;
}

// dst[r - r0] = src[r] / ||src[r]|| for rows [r0, r1) (dst rows contiguous, d apart). Returns the
// first row without a direction, or -1.
template <typename scalar_t, typename acc_t>
int64_t normalize_rows(const scalar_t* src, int64_t stride, int64_t r0, int64_t r1, int64_t d,
                       acc_t* dst) {
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* x = src + r * stride;
    const double inv = row_inv_norm<acc_t>(x, d);
    if (inv == 0.0) return r;
    acc_t* y = dst + (r - r0) * d;
    if (inv <= static_cast<double>(std::numeric_limits<acc_t>::max())) {
      const acc_t s = static_cast<acc_t>(inv);
      for (int64_t j = 0; j < d; ++j) y[j] = static_cast<acc_t>(x[j]) * s;
    } else {  // tiny fp32 rows: the scale itself is not an fp32 number
      for (int64_t j = 0; j < d; ++j) y[j] = static_cast<acc_t>(static_cast<double>(x[j]) * inv);
    }
  }
  return -1;
}

// Normalise rows [0, n) of src into dst [n, d] in parallel; returns the first bad row or -1.
template <typename scalar_t, typename acc_t>
int64_t normalize_all(const scalar_t* src, int64_t stride, int64_t n, int64_t d, acc_t* dst) {
  const int64_t chunk = std::max<int64_t>(1, (1 << 16) / d);
  const int64_t chunks = ceil_div(n, chunk);
  std::vector<int64_t> bad(static_cast<size_t>(chunks), -1);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t r0 = c * chunk;
      bad[c] = normalize_rows(src, stride, r0, std::min(n, r0 + chunk), d, dst + r0 * d);
    }
  });
  for (int64_t b : bad) {
    if (b >= 0) return b;
  }
  return -1;
}

// First row in [0, n) without a direction, or -1 (validation only, nothing written).
template <typename scalar_t, typename acc_t>
int64_t first_bad_row(const scalar_t* src, int64_t stride, int64_t n, int64_t d) {
  const int64_t chunk = std::max<int64_t>(1, (1 << 16) / d);
  const int64_t chunks = ceil_div(n, chunk);
  std::vector<int64_t> bad(static_cast<size_t>(chunks), -1);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t end = std::min(n, (c + 1) * chunk);
      for (int64_t r = c * chunk; r < end; ++r) {
        if (row_inv_norm<acc_t>(src + r * stride, d) == 0.0) {
          bad[c] = r;
          break;
        }
      }
    }
  });
  for (int64_t b : bad) {
    if (b >= 0) return b;
  }
  return -1;
}

}  // namespace
}  // namespace moe_framework
