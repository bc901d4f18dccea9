// AVX2+FMA dot-product kernel for a B stored transposed (B(p, j) = b[j * ldbj + p], unit stride
// along p): the trans_b forward ([E, out, in] weights, Hugging Face's layout) and the da of the
// backward of a @ b[e]. Without it, AVX2 CPUs packed such a B into row-major panels one scalar
// store at a time (a transpose), 2-7x slower than the a @ b[e] layout at decode sizes.
//
// Each output is a dot product of an A row with a contiguous row of b, so b streams from memory
// once, row after row, with no packing. A register block of MR A rows x NR b rows keeps MR * NR
// ymm accumulators (8 or 12: enough independent FMA chains to hide the FMA latency) summed
// vertically over p in 8 lanes, and reduced horizontally once per output at the end (a fixed
// shuffle tree). Every output element sees the same operations in the same order whatever block
// shape computed it (the tail of k is a zero-padded 8-lane step, the block shape only decides
// which outputs run together), so results do not depend on the tiling or the thread count.
#pragma once

#include "packing.h"

namespace moe_framework {
namespace {

#if MOE_GG_X86
// 8 lanes of b from p on, of which n (< 8) are in range and the rest zero (the tail of k).
template <typename scalar_t>
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8_tail_as_float(const scalar_t* p,
                                                                           int64_t n) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return _mm256_maskload_ps(p, lane_mask(n));
  } else {
    scalar_t tmp[8] = {};
    for (int64_t i = 0; i < n; ++i) tmp[i] = p[i];
    return load8_as_float(tmp);
  }
}

// Horizontal sum of the 8 lanes in a fixed order: (lo + hi) pairwise, then the last two.
__attribute__((target("avx2,fma"))) inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// C[i, j] = sum_p A[i, p] B[j, p] for i < MR, j < NR (rows past mi / nj repeat the last row:
// computed, not stored). A is fp32 with unit stride along p. pf (or null): the next NR rows of b,
// prefetched along with the reads of these (b streams from memory in short rows of K elements,
// too short for the hardware prefetcher to ramp up on each).
template <int MR, int NR, typename scalar_t>
__attribute__((target("avx2,fma,f16c"))) void dot_block_avx2(int64_t k, const float* a, int64_t lda,
                                                             int64_t mi, const scalar_t* b,
                                                             int64_t ldbj, int64_t nj, float* c,
                                                             int64_t ldc, const scalar_t* pf) {
  const float* ar[MR];
  const scalar_t* br[NR];
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i) ar[i] = a + std::min<int64_t>(i, mi - 1) * lda;
#pragma GCC unroll 8
  for (int j = 0; j < NR; ++j) br[j] = b + std::min<int64_t>(j, nj - 1) * ldbj;
  __m256 acc[MR][NR];
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  }
  const int64_t k8 = k / 8 * 8;
  for (int64_t p = 0; p < k8; p += 8) {
    if (pf != nullptr) {
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) __builtin_prefetch(pf + j * ldbj + p, 0, 2);
    }
    __m256 bv[NR];
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) bv[j] = load8_as_float(br[j] + p);
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i) {
      const __m256 av = _mm256_loadu_ps(ar[i] + p);
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(av, bv[j], acc[i][j]);
    }
  }
  if (k8 < k) {
    const int64_t n = k - k8;
    __m256 bv[NR];
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) bv[j] = load8_tail_as_float(br[j] + k8, n);
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i) {
      const __m256 av = _mm256_maskload_ps(ar[i] + k8, lane_mask(n));
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(av, bv[j], acc[i][j]);
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i) {
    if (i < mi) {
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) {
        if (j < nj) c[i * ldc + j] = hsum8(acc[i][j]);
      }
    }
  }
}

// The column sweep for row blocks of MR rows: NR b rows stay in L1 while the row blocks of the
// tile (its A rows stay in L2) run over them; the first row block prefetches the next NR rows.
template <int MR, int NR, typename scalar_t>
void dot_rows_avx2(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const scalar_t* b,
                   int64_t ldbj, float* c, int64_t ldc) {
  for (int64_t j = 0; j < n; j += NR) {
    const scalar_t* pf = j + 2 * NR <= n ? b + (j + NR) * ldbj : nullptr;
    for (int64_t i = 0; i < m; i += MR) {
      dot_block_avx2<MR, NR>(k, a + i * lda, lda, std::min<int64_t>(MR, m - i), b + j * ldbj, ldbj,
                             std::min<int64_t>(NR, n - j), c + i * ldc + j, ldc,
                             i == 0 ? pf : nullptr);
    }
  }
}

// C[m x n] = A B^T with the block shape that keeps 8-12 accumulators busy for this m: 1 row x 8
// columns, 2 x 4, 3 x 4, and 4 x 3 for 4 rows and more (a last row block of fewer rows repeats a
// row: computed, not stored).
template <typename scalar_t>
void dot_gemm_avx2(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const scalar_t* b,
                   int64_t ldbj, float* c, int64_t ldc) {
  switch (m) {
    case 1:
      return dot_rows_avx2<1, 8>(m, n, k, a, lda, b, ldbj, c, ldc);
    case 2:
      return dot_rows_avx2<2, 4>(m, n, k, a, lda, b, ldbj, c, ldc);
    case 3:
      return dot_rows_avx2<3, 4>(m, n, k, a, lda, b, ldbj, c, ldc);
    default:
      return dot_rows_avx2<4, 3>(m, n, k, a, lda, b, ldbj, c, ldc);
  }
}
#endif

}  // namespace
}  // namespace moe_framework
