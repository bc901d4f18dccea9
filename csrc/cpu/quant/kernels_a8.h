// Column micro-kernels of grouped_gemm_q with INT8 activations (act_bits = 8): integer dot
// products of the packed weights with activation rows quantised once per call, the llama.cpp
// Q4_0 x Q8_0 / Q8_0 x Q8_0 idea, on AVX2 (vpmaddubsw + vpmaddwd) with a scalar fallback.
//
// Activations: row r, group g (the weights' group, K when group_size = 0) is stored as int8
// aq = round(a / sa) with sa = max|a| / 127 (aq in [-127, 127]), its scale sa and the integer
// sum of its aq (for the INT4 zero point). For one column and one row the result is
//     sum_g  sw_g * sa_g * (sum_{k in g} q_k aq_k  -  zero_g * sum_{k in g} aq_k)
// (q = u in [0, 15] for INT4 with zero 8 or zeros[g]; q = int8 weight for INT8, zero 0). The
// integer parts are exact (int16 / int32 lanes, bounded below), so only the per-group fp32
// scaling rounds: results are deterministic and independent of the thread count.
#pragma once

#include <cstdint>

#include "kernels.h"

namespace moe_framework {
namespace {

// What a column kernel reads besides the weights: R rows of int8 activations (row stride lda),
// their per-group scales (stride lds) and sums (stride lds), and the column's weights and scheme.
struct ColumnArgsA8 {
  const int8_t* aq;
  int64_t lda;
  const float* asc;
  const int32_t* aqsum;
  const float* ascsum;  // asc * aqsum (float), per row and group
  int64_t lds;
  const void* w;
  const float* scales;
  const uint8_t* zeros;
  int32_t zero_default;
  int64_t k, group_size, groups;
};

MOE_ALWAYS_INLINE int32_t zero_of(const ColumnArgsA8& c, int64_t g) {
  return c.zeros != nullptr ? static_cast<int32_t>(c.zeros[g]) : c.zero_default;
}

// ---- scalar (baseline) ----------------------------------------------------------------------

template <int R>
void column_q4_a8_scalar(const ColumnArgsA8& c, float* res) {
  const uint8_t* w = static_cast<const uint8_t*>(c.w);
  float acc[R] = {};
  for (int64_t g = 0; g < c.groups; ++g) {
    int32_t dot[R] = {};
    const int64_t p0 = g * c.group_size, p1 = p0 + c.group_size;
    for (int64_t blk = p0; blk < p1; blk += 32) {
      const uint8_t* b = w + blk / 2;
      for (int i = 0; i < 16; ++i) {
        const int32_t lo = b[i] & 0x0F, hi = b[i] >> 4;
        for (int r = 0; r < R; ++r) {
          const int8_t* a = c.aq + r * c.lda;
          dot[r] += lo * a[blk + i] + hi * a[blk + 16 + i];
        }
      }
    }
    const int32_t z = zero_of(c, g);
    for (int r = 0; r < R; ++r) {
      const int32_t v = dot[r] - z * c.aqsum[r * c.lds + g];
      acc[r] += static_cast<float>(v) * (c.scales[g] * c.asc[r * c.lds + g]);
    }
  }
  for (int r = 0; r < R; ++r) res[r] = acc[r];
}

template <int R>
void column_q8_a8_scalar(const ColumnArgsA8& c, float* res) {
  const int8_t* w = static_cast<const int8_t*>(c.w);
  float acc[R] = {};
  for (int64_t g = 0; g < c.groups; ++g) {
    int32_t dot[R] = {};
    const int64_t p0 = g * c.group_size, p1 = p0 + c.group_size;
    for (int64_t p = p0; p < p1; ++p) {
      const int32_t wv = w[p];
      for (int r = 0; r < R; ++r) dot[r] += wv * c.aq[r * c.lda + p];
    }
    for (int r = 0; r < R; ++r) {
      acc[r] += static_cast<float>(dot[r]) * (c.scales[g] * c.asc[r * c.lds + g]);
    }
  }
  for (int r = 0; r < R; ++r) res[r] = acc[r];
}

// ---- AVX2 ---------------------------------------------------------------------------------------
#if MOE_GGQ_X86

// INT4: a 16-byte load broadcast to both 128-bit halves gives 32 weights (low nibbles k 0..15 of
// the block, high nibbles 16..31): a 64-bit shift by 0 (low half) / 4 (high half) and one mask
// spread them to 32 bytes in k order. vpmaddubsw (unsigned weights x signed activations) sums
// pairs into int16 lanes, at most 2 * 15 * 127 = 3810 each, so up to 8 blocks (256 weights) add
// up in int16 before vpmaddwd widens to int32.
MOE_TARGET_AVX2_FMA MOE_ALWAYS_INLINE __m256i nibbles32(const uint8_t* p, __m256i shift,
                                                        __m256i mask) {
  const __m256i b =
      _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_and_si256(_mm256_srlv_epi64(b, shift), mask);
}

// One group's integer dot products for R rows (advancing the weight and activation pointers),
// each reduced to 4 int32 lanes.
template <int R>
MOE_TARGET_AVX2_FMA MOE_ALWAYS_INLINE void q4_a8_group(const uint8_t*& wp, const int8_t*& ap,
                                                       int64_t lda, int64_t blocks, __m128i* out) {
  const __m256i mask = _mm256_set1_epi8(0x0F);
  const __m256i shift = _mm256_set_epi64x(4, 4, 0, 0);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i d32[R];
  for (int r = 0; r < R; ++r) d32[r] = _mm256_setzero_si256();
  for (int64_t left = blocks; left > 0; left -= 8) {
    const int64_t nb = left < 8 ? left : 8;
    __m256i d16[R];
    for (int r = 0; r < R; ++r) d16[r] = _mm256_setzero_si256();
    int64_t j = 0;
    for (; j + 2 <= nb; j += 2) {
      const __m256i u0 = nibbles32(wp, shift, mask);
      const __m256i u1 = nibbles32(wp + 16, shift, mask);
      for (int r = 0; r < R; ++r) {
        const int8_t* a = ap + r * lda;
        const __m256i p0 =
            _mm256_maddubs_epi16(u0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a)));
        const __m256i p1 =
            _mm256_maddubs_epi16(u1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 32)));
        d16[r] = _mm256_add_epi16(d16[r], _mm256_add_epi16(p0, p1));
      }
      wp += 32;
      ap += 64;
    }
    if (j < nb) {
      const __m256i u0 = nibbles32(wp, shift, mask);
      for (int r = 0; r < R; ++r) {
        const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ap + r * lda));
        d16[r] = _mm256_add_epi16(d16[r], _mm256_maddubs_epi16(u0, a));
      }
      wp += 16;
      ap += 32;
    }
    for (int r = 0; r < R; ++r) {
      d32[r] = _mm256_add_epi32(d32[r], _mm256_madd_epi16(d16[r], ones));
    }
  }
  for (int r = 0; r < R; ++r) {
    out[r] = _mm_add_epi32(_mm256_castsi256_si128(d32[r]), _mm256_extracti128_si256(d32[r], 1));
  }
}

MOE_TARGET_AVX2_FMA MOE_ALWAYS_INLINE float hsum4(__m128 s) {
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Groups are taken 4 at a time: their 4 x 4 int32 lanes reduce to one vector of 4 group sums
// (three vphaddd), converted and scaled by the 4 weight scales x the row's 4 activation scales in
// one multiply and FMA, the zero points likewise (zero * sw * (sa * sum aq)); the last G % 4
// groups one by one.
template <int R>
MOE_TARGET_AVX2_FMA void column_q4_a8_avx2(const ColumnArgsA8& c, float* res) {
  const uint8_t* wp = static_cast<const uint8_t*>(c.w);
  const int8_t* ap = c.aq;
  const int64_t blocks = c.group_size / 32;
  __m128 acc[R], bias[R];
  for (int r = 0; r < R; ++r) {
    acc[r] = _mm_setzero_ps();
    bias[r] = _mm_setzero_ps();
  }
  int64_t g = 0;
  for (; g + 4 <= c.groups; g += 4) {
    __m128i d[4][R];
    for (int j = 0; j < 4; ++j) q4_a8_group<R>(wp, ap, c.lda, blocks, d[j]);
    const __m128 sw = _mm_loadu_ps(c.scales + g);
    __m128 zsw;
    if (c.zeros != nullptr) {
      int32_t z4;
      std::memcpy(&z4, c.zeros + g, 4);
      zsw = _mm_mul_ps(_mm_cvtepi32_ps(_mm_cvtepu8_epi32(_mm_cvtsi32_si128(z4))), sw);
    } else {
      zsw = _mm_mul_ps(_mm_set1_ps(static_cast<float>(c.zero_default)), sw);
    }
    for (int r = 0; r < R; ++r) {
      const __m128i sums =
          _mm_hadd_epi32(_mm_hadd_epi32(d[0][r], d[1][r]), _mm_hadd_epi32(d[2][r], d[3][r]));
      const __m128 s = _mm_mul_ps(sw, _mm_loadu_ps(c.asc + r * c.lds + g));
      acc[r] = _mm_fmadd_ps(_mm_cvtepi32_ps(sums), s, acc[r]);
      bias[r] = _mm_fmadd_ps(zsw, _mm_loadu_ps(c.ascsum + r * c.lds + g), bias[r]);
    }
  }
  float tail[R] = {};
  for (; g < c.groups; ++g) {
    __m128i d[R];
    q4_a8_group<R>(wp, ap, c.lda, blocks, d);
    const float sw = c.scales[g];
    const float zsw = static_cast<float>(zero_of(c, g)) * sw;
    for (int r = 0; r < R; ++r) {
      __m128i v = _mm_hadd_epi32(d[r], d[r]);
      v = _mm_hadd_epi32(v, v);
      tail[r] += static_cast<float>(_mm_cvtsi128_si32(v)) * (sw * c.asc[r * c.lds + g]) -
                 zsw * c.ascsum[r * c.lds + g];
    }
  }
  for (int r = 0; r < R; ++r) res[r] = hsum4(acc[r]) - hsum4(bias[r]) + tail[r];
}

// ncols consecutive columns of one expert (column j: weights c.w + j * row_bytes, scales and zero
// points + j * groups) into res[r * ncols + j], in one call: the per-column call, dispatch and
// setup (~50 cycles, a third of a K = 1024 column) are paid once per block. With end != nullptr
// each column prefetches the weights `ahead` bytes further on (up to end: the expert's last byte).
template <int R>
MOE_TARGET_AVX2_FMA void columns_q4_a8_avx2(ColumnArgsA8 c, int64_t ncols, int64_t row_bytes,
                                            int64_t ahead, const uint8_t* end, float* res) {
  for (int64_t j = 0; j < ncols; ++j) {
    const uint8_t* w = static_cast<const uint8_t*>(c.w);
    if (end != nullptr) {
      const uint8_t* lo = w + ahead;
      const uint8_t* hi = lo + row_bytes < end ? lo + row_bytes : end;
      const uintptr_t lo_line = reinterpret_cast<uintptr_t>(lo) & ~uintptr_t{63};
      for (const uint8_t* p = reinterpret_cast<const uint8_t*>(lo_line); p < hi; p += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0);
      }
    }
    float one[R];
    column_q4_a8_avx2<R>(c, one);
    for (int r = 0; r < R; ++r) res[r * ncols + j] = one[r];
    c.w = w + row_bytes;
    c.scales += c.groups;
    if (c.zeros != nullptr) c.zeros += c.groups;
  }
}

// INT8: signed x signed through vpmaddubsw's unsigned x signed form: |w| x (aq with w's sign)
// (vpsignb twice); a pair sums to at most 2 * 128 * 127 = 32512, so each block widens to int32
// at once (vpmaddwd). A group's tail (group_size not a multiple of 32) is scalar.
template <int R>
MOE_TARGET_AVX2_FMA void column_q8_a8_avx2(const ColumnArgsA8& c, float* res) {
  const int8_t* w = static_cast<const int8_t*>(c.w);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[R];
  float tail[R];
  for (int r = 0; r < R; ++r) {
    acc[r] = _mm256_setzero_ps();
    tail[r] = 0.f;
  }
  for (int64_t g = 0; g < c.groups; ++g) {
    const int64_t p0 = g * c.group_size, p1 = p0 + c.group_size;
    __m256i d32[R];
    for (int r = 0; r < R; ++r) d32[r] = _mm256_setzero_si256();
    int64_t p = p0;
    for (; p + 32 <= p1; p += 32) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + p));
      const __m256i aw = _mm256_sign_epi8(wv, wv);
      for (int r = 0; r < R; ++r) {
        const __m256i a =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c.aq + r * c.lda + p));
        const __m256i prod = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(a, wv));
        d32[r] = _mm256_add_epi32(d32[r], _mm256_madd_epi16(prod, ones));
      }
    }
    int32_t dt[R] = {};
    for (; p < p1; ++p) {
      const int32_t wv = w[p];
      for (int r = 0; r < R; ++r) dt[r] += wv * c.aq[r * c.lda + p];
    }
    const float sw = c.scales[g];
    for (int r = 0; r < R; ++r) {
      const float s = sw * c.asc[r * c.lds + g];
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d32[r]), _mm256_set1_ps(s), acc[r]);
      tail[r] += static_cast<float>(dt[r]) * s;
    }
  }
  for (int r = 0; r < R; ++r) res[r] = hsum8(acc[r]) + tail[r];
}

// ---- AVX2 group kernels (knob ggq_a8_group_kernels, the default) ------------------------------
// A work tile of columns per call like columns_q4_a8_avx2, with the group loop specialised:
// groups of a multiple of 64 weights (INT4) or 32 (INT8), the group's int32 lanes converted and
// scaled once (8 lanes, one convert, multiply and FMA per row), no hadd and no scalar tails. With
// end != nullptr (the first chunk of rows: weights from memory) one prefetch per 64 bytes of
// weights read, `ahead` bytes on, clamped to end (the expert's last byte): spread over the loop
// rather than a burst per column (which cost the INT8 kernel ~8% from DRAM).

// INT4, group_size a multiple of 64, activations permuted per 64 (quant.cpp, quantize_rows with
// perm64: the 16-byte quarters 1 and 2 of every 64 activations of a group swapped). One 32-byte
// load holds two blocks, 64 weights: the low nibbles (one mask) are k 0..15 and 32..47, the
// permuted activations' first 32 bytes; the high nibbles (one shift, one mask) k 16..31 and
// 48..63, the next 32. vpmaddubsw (unsigned nibbles x signed activations) pairs are at most
// 2 * 15 * 127 = 3810, so 4 chunks (8 products) add up in int16 lanes before vpmaddwd.
template <int R>
MOE_TARGET_AVX2_FMA MOE_ALWAYS_INLINE void q4x64_chunk(const uint8_t* wp, const int8_t* ap,
                                                       int64_t lda, __m256i mask, __m256i* d16) {
  const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp));
  const __m256i lo = _mm256_and_si256(wv, mask);
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(wv, 4), mask);
  for (int r = 0; r < R; ++r) {
    const int8_t* a = ap + r * lda;
    const __m256i p0 =
        _mm256_maddubs_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a)));
    const __m256i p1 =
        _mm256_maddubs_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 32)));
    d16[r] = _mm256_add_epi16(d16[r], _mm256_add_epi16(p0, p1));
  }
}

// CH: 64-weight chunks per group known at compile time (1, 2, 4: groups of 64, 128, 256), or 0
// (c.group_size / 64 at run time).
template <int R, int CH>
MOE_TARGET_AVX2_FMA void columns_q4x64_a8_avx2_ch(ColumnArgsA8 c, int64_t ncols, int64_t row_bytes,
                                                  int64_t ahead, const uint8_t* end, float* res) {
  const __m256i mask = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t chunks = CH > 0 ? CH : c.group_size / 64;
  const uint8_t* pf_last = end != nullptr ? end - 1 : nullptr;
  for (int64_t j = 0; j < ncols; ++j) {
    const uint8_t* w = static_cast<const uint8_t*>(c.w);
    const uint8_t* wp = w;
    const int8_t* ap = c.aq;
    __m256 acc[R];
    float bias[R];
    for (int r = 0; r < R; ++r) {
      acc[r] = _mm256_setzero_ps();
      bias[r] = 0.f;
    }
    for (int64_t g = 0; g < c.groups; ++g) {
      __m256i d32[R];
      for (int r = 0; r < R; ++r) d32[r] = _mm256_setzero_si256();
      for (int64_t c0 = 0; c0 < chunks; c0 += 4) {
        const int64_t m = chunks - c0 < 4 ? chunks - c0 : 4;
        __m256i d16[R];
        for (int r = 0; r < R; ++r) d16[r] = _mm256_setzero_si256();
        for (int64_t i = 0; i < m; ++i) {
          if (end != nullptr && i % 2 == 0) {  // one prefetch per 64 bytes
            const uint8_t* a = wp + 32 * i + ahead;
            _mm_prefetch(reinterpret_cast<const char*>(a < pf_last ? a : pf_last), _MM_HINT_T0);
          }
          q4x64_chunk<R>(wp + 32 * i, ap + 64 * i, c.lda, mask, d16);
        }
        for (int r = 0; r < R; ++r) {
          d32[r] = _mm256_add_epi32(d32[r], _mm256_madd_epi16(d16[r], ones));
        }
        wp += 32 * m;
        ap += 64 * m;
      }
      const float sw = c.scales[g];
      const float zsw = static_cast<float>(zero_of(c, g)) * sw;
      const __m256 swv = _mm256_set1_ps(sw);
      for (int r = 0; r < R; ++r) {
        const __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(d32[r]), swv);
        acc[r] = _mm256_fmadd_ps(v, _mm256_set1_ps(c.asc[r * c.lds + g]), acc[r]);
        bias[r] += zsw * c.ascsum[r * c.lds + g];
      }
    }
    for (int r = 0; r < R; ++r) res[r * ncols + j] = hsum8(acc[r]) - bias[r];
    c.w = w + row_bytes;
    c.scales += c.groups;
    if (c.zeros != nullptr) c.zeros += c.groups;
  }
}

template <int R>
void columns_q4x64_a8_avx2(const ColumnArgsA8& c, int64_t ncols, int64_t row_bytes, int64_t ahead,
                           const uint8_t* end, float* res) {
  switch (c.group_size) {
    case 64:
      return columns_q4x64_a8_avx2_ch<R, 1>(c, ncols, row_bytes, ahead, end, res);
    case 128:
      return columns_q4x64_a8_avx2_ch<R, 2>(c, ncols, row_bytes, ahead, end, res);
    case 256:
      return columns_q4x64_a8_avx2_ch<R, 4>(c, ncols, row_bytes, ahead, end, res);
    default:
      return columns_q4x64_a8_avx2_ch<R, 0>(c, ncols, row_bytes, ahead, end, res);
  }
}

// INT8, group_size a multiple of 32: the signed x signed products of column_q8_a8_avx2 (vpsignb
// twice, vpmaddubsw, vpmaddwd), a tile of columns per call.
template <int R>
MOE_TARGET_AVX2_FMA MOE_ALWAYS_INLINE void q8x32_step(const int8_t* wp, const int8_t* ap,
                                                      int64_t lda, __m256i ones, __m256i* d32) {
  const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp));
  const __m256i aw = _mm256_sign_epi8(wv, wv);
  for (int r = 0; r < R; ++r) {
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ap + r * lda));
    const __m256i prod = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(a, wv));
    d32[r] = _mm256_add_epi32(d32[r], _mm256_madd_epi16(prod, ones));
  }
}

template <int R>
MOE_TARGET_AVX2_FMA void columns_q8x32_a8_avx2(ColumnArgsA8 c, int64_t ncols, int64_t row_bytes,
                                               int64_t ahead, const uint8_t* end, float* res) {
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t gs = c.group_size;
  for (int64_t j = 0; j < ncols; ++j) {
    const int8_t* w = static_cast<const int8_t*>(c.w);
    const int8_t* pf_last = end != nullptr ? reinterpret_cast<const int8_t*>(end) - 1 : nullptr;
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < c.groups; ++g) {
      const int8_t* wg = w + g * gs;
      const int8_t* ag = c.aq + g * gs;
      __m256i d32[R];
      for (int r = 0; r < R; ++r) d32[r] = _mm256_setzero_si256();
      int64_t p = 0;
      for (; p + 64 <= gs; p += 64) {
        if (end != nullptr) {  // one prefetch per 64 bytes
          const int8_t* a = wg + p + ahead;
          _mm_prefetch(reinterpret_cast<const char*>(a < pf_last ? a : pf_last), _MM_HINT_T0);
        }
        q8x32_step<R>(wg + p, ag + p, c.lda, ones, d32);
        q8x32_step<R>(wg + p + 32, ag + p + 32, c.lda, ones, d32);
      }
      if (p < gs) q8x32_step<R>(wg + p, ag + p, c.lda, ones, d32);
      const __m256 swv = _mm256_set1_ps(c.scales[g]);
      for (int r = 0; r < R; ++r) {
        const __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(d32[r]), swv);
        acc[r] = _mm256_fmadd_ps(v, _mm256_set1_ps(c.asc[r * c.lds + g]), acc[r]);
      }
    }
    for (int r = 0; r < R; ++r) res[r * ncols + j] = hsum8(acc[r]);
    c.w = w + row_bytes;
    c.scales += c.groups;
  }
}

#endif  // MOE_GGQ_X86

}  // namespace
}  // namespace moe_framework
