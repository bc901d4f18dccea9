// The fused pass for a few queries (<= kFusedMaxQueries) against an fp32/fp64 bank: each bank
// row is read once for its norm and its dot products (baseline, AVX2 and AVX-512 builds).
#pragma once

#include "normalize.h"

namespace moe_framework {
namespace {

// ---------------------------------------------------------------------------------------------
// A few queries against an fp32/fp64 bank: one fused pass per bank row computes its squared norm
// and its dot products with every query, so the row is read from memory once (the GEMM path
// would read each block twice, for the norms and for a matrix-vector product).
//
// The loop is compiled twice, for baseline x86-64 and with target("avx2"), picked at run time.
// FMA is deliberately not enabled: both builds round every product and sum the same way, so the
// results are bitwise identical whichever build runs (MOE_FRAMEWORK_CPU_BASELINE=1 forces the
// baseline build; a test compares both).

constexpr int64_t kFusedMaxQueries = 4;

// 32 bytes of T as one GCC vector: 8 floats or 4 doubles; two AVX or four SSE registers' work.
template <typename T>
struct Vec32;
template <>
struct Vec32<float> {
  typedef float type __attribute__((vector_size(32)));
  static constexpr int lanes = 8;
};
template <>
struct Vec32<double> {
  typedef double type __attribute__((vector_size(32)));
  static constexpr int lanes = 4;
};

// Vectors pass by reference: returning or passing them by value would change the ABI between the
// baseline and AVX2 builds (-Wpsabi).
template <typename V>
MOE_ALWAYS_INLINE void load_vec(V& v, const void* p) {
  std::memcpy(&v, p, sizeof(V));
}

template <typename T, typename V>
MOE_ALWAYS_INLINE T lane_sum(const V& v) {
  T out = T(0);
  for (int l = 0; l < static_cast<int>(sizeof(V) / sizeof(T)); ++l) out += v[l];
  return out;
}

// The end of a fused row: scores from the row's squared norm `ss` and raw dot products, offered to
// the heaps. False when the row has no direction.
template <int kQ, typename T>
MOE_ALWAYS_INLINE bool fused_row_offer(T ss, const T* dot, const T* qn, const T* x, int64_t d,
                                       int64_t k, int64_t row, T* floor_score, T* hs, int64_t* hi,
                                       int64_t* sizes) {
  T score[kQ];
  if (norm_ok(ss) && ss >= std::numeric_limits<T>::min()) {
    const T inv = static_cast<T>(inv_norm(static_cast<double>(ss)));
    for (int i = 0; i < kQ; ++i) score[i] = clamp_cosine(dot[i] * inv);
  } else {
    // squares over/underflow T (or the row is bad): redo this row in fp64
    const double ss64 = sum_of_squares<double>(x, d);
    if (!norm_ok(ss64)) return false;
    const double inv = inv_norm(ss64);
    for (int i = 0; i < kQ; ++i) {
      double dd = 0.0;
      for (int64_t jj = 0; jj < d; ++jj) {
        dd += static_cast<double>(qn[i * d + jj]) * static_cast<double>(x[jj]);
      }
      score[i] = static_cast<T>(clamp_cosine(dd * inv));
    }
  }
  for (int i = 0; i < kQ; ++i) {
    if (score[i] >= floor_score[i]) {
      topk_push(hs + i * k, hi + i * k, sizes[i], k, score[i], row);
      if (sizes[i] == k) floor_score[i] = hs[i * k];
    }
  }
  return true;
}

// Rows [c0, c1) of bank against kQ normalised queries: heaps of query i at (hs + i*k, hi + i*k,
// sizes[i]). Returns the first row without a direction, or -1.
template <int kQ, typename T>
MOE_ALWAYS_INLINE int64_t fused_rows_impl(const T* qn, const T* bank, int64_t stride, int64_t c0,
                                          int64_t c1, int64_t d, int64_t k, T* hs, int64_t* hi,
                                          int64_t* sizes) {
  using V = typename Vec32<T>::type;
  constexpr int W = Vec32<T>::lanes;
  T floor_score[kQ];
  for (int i = 0; i < kQ; ++i) {
    floor_score[i] = sizes[i] < k ? -std::numeric_limits<T>::infinity() : hs[i * k];
  }
  for (int64_t row = c0; row < c1; ++row) {
    const T* x = bank + row * stride;
    // two interleaved accumulator sets halve the add latency chain
    V ss0 = {}, ss1 = {};
    V dot0[kQ] = {}, dot1[kQ] = {};
    int64_t j = 0;
    for (; j + 2 * W <= d; j += 2 * W) {
      V a, b, qa, qb;
      load_vec(a, x + j);
      load_vec(b, x + j + W);
      ss0 += a * a;
      ss1 += b * b;
      for (int i = 0; i < kQ; ++i) {
        load_vec(qa, qn + i * d + j);
        load_vec(qb, qn + i * d + j + W);
        dot0[i] += qa * a;
        dot1[i] += qb * b;
      }
    }
    ss0 += ss1;
    T ss = lane_sum<T>(ss0);
    T dot[kQ];
    for (int i = 0; i < kQ; ++i) {
      dot0[i] += dot1[i];
      dot[i] = lane_sum<T>(dot0[i]);
    }
    for (; j < d; ++j) {
      ss += x[j] * x[j];
      for (int i = 0; i < kQ; ++i) dot[i] += qn[i * d + j] * x[j];
    }
    if (!fused_row_offer<kQ, T>(ss, dot, qn, x, d, k, row, floor_score, hs, hi, sizes)) return row;
  }
  return -1;
}

template <int kQ, typename T>
int64_t fused_rows_baseline(const T* qn, const T* bank, int64_t stride, int64_t c0, int64_t c1,
                            int64_t d, int64_t k, T* hs, int64_t* hi, int64_t* sizes) {
  return fused_rows_impl<kQ, T>(qn, bank, stride, c0, c1, d, k, hs, hi, sizes);
}

#if MOE_CPU_AVX2_CLONE
template <int kQ, typename T>
MOE_TARGET_AVX2 int64_t fused_rows_avx2(const T* qn, const T* bank, int64_t stride, int64_t c0,
                                        int64_t c1, int64_t d, int64_t k, T* hs, int64_t* hi,
                                        int64_t* sizes) {
  return fused_rows_impl<kQ, T>(qn, bank, stride, c0, c1, d, k, hs, hi, sizes);
}
#endif

// A bank streamed from memory: one core's demand misses plus the hardware prefetcher leave
// bandwidth unused, so the pass also requests the row kPrefetchRows ahead. Measured (interleaved,
// one thread, 1M x 384): ~10% faster at distance 4 (8, 16, 32 and L2 hints: no gain). A bank that
// fits in the last-level cache gets slower with it (-15% at 10k rows), hence the size limit.
constexpr int64_t kPrefetchRows = 4;
constexpr int64_t kPrefetchMinBankBytes = int64_t{64} << 20;

// The measurement above is from a CPU that runs AVX-512 at full width (Zen 5 class). On a Zen 4
// EPYC the same prefetch makes the scan slower: 1M x 384, q = 1, 1 thread, interleaved with
// FAISS: 71-72 ms with it (0.82x FAISS), 50-58 ms without (1.14-1.24x FAISS; the hardware
// prefetcher alone reaches the DRAM triad there). CPUs of AMD family 19h (Zen 3 and Zen 4; only
// Zen 4 runs this AVX-512 pass; GCC's __builtin_cpu_is) therefore skip it. Prefetching never
// changes the result.
bool bank_prefetch_helps() {
#if MOE_CPU_AVX2_CLONE
  static const bool helps = !__builtin_cpu_is("amdfam19h");
  return helps;
#else
  return false;
#endif
}

#if MOE_CPU_AVX2_CLONE
// Sum of the 16 lanes (a fixed tree). The maskz shuffles: GCC 12 warns about the undefined
// pass-through operand of the unmasked forms (and of _mm512_reduce_add_ps).
MOE_TARGET_AVX512 MOE_ALWAYS_INLINE float lane_sum_avx512(__m512 v) {
  v = _mm512_add_ps(v, _mm512_maskz_shuffle_f32x4(0xFFFF, v, v, 0x4E));
  v = _mm512_add_ps(v, _mm512_maskz_shuffle_f32x4(0xFFFF, v, v, 0xB1));
  v = _mm512_add_ps(v, _mm512_maskz_permute_ps(0xFFFF, v, 0x4E));
  v = _mm512_add_ps(v, _mm512_maskz_permute_ps(0xFFFF, v, 0xB1));
  return _mm512_cvtss_f32(v);
}

// The same pass for fp32 with AVX-512 FMA: 4 x 16 lanes per step, so 4 (kQ + 1) independent FMA
// chains hide the FMA latency; the d % 16 tail is a masked load (no scalar loop). Its sums are
// rounded differently from the baseline/AVX2 builds (FMA, other lane split): close, not bitwise.
template <int kQ>
MOE_TARGET_AVX512 int64_t fused_rows_avx512(const float* qn, const float* bank, int64_t stride,
                                            int64_t c0, int64_t c1, int64_t d, int64_t k, float* hs,
                                            int64_t* hi, int64_t* sizes, bool prefetch) {
  constexpr int U = 4;
  float floor_score[kQ];
  for (int i = 0; i < kQ; ++i) {
    floor_score[i] = sizes[i] < k ? -std::numeric_limits<float>::infinity() : hs[i * k];
  }
  for (int64_t row = c0; row < c1; ++row) {
    const float* x = bank + row * stride;
    if (prefetch && row + kPrefetchRows < c1) {
      const char* ahead = reinterpret_cast<const char*>(x + kPrefetchRows * stride);
      for (int64_t off = 0; off < d * 4; off += 64) _mm_prefetch(ahead + off, _MM_HINT_T0);
    }
    __m512 ss[U], dot[kQ][U];
    for (int u = 0; u < U; ++u) {
      ss[u] = _mm512_setzero_ps();
      for (int i = 0; i < kQ; ++i) dot[i][u] = _mm512_setzero_ps();
    }
    int64_t j = 0;
    for (; j + 16 * U <= d; j += 16 * U) {
      for (int u = 0; u < U; ++u) {
        const __m512 a = _mm512_loadu_ps(x + j + 16 * u);
        ss[u] = _mm512_fmadd_ps(a, a, ss[u]);
        for (int i = 0; i < kQ; ++i) {
          dot[i][u] = _mm512_fmadd_ps(_mm512_loadu_ps(qn + i * d + j + 16 * u), a, dot[i][u]);
        }
      }
    }
    for (; j < d; j += 16) {
      const __mmask16 m =
          d - j >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (d - j)) - 1);
      const __m512 a = _mm512_maskz_loadu_ps(m, x + j);
      ss[0] = _mm512_fmadd_ps(a, a, ss[0]);
      for (int i = 0; i < kQ; ++i) {
        dot[i][0] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, qn + i * d + j), a, dot[i][0]);
      }
    }
    const float sst =
        lane_sum_avx512(_mm512_add_ps(_mm512_add_ps(ss[0], ss[1]), _mm512_add_ps(ss[2], ss[3])));
    float dt[kQ];
    for (int i = 0; i < kQ; ++i) {
      dt[i] = lane_sum_avx512(
          _mm512_add_ps(_mm512_add_ps(dot[i][0], dot[i][1]), _mm512_add_ps(dot[i][2], dot[i][3])));
    }
    if (!fused_row_offer<kQ, float>(sst, dt, qn, x, d, k, row, floor_score, hs, hi, sizes)) {
      return row;
    }
  }
  return -1;
}
#endif

// Queries [0, nq) (nq <= kFusedMaxQueries; their heaps are consecutive in hs/hi/sizes).
// prefetch: the bank does not fit in cache (AVX-512 pass only).
template <typename T>
int64_t fused_rows(const T* qn, int64_t nq, const T* bank, int64_t stride, int64_t c0, int64_t c1,
                   int64_t d, int64_t k, T* hs, int64_t* hi, int64_t* sizes, bool prefetch) {
#if MOE_CPU_AVX2_CLONE
  if constexpr (std::is_same_v<T, float>) {
    if (use_avx512()) {
      switch (nq) {
        case 1:
          return fused_rows_avx512<1>(qn, bank, stride, c0, c1, d, k, hs, hi, sizes, prefetch);
        case 2:
          return fused_rows_avx512<2>(qn, bank, stride, c0, c1, d, k, hs, hi, sizes, prefetch);
        case 3:
          return fused_rows_avx512<3>(qn, bank, stride, c0, c1, d, k, hs, hi, sizes, prefetch);
        default:
          return fused_rows_avx512<4>(qn, bank, stride, c0, c1, d, k, hs, hi, sizes, prefetch);
      }
    }
  }
  const bool avx2 = use_avx2();
#define MOE_SIM_FUSED(Q)                                                             \
  return avx2 ? fused_rows_avx2<Q, T>(qn, bank, stride, c0, c1, d, k, hs, hi, sizes) \
              : fused_rows_baseline<Q, T>(qn, bank, stride, c0, c1, d, k, hs, hi, sizes)
#else
  (void)prefetch;
#define MOE_SIM_FUSED(Q) \
  return fused_rows_baseline<Q, T>(qn, bank, stride, c0, c1, d, k, hs, hi, sizes)
#endif
  switch (nq) {
    case 1:
      MOE_SIM_FUSED(1);
    case 2:
      MOE_SIM_FUSED(2);
    case 3:
      MOE_SIM_FUSED(3);
    default:
      MOE_SIM_FUSED(4);
  }
#undef MOE_SIM_FUSED
}

}  // namespace
}  // namespace moe_framework
