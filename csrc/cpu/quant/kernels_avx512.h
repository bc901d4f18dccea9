// AVX-512 kernels of grouped_gemm_q (CPUs with AVX-512 F/BW/VL/DQ, e.g. Zen 4, Ice Lake and later;
// knob ggq_avx512, MOE_FRAMEWORK_CPU_NO_AVX512=1 turns them off): weight-only INT8 / INT4 with fp32
// activations, and INT8 / INT4 weights x INT8 activations with AVX512-VNNI (vpdpbusd; INT8 x INT8
// only with ggq_avx512 = 2: from DRAM the AVX2 group kernel streams faster on Zen 4).
//
// Every kernel runs a work tile of ncols consecutive columns of one expert for R <= 4 rows (column
// j: weights c.w + j * row_bytes, scales / zero points + j * groups; result res[r * ncols + j]) in
// passes of CN columns at once (4 for up to two rows, 2 for more), so each activation vector loaded
// serves CN columns and each weight vector dequantised serves R rows, with R * CN independent
// accumulator chains. With end != nullptr (the first chunk of rows: weights from memory) a pass
// prefetches one line per 64 bytes of weights it reads, `ahead` bytes beyond its linear position in
// the tile (the CN columns are contiguous: a pass reads CN * row_bytes bytes, so the stream runs
// `ahead` bytes in front of the reads in order), clamped to end (the expert's last byte).
//
// Weight-only (fp32 accumulation, FMA): INT8 widens 16 weights per vpmovsxbd zmm + vcvtdq2ps, one
// FMA per row; INT4 16 packed bytes (32 weights) per vpmovzxbd zmm, the low nibbles (k 0..15 of the
// block: one vpandd) and high (16..31: one vpsrld) converted, two FMAs per row; the zero point as
// in kernels.h (zero * scale * sum of the group's activations, after the loop). Any INT8 group
// size: a group's last < 16 weights are a masked step.
//
// INT8 activations (exact integer sums, deterministic; kernels_a8.h for the scheme):
//   INT4: vpdpbusd takes the unsigned nibbles as they are (u8) x the int8 activations. One 32-byte
//   load broadcast to both halves of a zmm, shifted by 0 (low half) / 4 (high half) and masked,
//   gives 64 weights in the order of quantize_rows' perm64 activations (k 0..15, 32..47, 16..31,
//   48..63); groups of a multiple of 64. The zero point enters the integer sum (-zero * sum aq in
//   lane 0 of the group's accumulator).
//   INT8: weights w + 128 as u8 (one vpxord with 0x80) x int8 activations; the +128 adds
//   128 * (the activations of each lane) to every int32 lane, removed exactly by starting each
//   group's accumulator at -lanes128 (the driver's per row, group and lane sums of 128 * aq: the
//   lane layout of a 64-byte step), so each lane holds the exact signed dot product of its bytes,
//   as the AVX2 kernel's lanes. Any group size (masked last step). Per 64-byte step:
//   |lane| <= 4 * 255 * 127, so int32 lanes hold groups of up to ~16k weights (K per channel).
// Per group the int32 lanes are converted, scaled by the weight scale and FMA'd with the row's
// activation scale into fp32 lanes (as the AVX2 group kernels), reduced once per column.
#pragma once

#include <cstdint>

#include "kernels.h"
#include "kernels_a8.h"

// GCC 12's AVX-512 headers build some intrinsics (reductions, conversions) on
// _mm512_undefined_*(), which -Wmaybe-uninitialized reports at every use: a false positive.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace moe_framework {
namespace {

#if MOE_GGQ_X86

// Columns per pass for R rows.
template <int R>
constexpr int avx512_cols() {
  return R <= 2 ? 4 : 2;
}

// The prefetch stream of a pass: lines at base + CN * (bytes read per column), up to last.
struct PassPrefetch {
  const uint8_t* base;  // nullptr: no prefetch (weights already in cache)
  const uint8_t* last;
  int64_t next;  // next byte offset (per column) at which CN lines are prefetched
};

template <int CN>
MOE_ALWAYS_INLINE void pass_prefetch(PassPrefetch& pf, int64_t byte) {
  if (pf.base != nullptr && byte >= pf.next) {
    for (int i = 0; i < CN; ++i) {
      const uint8_t* p = pf.base + CN * pf.next + 64 * i;
      _mm_prefetch(reinterpret_cast<const char*>(p < pf.last ? p : pf.last), _MM_HINT_T0);
    }
    pf.next += 64;
  }
}

MOE_ALWAYS_INLINE PassPrefetch pass_prefetch_of(const uint8_t* w, int64_t ahead,
                                                const uint8_t* end) {
  return {end != nullptr ? w + ahead : nullptr, end != nullptr ? end - 1 : nullptr, 0};
}

// ---- weight-only, fp32 activations ---------------------------------------------------------

// Accumulator chains per (row, column) so that a pass has at least 4 (the FMA / vpdpbusd latency).
template <int R, int CN>
constexpr int avx512_chains() {
  return R * CN >= 4 ? 1 : 4 / (R * CN);
}

template <int R, int CN, int S>
MOE_TARGET_AVX512 MOE_ALWAYS_INLINE void q8_step_avx512(const ColumnArgs& c, const int8_t* w,
                                                        int64_t row_bytes, int64_t p, int s,
                                                        __m512 (*ga)[CN][S]) {
  __m512 wv[CN];
  for (int j = 0; j < CN; ++j) {
    wv[j] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j * row_bytes + p))));
  }
  for (int r = 0; r < R; ++r) {
    const __m512 av = _mm512_loadu_ps(c.a + r * c.lda + p);
    for (int j = 0; j < CN; ++j) ga[r][j][s] = _mm512_fmadd_ps(wv[j], av, ga[r][j][s]);
  }
}

template <int R, int CN>
MOE_TARGET_AVX512 MOE_ALWAYS_INLINE void q8_pass_avx512(const ColumnArgs& c, const int8_t* w,
                                                        const float* sc, int64_t row_bytes,
                                                        PassPrefetch pf, float* res,
                                                        int64_t ldres) {
  constexpr int S = avx512_chains<R, CN>();
  __m512 acc[R][CN];
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < CN; ++j) acc[r][j] = _mm512_setzero_ps();
  }
  for (int64_t g = 0; g < c.groups; ++g) {
    const int64_t p0 = g * c.group_size, p1 = p0 + c.group_size;
    __m512 ga[R][CN][S];
    for (int r = 0; r < R; ++r) {
      for (int j = 0; j < CN; ++j) {
        for (int i = 0; i < S; ++i) ga[r][j][i] = _mm512_setzero_ps();
      }
    }
    int64_t p = p0;
    for (; p + 16 * S <= p1; p += 16 * S) {
      for (int i = 0; i < S; ++i) {
        pass_prefetch<CN>(pf, p + 16 * i);
        q8_step_avx512<R, CN, S>(c, w, row_bytes, p + 16 * i, i, ga);
      }
    }
    for (; p + 16 <= p1; p += 16) {
      pass_prefetch<CN>(pf, p);
      q8_step_avx512<R, CN, S>(c, w, row_bytes, p, 0, ga);
    }
    if (p < p1) {  // the group's last 1..15 weights
      pass_prefetch<CN>(pf, p);
      const __mmask16 m = static_cast<__mmask16>((1u << (p1 - p)) - 1);
      __m512 wv[CN];
      for (int j = 0; j < CN; ++j) {
        wv[j] = _mm512_cvtepi32_ps(
            _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, w + j * row_bytes + p)));
      }
      for (int r = 0; r < R; ++r) {
        const __m512 av = _mm512_maskz_loadu_ps(m, c.a + r * c.lda + p);
        for (int j = 0; j < CN; ++j) ga[r][j][0] = _mm512_fmadd_ps(wv[j], av, ga[r][j][0]);
      }
    }
    for (int j = 0; j < CN; ++j) {
      const __m512 sv = _mm512_set1_ps(sc[j * c.groups + g]);
      for (int r = 0; r < R; ++r) {
        __m512 sum = ga[r][j][0];
        for (int i = 1; i < S; ++i) sum = _mm512_add_ps(sum, ga[r][j][i]);
        acc[r][j] = _mm512_fmadd_ps(sum, sv, acc[r][j]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < CN; ++j) res[r * ldres + j] = _mm512_reduce_add_ps(acc[r][j]);
  }
}

template <int R, int CN>
MOE_TARGET_AVX512 void columns_q8_avx512_cn(const ColumnArgs& c, int64_t ncols, int64_t row_bytes,
                                            int64_t ahead, const uint8_t* end, float* res) {
  const int8_t* w = static_cast<const int8_t*>(c.w);
  int64_t j = 0;
  for (; j + CN <= ncols; j += CN) {
    const int8_t* wj = w + j * row_bytes;
    q8_pass_avx512<R, CN>(c, wj, c.scales + j * c.groups, row_bytes,
                          pass_prefetch_of(reinterpret_cast<const uint8_t*>(wj), ahead, end),
                          res + j, ncols);
  }
  for (; j < ncols; ++j) {
    const int8_t* wj = w + j * row_bytes;
    q8_pass_avx512<R, 1>(c, wj, c.scales + j * c.groups, row_bytes,
                         pass_prefetch_of(reinterpret_cast<const uint8_t*>(wj), ahead, end),
                         res + j, ncols);
  }
}

template <int R>
void columns_q8_avx512(const ColumnArgs& c, int64_t ncols, int64_t row_bytes, int64_t ahead,
                       const uint8_t* end, float* res) {
  columns_q8_avx512_cn<R, avx512_cols<R>()>(c, ncols, row_bytes, ahead, end, res);
}

// INT4: S accumulator chains per (row, column): two (low / high nibbles) for one row, where
// R * CN = 4 chains would leave the FMA latency exposed.
template <int R, int CN>
MOE_TARGET_AVX512 MOE_ALWAYS_INLINE void q4_pass_avx512(const ColumnArgs& c, const uint8_t* w,
                                                        const float* sc, const uint8_t* zeros,
                                                        int64_t row_bytes, PassPrefetch pf,
                                                        float* res, int64_t ldres) {
  constexpr int S = R == 1 ? 2 : 1;
  const __m512i mask = _mm512_set1_epi32(0x0F);
  __m512 acc[R][CN];
  float bias[R][CN];
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < CN; ++j) {
      acc[r][j] = _mm512_setzero_ps();
      bias[r][j] = 0.f;
    }
  }
  for (int64_t g = 0; g < c.groups; ++g) {
    const int64_t p0 = g * c.group_size, p1 = p0 + c.group_size;
    __m512 ga[R][CN][S];
    for (int r = 0; r < R; ++r) {
      for (int j = 0; j < CN; ++j) {
        for (int i = 0; i < S; ++i) ga[r][j][i] = _mm512_setzero_ps();
      }
    }
    for (int64_t p = p0; p < p1; p += 32) {
      pass_prefetch<CN>(pf, p / 2);
      __m512 lo[CN], hi[CN];
      for (int j = 0; j < CN; ++j) {
        const __m512i x = _mm512_cvtepu8_epi32(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j * row_bytes + p / 2)));
        lo[j] = _mm512_cvtepi32_ps(_mm512_and_si512(x, mask));
        hi[j] = _mm512_cvtepi32_ps(_mm512_srli_epi32(x, 4));
      }
      for (int r = 0; r < R; ++r) {
        const __m512 alo = _mm512_loadu_ps(c.a + r * c.lda + p);
        const __m512 ahi = _mm512_loadu_ps(c.a + r * c.lda + p + 16);
        for (int j = 0; j < CN; ++j) {
          ga[r][j][0] = _mm512_fmadd_ps(lo[j], alo, ga[r][j][0]);
          ga[r][j][S - 1] = _mm512_fmadd_ps(hi[j], ahi, ga[r][j][S - 1]);
        }
      }
    }
    for (int j = 0; j < CN; ++j) {
      const float sf = sc[j * c.groups + g];
      const float z =
          zeros != nullptr ? static_cast<float>(zeros[j * c.groups + g]) : c.zero_default;
      const float zs = z * sf;
      const __m512 s = _mm512_set1_ps(sf);
      for (int r = 0; r < R; ++r) {
        __m512 sum = ga[r][j][0];
        if constexpr (S == 2) sum = _mm512_add_ps(sum, ga[r][j][1]);
        acc[r][j] = _mm512_fmadd_ps(sum, s, acc[r][j]);
        bias[r][j] += zs * c.asum[r * c.ldsum + g];
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < CN; ++j) res[r * ldres + j] = _mm512_reduce_add_ps(acc[r][j]) - bias[r][j];
  }
}

template <int R>
MOE_TARGET_AVX512 void columns_q4_avx512(const ColumnArgs& c, int64_t ncols, int64_t row_bytes,
                                         int64_t ahead, const uint8_t* end, float* res) {
  constexpr int CN = avx512_cols<R>();
  const uint8_t* w = static_cast<const uint8_t*>(c.w);
  int64_t j = 0;
  for (; j + CN <= ncols; j += CN) {
    const uint8_t* wj = w + j * row_bytes;
    q4_pass_avx512<R, CN>(c, wj, c.scales + j * c.groups,
                          c.zeros != nullptr ? c.zeros + j * c.groups : nullptr, row_bytes,
                          pass_prefetch_of(wj, ahead, end), res + j, ncols);
  }
  for (; j < ncols; ++j) {
    const uint8_t* wj = w + j * row_bytes;
    q4_pass_avx512<R, 1>(c, wj, c.scales + j * c.groups,
                         c.zeros != nullptr ? c.zeros + j * c.groups : nullptr, row_bytes,
                         pass_prefetch_of(wj, ahead, end), res + j, ncols);
  }
}

// ---- INT8 activations, AVX512-VNNI ----------------------------------------------------------

// Per 64 weights of every column: the column's group accumulators d[r][j] += u8 weights x
// activations of row r.
template <int R, int CN>
MOE_TARGET_AVX512_VNNI MOE_ALWAYS_INLINE void dp_step(const __m512i* wu, const int8_t* ap,
                                                      int64_t lda, __m512i (*d)[CN]) {
  for (int r = 0; r < R; ++r) {
    const __m512i av = _mm512_loadu_si512(ap + r * lda);
    for (int j = 0; j < CN; ++j) d[r][j] = _mm512_dpbusd_epi32(d[r][j], wu[j], av);
  }
}

// One group's int32 lanes into the fp32 lanes: acc += (float(d) * sw) * sa.
template <int R, int CN>
MOE_TARGET_AVX512_VNNI MOE_ALWAYS_INLINE void scale_group(const ColumnArgsA8& c, const float* sc,
                                                          int64_t g, __m512i (*d)[CN],
                                                          __m512 (*acc)[CN]) {
  for (int j = 0; j < CN; ++j) {
    const __m512 sw = _mm512_set1_ps(sc[j * c.groups + g]);
    for (int r = 0; r < R; ++r) {
      const __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(d[r][j]), sw);
      acc[r][j] = _mm512_fmadd_ps(v, _mm512_set1_ps(c.asc[r * c.lds + g]), acc[r][j]);
    }
  }
}

// -128 * the lane sums of n int8 activations (one group) into out[16]: lane l of a 64-byte step
// holds its bytes 4l..4l+3 (vpdpbusd of 0x80 x aq; the last step masked).
MOE_TARGET_AVX512_VNNI void lanes128_vnni(const int8_t* q, int64_t n, int32_t* out) {
  const __m512i u128 = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i acc = _mm512_setzero_si512();
  int64_t p = 0;
  for (; p + 64 <= n; p += 64) acc = _mm512_dpbusd_epi32(acc, u128, _mm512_loadu_si512(q + p));
  if (p < n) {
    const __mmask64 m = (~uint64_t{0}) >> (64 - (n - p));
    acc = _mm512_dpbusd_epi32(acc, u128, _mm512_maskz_loadu_epi8(m, q + p));
  }
  _mm512_storeu_si512(out, _mm512_sub_epi32(_mm512_setzero_si512(), acc));
}

// INT8 x INT8: lanes128 = the driver's -128 * (lane sums of aq), 16 int32 per row and group (row
// stride groups * 16).
template <int R, int CN>
MOE_TARGET_AVX512_VNNI MOE_ALWAYS_INLINE void q8_a8_pass_vnni(const ColumnArgsA8& c,
                                                              const int32_t* lanes128,
                                                              const int8_t* w, const float* sc,
                                                              int64_t row_bytes, PassPrefetch pf,
                                                              float* res, int64_t ldres) {
  constexpr int S = avx512_chains<R, CN>();
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const int64_t gs = c.group_size;
  __m512 acc[R][CN];
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < CN; ++j) acc[r][j] = _mm512_setzero_ps();
  }
  for (int64_t g = 0; g < c.groups; ++g) {
    const int64_t p0 = g * gs, p1 = p0 + gs;
    __m512i d[S][R][CN];
    for (int r = 0; r < R; ++r) {
      const __m512i start = _mm512_loadu_si512(lanes128 + (r * c.groups + g) * 16);
      for (int j = 0; j < CN; ++j) {
        d[0][r][j] = start;
        for (int i = 1; i < S; ++i) d[i][r][j] = _mm512_setzero_si512();
      }
    }
    int64_t p = p0;
    for (; p + 64 * S <= p1; p += 64 * S) {
      for (int i = 0; i < S; ++i) {
        pass_prefetch<CN>(pf, p + 64 * i);
        __m512i wu[CN];
        for (int j = 0; j < CN; ++j) {
          wu[j] = _mm512_xor_si512(_mm512_loadu_si512(w + j * row_bytes + p + 64 * i), flip);
        }
        dp_step<R, CN>(wu, c.aq + p + 64 * i, c.lda, d[i]);
      }
    }
    for (; p + 64 <= p1; p += 64) {
      pass_prefetch<CN>(pf, p);
      __m512i wu[CN];
      for (int j = 0; j < CN; ++j) {
        wu[j] = _mm512_xor_si512(_mm512_loadu_si512(w + j * row_bytes + p), flip);
      }
      dp_step<R, CN>(wu, c.aq + p, c.lda, d[0]);
    }
    if (p < p1) {  // the group's last 1..63 weights: masked lanes are 0x80 x 0
      pass_prefetch<CN>(pf, p);
      const __mmask64 m = (~uint64_t{0}) >> (64 - (p1 - p));
      __m512i wu[CN];
      for (int j = 0; j < CN; ++j) {
        wu[j] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, w + j * row_bytes + p), flip);
      }
      for (int r = 0; r < R; ++r) {
        const __m512i av = _mm512_maskz_loadu_epi8(m, c.aq + r * c.lda + p);
        for (int j = 0; j < CN; ++j) d[0][r][j] = _mm512_dpbusd_epi32(d[0][r][j], wu[j], av);
      }
    }
    for (int i = 1; i < S; ++i) {
      for (int r = 0; r < R; ++r) {
        for (int j = 0; j < CN; ++j) d[0][r][j] = _mm512_add_epi32(d[0][r][j], d[i][r][j]);
      }
    }
    scale_group<R, CN>(c, sc, g, d[0], acc);
  }
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < CN; ++j) res[r * ldres + j] = _mm512_reduce_add_ps(acc[r][j]);
  }
}

template <int R, int CN>
MOE_TARGET_AVX512_VNNI void columns_q8_a8_vnni_cn(const ColumnArgsA8& c, const int32_t* lanes128,
                                                  int64_t ncols, int64_t row_bytes, int64_t ahead,
                                                  const uint8_t* end, float* res) {
  const int8_t* w = static_cast<const int8_t*>(c.w);
  int64_t j = 0;
  for (; j + CN <= ncols; j += CN) {
    const int8_t* wj = w + j * row_bytes;
    q8_a8_pass_vnni<R, CN>(c, lanes128, wj, c.scales + j * c.groups, row_bytes,
                           pass_prefetch_of(reinterpret_cast<const uint8_t*>(wj), ahead, end),
                           res + j, ncols);
  }
  for (; j < ncols; ++j) {
    const int8_t* wj = w + j * row_bytes;
    q8_a8_pass_vnni<R, 1>(c, lanes128, wj, c.scales + j * c.groups, row_bytes,
                          pass_prefetch_of(reinterpret_cast<const uint8_t*>(wj), ahead, end),
                          res + j, ncols);
  }
}

template <int R>
void columns_q8_a8_vnni(const ColumnArgsA8& c, const int32_t* lanes128, int64_t ncols,
                        int64_t row_bytes, int64_t ahead, const uint8_t* end, float* res) {
  columns_q8_a8_vnni_cn<R, avx512_cols<R>()>(c, lanes128, ncols, row_bytes, ahead, end, res);
}

// INT4 x INT8, group_size a multiple of 64, perm64 activations.
template <int R, int CN>
MOE_TARGET_AVX512_VNNI MOE_ALWAYS_INLINE void q4_a8_pass_vnni(const ColumnArgsA8& c,
                                                              const uint8_t* w, const float* sc,
                                                              const uint8_t* zeros,
                                                              int64_t row_bytes, PassPrefetch pf,
                                                              float* res, int64_t ldres) {
  const __m512i mask = _mm512_set1_epi8(0x0F);
  const __m512i shift = _mm512_set_epi64(4, 4, 4, 4, 0, 0, 0, 0);
  const int64_t gs = c.group_size;
  __m512 acc[R][CN];
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < CN; ++j) acc[r][j] = _mm512_setzero_ps();
  }
  for (int64_t g = 0; g < c.groups; ++g) {
    const int64_t p0 = g * gs, p1 = p0 + gs;
    __m512i d[R][CN];
    for (int j = 0; j < CN; ++j) {
      const int32_t z = zeros != nullptr ? zeros[j * c.groups + g] : c.zero_default;
      for (int r = 0; r < R; ++r) {
        d[r][j] = _mm512_zextsi128_si512(_mm_cvtsi32_si128(-z * c.aqsum[r * c.lds + g]));
      }
    }
    for (int64_t p = p0; p < p1; p += 64) {
      pass_prefetch<CN>(pf, p / 2);
      __m512i wu[CN];
      for (int j = 0; j < CN; ++j) {
        const __m512i b = _mm512_broadcast_i64x4(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * row_bytes + p / 2)));
        wu[j] = _mm512_and_si512(_mm512_srlv_epi64(b, shift), mask);
      }
      dp_step<R, CN>(wu, c.aq + p, c.lda, d);
    }
    scale_group<R, CN>(c, sc, g, d, acc);
  }
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < CN; ++j) res[r * ldres + j] = _mm512_reduce_add_ps(acc[r][j]);
  }
}

template <int R>
MOE_TARGET_AVX512_VNNI void columns_q4_a8_vnni(const ColumnArgsA8& c, int64_t ncols,
                                               int64_t row_bytes, int64_t ahead, const uint8_t* end,
                                               float* res) {
  constexpr int CN = avx512_cols<R>();
  const uint8_t* w = static_cast<const uint8_t*>(c.w);
  int64_t j = 0;
  for (; j + CN <= ncols; j += CN) {
    const uint8_t* wj = w + j * row_bytes;
    q4_a8_pass_vnni<R, CN>(c, wj, c.scales + j * c.groups,
                           c.zeros != nullptr ? c.zeros + j * c.groups : nullptr, row_bytes,
                           pass_prefetch_of(wj, ahead, end), res + j, ncols);
  }
  for (; j < ncols; ++j) {
    const uint8_t* wj = w + j * row_bytes;
    q4_a8_pass_vnni<R, 1>(c, wj, c.scales + j * c.groups,
                          c.zeros != nullptr ? c.zeros + j * c.groups : nullptr, row_bytes,
                          pass_prefetch_of(wj, ahead, end), res + j, ncols);
  }
}

#endif  // MOE_GGQ_X86

}  // namespace
}  // namespace moe_framework
