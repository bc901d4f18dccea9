// The AVX-512 score tiles of fp32 kg_search: a register-blocked GEMM whose epilogue scales the
// scores and applies the top-k admission test in registers (no score block is stored).
#pragma once

#include "common.h"

namespace moe_framework {
namespace {

// ---------------------------------------------------------------------------------------------
// AVX-512 score tiles (fp32 kg_search): our own register-blocked GEMM whose epilogue applies the
// bank rows' 1/||row|| and the top-k admission test while the scores are still in registers, so
// no score block is ever written out (BLAS would store [QB, NB] scores, and the scan would read
// them back).
//
// Vector lanes run along QUERIES: the normalised queries are packed once per call into panels of
// 32 ([d][32], zero padded), and each bank element is broadcast straight from the bank row, so the
// bank (the big operand) is never packed or copied. A tile is 32 queries x kTileRows bank rows:
// 2 x 14 zmm accumulators, one pass over d with no remainder (any d, odd included). The
// admission floors of 32 queries are one vector pair, so the per-score work of the top-k is one
// compare; only scores that beat a floor leave the registers.
//
// Every score is one FMA chain over j = 0..d-1 in order, whatever the split into blocks, segments
// or threads: deterministic for a given build, but rounded differently from the BLAS/non-FMA
// builds (scores differ by a few ulps; tests compare each build with the reference).

constexpr int64_t kPanelQ = 32;  // queries per panel (two zmm)
constexpr int kTileRows = 14;    // bank rows per tile: 28 accumulators + 2 query vectors
// Query panels a tile loop sweeps per group of bank rows: the panels (up to 48 KiB each at
// d = 384) stream from L2 while the 14 bank rows stay in L1.

int64_t query_panels(int64_t q) {
  return ceil_div(q, kPanelQ);
}

// qp [panels][d][32] from qn [q, d]; lanes past q are zero.
void pack_query_panels(const float* qn, int64_t q, int64_t d, float* qp) {
  const int64_t panels = query_panels(q);
  at::parallel_for(0, panels, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, d)),
                   [&](int64_t p0, int64_t p1) {
                     for (int64_t p = p0; p < p1; ++p) {
                       float* out = qp + p * d * kPanelQ;
                       for (int64_t l = 0; l < kPanelQ; ++l) {
                         const int64_t r = p * kPanelQ + l;
                         for (int64_t j = 0; j < d; ++j) {
                           out[j * kPanelQ + l] = r < q ? qn[r * d + j] : 0.0f;
                         }
                       }
                     }
                   });
}

// Where a task's accepted candidates go: the partial heaps of its segment (row r at hs + r*k)
// and each query's admission floor (the heap root's score once full, -inf before; +inf for the
// padding lanes of the last panel, which then never pass).
struct TileSink {
  float* hs;
  int64_t* hi;
  int64_t* sizes;
  float* floor;
  int64_t k;
};

// Offer lanes `mask` of scores s[32] (queries q0.., bank row `id`) to their heaps. Rare after the
// first k rows, so out of line: the tile loop keeps its registers.
__attribute__((noinline)) void push_lanes(uint64_t mask, const float* s, int64_t q0, int64_t id,
                                          const TileSink& sink) {
  const int64_t k = sink.k;
  while (mask != 0) {
    const int l = __builtin_ctzll(mask);
    mask &= mask - 1;
    const int64_t r = q0 + l;
    float* hs = sink.hs + r * k;
    topk_push(hs, sink.hi + r * k, sink.sizes[r], k, s[l], id);
    sink.floor[r] = sink.sizes[r] < k ? -std::numeric_limits<float>::infinity() : hs[0];
  }
}

#if MOE_CPU_AVX2_CLONE
// Scores of MQ x 16 queries (panel qp, first query q0) against NR bank rows b + i*ldb (ids id0..),
// each scaled by scale[i] and clamped to [-1, 1], offered to the heaps where they pass the floor.
template <int MQ, int NR>
MOE_TARGET_AVX512 void score_tile_avx512(const float* qp, int64_t q0, const float* b, int64_t ldb,
                                         const float* scale, int64_t id0, int64_t d,
                                         const TileSink& sink) {
  __m512 acc[NR][MQ];
#pragma GCC unroll 14
  for (int i = 0; i < NR; ++i) {
#pragma GCC unroll 2
    for (int m = 0; m < MQ; ++m) acc[i][m] = _mm512_setzero_ps();
  }
  for (int64_t j = 0; j < d; ++j) {
    __m512 a[MQ];
#pragma GCC unroll 2
    for (int m = 0; m < MQ; ++m) a[m] = _mm512_loadu_ps(qp + j * kPanelQ + 16 * m);
#pragma GCC unroll 14
    for (int i = 0; i < NR; ++i) {
      const __m512 bi = _mm512_set1_ps(b[i * ldb + j]);
#pragma GCC unroll 2
      for (int m = 0; m < MQ; ++m) acc[i][m] = _mm512_fmadd_ps(a[m], bi, acc[i][m]);
    }
  }
  const __m512 lo = _mm512_set1_ps(-1.0f);
  const __m512 hi = _mm512_set1_ps(1.0f);
  __m512 fl[MQ];
#pragma GCC unroll 2
  for (int m = 0; m < MQ; ++m) fl[m] = _mm512_loadu_ps(sink.floor + q0 + 16 * m);
#pragma GCC unroll 14
  for (int i = 0; i < NR; ++i) {
    const __m512 sc = _mm512_set1_ps(scale[i]);
    __m512 s[MQ];
    uint64_t mask = 0;
#pragma GCC unroll 2
    for (int m = 0; m < MQ; ++m) {
      // clamp before the test: a score rounded past -1 ties with a floor of exactly -1
      // (maskz forms: GCC 12 warns about the undefined pass-through of the plain min/max)
      s[m] = _mm512_maskz_min_ps(0xFFFF,
                                 _mm512_maskz_max_ps(0xFFFF, _mm512_mul_ps(acc[i][m], sc), lo), hi);
      mask |= static_cast<uint64_t>(_mm512_cmp_ps_mask(s[m], fl[m], _CMP_GE_OQ)) << (16 * m);
    }
    if (mask != 0) {
      alignas(64) float buf[kPanelQ];
#pragma GCC unroll 2
      for (int m = 0; m < MQ; ++m) _mm512_store_ps(buf + 16 * m, s[m]);
      push_lanes(mask, buf, q0, id0 + i, sink);
#pragma GCC unroll 2
      for (int m = 0; m < MQ; ++m) fl[m] = _mm512_loadu_ps(sink.floor + q0 + 16 * m);
    }
  }
}

template <int MQ>
MOE_TARGET_AVX512 void score_rows_avx512(const float* qp, int64_t q0, const float* b, int64_t ldb,
                                         const float* scale, int64_t id0, int64_t nr, int64_t d,
                                         const TileSink& sink) {
  switch (nr) {
#define MOE_SIM_TILE(R)                                            \
  case R:                                                          \
    score_tile_avx512<MQ, R>(qp, q0, b, ldb, scale, id0, d, sink); \
    return;
    MOE_SIM_TILE(1)
    MOE_SIM_TILE(2)
    MOE_SIM_TILE(3)
    MOE_SIM_TILE(4)
    MOE_SIM_TILE(5)
    MOE_SIM_TILE(6)
    MOE_SIM_TILE(7)
    MOE_SIM_TILE(8)
    MOE_SIM_TILE(9)
    MOE_SIM_TILE(10)
    MOE_SIM_TILE(11)
    MOE_SIM_TILE(12)
    MOE_SIM_TILE(13)
    default:
      score_tile_avx512<MQ, kTileRows>(qp, q0, b, ldb, scale, id0, d, sink);
#undef MOE_SIM_TILE
  }
}

// Queries [r0, r1) (r0 a multiple of kPanelQ) against bank rows [c0, c1) at b (row c0, stride
// ldb) with their scales: groups of kTileRows bank rows (kept in L1) sweep the query panels.
MOE_TARGET_AVX512 void score_block_avx512(const float* qpanels, int64_t r0, int64_t r1,
                                          const float* b, int64_t ldb, const float* scale,
                                          int64_t c0, int64_t c1, int64_t d, const TileSink& sink) {
  for (int64_t i0 = c0; i0 < c1; i0 += kTileRows) {
    const int64_t nr = std::min<int64_t>(kTileRows, c1 - i0);
    const float* bi = b + (i0 - c0) * ldb;
    for (int64_t q0 = r0; q0 < r1; q0 += kPanelQ) {
      const float* qp = qpanels + (q0 / kPanelQ) * d * kPanelQ;
      if (r1 - q0 > 16) {
        score_rows_avx512<2>(qp, q0, bi, ldb, scale + (i0 - c0), i0, nr, d, sink);
      } else {  // a last panel of <= 16 queries: half the work
        score_rows_avx512<1>(qp, q0, bi, ldb, scale + (i0 - c0), i0, nr, d, sink);
      }
    }
  }
}
#endif

}  // namespace
}  // namespace moe_framework
