// Kernels that read B where it lies instead of packing it, for small groups (decode, fine-grained
// experts), where a tile has too few rows for packing B to pay off: the streaming kernel (AVX2,
// <= kStreamRows rows), the direct kernel (AVX-512 8x48 tile on B, <= kDirectRows rows) and the
// dot-product kernel (b^T: each output a dot product of an A row and a contiguous row of b; with
// AVX-512 for fp32 below kPackRowsTransB rows, fp16 and bf16 whenever our fp32 tiles run them; with
// AVX2 for every group our tiles run, dot_avx2.h). Each runner
// returns false when it does not apply, and the caller falls back to tile_gemm.
#pragma once

#include "dot_avx2.h"
#include "packing.h"

namespace moe_framework {
namespace {

// ---------------------------------------------------------------------------------------------
// Streaming kernel for tiles of at most kStreamRows rows with a unit-column-stride B (decode,
// fine-grained experts). There, each weight element feeds only a few FMAs and the tile is bound
// by reading B from memory; packing would add a write and a re-read of every element. This loop
// reads B once, row by row (8 rows per pass: sequential streams the prefetcher follows), converts
// bf16/fp16 in registers, and keeps the m x n fp32 output block in L1:
//   C[i, :] += a[i, p] B[p, :] + a[i, p+1] B[p+1, :] + ...   (fused, in p order).

#if MOE_GG_X86
template <typename scalar_t>
__attribute__((target("avx2,fma,f16c"))) void stream_gemm_avx2(int64_t m, int64_t n, int64_t k,
                                                               const float* a, int64_t lda,
                                                               const scalar_t* b, int64_t ldb,
                                                               float* c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + n, 0.f);
  const int64_t n8 = n / 8 * 8;
  int64_t p = 0;
  // 8 rows of B per pass: each C vector is loaded and stored once per 8 FMAs.
  for (; p + 8 <= k; p += 8) {
    const scalar_t* b0 = b + p * ldb;
    for (int64_t j = 0; j < n8; j += 8) {
      __m256 v[8];
#pragma GCC unroll 8
      for (int q = 0; q < 8; ++q) v[q] = load8_as_float(b0 + q * ldb + j);
      for (int64_t i = 0; i < m; ++i) {
        const float* ai = a + i * lda + p;
        float* ci = c + i * ldc + j;
        __m256 acc = _mm256_loadu_ps(ci);
#pragma GCC unroll 8
        for (int q = 0; q < 8; ++q) acc = _mm256_fmadd_ps(_mm256_broadcast_ss(ai + q), v[q], acc);
        _mm256_storeu_ps(ci, acc);
      }
    }
    for (int64_t j = n8; j < n; ++j) {
      for (int64_t i = 0; i < m; ++i) {
        const float* ai = a + i * lda + p;
        float acc = c[i * ldc + j];
        for (int q = 0; q < 8; ++q) acc = std::fma(ai[q], static_cast<float>(b0[q * ldb + j]), acc);
        c[i * ldc + j] = acc;
      }
    }
  }
  for (; p < k; ++p) {
    const scalar_t* b0 = b + p * ldb;
    for (int64_t j = 0; j < n8; j += 8) {
      const __m256 v0 = load8_as_float(b0 + j);
      for (int64_t i = 0; i < m; ++i) {
        float* ci = c + i * ldc + j;
        _mm256_storeu_ps(
            ci, _mm256_fmadd_ps(_mm256_broadcast_ss(a + i * lda + p), v0, _mm256_loadu_ps(ci)));
      }
    }
    for (int64_t j = n8; j < n; ++j)
      for (int64_t i = 0; i < m; ++i)
        c[i * ldc + j] = std::fma(a[i * lda + p], static_cast<float>(b0[j]), c[i * ldc + j]);
  }
}
#endif

// Runs the streaming kernel when it applies (see above); false means the caller uses tile_gemm.
template <typename scalar_t>
bool stream_gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                 const BView<scalar_t>& b, float* c, int64_t ldc) {
#if MOE_GG_X86
  // With AVX-512 the packed-panel path is faster, and the direct kernel faster still.
  if (m <= kStreamRows && b.sn == 1 && gemm_isa() == Isa::kAvx2) {
    stream_gemm_avx2(m, n, k, a, lda, b.ptr, b.sk, c, ldc);
    return true;
  }
#endif
  return false;
}

// ---------------------------------------------------------------------------------------------
// Direct kernel for fp32 tiles of at most kDirectRows rows with AVX-512 and a unit-column-stride
// B (a @ b[e] with small groups). Each weight element feeds only 8-16 FMAs there, so packing B
// into panels (read B, write the panel, read it again) costs more than the FMAs. This kernel runs
// the 8x48 register tile (tile_avx512) straight on B: per k, three loads from row k of B and eight
// broadcast FMAs from A (the tile's A rows stay in L1), with B prefetched kDirectPrefetch rows
// ahead (rows of B are a page apart at N = 1024 floats: the hardware prefetchers do not follow that
// walk). Tiles of 9-16 rows run two passes per 48-column strip; the second one finds the strip (K x
// 192 bytes) in L2. Sums run over k in order, as in micro_avx512. Without the software prefetch
// it is slower than the packed path (measurements: the experiment log in docs/performance_log.md).

// Rows per pass of the direct kernels: 9-16 rows run as two equal passes (12 = 6 + 6, not 8 + 4,
// which measured slower: docs/performance_log.md, "Grouped GEMM: kernel experiment log").
inline int64_t direct_pass_rows(int64_t m) {
  return m > 8 ? (m + 1) / 2 : 8;
}

#if MOE_GG_X86
template <int MR, bool kFull>
MOE_TARGET_AVX512 void direct_avx512(int64_t k, const float* a, int64_t lda, const float* b,
                                     int64_t ldb, float* c, int64_t ldc, int64_t nr, bool pf) {
  // Prefetches stop kDirectPrefetch rows before the end of the strip (prefetches never fault, but
  // fetching past B is waste); the second pass over a strip reads it from L2 and skips them.
  const int64_t kpf = pf ? std::max<int64_t>(0, k - kDirectPrefetch) : 0;
  tile_avx512<MR, kFull>(k, a, lda, 1, b, ldb, c, ldc, nr, false, kpf);
}

template <bool kFull>
void direct_avx512_rows(int64_t mr, int64_t k, const float* a, int64_t lda, const float* b,
                        int64_t ldb, float* c, int64_t ldc, int64_t nr, bool pf) {
  with_tile_rows<8>(mr, [&](auto r) {
    direct_avx512<decltype(r)::value, kFull>(k, a, lda, b, ldb, c, ldc, nr, pf);
  });
}
#endif

// AVX2: fp32 tiles of kStreamRows + 1 to kDirectRowsAvx2 rows with a unit-column-stride B run the
// 4x24 register tile (micro_avx2) straight on B over the whole of K: the row blocks of a 24-column
// strip re-read it from L2 (K x 96 bytes), which costs less than packing the tile's B panels.
// Every output is one sum over k in order, whatever the tiling.
template <typename scalar_t>
bool direct_gemm_avx2(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                      const BView<scalar_t>& b, float* c, int64_t ldc) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (m <= kStreamRows || m > kDirectRowsAvx2 || k == 0 || b.sn != 1 ||
        gemm_isa() != Isa::kAvx2) {
      return false;
    }
    for (int64_t j = 0; j < n; j += kNR) {
      for (int64_t i = 0; i < m; i += kMR) {
        micro(MicroArgs{k, a + i * lda, lda, 1, b.ptr + j, b.sk, c + i * ldc + j, ldc,
                        std::min(kMR, m - i), std::min(kNR, n - j), false});
      }
    }
    return true;
  }
  return false;
}

// Runs the direct kernel when it applies (see above); false means the caller uses tile_gemm.
template <typename scalar_t>
bool direct_gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                 const BView<scalar_t>& b, float* c, int64_t ldc) {
#if MOE_GG_X86
  if (direct_gemm_avx2(m, n, k, a, lda, b, c, ldc)) return true;
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (m > kDirectRows || k == 0 || b.sn != 1 || gemm_isa() != Isa::kAvx512) return false;
    const int64_t step = direct_pass_rows(m);
    for (int64_t j = 0; j < n; j += kNR512) {
      const int64_t nr = std::min(kNR512, n - j);
      for (int64_t i = 0; i < m; i += step) {
        const int64_t mr = std::min(step, m - i);
        if (nr == kNR512) {
          direct_avx512_rows<true>(mr, k, a + i * lda, lda, b.ptr + j, b.sk, c + i * ldc + j, ldc,
                                   nr, i == 0);
        } else {
          direct_avx512_rows<false>(mr, k, a + i * lda, lda, b.ptr + j, b.sk, c + i * ldc + j, ldc,
                                    nr, i == 0);
        }
      }
    }
    return true;
  }
#endif
  return false;
}

// ---------------------------------------------------------------------------------------------
// Dot-product kernel for a B stored transposed (B(p, j) = b[j * ldbj + p], unit stride along p:
// the trans_b forward and the da of the backward) and A rows with unit stride. Packing such a B
// into row-major panels is a transpose (scattered writes); instead each output is a dot product of
// an A row with a contiguous row of b, so b streams from memory once, row after row. A block of
// 8 A rows x 3 b rows keeps 24 zmm accumulators; each is reduced horizontally once at the end
// (fixed shuffle tree: deterministic). A rows of a tile (<= kMB rows x K) stay in L2.
#if MOE_GG_X86
template <typename scalar_t>
MOE_TARGET_AVX512 inline __m512 load16_as_float(const scalar_t* p, __mmask16 k) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (k == 0xFFFF) return _mm512_loadu_ps(p);
    return _mm512_maskz_loadu_ps(k, p);
  } else if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    const __m256i v = _mm256_maskz_loadu_epi16(k, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
  } else {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p));
  }
}

// Shared by the dot-product kernels (dot_8x3, dot_bf16_8x3): the 8 row pointers of A and 3 of B
// (past mi / nj they repeat the last row: computed, not stored) and zeroed accumulators ...
template <typename A, typename B>
MOE_TARGET_AVX512 MOE_ALWAYS_INLINE void dot_8x3_begin(const A* a, int64_t lda, int64_t mi,
                                                       const B* b, int64_t ldbj, int64_t nj,
                                                       const A* (&ar)[8], const B* (&br)[3],
                                                       __m512 (&acc)[8][3]) {
  for (int64_t i = 0; i < 8; ++i) ar[i] = a + std::min(i, mi - 1) * lda;
  for (int64_t j = 0; j < 3; ++j) br[j] = b + std::min(j, nj - 1) * ldbj;
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    acc[i][0] = _mm512_setzero_ps();
    acc[i][1] = acc[i][0];
    acc[i][2] = acc[i][0];
  }
}

// ... and the epilogue: one horizontal sum per (row < mi, column < nj).
MOE_TARGET_AVX512 MOE_ALWAYS_INLINE void dot_8x3_end(const __m512 (&acc)[8][3], int64_t mi,
                                                     int64_t nj, float* c, int64_t ldc) {
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    if (i < mi) {
      float* ci = c + i * ldc;
      ci[0] = _mm512_reduce_add_ps(acc[i][0]);
      if (nj > 1) ci[1] = _mm512_reduce_add_ps(acc[i][1]);
      if (nj > 2) ci[2] = _mm512_reduce_add_ps(acc[i][2]);
    }
  }
}

// C[i, j] = sum_p A[i, p] B[j, p] for i < 8 (rows past mi repeat row mi-1 and are not stored),
// j < 3 (same for nj). Sums run over 16 lanes in p order, then one horizontal reduction.
template <typename scalar_t>
MOE_TARGET_AVX512 void dot_8x3(int64_t k, const float* a, int64_t lda, int64_t mi,
                               const scalar_t* b, int64_t ldbj, int64_t nj, float* c, int64_t ldc,
                               const scalar_t* pf) {
  const float* ar[8];
  const scalar_t* br[3];
  __m512 acc[8][3];
  dot_8x3_begin(a, lda, mi, b, ldbj, nj, ar, br, acc);
  const int64_t k16 = k / 16 * 16;
  for (int64_t p = 0; p < k16; p += 16) {
    if (pf != nullptr) {
      // The next 3 rows of b (see dot_gemm), one line ahead per row and iteration.
      __builtin_prefetch(pf + p, 0, 2);
      __builtin_prefetch(pf + ldbj + p, 0, 2);
      __builtin_prefetch(pf + 2 * ldbj + p, 0, 2);
    }
    const __m512 b0 = load16_as_float(br[0] + p, 0xFFFF);
    const __m512 b1 = load16_as_float(br[1] + p, 0xFFFF);
    const __m512 b2 = load16_as_float(br[2] + p, 0xFFFF);
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
      const __m512 av = _mm512_loadu_ps(ar[i] + p);
      acc[i][0] = _mm512_fmadd_ps(av, b0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(av, b1, acc[i][1]);
      acc[i][2] = _mm512_fmadd_ps(av, b2, acc[i][2]);
    }
  }
  for (int64_t p = k16; p < k; p += 16) {
    const __mmask16 km = strip_mask(k - p);
    const __m512 b0 = load16_as_float(br[0] + p, km);
    const __m512 b1 = load16_as_float(br[1] + p, km);
    const __m512 b2 = load16_as_float(br[2] + p, km);
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
      const __m512 av = _mm512_maskz_loadu_ps(km, ar[i] + p);
      acc[i][0] = _mm512_fmadd_ps(av, b0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(av, b1, acc[i][1]);
      acc[i][2] = _mm512_fmadd_ps(av, b2, acc[i][2]);
    }
  }
  dot_8x3_end(acc, mi, nj, c, ldc);
}
#endif

// Runs the dot-product kernel when it applies; false means the caller uses tile_gemm.
template <typename scalar_t>
bool dot_gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
              const BView<scalar_t>& b, float* c, int64_t ldc) {
#if MOE_GG_X86
  if (b.sk == 1 && gemm_isa() == Isa::kAvx2) {
    dot_gemm_avx2(m, n, k, a, lda, b.ptr, b.sn, c, ldc);
    return true;
  }
  if (b.sk == 1 && gemm_isa() == Isa::kAvx512) {
    // b rows j..j+2 stay in L1 while all row blocks of A sweep over them.
    for (int64_t j = 0; j < n; j += 3) {
      for (int64_t i = 0; i < m; i += 8) {
        // The first row block prefetches the next 3 rows of b: b streams from DRAM and 3
        // concurrent row streams alone do not keep enough reads in flight.
        const scalar_t* pf = (i == 0 && j + 3 < n) ? b.ptr + (j + 3) * b.sn : nullptr;
        dot_8x3(k, a + i * lda, lda, std::min<int64_t>(8, m - i), b.ptr + j * b.sn, b.sn,
                std::min<int64_t>(3, n - j), c + i * ldc + j, ldc, pf);
      }
    }
    return true;
  }
#endif
  return false;
}

}  // namespace
}  // namespace moe_framework
