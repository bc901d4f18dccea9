// CPU kernels of dedup and kg_search.
//
// Both are one engine: a blocked GEMM of unit-normalised query rows against unit-normalised bank
// rows, each block of scores scanned into a running top-k per query (similarity.h). kg_search is
// the engine with k results per query over bank rows [0, n_valid); dedup is the engine with k = 1
// run on emb against itself, "causally" (row j only sees rows i < j), followed by the threshold.
//
// Memory: the normalised queries ([q, d], like the input), one [NB, d] bank block and one
// [QB, NB] score block per task, and the partial top-k lists. Never [q, N] or n x n x d.
//
// Scores: with AVX-512 (fp32 scores), our own register-tiled GEMM whose epilogue scales and tests
// the scores in registers (score_block_avx512); otherwise BLAS (at::mm) on [QB, d] x [d, NB]
// blocks and a scan of the stored score block, whose candidates are rescored in a fixed order
// (candidate_score: exact ties between equal rows). A few queries (<= kFusedMaxQueries) against an
// fp32/fp64 bank take a fused pass that reads each bank row once (fused_rows).
//
// Work split: queries in fixed blocks of QB rows, bank rows in fixed blocks of NB rows, so every
// score comes out of the same GEMM call shape whatever the thread count. Tasks own a group of query
// blocks x a segment of bank blocks and keep a partial top-k per query; the partial lists merge
// under the total rank order (score desc, id asc), whose top-k is unique: the result does not
// depend on how the work was split.
#include "moe_framework/similarity.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "moe_framework/cpu_isa.h"

#if MOE_CPU_AVX2_CLONE
#include <immintrin.h>
#endif

namespace moe_framework {
namespace {

using namespace similarity;

// Query rows per GEMM call: enough to amortise packing the bank block inside the BLAS.
constexpr int64_t kQueryBlock = 256;
// Bytes of one normalised bank block: small enough to stay in the core's L2 between the
// normalisation pass and the GEMM that reads it (what keeps q = 1 searches memory bound, not
// twice memory bound).
constexpr int64_t kBankBlockBytes = 384 * 1024;
// Parallel tasks per thread of torch's pool: some slack for uneven blocks.
constexpr int64_t kTasksPerThread = 4;
// Multiply-adds below which another task costs more than it saves (~50 us of one core).
constexpr double kMinTaskWork = double(1 << 22);
// Cap on partial top-k entries (all tasks together) before fewer bank segments are used.
constexpr int64_t kMaxPartialEntries = int64_t{1} << 25;

int64_t bank_block_rows(int64_t d, int64_t elem_size) {
  const int64_t rows = kBankBlockBytes / std::max<int64_t>(1, d * elem_size);
  return std::clamp<int64_t>(rows / 16 * 16, 16, 4096);
}

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

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

// S [nq, nb] (row-major, ld nb) = Q [nq, d] (ld d) x B [nb, d]^T (ld ldb), one BLAS call on
// views of the caller's buffers (no copies).
template <typename acc_t>
void scores_gemm(const acc_t* qn, int64_t nq, const acc_t* b, int64_t nb, int64_t ldb, int64_t d,
                 acc_t* s) {
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const at::Tensor qt = at::from_blob(const_cast<acc_t*>(qn), {nq, d}, {d, 1}, opts);
  const at::Tensor bt = at::from_blob(const_cast<acc_t*>(b), {d, nb}, {1, ldb}, opts);
  at::Tensor st = at::from_blob(s, {nq, nb}, {nb, 1}, opts);
  at::mm_out(st, qt, bt);
}

// ---------------------------------------------------------------------------------------------
// Exact ties on the BLAS path. A BLAS GEMM rounds an entry differently depending on where it falls
// in its tiles and on the shape of the call (the last, partial bank block), so two copies of one
// bank row (an `expand`ed bank, duplicated embeddings) could get scores an ulp apart, and a higher
// id could beat a lower one. The BLAS scores therefore only select candidates, with a margin that
// covers their rounding; every candidate's score is recomputed by candidate_score, a fixed-order
// function of the query row and the bank row alone, so equal rows get equal scores and ties go to
// the lowest id wherever the rows sit. (The fused pass and the AVX-512 tiles compute every score
// with one fixed chain already.)

// sum_j q[j] * x[j] over 16 independent partial sums added in a fixed tree (sum_of_squares' order).
// Compiled for baseline x86-64 and AVX2 without FMA: the same operations per lane, so the same
// bits whichever runs.
template <typename T>
MOE_ALWAYS_INLINE T dot_fixed_impl(const T* q, const T* x, int64_t d) {
  constexpr int kLanes = 16;
  T part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) part[l] += q[i + l] * x[i + l];
  }
  for (; i < d; ++i) part[0] += q[i] * x[i];
  for (int w = kLanes / 2; w > 0; w /= 2) {
    for (int l = 0; l < w; ++l) part[l] += part[l + w];
  }
  return part[0];
}

template <typename T>
T dot_fixed_baseline(const T* q, const T* x, int64_t d) {
  return dot_fixed_impl(q, x, d);
}

#if MOE_CPU_AVX2_CLONE
template <typename T>
MOE_TARGET_AVX2 T dot_fixed_avx2(const T* q, const T* x, int64_t d) {
  return dot_fixed_impl(q, x, d);
}
#endif

template <typename T>
T dot_fixed(const T* q, const T* x, int64_t d) {
#if MOE_CPU_AVX2_CLONE
  if (use_avx2()) return dot_fixed_avx2(q, x, d);
#endif
  return dot_fixed_baseline(q, x, d);
}

// Bound on |BLAS score - candidate_score|: both are dot products of (nearly) unit rows, each within
// gamma_d = d u / (1 - d u) of the exact value in any summation order, plus the rounding of the
// row's scale; twice that with room to spare.
template <typename T>
T rescore_margin(int64_t d) {
  return static_cast<T>(2 * d + 8) * std::numeric_limits<T>::epsilon();
}

// The score of bank row `row` for the normalised query qrow, from the two rows only: rows already
// normalised (dedup) directly; rows whose squared norm is a normal number as the raw dot product
// times their scale, static_cast<acc_t>(inv_norm(sum_of_squares)) (`scale` when the caller has it
// already, else 0); others through a normalised copy in tmp [d] (normalize_rows). The caller has
// checked that the row has a direction.
template <typename scalar_t, typename acc_t>
acc_t candidate_score(const acc_t* qrow, const scalar_t* bank, int64_t bank_stride,
                      bool bank_normalized, int64_t row, int64_t d, acc_t scale, acc_t* tmp) {
  if (bank_normalized) {
    return dot_fixed(qrow, reinterpret_cast<const acc_t*>(bank) + row * bank_stride, d);
  }
  const scalar_t* x = bank + row * bank_stride;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (scale > acc_t(0)) return dot_fixed(qrow, x, d) * scale;
    const acc_t ss = sum_of_squares<acc_t>(x, d);
    if (norm_ok(ss) && ss >= std::numeric_limits<acc_t>::min()) {
      return dot_fixed(qrow, x, d) * static_cast<acc_t>(inv_norm(ss));
    }
  }
  normalize_rows(bank, bank_stride, row, row + 1, d, tmp);
  return dot_fixed(qrow, tmp, d);
}

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

// How the (query block x bank block) grid is cut into tasks. Query blocks [qgroup[g], qgroup[g+1])
// form group g; bank blocks [segment[s], segment[s+1]) form segment s; task t = g * segs + s.
struct Plan {
  int64_t query_block = kQueryBlock;
  int64_t bank_block = 0;
  std::vector<int64_t> qgroup;
  std::vector<int64_t> segment;
  int64_t groups() const { return static_cast<int64_t>(qgroup.size()) - 1; }
  int64_t segs() const { return static_cast<int64_t>(segment.size()) - 1; }
};

// Tasks for `work` multiply-adds: a few per thread of torch's pool, none smaller than
// kMinTaskWork (small searches run inline, without waking the pool). Past one task per thread, a
// multiple of the thread count, so that equal tasks keep every thread equally busy.
int64_t task_target(double work) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const double by_work = std::max(1.0, std::floor(work / kMinTaskWork));
  int64_t t = std::max<int64_t>(1, std::min<int64_t>(kTasksPerThread * threads,
                                                     static_cast<int64_t>(std::min(by_work, 1e9))));
  if (t > threads) t -= t % threads;
  return t;
}

std::vector<int64_t> even_bounds(int64_t items, int64_t parts) {
  std::vector<int64_t> b(static_cast<size_t>(parts + 1));
  for (int64_t p = 0; p <= parts; ++p) b[p] = items * p / parts;
  return b;
}

// kg_search: bank segments first (they parallelise any q, including q = 1), query groups when
// the bank is too small to feed every thread.
Plan plan_search(int64_t q, int64_t nv, int64_t k, int64_t elem_size, int64_t d) {
  Plan p;
  p.bank_block = bank_block_rows(d, elem_size);
  const int64_t qblocks = ceil_div(q, p.query_block);
  const int64_t bblocks = ceil_div(nv, p.bank_block);
  // The fused pass (q <= kFusedMaxQueries) is bound by reading the bank: its cost per row is
  // about that of kFusedMaxQueries queries' multiply-adds.
  const double q_cost = static_cast<double>(std::max(q, kFusedMaxQueries));
  const int64_t target = task_target(q_cost * static_cast<double>(nv) * d);
  int64_t segs = std::min(bblocks, target);
  segs = std::max<int64_t>(1, std::min(segs, kMaxPartialEntries / std::max<int64_t>(1, q * k)));
  const int64_t groups = std::max<int64_t>(1, std::min(qblocks, ceil_div(target, segs)));
  p.segment = even_bounds(bblocks, segs);
  p.qgroup = even_bounds(qblocks, groups);
  return p;
}

// dedup (causal: query block i needs bank blocks up to its own rows, work grows with i): one bank
// segment, query groups cut where the cumulative triangular work crosses equal shares.
Plan plan_causal(int64_t n, int64_t elem_size, int64_t d) {
  Plan p;
  p.bank_block = bank_block_rows(d, elem_size);
  const int64_t qblocks = ceil_div(n, p.query_block);
  const int64_t target = task_target(0.5 * static_cast<double>(n) * static_cast<double>(n) * d);
  const int64_t groups = std::max<int64_t>(1, std::min(qblocks, target));
  p.segment = {0, ceil_div(n, p.bank_block)};
  p.qgroup.assign(1, 0);
  // work of query block i ~ its last row + 1 (the bank rows it scans)
  auto work_upto = [&](int64_t blocks) {  // sum over i < blocks
    double w = 0;
    for (int64_t i = 0; i < blocks; ++i)
      w += static_cast<double>(std::min(n, (i + 1) * kQueryBlock));
    return w;
  };
  const double total = work_upto(qblocks);
  double acc = 0;
  for (int64_t i = 0, g = 1; i < qblocks && g < groups; ++i) {
    acc += static_cast<double>(std::min(n, (i + 1) * kQueryBlock));
    if (acc >= total * static_cast<double>(g) / static_cast<double>(groups) && i + 1 < qblocks) {
      p.qgroup.push_back(i + 1);
      ++g;
    }
  }
  p.qgroup.push_back(qblocks);
  return p;
}

// Partial top-k lists: [segs][q][k] scores and ids, [segs][q] sizes.
template <typename acc_t>
struct Partials {
  std::vector<acc_t> score;
  std::vector<int64_t> id;
  std::vector<int64_t> size;
  int64_t q, k;
  Partials(int64_t segs, int64_t q_, int64_t k_)
      : score(static_cast<size_t>(segs * q_ * k_)),
        id(static_cast<size_t>(segs * q_ * k_)),
        size(static_cast<size_t>(segs * q_), 0),
        q(q_),
        k(k_) {}
};

// The engine. qn: normalised queries [q, d]. Bank rows [0, nv) of `bank` (row stride
// bank_stride); when bank_normalized (dedup) they are used in place, else each task normalises a
// block into its buffer. causal: query row r only sees bank rows < r. Returns the first bank row
// without a direction (-1 when all are fine).
// qpanels: the queries packed for the AVX-512 tiles (fp32 kg_search when use_avx512()), else
// null: BLAS blocks.
template <typename scalar_t, typename acc_t>
int64_t search_blocks(const acc_t* qn, int64_t q, int64_t d, const scalar_t* bank,
                      int64_t bank_stride, bool bank_normalized, int64_t nv, int64_t k, bool causal,
                      const Plan& plan, Partials<acc_t>& part, const float* qpanels = nullptr) {
  const int64_t QB = plan.query_block;
  const int64_t NB = plan.bank_block;
  const int64_t segs = plan.segs();
  const int64_t tasks = plan.groups() * segs;
  std::vector<int64_t> bad(static_cast<size_t>(tasks), -1);
  const acc_t margin = rescore_margin<acc_t>(d);
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    at::Tensor bank_buf, score_buf;
    std::vector<acc_t> scale(static_cast<size_t>(NB));
    std::vector<acc_t> rescore_row(static_cast<size_t>(d));
    std::vector<float> floors;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t g = t / segs;
      const int64_t s = t % segs;
      const int64_t row_begin = plan.qgroup[g] * QB;
      const int64_t row_end = std::min(q, plan.qgroup[g + 1] * QB);
      const bool tiles = std::is_same_v<acc_t, float> && qpanels != nullptr && !causal;
      if (tiles) {
        // this task's heaps start empty: every score passes until a heap holds k entries
        floors.resize(static_cast<size_t>(query_panels(q) * kPanelQ));
        for (int64_t r = row_begin; r < query_panels(row_end) * kPanelQ; ++r) {
          floors[r] = r < q ? -std::numeric_limits<float>::infinity()
                            : std::numeric_limits<float>::infinity();
        }
      }
      if (!score_buf.defined() && !tiles) {
        score_buf =
            at::empty({QB * NB}, at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
        if (!bank_normalized) {
          bank_buf = at::empty({NB * d},
                               at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
        }
      }
      if (tiles && !bank_buf.defined() && !bank_normalized) {
        bank_buf =
            at::empty({NB * d}, at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
      }
      acc_t* sbuf = tiles ? nullptr : score_buf.data_ptr<acc_t>();
      acc_t* part_score = part.score.data() + s * q * k;
      int64_t* part_id = part.id.data() + s * q * k;
      int64_t* part_size = part.size.data() + s * q;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        if (!bank_normalized && !causal && q <= kFusedMaxQueries) {
          const int64_t c0 = plan.segment[s] * NB;
          const int64_t c1 = std::min(nv, plan.segment[s + 1] * NB);
          bad[t] =
              fused_rows(qn, q, bank, bank_stride, c0, c1, d, k, part_score, part_id, part_size,
                         nv * d * static_cast<int64_t>(sizeof(scalar_t)) >= kPrefetchMinBankBytes &&
                             bank_prefetch_helps());
          continue;
        }
      }
      for (int64_t blk = plan.segment[s]; blk < plan.segment[s + 1]; ++blk) {
        const int64_t c0 = blk * NB;
        const int64_t c1 = std::min(nv, c0 + NB);
        if (causal && c0 + 1 >= row_end) break;  // no row of this group sees column c0
        const acc_t* b = nullptr;
        int64_t ldb = d;
        bool scaled = false;
        if (bank_normalized) {
          // scalar_t == acc_t here (dedup passes its normalised copy).
          b = reinterpret_cast<const acc_t*>(bank) + c0 * bank_stride;
          ldb = bank_stride;
        } else {
          if constexpr (std::is_same_v<scalar_t, acc_t>) {
            // Raw rows straight into the GEMM, scores scaled by 1/||row|| afterwards: no copy of
            // the block. Only when every squared norm is a normal acc_t number, so the raw
            // products neither overflow nor lose bits to subnormals; else the normalised copy.
            scaled = true;
            for (int64_t row = c0; row < c1 && scaled; ++row) {
              const acc_t ss = sum_of_squares<acc_t>(bank + row * bank_stride, d);
              scaled = norm_ok(ss) && ss >= std::numeric_limits<acc_t>::min();
              scale[row - c0] = scaled ? static_cast<acc_t>(inv_norm(ss)) : acc_t(0);
            }
            if (scaled) {
              b = bank + c0 * bank_stride;
              ldb = bank_stride;
            }
          }
          if (!scaled) {
            acc_t* buf = bank_buf.data_ptr<acc_t>();
            const int64_t r = normalize_rows(bank, bank_stride, c0, c1, d, buf);
            if (r >= 0) {
              bad[t] = r;
              break;
            }
            b = buf;
            ldb = d;
          }
        }
        const int64_t nb = c1 - c0;
#if MOE_CPU_AVX2_CLONE
        if constexpr (std::is_same_v<acc_t, float>) {
          if (tiles) {
            if (!scaled) std::fill(scale.begin(), scale.begin() + nb, 1.0f);
            const TileSink sink{part_score, part_id, part_size, floors.data(), k};
            score_block_avx512(qpanels, row_begin, row_end, b, ldb, scale.data(), c0, c1, d, sink);
            continue;
          }
        }
#endif
        for (int64_t r0 = row_begin; r0 < row_end; r0 += QB) {
          const int64_t r1 = std::min(row_end, r0 + QB);
          if (causal && r1 - 1 <= c0) continue;  // every row here precedes the block
          scores_gemm(qn + r0 * d, r1 - r0, b, nb, ldb, d, sbuf);
          for (int64_t r = r0; r < r1; ++r) {
            acc_t* srow = sbuf + (r - r0) * nb;
            if (scaled) {
              for (int64_t j = 0; j < nb; ++j) srow[j] *= scale[j];
            }
            acc_t* hs = part_score + r * k;
            int64_t* hi = part_id + r * k;
            int64_t& size = part_size[r];
            const int64_t lim = causal ? std::min(nb, std::max<int64_t>(0, r - c0)) : nb;
            // A BLAS score within `margin` of the heap's root may belong to a row whose own score
            // (candidate_score) enters; topk_push's full comparison decides on that score.
            acc_t floor_score = size < k ? -std::numeric_limits<acc_t>::infinity() : hs[0];
            for (int64_t j = 0; j < lim; ++j) {
              if (srow[j] >= floor_score - margin) {
                const acc_t sc =
                    candidate_score(qn + r * d, bank, bank_stride, bank_normalized, c0 + j, d,
                                    scaled ? scale[j] : acc_t(0), rescore_row.data());
                topk_push(hs, hi, size, k, clamp_cosine(sc), c0 + j);
                if (size == k) floor_score = hs[0];
              }
            }
          }
        }
      }
    }
  });
  int64_t first = -1;
  for (int64_t b : bad) {
    if (b >= 0 && (first < 0 || b < first)) first = b;
  }
  return first;
}

// Merge each query's partial lists (one per segment) into its final top-k, best first, padded
// with (-inf, -1). Calls out(r, score, id, count) per query with the sorted entries.
template <typename acc_t, typename Out>
void merge_partials(const Partials<acc_t>& part, int64_t segs, Out&& out) {
  const int64_t q = part.q;
  const int64_t k = part.k;
  at::parallel_for(0, q, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, k * segs)),
                   [&](int64_t r0, int64_t r1) {
                     std::vector<acc_t> hs(static_cast<size_t>(k));
                     std::vector<int64_t> hi(static_cast<size_t>(k));
                     for (int64_t r = r0; r < r1; ++r) {
                       int64_t size = 0;
                       for (int64_t s = 0; s < segs; ++s) {
                         const int64_t base = (s * q + r) * k;
                         const int64_t n = part.size[s * q + r];
                         for (int64_t e = 0; e < n; ++e) {
                           topk_push(hs.data(), hi.data(), size, k, part.score[base + e],
                                     part.id[base + e]);
                         }
                       }
                       topk_sort(hs.data(), hi.data(), size);
                       out(r, hs.data(), hi.data(), size);
                     }
                   });
}

// ---------------------------------------------------------------------------------------------
// kg_search

template <typename scalar_t>
void kg_search_kernel(const at::Tensor& queries, const at::Tensor& bank, int64_t k, int64_t nv,
                      at::Tensor& scores, at::Tensor& ids) {
  using acc = acc_t<scalar_t>;
  const int64_t q = queries.size(0);
  const int64_t d = queries.size(1);
  const scalar_t* bp = bank.const_data_ptr<scalar_t>();
  const int64_t bstride = bank.stride(0);
  if (q == 0) {
    // Nothing to rank, but a bad bank is still an error, whatever the number of queries.
    const int64_t bad = first_bad_row<scalar_t, acc>(bp, bstride, nv, d);
    TORCH_CHECK(bad < 0, "kg_search: bank row ", bad, " (within the first n_valid = ", nv,
                " rows) has a zero, NaN or Inf norm: cosine similarity is undefined");
    return;
  }
  std::vector<acc> qn(static_cast<size_t>(q * d));
  const int64_t bad_q = normalize_all<scalar_t, acc>(queries.const_data_ptr<scalar_t>(),
                                                     queries.stride(0), q, d, qn.data());
  TORCH_CHECK(bad_q < 0, "kg_search: queries row ", bad_q,
              " has a zero, NaN or Inf norm: cosine similarity is undefined");

  const Plan plan = plan_search(q, nv, k, sizeof(acc), d);
  Partials<acc> part(plan.segs(), q, k);
  if (nv > 0) {
    // fp32 scores (fp32, bf16, fp16 inputs) past the fused few-query pass: AVX-512 tiles
    std::vector<float> qpanels;
    if constexpr (std::is_same_v<acc, float>) {
      const bool fused = std::is_same_v<scalar_t, float> && q <= kFusedMaxQueries;
      if (use_avx512() && !fused) {
        qpanels.resize(static_cast<size_t>(query_panels(q) * kPanelQ * d));
        pack_query_panels(qn.data(), q, d, qpanels.data());
      }
    }
    const int64_t bad =
        search_blocks<scalar_t, acc>(qn.data(), q, d, bp, bstride, false, nv, k, false, plan, part,
                                     qpanels.empty() ? nullptr : qpanels.data());
    TORCH_CHECK(bad < 0, "kg_search: bank row ", bad, " (within the first n_valid = ", nv,
                " rows) has a zero, NaN or Inf norm: cosine similarity is undefined");
  }
  float* so = scores.mutable_data_ptr<float>();
  int64_t* io = ids.mutable_data_ptr<int64_t>();
  merge_partials(part, plan.segs(), [&](int64_t r, const acc* hs, const int64_t* hi, int64_t n) {
    for (int64_t e = 0; e < n; ++e) {
      so[r * k + e] = static_cast<float>(hs[e]);
      io[r * k + e] = hi[e];
    }
    for (int64_t e = n; e < k; ++e) {
      so[r * k + e] = -std::numeric_limits<float>::infinity();
      io[r * k + e] = -1;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> kg_search_cpu(const at::Tensor& queries_in,
                                                 const at::Tensor& bank_in, int64_t k,
                                                 const at::Tensor& n_valid) {
  check_kg_search_inputs(queries_in, bank_in, k, n_valid);
  const int64_t nv = n_valid.item<int64_t>();  // a CPU scalar: no device sync
  TORCH_CHECK(nv >= 0 && nv <= bank_in.size(0), "kg_search: n_valid must be in [0, ",
              bank_in.size(0), "] (the rows of bank), got ", nv);
  const at::Tensor queries = with_unit_inner_stride(queries_in);
  const at::Tensor bank = with_unit_inner_stride(bank_in);
  const int64_t q = queries.size(0);
  at::Tensor scores = at::empty({q, k}, queries.options().dtype(at::kFloat));
  at::Tensor ids = at::empty({q, k}, queries.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, bank.scalar_type(), "kg_search", [&] {
    kg_search_kernel<scalar_t>(queries, bank, k, nv, scores, ids);
  });
  return {scores, ids};
}

// ---------------------------------------------------------------------------------------------
// dedup

template <typename scalar_t>
void dedup_kernel(const at::Tensor& emb, double threshold, at::Tensor& keep, at::Tensor& rep) {
  using acc = acc_t<scalar_t>;
  const int64_t n = emb.size(0);
  const int64_t d = emb.size(1);
  std::vector<acc> en(static_cast<size_t>(n * d));
  const int64_t bad =
      normalize_all<scalar_t, acc>(emb.const_data_ptr<scalar_t>(), emb.stride(0), n, d, en.data());
  TORCH_CHECK(bad < 0, "dedup: emb row ", bad,
              " has a zero, NaN or Inf norm: cosine similarity is undefined");
  const Plan plan = plan_causal(n, sizeof(acc), d);
  Partials<acc> part(plan.segs(), n, 1);
  search_blocks<acc, acc>(en.data(), n, d, en.data(), d, true, n, 1, true, plan, part);
  bool* keep_out = keep.mutable_data_ptr<bool>();
  int64_t* rep_out = rep.mutable_data_ptr<int64_t>();
  merge_partials(part, plan.segs(), [&](int64_t r, const acc* hs, const int64_t* hi, int64_t m) {
    const bool dup = m > 0 && is_duplicate(hs[0], threshold);
    keep_out[r] = !dup;
    rep_out[r] = dup ? hi[0] : r;
  });
}

std::tuple<at::Tensor, at::Tensor> dedup_cpu(const at::Tensor& emb_in, double threshold) {
  check_dedup_inputs(emb_in, threshold);
  const at::Tensor emb = with_unit_inner_stride(emb_in);
  const int64_t n = emb.size(0);
  at::Tensor keep = at::empty({n}, emb.options().dtype(at::kBool));
  at::Tensor rep = at::empty({n}, emb.options().dtype(at::kLong));
  if (n == 0) return {keep, rep};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, emb.scalar_type(), "dedup",
                                  [&] { dedup_kernel<scalar_t>(emb, threshold, keep, rep); });
  return {keep, rep};
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_framework, CPU, m) {
  m.impl("dedup", &dedup_cpu);
  m.impl("kg_search", &kg_search_cpu);
}

}  // namespace moe_framework
