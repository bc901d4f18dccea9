// Packing of B into fp32 panels (row by row with conversion, or transposed 16x16 in registers for
// b^T), and tile_gemm, the packed-panel path: pack a k block, run the register tiles over it.
#pragma once

#include "fp32_tiles.h"

namespace moe_framework {
namespace {

// Tile driver: C[m x n] = A[m x k] * B[k x n] for one work tile, blocked by kKC over k.
// A is fp32 with strides (rsa, csa). B (any dtype and strides) is packed per k block into a
// row-major fp32 panel: the copy streams B row by row (what the hardware prefetcher follows, and
// small groups are bound by streaming B from memory), and the padded panel stride keeps the
// micro-kernel's walk down a column strip from aliasing into a few L1 sets (reading B in place
// would walk it with its power-of-two row stride).

template <typename scalar_t>
struct BView {
  const scalar_t* ptr;
  int64_t sk, sn;  // strides of B(p, j) along p and j
};

// Convert n elements of a row of B into fp32 at dst.
template <typename scalar_t>
void pack_row_scalar(const scalar_t* row, int64_t n, float* dst) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(row[j]);
}

#if MOE_GG_X86
// 8 elements of a row as 8 floats (bf16: shift into the high half; fp16: F16C conversion).
template <typename scalar_t>
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8_as_float(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return _mm256_loadu_ps(p);
  } else if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
  } else {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
}

template <typename scalar_t>
__attribute__((target("avx2,fma,f16c"))) void pack_row_avx2(const scalar_t* row, int64_t n,
                                                            float* dst) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(dst + j, load8_as_float(row + j));
  for (; j < n; ++j) dst[j] = static_cast<float>(row[j]);
}

#endif

template <typename scalar_t>
void pack_row(const scalar_t* row, int64_t n, float* dst) {
#if MOE_GG_X86
  if (gemm_isa() != Isa::kScalar) return pack_row_avx2(row, n, dst);
#endif
  pack_row_scalar(row, n, dst);
}

// Row stride of a packed panel of n columns: a multiple of 8 floats (32-byte rows) that is not a
// multiple of 1 KiB, so walking a column strip down the panel does not alias into few L1 sets.
inline int64_t panel_ld(int64_t n) {
  const int64_t ld = ceil_div(n, 8) * 8;
  return (ld % 256 == 0) ? ld + 8 : ld;
}

#if MOE_GG_X86
// In-register transpose of a 16x16 fp32 block: r[i] holds row i on entry, column i on exit.
// Three shuffle stages: 2x2 (unpack), 4x4 within 128-bit lanes, then two lane shuffles.
MOE_TARGET_AVX512 inline void transpose16(__m512 r[16]) {
  __m512 t[16];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // r[4g + q], lane L: rows 4g..4g+3 of column 4L + q.
#pragma GCC unroll 4
  for (int g = 0; g < 4; ++g) {
    r[4 * g] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0x44);
    r[4 * g + 1] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0xEE);
    r[4 * g + 2] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
    r[4 * g + 3] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xEE);
  }
#pragma GCC unroll 4
  for (int q = 0; q < 4; ++q) {
    // Lanes (0, 2 | 1, 3) of the row groups (0, 1) and (2, 3), then gathered across groups.
    const __m512 u0 = _mm512_shuffle_f32x4(r[q], r[4 + q], 0x88);
    const __m512 u1 = _mm512_shuffle_f32x4(r[q], r[4 + q], 0xDD);
    const __m512 u2 = _mm512_shuffle_f32x4(r[8 + q], r[12 + q], 0x88);
    const __m512 u3 = _mm512_shuffle_f32x4(r[8 + q], r[12 + q], 0xDD);
    t[q] = _mm512_shuffle_f32x4(u0, u2, 0x88);       // column q
    t[8 + q] = _mm512_shuffle_f32x4(u0, u2, 0xDD);   // column 8 + q
    t[4 + q] = _mm512_shuffle_f32x4(u1, u3, 0x88);   // column 4 + q
    t[12 + q] = _mm512_shuffle_f32x4(u1, u3, 0xDD);  // column 12 + q
  }
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// Transposing pack of an fp32 b^T block: panel[p * ldp + j] = b[j * ldbj + p] for p < kc, j < n.
// 16 rows of b are read along p (16 sequential streams) and transposed 16x16 in registers, about
// 0.3 instructions per element instead of a scattered scalar store each.
MOE_TARGET_AVX512 void pack_bt_avx512(const float* b, int64_t ldbj, int64_t kc, int64_t n,
                                      float* panel, int64_t ldp) {
  for (int64_t j = 0; j < n; j += 16) {
    const int64_t nj = std::min<int64_t>(16, n - j);
    const __mmask16 kj = strip_mask(nj);
    for (int64_t p = 0; p < kc; p += 16) {
      const __mmask16 kp = strip_mask(kc - p);
      __m512 r[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) {
        r[i] = i < nj ? _mm512_maskz_loadu_ps(kp, b + (j + i) * ldbj + p) : _mm512_setzero_ps();
      }
      transpose16(r);
      const int64_t np = std::min<int64_t>(16, kc - p);
#pragma GCC unroll 16
      for (int q = 0; q < 16; ++q) {
        if (q < np) _mm512_mask_storeu_ps(panel + (p + q) * ldp + j, kj, r[q]);
      }
    }
  }
}
#endif

// Pack B[k0:k0+kc, 0:n] into the row-major fp32 panel (row stride ldp). Reads and writes both
// run along rows (sequential memory streams) when B has unit column stride.
template <typename scalar_t>
void pack_b(const BView<scalar_t>& b, int64_t k0, int64_t kc, int64_t n, float* panel, int64_t ldp,
            int64_t k) {
  if (b.sn == 1) {
    const int64_t row_bytes = n * static_cast<int64_t>(sizeof(scalar_t));
    for (int64_t p = 0; p < kc; ++p) {
      // The same row of the next k block, prefetched while this one is packed and computed
      // (small groups stream B from DRAM).
      if (k0 + kc + p < k) {
        const char* next = reinterpret_cast<const char*>(b.ptr + (k0 + kc + p) * b.sk);
        for (int64_t o = 0; o < row_bytes; o += 64) __builtin_prefetch(next + o, 0, 2);
      }
      pack_row(b.ptr + (k0 + p) * b.sk, n, panel + p * ldp);
    }
  } else {
#if MOE_GG_X86
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (b.sk == 1 && gemm_isa() == Isa::kAvx512) {
        return pack_bt_avx512(b.ptr + k0, b.sn, kc, n, panel, ldp);
      }
    }
#endif
    // Transposed B: walk the source along its contiguous axis (p) for each column j.
    for (int64_t j = 0; j < n; ++j) {
      const scalar_t* src = b.ptr + j * b.sn + k0 * b.sk;
      for (int64_t p = 0; p < kc; ++p) panel[p * ldp + j] = static_cast<float>(src[p * b.sk]);
    }
  }
}

template <typename scalar_t>
void tile_gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t rsa, int64_t csa,
               const BView<scalar_t>& b, float* c, int64_t ldc, std::vector<float>& panel) {
  if (k == 0) {
    for (int64_t i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + n, 0.f);
    return;
  }
  const int64_t ldp = panel_ld(n);
  // Panel depth: the packed panel (kc x ldp floats) stays within kPanelBytes (L2).
  const int64_t kcb = std::clamp<int64_t>(kPanelBytes / (4 * ldp), 16, kKC);
  panel.resize(static_cast<size_t>(kcb * ldp));
  for (int64_t k0 = 0; k0 < k; k0 += kcb) {
    const int64_t kc = std::min(kcb, k - k0);
    pack_b(b, k0, kc, n, panel.data(), ldp, k);
    const int64_t mr = tile_rows(), nr = tile_cols();
    for (int64_t j = 0; j < n; j += nr) {
      for (int64_t i = 0; i < m; i += mr) {
        micro(MicroArgs{kc, a + i * rsa + k0 * csa, rsa, csa, panel.data() + j, ldp,
                        c + i * ldc + j, ldc, std::min(mr, m - i), std::min(nr, n - j), k0 > 0});
      }
    }
  }
}

}  // namespace
}  // namespace moe_framework
