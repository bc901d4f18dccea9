// Column micro-kernels of grouped_gemm_q on the CPU: one output column n of R rows (R <= 4) of one
// expert, dequantising the column's packed weights in registers (they are read once and used for
// all R rows). Scalar (baseline x86-64, any CPU) and AVX2+FMA versions of INT8 and INT4.
//
// For one column and one row the result is
//     sum_g scale_g * (sum_{k in g} a_k q_k)  -  sum_g zero_g * scale_g * asum_g
// where asum_g = sum_{k in g} a_k (precomputed once per row by the driver, INT4 only): the zero
// point never enters the inner loop, which is then one convert and R FMAs per 8 weights.
// Storage format: moe_framework/grouped_gemm_q.h.
#pragma once

#include <cstdint>
#include <cstring>

#include "moe_framework/cpu_isa.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define MOE_GGQ_X86 1
#else
#define MOE_GGQ_X86 0
#endif

namespace moe_framework {
namespace {

// Everything a column kernel reads: R rows of fp32 activations (row stride lda), the column's
// packed weights, its G scales and zero points (zeros == nullptr: the scheme's fixed zero,
// `zero_default`), and for INT4 the per-group activation sums (asum, row stride ldsum).
struct ColumnArgs {
  const float* a;
  int64_t lda;
  const void* w;
  const float* scales;
  const uint8_t* zeros;
  float zero_default;
  const float* asum;
  int64_t ldsum;
  int64_t k, group_size, groups;
};

MOE_ALWAYS_INLINE float zero_of(const ColumnArgs& c, int64_t g) {
  return c.zeros != nullptr ? static_cast<float>(c.zeros[g]) : c.zero_default;
}

// ---- scalar (baseline) ----------------------------------------------------------------------

template <int R>
void column_q8_scalar(const ColumnArgs& c, float* res) {
  const int8_t* w = static_cast<const int8_t*>(c.w);
  float acc[R] = {};
  for (int64_t g = 0; g < c.groups; ++g) {
    float ga[R] = {};
    const int64_t p0 = g * c.group_size, p1 = p0 + c.group_size;
    for (int64_t p = p0; p < p1; ++p) {
      const float wv = static_cast<float>(w[p]);
      for (int r = 0; r < R; ++r) ga[r] += c.a[r * c.lda + p] * wv;
    }
    for (int r = 0; r < R; ++r) acc[r] += ga[r] * c.scales[g];
  }
  for (int r = 0; r < R; ++r) res[r] = acc[r];
}

template <int R>
void column_q4_scalar(const ColumnArgs& c, float* res) {
  const uint8_t* w = static_cast<const uint8_t*>(c.w);
  float acc[R] = {};
  for (int64_t g = 0; g < c.groups; ++g) {
    float ga[R] = {};
    const int64_t p0 = g * c.group_size, p1 = p0 + c.group_size;
    for (int64_t blk = p0; blk < p1; blk += 32) {
      const uint8_t* b = w + blk / 2;
      for (int i = 0; i < 16; ++i) {
        const float lo = static_cast<float>(b[i] & 0x0F), hi = static_cast<float>(b[i] >> 4);
        for (int r = 0; r < R; ++r) {
          ga[r] += c.a[r * c.lda + blk + i] * lo + c.a[r * c.lda + blk + 16 + i] * hi;
        }
      }
    }
    const float s = c.scales[g], zs = zero_of(c, g) * s;
    for (int r = 0; r < R; ++r) acc[r] += ga[r] * s - zs * c.asum[r * c.ldsum + g];
  }
  for (int r = 0; r < R; ++r) res[r] = acc[r];
}

// ---- AVX2 + FMA ---------------------------------------------------------------------------------
#if MOE_GGQ_X86

MOE_TARGET_AVX2_FMA MOE_ALWAYS_INLINE float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

MOE_TARGET_AVX2_FMA MOE_ALWAYS_INLINE __m256 widen_i8(const int8_t* p) {
  return _mm256_cvtepi32_ps(
      _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// INT8: per group, C independent FMA chains per row (C = 4 for one or two rows, where the FMA
// latency would otherwise bound the loop, 2 for more rows), 8 weights per step each.
template <int R>
MOE_TARGET_AVX2_FMA void column_q8_avx2(const ColumnArgs& c, float* res) {
  constexpr int C = R <= 2 ? 4 : 2;
  const int8_t* w = static_cast<const int8_t*>(c.w);
  __m256 acc[R];
  float tail[R];
  for (int r = 0; r < R; ++r) {
    acc[r] = _mm256_setzero_ps();
    tail[r] = 0.f;
  }
  for (int64_t g = 0; g < c.groups; ++g) {
    const int64_t p0 = g * c.group_size, p1 = p0 + c.group_size;
    __m256 ga[R][C];
    for (int r = 0; r < R; ++r) {
      for (int j = 0; j < C; ++j) ga[r][j] = _mm256_setzero_ps();
    }
    int64_t p = p0;
    for (; p + 8 * C <= p1; p += 8 * C) {
      for (int j = 0; j < C; ++j) {
        const __m256 wv = widen_i8(w + p + 8 * j);
        for (int r = 0; r < R; ++r) {
          ga[r][j] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(c.a + r * c.lda + p + 8 * j), ga[r][j]);
        }
      }
    }
    for (; p + 8 <= p1; p += 8) {
      const __m256 wv = widen_i8(w + p);
      for (int r = 0; r < R; ++r) {
        ga[r][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(c.a + r * c.lda + p), ga[r][0]);
      }
    }
    float gt[R] = {};
    for (; p < p1; ++p) {
      const float wv = static_cast<float>(w[p]);
      for (int r = 0; r < R; ++r) gt[r] += c.a[r * c.lda + p] * wv;
    }
    const __m256 s = _mm256_set1_ps(c.scales[g]);
    for (int r = 0; r < R; ++r) {
      __m256 sum = ga[r][0];
      for (int j = 1; j < C; ++j) sum = _mm256_add_ps(sum, ga[r][j]);
      acc[r] = _mm256_fmadd_ps(sum, s, acc[r]);
      tail[r] += gt[r] * c.scales[g];
    }
  }
  for (int r = 0; r < R; ++r) res[r] = hsum8(acc[r]) + tail[r];
}

// column_q8_avx2 for a work tile of ncols consecutive columns (column j: weights c.w + j *
// row_bytes, scales + j * groups) into res[r * ncols + j]: the per-column call and dispatch are
// paid once per tile. With end != nullptr (weights from memory) one prefetch per 64 bytes of
// weights read, `ahead` bytes on, clamped to end (the expert's last byte).
template <int R>
MOE_TARGET_AVX2_FMA void columns_q8_avx2(ColumnArgs c, int64_t ncols, int64_t row_bytes,
                                         int64_t ahead, const uint8_t* end, float* res) {
  constexpr int C = R <= 2 ? 4 : 2;
  const int8_t* pf_last = end != nullptr ? reinterpret_cast<const int8_t*>(end) - 1 : nullptr;
  for (int64_t col = 0; col < ncols; ++col) {
    const int8_t* w = static_cast<const int8_t*>(c.w);
    int64_t next_pf = end != nullptr ? 0 : c.k;  // the next offset to prefetch for
    __m256 acc[R];
    float tail[R];
    for (int r = 0; r < R; ++r) {
      acc[r] = _mm256_setzero_ps();
      tail[r] = 0.f;
    }
    for (int64_t g = 0; g < c.groups; ++g) {
      const int64_t p0 = g * c.group_size, p1 = p0 + c.group_size;
      __m256 ga[R][C];
      for (int r = 0; r < R; ++r) {
        for (int j = 0; j < C; ++j) ga[r][j] = _mm256_setzero_ps();
      }
      int64_t p = p0;
      for (; p + 8 * C <= p1; p += 8 * C) {
        if (p >= next_pf) {
          const int8_t* a = w + p + ahead;
          _mm_prefetch(reinterpret_cast<const char*>(a < pf_last ? a : pf_last), _MM_HINT_T0);
          next_pf = p + 64;
        }
        for (int j = 0; j < C; ++j) {
          const __m256 wv = widen_i8(w + p + 8 * j);
          for (int r = 0; r < R; ++r) {
            ga[r][j] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(c.a + r * c.lda + p + 8 * j), ga[r][j]);
          }
        }
      }
      for (; p + 8 <= p1; p += 8) {
        const __m256 wv = widen_i8(w + p);
        for (int r = 0; r < R; ++r) {
          ga[r][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(c.a + r * c.lda + p), ga[r][0]);
        }
      }
      float gt[R] = {};
      for (; p < p1; ++p) {
        const float wv = static_cast<float>(w[p]);
        for (int r = 0; r < R; ++r) gt[r] += c.a[r * c.lda + p] * wv;
      }
      const __m256 s = _mm256_set1_ps(c.scales[g]);
      for (int r = 0; r < R; ++r) {
        __m256 sum = ga[r][0];
        for (int j = 1; j < C; ++j) sum = _mm256_add_ps(sum, ga[r][j]);
        acc[r] = _mm256_fmadd_ps(sum, s, acc[r]);
        tail[r] += gt[r] * c.scales[g];
      }
    }
    for (int r = 0; r < R; ++r) res[r * ncols + col] = hsum8(acc[r]) + tail[r];
    c.w = w + row_bytes;
    c.scales += c.groups;
  }
}

// INT4: one 16-byte load gives 32 weights in k order (low nibbles: k 0..15, high: 16..31 of the
// block), widened 8 at a time; 4 FMA chains per row for up to two rows, 2 for more.
template <int R>
MOE_TARGET_AVX2_FMA void column_q4_avx2(const ColumnArgs& c, float* res) {
  constexpr int C = R <= 2 ? 4 : 2;
  const uint8_t* w = static_cast<const uint8_t*>(c.w);
  const __m128i mask = _mm_set1_epi8(0x0F);
  __m256 acc[R];
  float bias[R];
  for (int r = 0; r < R; ++r) {
    acc[r] = _mm256_setzero_ps();
    bias[r] = 0.f;
  }
  for (int64_t g = 0; g < c.groups; ++g) {
    const int64_t p0 = g * c.group_size, p1 = p0 + c.group_size;
    __m256 ga[R][C];
    for (int r = 0; r < R; ++r) {
      for (int j = 0; j < C; ++j) ga[r][j] = _mm256_setzero_ps();
    }
    for (int64_t p = p0; p < p1; p += 32) {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + p / 2));
      const __m128i lo = _mm_and_si128(b, mask);
      const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
      const __m256 wv[4] = {_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)),
                            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))),
                            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)),
                            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)))};
      for (int q = 0; q < 4; ++q) {
        for (int r = 0; r < R; ++r) {
          ga[r][q % C] =
              _mm256_fmadd_ps(wv[q], _mm256_loadu_ps(c.a + r * c.lda + p + 8 * q), ga[r][q % C]);
        }
      }
    }
    const float sf = c.scales[g], zs = zero_of(c, g) * sf;
    const __m256 s = _mm256_set1_ps(sf);
    for (int r = 0; r < R; ++r) {
      __m256 sum = ga[r][0];
      for (int j = 1; j < C; ++j) sum = _mm256_add_ps(sum, ga[r][j]);
      acc[r] = _mm256_fmadd_ps(sum, s, acc[r]);
      bias[r] += zs * c.asum[r * c.ldsum + g];
    }
  }
  for (int r = 0; r < R; ++r) res[r] = hsum8(acc[r]) - bias[r];
}

#endif  // MOE_GGQ_X86

}  // namespace
}  // namespace moe_framework
