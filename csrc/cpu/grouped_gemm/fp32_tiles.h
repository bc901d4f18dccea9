// fp32 register tiles: the micro-kernels every fp32 path ends in (a scalar loop, the AVX2+FMA
// kMR x kNR tile and the AVX-512 kMR512 x kNR512 tile), and micro(), which runs the one gemm_isa()
// picked.
#pragma once

#include "tuning.h"

namespace moe_framework {
namespace {

// Micro-kernels: C[mr x nr] (+)= sum_p A(i, p) * B(p, j) for p in [0, kc), in p order.
// A(i, p) = A[i * rsa + p * csa] (any strides); B(p, j) = B[p * ldb + j] (unit column stride);
// C row stride ldc. `accumulate` adds to C instead of overwriting it.

struct MicroArgs {
  int64_t kc;
  const float* a;
  int64_t rsa, csa;
  const float* b;
  int64_t ldb;
  float* c;
  int64_t ldc;
  int64_t mr, nr;
  bool accumulate;
};

void micro_scalar(const MicroArgs& x) {
  float acc[kMR][kNR] = {};
  for (int64_t p = 0; p < x.kc; ++p) {
    const float* brow = x.b + p * x.ldb;
    for (int64_t i = 0; i < x.mr; ++i) {
      const float av = x.a[i * x.rsa + p * x.csa];
      for (int64_t j = 0; j < x.nr; ++j) acc[i][j] += av * brow[j];
    }
  }
  for (int64_t i = 0; i < x.mr; ++i) {
    float* crow = x.c + i * x.ldc;
    for (int64_t j = 0; j < x.nr; ++j) crow[j] = x.accumulate ? crow[j] + acc[i][j] : acc[i][j];
  }
}

#if MOE_GG_X86
// Lane masks for the last, partial column strip: lanes < n are on.
__attribute__((target("avx2"))) inline __m256i lane_mask(int64_t n) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::clamp<int64_t>(n, 0, 8))), idx);
}

// Accumulators are named variables, not an array: GCC keeps an array of __m256 on the stack and
// spills it every iteration.
template <bool kFull>
__attribute__((target("avx2,fma"))) inline void load_b3(const float* bp, __m256i m0, __m256i m1,
                                                        __m256i m2, __m256& b0, __m256& b1,
                                                        __m256& b2) {
  if constexpr (kFull) {
    b0 = _mm256_loadu_ps(bp);
    b1 = _mm256_loadu_ps(bp + 8);
    b2 = _mm256_loadu_ps(bp + 16);
  } else {
    // Masked loads never touch memory past the last column.
    b0 = _mm256_maskload_ps(bp, m0);
    b1 = _mm256_maskload_ps(bp + 8, m1);
    b2 = _mm256_maskload_ps(bp + 16, m2);
  }
}

template <bool kFull>
__attribute__((target("avx2,fma"))) inline void store_c3(float* cp, bool accumulate, __m256i m0,
                                                         __m256i m1, __m256i m2, __m256 c0,
                                                         __m256 c1, __m256 c2) {
  if constexpr (kFull) {
    if (accumulate) {
      c0 = _mm256_add_ps(c0, _mm256_loadu_ps(cp));
      c1 = _mm256_add_ps(c1, _mm256_loadu_ps(cp + 8));
      c2 = _mm256_add_ps(c2, _mm256_loadu_ps(cp + 16));
    }
    _mm256_storeu_ps(cp, c0);
    _mm256_storeu_ps(cp + 8, c1);
    _mm256_storeu_ps(cp + 16, c2);
  } else {
    if (accumulate) {
      c0 = _mm256_add_ps(c0, _mm256_maskload_ps(cp, m0));
      c1 = _mm256_add_ps(c1, _mm256_maskload_ps(cp + 8, m1));
      c2 = _mm256_add_ps(c2, _mm256_maskload_ps(cp + 16, m2));
    }
    _mm256_maskstore_ps(cp, m0, c0);
    _mm256_maskstore_ps(cp + 8, m1, c1);
    _mm256_maskstore_ps(cp + 16, m2, c2);
  }
}

template <int MR, bool kFull>
__attribute__((target("avx2,fma"))) void micro_avx2(const MicroArgs& x) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c02 = c00, c10 = c00, c11 = c00, c12 = c00;
  __m256 c20 = c00, c21 = c00, c22 = c00, c30 = c00, c31 = c00, c32 = c00;
  const __m256i m0 = lane_mask(x.nr), m1 = lane_mask(x.nr - 8), m2 = lane_mask(x.nr - 16);
  const int64_t kc = x.kc, ldb = x.ldb, rsa = x.rsa, csa = x.csa;
  const float* bp = x.b;
  const float* ap = x.a;
  for (int64_t p = 0; p < kc; ++p, bp += ldb, ap += csa) {
    __m256 b0, b1, b2;
    load_b3<kFull>(bp, m0, m1, m2, b0, b1, b2);
    __m256 av = _mm256_broadcast_ss(ap);
    c00 = _mm256_fmadd_ps(av, b0, c00);
    c01 = _mm256_fmadd_ps(av, b1, c01);
    c02 = _mm256_fmadd_ps(av, b2, c02);
    if constexpr (MR > 1) {
      av = _mm256_broadcast_ss(ap + rsa);
      c10 = _mm256_fmadd_ps(av, b0, c10);
      c11 = _mm256_fmadd_ps(av, b1, c11);
      c12 = _mm256_fmadd_ps(av, b2, c12);
    }
    if constexpr (MR > 2) {
      av = _mm256_broadcast_ss(ap + 2 * rsa);
      c20 = _mm256_fmadd_ps(av, b0, c20);
      c21 = _mm256_fmadd_ps(av, b1, c21);
      c22 = _mm256_fmadd_ps(av, b2, c22);
    }
    if constexpr (MR > 3) {
      av = _mm256_broadcast_ss(ap + 3 * rsa);
      c30 = _mm256_fmadd_ps(av, b0, c30);
      c31 = _mm256_fmadd_ps(av, b1, c31);
      c32 = _mm256_fmadd_ps(av, b2, c32);
    }
  }
  float* cp = x.c;
  store_c3<kFull>(cp, x.accumulate, m0, m1, m2, c00, c01, c02);
  if constexpr (MR > 1) store_c3<kFull>(cp + x.ldc, x.accumulate, m0, m1, m2, c10, c11, c12);
  if constexpr (MR > 2) store_c3<kFull>(cp + 2 * x.ldc, x.accumulate, m0, m1, m2, c20, c21, c22);
  if constexpr (MR > 3) store_c3<kFull>(cp + 3 * x.ldc, x.accumulate, m0, m1, m2, c30, c31, c32);
}

template <bool kFull>
void micro_avx2_rows(const MicroArgs& x) {
  with_tile_rows<4>(x.mr, [&](auto r) { micro_avx2<decltype(r)::value, kFull>(x); });
}

// AVX-512 register tile: up to kMR512 rows x kNR512 columns (3 zmm), 24 zmm accumulators held in
// registers (the array is indexed with constants only after unrolling; checked in the assembly:
// no spills). Same contract as micro_avx2; masked loads/stores handle the last column strip.
//
// The tile itself: C[MR x nr] (+)= A[MR x k] B[k x nr], A(i, p) = a[i * rsa + p * csa], B rows
// ldb apart with unit column stride. For p < kpf it prefetches B kDirectPrefetch rows ahead (the
// direct kernel streams B from memory; packed panels pass kpf = 0).
template <int MR, bool kFull>
MOE_TARGET_AVX512 void tile_avx512(int64_t k, const float* a, int64_t rsa, int64_t csa,
                                   const float* b, int64_t ldb, float* c, int64_t ldc, int64_t nr,
                                   bool accumulate, int64_t kpf) {
  __m512 acc[MR][3];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    acc[i][0] = _mm512_setzero_ps();
    acc[i][1] = acc[i][0];
    acc[i][2] = acc[i][0];
  }
  const __mmask16 k0 = strip_mask(nr), k1 = strip_mask(nr - 16), k2 = strip_mask(nr - 32);
  const int64_t pfo = kDirectPrefetch * ldb;
  const float* bp = b;
  const float* ap = a;
  for (int64_t p = 0; p < k; ++p, bp += ldb, ap += csa) {
    if (p < kpf) {
      const char* f = reinterpret_cast<const char*>(bp + pfo);
      _mm_prefetch(f, kStreamHint);
      _mm_prefetch(f + 64, kStreamHint);
      _mm_prefetch(f + 128, kStreamHint);
      _mm_prefetch(f + 188, kStreamHint);  // the 4th line a misaligned strip touches
    }
    __m512 b0, b1, b2;
    if constexpr (kFull) {
      b0 = _mm512_loadu_ps(bp);
      b1 = _mm512_loadu_ps(bp + 16);
      b2 = _mm512_loadu_ps(bp + 32);
    } else {
      b0 = _mm512_maskz_loadu_ps(k0, bp);
      b1 = _mm512_maskz_loadu_ps(k1, bp + 16);
      b2 = _mm512_maskz_loadu_ps(k2, bp + 32);
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512 av = _mm512_set1_ps(ap[i * rsa]);
      acc[i][0] = _mm512_fmadd_ps(av, b0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(av, b1, acc[i][1]);
      acc[i][2] = _mm512_fmadd_ps(av, b2, acc[i][2]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    float* cp = c + i * ldc;
    if constexpr (kFull) {
      if (accumulate) {
        acc[i][0] = _mm512_add_ps(acc[i][0], _mm512_loadu_ps(cp));
        acc[i][1] = _mm512_add_ps(acc[i][1], _mm512_loadu_ps(cp + 16));
        acc[i][2] = _mm512_add_ps(acc[i][2], _mm512_loadu_ps(cp + 32));
      }
      _mm512_storeu_ps(cp, acc[i][0]);
      _mm512_storeu_ps(cp + 16, acc[i][1]);
      _mm512_storeu_ps(cp + 32, acc[i][2]);
    } else {
      if (accumulate) {
        acc[i][0] = _mm512_add_ps(acc[i][0], _mm512_maskz_loadu_ps(k0, cp));
        acc[i][1] = _mm512_add_ps(acc[i][1], _mm512_maskz_loadu_ps(k1, cp + 16));
        acc[i][2] = _mm512_add_ps(acc[i][2], _mm512_maskz_loadu_ps(k2, cp + 32));
      }
      _mm512_mask_storeu_ps(cp, k0, acc[i][0]);
      _mm512_mask_storeu_ps(cp + 16, k1, acc[i][1]);
      _mm512_mask_storeu_ps(cp + 32, k2, acc[i][2]);
    }
  }
}

template <int MR, bool kFull>
MOE_TARGET_AVX512 void micro_avx512(const MicroArgs& x) {
  tile_avx512<MR, kFull>(x.kc, x.a, x.rsa, x.csa, x.b, x.ldb, x.c, x.ldc, x.nr, x.accumulate, 0);
}

template <bool kFull>
void micro_avx512_rows(const MicroArgs& x) {
  with_tile_rows<8>(x.mr, [&](auto r) { micro_avx512<decltype(r)::value, kFull>(x); });
}
#endif

// Register tile of the micro-kernel that gemm_isa() runs.
inline int64_t tile_rows() {
#if MOE_GG_X86
  if (gemm_isa() == Isa::kAvx512) return kMR512;
#endif
  return kMR;
}
inline int64_t tile_cols() {
#if MOE_GG_X86
  if (gemm_isa() == Isa::kAvx512) return kNR512;
#endif
  return kNR;
}

// One register tile. Both variants sum over p in the same order with fused multiply-adds on the
// AVX2 path and separate ones on the scalar path; a given machine always takes the same one.
inline void micro(const MicroArgs& x) {
#if MOE_GG_X86
  const Isa isa = gemm_isa();
  if (isa == Isa::kAvx512) {
    if (x.nr == kNR512) {
      micro_avx512_rows<true>(x);
    } else {
      micro_avx512_rows<false>(x);
    }
    return;
  }
  if (isa == Isa::kAvx2) {
    if (x.nr == kNR) {
      micro_avx2_rows<true>(x);
    } else {
      micro_avx2_rows<false>(x);
    }
    return;
  }
#endif
  micro_scalar(x);
}

}  // namespace
}  // namespace moe_framework
