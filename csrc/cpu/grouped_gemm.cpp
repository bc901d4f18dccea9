// CPU kernels of grouped_gemm and grouped_gemm_wgrad.
//
// Two paths, chosen per expert from its row count (the offsets are host memory on CPU):
//  * "large" groups call torch's BLAS (at::mm_out) on the contiguous row slice;
//  * the others are cut into (expert, row block, column block) tiles over all experts, run by one
//    at::parallel_for (no per-expert calls), each with a register-blocked FMA micro-kernel picked
//    at run time (gemm_isa(): AVX-512 8x48, AVX2+FMA 4x24, or a scalar loop).
//    With AVX-512, tiles of <= 16 rows with a unit-column-stride B (fp32, and bf16 on
//    AVX512-BF16 CPUs) run the 8x48 tile directly on B, without packing it (direct_avx512).
// Which groups are "large" (is_large): fp64 (gradcheck) always; fp16 never (torch's CPU fp16 GEMM
// is orders of magnitude slower); fp32 from 128 rows with AVX2, and with AVX-512 never (b^T groups
// from 24 rows pack transposed B panels for the 8x48 kernel, smaller ones run a dot-product
// kernel); bf16 on CPUs with AVX512-BF16 never in the forward (vdpbf16ps kernels: the 6x64 panel
// kernels, the direct 8x48 tile at 7-8 rows, the dot-product kernel for b^T below 20 rows), and
// in the weight gradient only at 8-31 rows (from 32 rows the panel micro-kernels run it,
// wgrad_bf16_panels); bf16 without AVX512-BF16 from 32 rows.
// bf16/fp16 accumulate in fp32: the fp32 kernels convert the activations once and the weight
// panels while packing; the vdpbf16ps kernels multiply bf16 pairs directly. Every output element is
// a sum over K (or over the rows of an expert, for wgrad) in a fixed order, independent of the
// thread count: results are bitwise reproducible for a given build and CPU (the AVX-512, AVX2 and
// scalar kernels differ in rounding: FMA, summation order).
#include "moe_framework/grouped_gemm.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "moe_framework/cpu_isa.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
// GCC 12's AVX-512 headers build some intrinsics (reductions, conversions) on
// _mm512_undefined_*(), which -Wmaybe-uninitialized reports at every use: a false positive.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#define MOE_GG_X86 1
#else
#define MOE_GG_X86 0
#endif

namespace moe_framework {
namespace {

// Calls f(std::integral_constant<int, R>{}) with R = min(max(rows, 1), kMax): turns a run-time
// row count into the compile-time row count of a register tile (one instantiation per R).
template <int kMax, typename F>
MOE_ALWAYS_INLINE void with_tile_rows(int64_t rows, F&& f) {
  if constexpr (kMax > 1) {
    if (rows < kMax) return with_tile_rows<kMax - 1>(rows, f);
  }
  f(std::integral_constant<int, kMax>{});
}

using grouped_gemm::acc_t;
using grouped_gemm::ceil_div;

// fp32 (AVX2 build) and bf16 (no AVX512-BF16): groups with at least this many rows go to
// torch's BLAS; below it, per-call overhead and thin
// GEMM shapes make the tiled kernel faster (measured: benchmarks/bench_grouped_gemm.py). bf16
// switches earlier: on CPUs with AVX512-BF16, torch's bf16 GEMM uses bf16 dot-product
// instructions that our fp32-converting kernel cannot match beyond a handful of rows (measured:
// 0.5-0.8x at 8-16 rows); without them it falls back to conversions like ours.
constexpr int64_t kLargeRows = 128;
// fp32 b^T with AVX-512: groups of at least kPackRowsTransB rows run the 8x48 register tile on
// transposed panels (pack_bt_avx512); smaller groups run the dot-product kernel, which needs no
// packing (measured, 8 experts, 1 thread: pack/dot 0.8-0.9x at 8 rows, 0.8-1.04x at 16,
// 1.07-1.17x at 24, 1.2-1.5x at 32).
constexpr int64_t kPackRowsTransB = 24;
// fp32 groups on the AVX-512 kernels (b, and b^T from kPackRowsTransB rows) run in row ranges of
// up to kMBLarge rows of one expert, not kMB, so that each B panel is packed once for all of them,
// and in column blocks of at most kMaxNBLarge columns: a narrower panel gets a deeper k block
// (kPanelBytes), fewer C tile reloads. Measured at 8 experts x 512 rows, d = 512, h = 1792,
// 1 thread: the six GEMMs of a SwiGLU layer's fwd+bwd 400 -> 369 ms (b^T fwd 172 -> 191,
// da 162-169 -> 192-195 GFLOP/s).
constexpr int64_t kMBLarge = 512;
constexpr int64_t kMaxNBLarge = 480;  // 10 AVX-512 register tiles
// bf16 b^T groups (AVX512-BF16 CPUs) of at least this many rows run the panel kernels on
// transposed pair panels; smaller ones the dot-product kernel (no packing). Measured, 64 experts,
// K = N = 1024, 1 thread, panel vs dot: 205 vs 251 GFLOP/s at 16 rows, 261 vs 252 at 20, 297 vs
// 146 at 24, 307 vs 266 at 32.
constexpr int64_t kPanelRowsTransBBf16 = 20;
int64_t large_rows_bf16() {
#if MOE_GG_X86
  static const int64_t rows = __builtin_cpu_supports("avx512bf16") ? 8 : 32;
  return rows;
#else
  return 32;
#endif
}
// Register tile of the micro-kernel: kMR rows x kNR columns (3 AVX2 vectors), 12 accumulators.
constexpr int64_t kMR = 4;
constexpr int64_t kNR = 24;
// Depth of a packed B panel: kKC x kNR floats (24 KiB) stay in L1 while the row groups of a tile
// sweep over it.
constexpr int64_t kKC = 256;
// Rows of one work tile, and the widest column block: a wide block makes the tile read each row
// of B as one long contiguous run (small groups are bound by streaming B from memory).
constexpr int64_t kMB = 64;
constexpr int64_t kMaxNB = 44 * kNR;  // 1056 columns, a multiple of both register tiles
constexpr int64_t kPanelBytes = 256 * 1024;

// ---------------------------------------------------------------------------------------------
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
// spills it every iteration (measured 4x slower).
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

#endif

// Which micro-kernels run: picked once per process from the CPU and the MOE_FRAMEWORK_CPU_*
// switches of cpu_isa.h (baseline -> scalar, NO_AVX512 -> AVX2+FMA).
enum class Isa { kScalar, kAvx2, kAvx512 };
Isa gemm_isa() {
#if MOE_GG_X86
  static const Isa isa = use_avx512()                                    ? Isa::kAvx512
                         : (use_avx2() && __builtin_cpu_supports("fma")) ? Isa::kAvx2
                                                                         : Isa::kScalar;
  return isa;
#else
  return Isa::kScalar;
#endif
}

#if MOE_GG_X86
// AVX-512 register tile: up to kMR512 rows x kNR512 columns (3 zmm), 24 zmm accumulators held in
// registers (the array is indexed with constants only after unrolling; checked in the assembly:
// no spills). Same contract as micro_avx2; masked loads/stores handle the last column strip.
constexpr int64_t kMR512 = 8;
constexpr int64_t kNR512 = 48;

MOE_TARGET_AVX512 inline __mmask16 strip_mask(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF)
                 : (n <= 0 ? static_cast<__mmask16>(0) : static_cast<__mmask16>((1u << n) - 1));
}

// Software prefetches of B rows that lie a row stride apart (the direct kernels and the bf16
// packing row block walk a strip of B down K: the hardware prefetchers do not follow that walk)
// go to L2, not L1: a prefetch into L1 holds one of the core's few L1 miss buffers until its line
// arrives, which caps the lines in flight below what DRAM latency needs; L2 tracks many more
// misses, and the loads then hit L2. Measured (1 thread, K = N = 1024, Zen 4 EPYC, its AVX-512 on
// 256-bit units), T0 -> T1: fp32 128 experts x 8 rows 31 -> 72 GFLOP/s, 64 x 16 48 -> 84; bf16
// 128 x 8 55-60 -> 93-121, 64 x 16 104-120 -> 166 (benchmarks/bench_grouped_gemm.py). The
// earlier T0 numbers of the Zen 5 class machine are in docs/performance.md.
constexpr auto kStreamHint = _MM_HINT_T1;
// Rows of B the direct kernels prefetch ahead (see "Direct kernel" below). Zen 4, T1, 128 x 8
// fp32: 16 / 32 / 48 rows: 54-57 / 66-70 / 73-77 GFLOP/s.
constexpr int64_t kDirectPrefetch = 48;

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

// ---------------------------------------------------------------------------------------------
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
      // (small groups stream B from DRAM; measured 5-10% at 8-16 rows).
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

// ---------------------------------------------------------------------------------------------
// Streaming kernel for tiles of at most kStreamRows rows with a unit-column-stride B (decode,
// fine-grained experts). There, each weight element feeds only a few FMAs and the tile is bound
// by reading B from memory; packing would add a write and a re-read of every element. This loop
// reads B once, row by row (4 rows per pass: sequential streams the prefetcher follows), converts
// bf16/fp16 in registers, and keeps the m x n fp32 output block in L1:
//   C[i, :] += a[i, p] B[p, :] + a[i, p+1] B[p+1, :] + ...   (fused, in p order).
constexpr int64_t kStreamRows = 8;

#if MOE_GG_X86
template <typename scalar_t>
__attribute__((target("avx2,fma,f16c"))) void stream_gemm_avx2(int64_t m, int64_t n, int64_t k,
                                                               const float* a, int64_t lda,
                                                               const scalar_t* b, int64_t ldb,
                                                               float* c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + n, 0.f);
  const int64_t n8 = n / 8 * 8;
  int64_t p = 0;
  for (; p + 4 <= k; p += 4) {
    const scalar_t* b0 = b + p * ldb;
    const scalar_t* b1 = b0 + ldb;
    const scalar_t* b2 = b1 + ldb;
    const scalar_t* b3 = b2 + ldb;
    for (int64_t j = 0; j < n8; j += 8) {
      const __m256 v0 = load8_as_float(b0 + j), v1 = load8_as_float(b1 + j);
      const __m256 v2 = load8_as_float(b2 + j), v3 = load8_as_float(b3 + j);
      for (int64_t i = 0; i < m; ++i) {
        const float* ai = a + i * lda + p;
        float* ci = c + i * ldc + j;
        __m256 acc = _mm256_loadu_ps(ci);
        acc = _mm256_fmadd_ps(_mm256_broadcast_ss(ai), v0, acc);
        acc = _mm256_fmadd_ps(_mm256_broadcast_ss(ai + 1), v1, acc);
        acc = _mm256_fmadd_ps(_mm256_broadcast_ss(ai + 2), v2, acc);
        acc = _mm256_fmadd_ps(_mm256_broadcast_ss(ai + 3), v3, acc);
        _mm256_storeu_ps(ci, acc);
      }
    }
    for (int64_t j = n8; j < n; ++j) {
      for (int64_t i = 0; i < m; ++i) {
        const float* ai = a + i * lda + p;
        float acc = c[i * ldc + j];
        acc = std::fma(ai[0], static_cast<float>(b0[j]), acc);
        acc = std::fma(ai[1], static_cast<float>(b1[j]), acc);
        acc = std::fma(ai[2], static_cast<float>(b2[j]), acc);
        acc = std::fma(ai[3], static_cast<float>(b3[j]), acc);
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
  // With AVX-512 the packed-panel path is faster (measured 68 vs 43 GFLOP/s at 8 rows).
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
// 192 bytes) in L2. Sums run over k in order, as in micro_avx512. Measured (128 experts x 8 rows, K
// = N = 1024, 1 thread, Zen 5 class CPU, prefetch into L1): 1.4-1.6x the packed path; without the
// software prefetch 0.9x; distance 16 / 32 / 64 rows: 26 / 24 / 24.5 ms. Prefetching into L2
// (kStreamHint) took it from 31 to 72 GFLOP/s on a Zen 4 CPU.
constexpr int64_t kDirectRows = 16;
// Rows per pass of the direct kernels: 9-16 rows run as two equal passes (12 = 6 + 6, not 8 + 4;
// measured 1.21 vs 1.18x the packed path at 12 rows, 1.06 vs 1.03x at 9).
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

// Runs the direct kernel when it applies (see above); false means the caller uses tile_gemm.
template <typename scalar_t>
bool direct_gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                 const BView<scalar_t>& b, float* c, int64_t ldc) {
#if MOE_GG_X86
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

// ---------------------------------------------------------------------------------------------
// bf16 kernels for CPUs with AVX512-BF16: vdpbf16ps multiplies pairs of bf16 (adjacent k) and
// adds both products to an fp32 lane, so neither operand is converted to fp32 and twice the k
// values go through each instruction. A keeps its bf16 rows (k pairs are adjacent); B is read as
// pairs {B(2q, j), B(2q+1, j)} (32 bits, zero past k): interleaved in registers (direct kernel),
// packed into pair panels (panel kernels), or, for b^T, read as it is (a row of b is already a
// run of k pairs: dot-product kernel).
#if MOE_GG_X86
using bf16_t = uint16_t;

MOE_TARGET_AVX512_BF16 inline __m512bh as_bh(__m512i v) {
  return reinterpret_cast<__m512bh>(v);
}

MOE_TARGET_AVX512_BF16 inline __m512i bcast_pair(const bf16_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return _mm512_set1_epi32(v);
}

// 16 columns (lanes of km) of rows r0 and r1 (nullptr: zeros) of B as 16 bf16 pairs.
MOE_TARGET_AVX512_BF16 inline __m512bh pair_rows(const bf16_t* r0, const bf16_t* r1, __mmask16 km,
                                                 __m512i idx) {
  const __m512i x = _mm512_castsi256_si512(_mm256_maskz_loadu_epi16(km, r0));
  const __m512i y = r1 != nullptr ? _mm512_castsi256_si512(_mm256_maskz_loadu_epi16(km, r1))
                                  : _mm512_setzero_si512();
  return as_bh(_mm512_permutex2var_epi16(x, idx, y));
}

// Direct bf16 kernel for tiles of 7-8 rows (see direct_avx512, grouped_gemm_tiles_bf16): no panel;
// per k pair, the 48 columns of rows k and k+1 of B are loaded and interleaved into pairs in
// registers (three word permutes), then run through the 8x48 vdpbf16ps tile. Odd K pairs the
// last row with zeros. The pairs are summed in k order.
template <int MR>
MOE_TARGET_AVX512_BF16 void direct_bf16(int64_t k, const bf16_t* a, int64_t lda, const bf16_t* b,
                                        int64_t ldb, float* c, int64_t ldc, int64_t nr, bool pf) {
  __m512 acc[MR][3];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    acc[i][0] = _mm512_setzero_ps();
    acc[i][1] = acc[i][0];
    acc[i][2] = acc[i][0];
  }
  const __mmask16 k0 = strip_mask(nr), k1 = strip_mask(nr - 16), k2 = strip_mask(nr - 32);
  // Word j of the result: column j / 2 of the first source (even j) or of the second (odd j).
  const __m512i idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                       39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const int64_t kpf = pf ? std::max<int64_t>(0, k - kDirectPrefetch) : 0;
  const int64_t pfo = kDirectPrefetch * ldb;
  const bf16_t* bp = b;
  for (int64_t p = 0; p < k; p += 2, bp += 2 * ldb) {
    if (p < kpf) {
      const char* f = reinterpret_cast<const char*>(bp + pfo);
      _mm_prefetch(f, kStreamHint);
      _mm_prefetch(f + 94, kStreamHint);
      _mm_prefetch(f + 2 * ldb, kStreamHint);
      _mm_prefetch(f + 2 * ldb + 94, kStreamHint);
    }
    const bf16_t* r1 = p + 1 < k ? bp + ldb : nullptr;
    const __m512bh b0 = pair_rows(bp, r1, k0, idx);
    const __m512bh b1 = pair_rows(bp + 16, r1 != nullptr ? r1 + 16 : nullptr, k1, idx);
    const __m512bh b2 = pair_rows(bp + 32, r1 != nullptr ? r1 + 32 : nullptr, k2, idx);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512bh av = as_bh(bcast_pair(a + i * lda + p));
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], av, b0);
      acc[i][1] = _mm512_dpbf16_ps(acc[i][1], av, b1);
      acc[i][2] = _mm512_dpbf16_ps(acc[i][2], av, b2);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    float* cp = c + i * ldc;
    _mm512_mask_storeu_ps(cp, k0, acc[i][0]);
    _mm512_mask_storeu_ps(cp + 16, k1, acc[i][1]);
    _mm512_mask_storeu_ps(cp + 32, k2, acc[i][2]);
  }
}

void direct_bf16_rows(int64_t mr, int64_t k, const bf16_t* a, int64_t lda, const bf16_t* b,
                      int64_t ldb, float* c, int64_t ldc, int64_t nr, bool pf) {
  with_tile_rows<8>(
      mr, [&](auto r) { direct_bf16<decltype(r)::value>(k, a, lda, b, ldb, c, ldc, nr, pf); });
}

// C[m x n] = A[m x k] B[k x n] with the direct kernel (m <= kDirectRows, see direct_bf16).
void direct_gemm_bf16(int64_t m, int64_t n, int64_t k, const bf16_t* a, int64_t lda,
                      const bf16_t* b, int64_t sk, float* c, int64_t ldc) {
  const int64_t step = direct_pass_rows(m);
  for (int64_t j = 0; j < n; j += kNR512) {
    for (int64_t i = 0; i < m; i += step) {
      direct_bf16_rows(std::min(step, m - i), k, a + i * lda, lda, b + j, sk, c + i * ldc + j, ldc,
                       std::min(kNR512, n - j), i == 0);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// bf16 panel kernels (tiles of up to kMBLarge rows of one expert; see grouped_gemm_tiles_bf16).
// B of a tile is packed per (column block, k block) into a strip-major pair panel: strip s holds
// columns [64 s, 64 s + 64) of the block as kq rows of 64 words, word (q, j) = {B(2q, j),
// B(2q+1, j)}, zero past k and past the block. A strip is one contiguous run, so the micro-kernel
// reads 256 aligned bytes per k pair in sequence (the L1 prefetcher follows it; no set aliasing).
// The last strip of a block is 16 * ceil(w / 16) words wide (w: its columns). A panel of up to
// kPairsBf16 pairs x kPanelBytesBf16 stays in L2 while every row block of the tile's A runs over
// it (its A rows in L1); each 6 x 64 register tile sums a whole k block (1024 k) in registers,
// so C is loaded and stored once per 1024 k, and the last k block writes the bf16 output directly.
// Packing (a @ b[e]) is done by the first row block while it computes (micro_bf16<kPack>), not as
// a separate pass, and while a panel is computed the micro-kernels prefetch the source of the next
// panel (next k block, next column block, or the first panel of the thread's next tile) into L2,
// a few lines per k step: the weights stream from DRAM. Measured at 32 experts x 128 rows,
// K = N = 1024, 1 thread (ratios to one dense oneDNN GEMM, interleaved): a packing pass and 8 x 48
// tiles 0.75; fused packing 0.85; 6 x 64 tiles, 256 KiB panels, A read in place 0.88-0.90;
// prefetch state in registers 0.96-0.99 (the remaining gap: the packing row block runs at about
// half speed, 1/21 of the rows at 128 rows/expert).
// Register tile of the panel kernels: kPR rows x kPS columns (4 zmm of fp32 sums, 24 in all).
// Per k pair: 4 panel loads, 6 broadcasts, 24 vdpbf16ps (8 x 48 needs 11 loads for 24). Model
// widths are mostly multiples of 64, so the last strip of a row is rarely partial.
constexpr int64_t kPR = 6;
constexpr int64_t kPS = 64;
constexpr int64_t kPairsBf16 = 512;
constexpr int64_t kPanelBytesBf16 = 256 * 1024;
// Rows of B (pairs) the packing row block prefetches ahead of its reads, in case the panel's
// source is not in L2 yet (measured at 128 rows/expert: 0.92 -> 0.96x dense).
constexpr int64_t kPackPrefetch = 32;

// Source of B for a panel tile: B(p, j) = ptr[p * sk + j * sn] with sn == 1 (a @ b[e]) or
// sk == 1 (b[e]^T: a row of b is a run of k pairs).
struct PairB {
  const bf16_t* ptr;
  int64_t sk, sn;
};

// k pairs per k block and columns per column block of a tile of n columns and depth k. kq depends
// on k alone, so every output element sums its k blocks in the same order whatever the tiling.
struct PanelBlocks {
  int64_t kq, nc;
};
inline PanelBlocks panel_blocks(int64_t n, int64_t k) {
  const int64_t kq = std::min<int64_t>(kPairsBf16, ceil_div(k, 2));
  const int64_t nc_max = std::max<int64_t>(1, kPanelBytesBf16 / (kq * 4 * kPS)) * kPS;
  const int64_t blocks = ceil_div(n, nc_max);
  return {kq, std::min(nc_max, ceil_div(ceil_div(n, blocks), kPS) * kPS)};
}

inline int64_t strip_words(int64_t cols) {
  return std::min<int64_t>(kPS, ceil_div(cols, 16) * 16);
}

// Lines of the next panel's source, fetched into L2 a few at a time (see above).
struct PfStream {
  const char* row = nullptr;
  int64_t ld = 0, lines = 0;  // row stride (bytes), lines per row
  int64_t rows = 0, col = 0;  // rows left, next line of the current row
  int64_t budget = 0;         // lines this micro-kernel call may still fetch
};

// One panel: B(k0 + p, j0 + j) for p < kc, j < nc, src = &B(k0, j0).
struct PanelDesc {
  const bf16_t* src = nullptr;
  int64_t sk = 0, sn = 0, kc = 0, nc = 0;
};

inline PanelDesc panel_at(const PairB& b, int64_t j0, int64_t nc, int64_t k0, int64_t kc) {
  return {b.ptr + k0 * b.sk + j0 * b.sn, b.sk, b.sn, kc, nc};
}

inline PfStream panel_source(const PanelDesc& d) {
  PfStream s;
  if (d.src == nullptr) return s;
  const bool rows_k = d.sn == 1;  // source rows run along j (a @ b) or along k (b^T)
  s.row = reinterpret_cast<const char*>(d.src);
  s.ld = 2 * (rows_k ? d.sk : d.sn);
  // One more line than the row covers: rows need not start on a line.
  s.lines = ceil_div(2 * (rows_k ? d.nc : d.kc), 64) + 1;
  s.rows = rows_k ? d.kc : d.nc;
  return s;
}

MOE_ALWAYS_INLINE void pf_step(PfStream& s) {
  if (s.budget > 0 && s.rows > 0) {
    __builtin_prefetch(s.row + 64 * s.col, 0, 2);
    --s.budget;
    if (++s.col == s.lines) {
      s.col = 0;
      s.row += s.ld;
      --s.rows;
    }
  }
}

// Pack B(k0 + p, j0 + j) = b[j * sn + p] (b^T: k pairs adjacent) into the panel: 16 rows of b
// read as 16 runs of 16 pairs, transposed 16 x 16 (32-bit words) in registers.
MOE_TARGET_AVX512_BF16 void pack_pairs_cols(const bf16_t* b, int64_t sn, int64_t kc, int64_t nc,
                                            int64_t kq, uint32_t* panel) {
  for (int64_t j = 0; j < nc; j += 16) {
    const int64_t s = j / kPS, ws = strip_words(nc - s * kPS);
    uint32_t* base = panel + s * kq * kPS + j - s * kPS;
    const int64_t nj = std::min<int64_t>(16, nc - j);
    for (int64_t q = 0; q < kq; q += 16) {
      const int64_t left = kc - 2 * q;  // k values left: the odd last one pairs with a zero
      const __mmask32 km = left >= 32 ? ~__mmask32{0} : (__mmask32{1} << left) - 1;
      __m512 r[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) {
        r[i] = i < nj ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(km, b + (j + i) * sn + 2 * q))
                      : _mm512_setzero_ps();
      }
      transpose16(r);
      const int64_t nq = std::min<int64_t>(16, kq - q);
#pragma GCC unroll 16
      for (int w = 0; w < 16; ++w) {
        if (w < nq) _mm512_storeu_ps(reinterpret_cast<float*>(base + (q + w) * ws), r[w]);
      }
    }
  }
}

// Where a micro-kernel's C tile goes: fp32 (cin: partial sums of earlier k blocks to add, or
// nullptr) into cf, or rounded to bf16 into cb (the last k block).
struct TileOut {
  const float* cin;
  float* cf;
  at::BFloat16* cb;
  int64_t ldf, ldb;
  // Non-temporal bf16 stores of whole 64-column rows (cb 64-byte aligned, ldb a multiple of
  // 32): the weight gradient is written once and not read again by this op.
  bool nt = false;
};

// Row-major source of a strip that the micro-kernel packs while it runs (kPack): rows r, r + sk
// of B hold k pairs' halves; kc k values (odd: the last pair's second half is zero).
struct StripSource {
  const bf16_t* b;
  int64_t sk, kc;
};

// C[MR x 16 NV] (+)= A[MR x 2 kq] B-strip[2 kq x 16 NV], nr <= 16 NV columns stored. With kPack
// the strip is read from B's rows (pairs interleaved in registers, as in direct_bf16) and also
// written to the panel for the tile's other row blocks: the first row block packs the panel
// while it computes, so the packing hides behind its vdpbf16ps instead of running as a pass that
// waits for memory.
template <int MR, int NV, bool kPack>
MOE_TARGET_AVX512_BF16 void micro_bf16(int64_t kq, const bf16_t* a, int64_t lda, uint32_t* b,
                                       int64_t nr, const TileOut& o, PfStream& pf_io,
                                       const StripSource& src) {
  // A local copy: the compiler keeps it in registers (through the reference it reloads and
  // stores every field each iteration; measured 0.87 -> 0.96x dense at 128 rows/expert).
  PfStream pf = pf_io;
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
  }
  [[maybe_unused]] const __m512i idx =
      _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                       37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  [[maybe_unused]] __mmask16 km[NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) km[v] = strip_mask(nr - 16 * v);
  for (int64_t q = 0; q < kq; ++q, b += 16 * NV) {
    pf_step(pf);
    __m512bh bv[NV];
    if constexpr (kPack) {
      const bf16_t* r0 = src.b + 2 * q * src.sk;
      const bf16_t* r1 = 2 * q + 1 < src.kc ? r0 + src.sk : nullptr;
      if (2 * (q + kPackPrefetch) + 1 < src.kc) {
        const char* f = reinterpret_cast<const char*>(r0 + 2 * kPackPrefetch * src.sk);
        _mm_prefetch(f, kStreamHint);
        _mm_prefetch(f + 32 * NV - 2, kStreamHint);
        _mm_prefetch(f + 2 * src.sk, kStreamHint);
        _mm_prefetch(f + 2 * src.sk + 32 * NV - 2, kStreamHint);
      }
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        bv[v] = pair_rows(r0 + 16 * v, r1 != nullptr ? r1 + 16 * v : nullptr, km[v], idx);
        _mm512_storeu_si512(b + 16 * v, reinterpret_cast<__m512i>(bv[v]));
      }
    } else {
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) bv[v] = as_bh(_mm512_loadu_si512(b + 16 * v));
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512bh av = as_bh(bcast_pair(a + i * lda + 2 * q));
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], av, bv[v]);
    }
  }
  pf_io = pf;
  if constexpr (NV == 4) {
    if (o.nt) {
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        __m512 x[4];
#pragma GCC unroll 4
        for (int v = 0; v < 4; ++v) {
          x[v] = acc[i][v];
          if (o.cin != nullptr)
            x[v] = _mm512_add_ps(x[v], _mm512_loadu_ps(o.cin + i * o.ldf + 16 * v));
        }
        __m256i h[4];
#pragma GCC unroll 4
        for (int v = 0; v < 4; ++v) h[v] = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x[v]));
        __m512i* dst = reinterpret_cast<__m512i*>(o.cb + i * o.ldb);
        _mm512_stream_si512(dst, _mm512_inserti64x4(_mm512_castsi256_si512(h[0]), h[1], 1));
        _mm512_stream_si512(dst + 1, _mm512_inserti64x4(_mm512_castsi256_si512(h[2]), h[3], 1));
      }
      return;
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const __mmask16 kv = strip_mask(nr - 16 * v);
      __m512 x = acc[i][v];
      if (o.cin != nullptr) {
        x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(kv, o.cin + i * o.ldf + 16 * v));
      }
      if (o.cb != nullptr) {
        _mm256_mask_storeu_epi16(o.cb + i * o.ldb + 16 * v, kv,
                                 reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x)));
      } else {
        _mm512_mask_storeu_ps(o.cf + i * o.ldf + 16 * v, kv, x);
      }
    }
  }
}

template <bool kPack>
void micro_bf16_tile(int64_t mr, int64_t nr, int64_t kq, const bf16_t* a, int64_t lda, uint32_t* b,
                     const TileOut& o, PfStream& pf, const StripSource& src) {
  with_tile_rows<kPR>(mr, [&](auto r) {
    constexpr int kR = decltype(r)::value;
    if (nr > 48) {
      micro_bf16<kR, 4, kPack>(kq, a, lda, b, nr, o, pf, src);
    } else if (nr > 32) {
      micro_bf16<kR, 3, kPack>(kq, a, lda, b, nr, o, pf, src);
    } else if (nr > 16) {
      micro_bf16<kR, 2, kPack>(kq, a, lda, b, nr, o, pf, src);
    } else {
      micro_bf16<kR, 1, kPack>(kq, a, lda, b, nr, o, pf, src);
    }
  });
}

// Rows of the next row block when `left` rows remain: kPR, but a last block of fewer than
// kPR / 2 + 1 rows is balanced with the one before it (8 -> 4 + 4, not 6 + 2: a 2-row tile has
// too few accumulators to hide the vdpbf16ps latency).
inline int64_t row_block(int64_t left) {
  if (left <= kPR) return left;
  if (left < kPR + kPR / 2 + 1) return left / 2;
  return kPR;
}

// Panel buffer, 64-byte aligned (strip rows are whole cache lines).
struct PairPanel {
  std::vector<uint32_t> buf;
  uint32_t* get(int64_t words) {
    if (buf.size() < static_cast<size_t>(words + 16)) buf.resize(static_cast<size_t>(words + 16));
    const uintptr_t p = reinterpret_cast<uintptr_t>(buf.data());
    return buf.data() + ((64 - p % 64) % 64) / 4;
  }
};

// out[m x n] (bf16, row stride ldo) = A[m x k] B[k x n] with the panel kernels. A: bf16 rows
// (row stride lda, pairs at even k; element k is zero when k is odd). cbuf: fp32 partial sums
// (m x n) when k spans more than one k block. `next`: the source of the first panel of the
// out[m x n] (bf16, row stride ldo) = A[m x k] B[k x n] with the panel kernels. A: bf16 rows
// (row stride lda, pairs at even k; element k is zero when k is odd). cbuf: fp32 partial sums
// (m x n) when k spans more than one k block. `next`: the first panel of the thread's next tile
// (src == nullptr: none), prefetched while this tile's last panel runs. Panels go in (column
// block, k block) order.
void panel_gemm_bf16(int64_t m, int64_t n, int64_t k, const bf16_t* a, int64_t lda, const PairB& b,
                     at::BFloat16* out, int64_t ldo, std::vector<float>& cbuf, PairPanel& pp,
                     const PanelDesc& next) {
  const PanelBlocks blk = panel_blocks(n, k);
  const int64_t kblocks = ceil_div(k, 2 * blk.kq);
  if (kblocks > 1) cbuf.resize(static_cast<size_t>(m * n));
  for (int64_t j0 = 0; j0 < n; j0 += blk.nc) {
    const int64_t nc = std::min(blk.nc, n - j0);
    for (int64_t kb = 0; kb < kblocks; ++kb) {
      const int64_t k0 = 2 * blk.kq * kb, kc = std::min(2 * blk.kq, k - k0);
      const int64_t kq = ceil_div(kc, 2);
      const PanelDesc cur = panel_at(b, j0, nc, k0, kc);
      // a @ b[e]: the first row block packs the panel (see micro_bf16); b^T: a packing pass.
      uint32_t* panel = pp.get(kq * blk.nc);
      if (b.sn != 1) pack_pairs_cols(cur.src, b.sn, kc, nc, kq, panel);
      // The next panel's source, prefetched over this panel's micro-kernel calls.
      PanelDesc nx = next;
      if (kb + 1 < kblocks) {
        const int64_t k1 = k0 + 2 * blk.kq;
        nx = panel_at(b, j0, nc, k1, std::min(2 * blk.kq, k - k1));
      } else if (j0 + nc < n) {
        nx = panel_at(b, j0 + nc, std::min(blk.nc, n - j0 - nc), 0, std::min(2 * blk.kq, k));
      }
      PfStream pf = panel_source(nx);
      const int64_t strips = ceil_div(nc, kPS);
      const int64_t calls = ceil_div(m, kPR) * strips;
      const int64_t share = ceil_div(pf.rows * pf.lines, calls);
      for (int64_t i = 0; i < m;) {
        const int64_t mr = row_block(m - i);
        for (int64_t s = 0; s < strips; ++s) {
          const int64_t jc = j0 + s * kPS, nr = std::min(kPS, n - jc);
          TileOut o{nullptr, nullptr, nullptr, n, ldo};
          if (kb > 0) o.cin = cbuf.data() + i * n + jc;
          if (kb + 1 < kblocks) {
            o.cf = cbuf.data() + i * n + jc;
          } else {
            o.cb = out + i * ldo + jc;
          }
          pf.budget = share;
          const StripSource src{cur.src + s * kPS, b.sk, kc};
          const bf16_t* ai = a + i * lda + k0;
          if (i == 0 && b.sn == 1) {
            micro_bf16_tile<true>(mr, nr, kq, ai, lda, panel + s * kq * kPS, o, pf, src);
          } else {
            micro_bf16_tile<false>(mr, nr, kq, ai, lda, panel + s * kq * kPS, o, pf, src);
          }
        }
        i += mr;
      }
    }
  }
}

// Dot-product kernel of b^T for bf16 (see dot_8x3): 32 k values (16 pairs) per instruction.
// A and b rows are bf16 with k even or zero-padded: lda, ldbj even, a row's element k is zero when
// k is odd (the b side is masked to k).
MOE_TARGET_AVX512_BF16 void dot_bf16_8x3(int64_t k, const bf16_t* a, int64_t lda, int64_t mi,
                                         const bf16_t* b, int64_t ldbj, int64_t nj, float* c,
                                         int64_t ldc, const bf16_t* pf) {
  const bf16_t* ar[8];
  const bf16_t* br[3];
  __m512 acc[8][3];
  dot_8x3_begin(a, lda, mi, b, ldbj, nj, ar, br, acc);
  for (int64_t p = 0; p < k; p += 32) {
    const __mmask32 km = k - p >= 32 ? ~__mmask32{0} : (__mmask32{1} << (k - p)) - 1;
    if (pf != nullptr) {
      __builtin_prefetch(pf + p, 0, 2);
      __builtin_prefetch(pf + ldbj + p, 0, 2);
      __builtin_prefetch(pf + 2 * ldbj + p, 0, 2);
    }
    const __m512bh b0 = as_bh(_mm512_maskz_loadu_epi16(km, br[0] + p));
    const __m512bh b1 = as_bh(_mm512_maskz_loadu_epi16(km, br[1] + p));
    const __m512bh b2 = as_bh(_mm512_maskz_loadu_epi16(km, br[2] + p));
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
      const __m512bh av = as_bh(_mm512_maskz_loadu_epi16(km, ar[i] + p));
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], av, b0);
      acc[i][1] = _mm512_dpbf16_ps(acc[i][1], av, b1);
      acc[i][2] = _mm512_dpbf16_ps(acc[i][2], av, b2);
    }
  }
  dot_8x3_end(acc, mi, nj, c, ldc);
}

void dot_gemm_bf16(int64_t m, int64_t n, int64_t k, const bf16_t* a, int64_t lda, const bf16_t* b,
                   int64_t ldbj, float* c, int64_t ldc) {
  for (int64_t j = 0; j < n; j += 3) {
    for (int64_t i = 0; i < m; i += 8) {
      const bf16_t* pf = (i == 0 && j + 3 < n) ? b + (j + 3) * ldbj : nullptr;
      dot_bf16_8x3(k, a + i * lda, lda, std::min<int64_t>(8, m - i), b + j * ldbj, ldbj,
                   std::min<int64_t>(3, n - j), c + i * ldc + j, ldc, pf);
    }
  }
}

// fp32 tile -> bf16 output, rounding to nearest even (as c10::BFloat16 does).
MOE_TARGET_AVX512_BF16 void store_tile_bf16(const float* src, int64_t lds, at::BFloat16* dst,
                                            int64_t ldd, int64_t m, int64_t n) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 km = strip_mask(n - j);
      const __m256bh v = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(km, src + i * lds + j));
      _mm256_mask_storeu_epi16(dst + i * ldd + j, km, reinterpret_cast<__m256i>(v));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// bf16 weight gradient with the panel micro-kernels (AVX512-BF16 CPUs): db[e] = x_e^T y_e, a
// reduction over the expert's rows. Both operands need pairs of adjacent rows: the left factor
// x_e^T is packed once per expert (and thread) as transposed pairs, xp[i * ldq + q] =
// {x(2q, i), x(2q + 1, i)} (zero past the rows), and y_e is packed per 64-column strip by the
// first row block while it computes (micro_bf16<kPack>). A strip holds at most kPairsBf16 pairs
// (1024 rows) and stays in L1/L2 while every row block of db[e] runs over it; each 6 x 64
// register tile sums all of its pairs and writes bf16 once. More rows: k blocks of kPairsBf16
// pairs summed through an fp32 strip buffer, in k order. Each output element's sum order depends
// on the row count alone (not on threads or tiling).
MOE_TARGET_AVX512_BF16 void pack_xt_pairs(const bf16_t* x, int64_t ldx, int64_t rows, int64_t p,
                                          uint32_t* xp, int64_t ldq) {
  const int64_t kq = ceil_div(rows, 2);
  const __m512i idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                       39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  for (int64_t i0 = 0; i0 < p; i0 += 16) {
    const __mmask16 km = strip_mask(p - i0);
    const int64_t ni = std::min<int64_t>(16, p - i0);
    for (int64_t q0 = 0; q0 < ldq; q0 += 16) {
      __m512 r[16];
#pragma GCC unroll 16
      for (int t = 0; t < 16; ++t) {
        const int64_t q = q0 + t;
        if (q < kq) {
          const bf16_t* r0 = x + 2 * q * ldx + i0;
          const bf16_t* r1 = 2 * q + 1 < rows ? r0 + ldx : nullptr;
          r[t] = _mm512_castsi512_ps(reinterpret_cast<__m512i>(pair_rows(r0, r1, km, idx)));
        } else {
          r[t] = _mm512_setzero_ps();
        }
      }
      // Word moves only (the shuffles do not touch the bits).
      transpose16(r);
      for (int64_t c = 0; c < ni; ++c) {
        _mm512_storeu_si512(xp + (i0 + c) * ldq + q0, _mm512_castps_si512(r[c]));
      }
    }
  }
}

// db_e[p x n] (bf16, row stride ldo) = x_e^T y_e over `rows` rows; x_e: [rows, p] (row stride
// ldx), y_e: [rows, n] (row stride ldy), both bf16 with unit column stride. Columns [j0, j1)
// only (a thread's share of the strips); xp holds x_e^T packed by pack_xt_pairs (ldq words a row).
void wgrad_strips_bf16(int64_t rows, int64_t p, int64_t j0, int64_t j1, const uint32_t* xp,
                       int64_t ldq, const bf16_t* y, int64_t ldy, at::BFloat16* out, int64_t ldo,
                       std::vector<float>& cbuf, PairPanel& pp) {
  const int64_t kq_all = ceil_div(rows, 2);
  const int64_t kblocks = ceil_div(kq_all, kPairsBf16);
  if (kblocks > 1) cbuf.resize(static_cast<size_t>(p * kPS));
  // Whole 64-column rows of db go out with non-temporal stores (measured 0.80 -> 0.83x dense at
  // 32 experts x 128 rows, 1 thread): db is as large as all expert weights and written once.
  const bool nt_ok = ldo % 32 == 0 && reinterpret_cast<uintptr_t>(out) % 64 == 0;
  PfStream pf;  // no prefetch stream (measured: fetching the next row block's xp rows gained 0)
  for (int64_t jc = j0; jc < j1; jc += kPS) {
    const int64_t nr = std::min(kPS, j1 - jc);
    for (int64_t kb = 0; kb < kblocks; ++kb) {
      const int64_t q0 = kb * kPairsBf16, kq = std::min(kPairsBf16, kq_all - q0);
      uint32_t* strip = pp.get(kq * kPS);
      const StripSource src{y + 2 * q0 * ldy + jc, ldy, std::min(2 * kq, rows - 2 * q0)};
      for (int64_t i = 0; i < p;) {
        const int64_t mr = row_block(p - i);
        TileOut o{nullptr, nullptr, nullptr, kPS, ldo};
        if (kb > 0) o.cin = cbuf.data() + i * kPS;
        if (kb + 1 < kblocks) {
          o.cf = cbuf.data() + i * kPS;
        } else {
          o.cb = out + i * ldo + jc;
          o.nt = nt_ok && nr == kPS;
        }
        // A(i, 2q + h) = x(2q + h, i): row i of xp, read as bf16 pairs.
        const bf16_t* ai = reinterpret_cast<const bf16_t*>(xp + i * ldq + q0);
        if (i == 0) {
          micro_bf16_tile<true>(mr, nr, kq, ai, 2 * ldq, strip, o, pf, src);
        } else {
          micro_bf16_tile<false>(mr, nr, kq, ai, 2 * ldq, strip, o, pf, src);
        }
        i += mr;
      }
    }
  }
}

#endif

// A work tile of the small-group path: rows [r0, r1) x columns [n0, n1) of expert e's output.
struct WorkTile {
  int64_t expert, r0, r1, n0, n1;
};

// Ask the kernel to back a freshly allocated output with transparent huge pages. The outputs of
// this op (notably the weight gradient, as large as all expert weights) are written once right
// after allocation, and with 4 KiB pages the first-touch page faults cost more than the writes
// (measured: 220 ms to fault in 512 MB vs 17 ms to fill it once mapped). Only 2 MiB-aligned
// subranges can use huge pages; madvise is advisory (ignored when THP is off, harmless on memory
// that is already mapped), so failures are ignored.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const size_t bytes = static_cast<size_t>(t.numel()) * t.element_size();
  if (bytes < 2 * kHuge) return;
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t lo = (p + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t hi = (p + bytes) & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#endif
}

// Host copy of the offsets (CPU tensors: no device transfer), checked.
std::vector<int64_t> read_offsets(const char* op, const at::Tensor& offsets, int64_t m) {
  const at::Tensor off = offsets.contiguous();
  const int64_t n = off.size(0);
  std::vector<int64_t> v(off.const_data_ptr<int64_t>(), off.const_data_ptr<int64_t>() + n);
  grouped_gemm::check_offsets_values(op, v.data(), n - 1, m);
  return v;
}

// True when bf16 tiles of this b run the vdpbf16ps kernels (CPU support, and b has a unit
// stride along j, or along k for b^T).
bool bf16_dot_kernels(const at::Tensor& b, bool trans_b) {
  if (!use_avx512_bf16()) return false;
  return (trans_b ? b.stride(1) : b.stride(2)) == 1 || (trans_b ? b.stride(2) : b.stride(1)) == 1;
}

bool is_large(int64_t rows, at::ScalarType dtype, bool trans_b, bool wgrad, const at::Tensor& b) {
  if (dtype == at::kDouble) return true;
  if (dtype == at::kHalf) return false;
  if (dtype == at::kBFloat16 && !wgrad && bf16_dot_kernels(b, trans_b)) {
    // The panel kernels run bf16 forward groups (b^T: from 20 rows) at 0.96-1.07x
    // one dense oneDNN GEMM of the same FLOPs from 128 rows/expert, 1.2-1.5x the per-expert
    // oneDNN loop at 32-128 rows (measured, 1 thread, K = 1024; docs/performance.md).
    return false;
  }
  if (dtype == at::kFloat && gemm_isa() == Isa::kAvx512) {
    // With the AVX-512 micro-kernel our tiles beat torch's fp32 BLAS at every group size for
    // a @ b[e], b[e]^T (transposed panels from kPackRowsTransB rows) and the weight gradient
    // (measured 1.6-1.8x at 64-512 rows, 1.0-2.3x for b^T at 32-2048 rows: the BLAS runs AVX2
    // code on this CPU).
    return false;
  }
  return rows >= (dtype == at::kBFloat16 ? large_rows_bf16() : kLargeRows);
}

// fp32 view of `t` with unit inner stride: `t` itself when it already is one, else a converted
// copy. Used for activations only (their size is small next to the GEMM work).
at::Tensor as_float_rows(const at::Tensor& t) {
  if (t.scalar_type() == at::kFloat && t.stride(1) == 1) return t;
  return t.to(at::kFloat).contiguous();
}

// Write an fp32 tile into the output of type scalar_t.
template <typename scalar_t>
void store_tile(const float* src, int64_t lds, scalar_t* dst, int64_t ldd, int64_t m, int64_t n) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) dst[i * ldd + j] = static_cast<scalar_t>(src[i * lds + j]);
}

// Run `tiles` in parallel: each computes an m x n fp32 block with tile_gemm (through `run`,
// which receives the tile, a C pointer + ldc, and the thread's panel buffer) and stores it into
// the scalar_t output at out + r0 * ldo + n0. fp32 outputs are written in place.
template <typename scalar_t, typename Run>
void run_tiles(const std::vector<WorkTile>& tiles, scalar_t* out, int64_t ldo, const Run& run) {
  if (tiles.empty()) return;
  at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> panel;
    std::vector<float> cbuf;
    for (int64_t t = t0; t < t1; ++t) {
      const WorkTile& w = tiles[static_cast<size_t>(t)];
      const int64_t m = w.r1 - w.r0, n = w.n1 - w.n0;
      scalar_t* dst = out + w.r0 * ldo + w.n0;
      if constexpr (std::is_same_v<scalar_t, float>) {
        run(w, dst, ldo, panel);
      } else {
        cbuf.resize(static_cast<size_t>(m * n));
        run(w, cbuf.data(), n, panel);
        store_tile(cbuf.data(), n, dst, ldo, m, n);
      }
    }
  });
}

// Row ranges of the small-group path, before they are split into column blocks.
struct RowRange {
  int64_t expert, r0, r1;
};

// Split each row range into column blocks as wide as possible (<= kMaxNB, or kMaxNBLarge for
// ranges of more than kMB rows) while leaving at least ~4 tiles per thread for load balance.
std::vector<WorkTile> col_tiles(const std::vector<RowRange>& rows, int64_t n) {
  std::vector<WorkTile> tiles;
  if (rows.empty() || n == 0) return tiles;
  const int64_t want = 4 * std::max<int64_t>(1, at::get_num_threads());
  const int64_t splits =
      std::max(ceil_div(n, kMaxNB), ceil_div(want, static_cast<int64_t>(rows.size())));
  // Block widths are multiples of both register tiles (24 and 48 columns).
  constexpr int64_t kStep = 48;
  const auto width = [&](int64_t parts) {
    return std::max(kStep, ceil_div(ceil_div(n, parts), kStep) * kStep);
  };
  const int64_t nb = width(splits);
  // Merged row ranges (more than kMB rows, see kMBLarge) use narrower blocks.
  const int64_t nb_large = width(std::max(splits, ceil_div(n, kMaxNBLarge)));
  tiles.reserve(rows.size() * static_cast<size_t>(ceil_div(n, nb_large)));
  for (const RowRange& r : rows) {
    const int64_t w = r.r1 - r.r0 > kMB ? nb_large : nb;
    for (int64_t n0 = 0; n0 < n; n0 += w)
      tiles.push_back({r.expert, r.r0, r.r1, n0, std::min(n, n0 + w)});
  }
  return tiles;
}

// ---------------------------------------------------------------------------------------------
// grouped_gemm

#if MOE_GG_X86
// bf16 tiles with the vdpbf16ps kernels (B with a unit stride along j, or along k for b^T):
// a @ b[e] tiles of 7-8 rows run the direct kernel (one 8-row pass), b^T groups of fewer than
// kPanelRowsTransBBf16 rows the dot-product kernel, all others the panel kernels. Measured, 1
// thread, K = N = 1024, 64-128 experts, panel vs direct GFLOP/s: 4 rows 91 vs 82, 6 rows 149 vs
// 124, 7 rows 137 vs 143, 8 rows 128-151 vs 142-149, 10 rows 192 vs 143, 16 rows 219-238 vs 186
// (the direct kernel runs 9-16 rows as two passes over B; the panel kernels pack B once).
void grouped_gemm_tiles_bf16(const std::vector<WorkTile>& tiles, const at::Tensor& a,
                             const at::Tensor& b, const std::vector<int64_t>& off, bool trans_b,
                             at::Tensor& out) {
  const int64_t k = a.size(1), n = out.size(1);
  const bf16_t* ap = reinterpret_cast<const bf16_t*>(a.const_data_ptr<at::BFloat16>());
  const int64_t sam = a.stride(0), sak = a.stride(1);
  const bf16_t* bp = reinterpret_cast<const bf16_t*>(b.const_data_ptr<at::BFloat16>());
  const int64_t sk = trans_b ? b.stride(2) : b.stride(1);
  const int64_t sn = trans_b ? b.stride(1) : b.stride(2);
  at::BFloat16* op = out.mutable_data_ptr<at::BFloat16>();
  // Padded row stride of the A tile copy (even: k pairs; not a multiple of 4 KiB: L1 sets).
  int64_t ldt = ceil_div(k + 1, 32) * 32;
  if ((2 * ldt) % 4096 == 0) ldt += 32;
  const auto panel = [&](const WorkTile& w) {
    const int64_t m = w.r1 - w.r0;
    return sn == 1 ? (m <= kPR || m > kMR512)
                   : off[w.expert + 1] - off[w.expert] >= kPanelRowsTransBBf16;
  };
  const auto source = [&](const WorkTile& w) {
    return PairB{bp + w.expert * b.stride(0) + w.n0 * sn, sk, sn};
  };
  at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, [&](int64_t t0, int64_t t1) {
    PairPanel pp;
    std::vector<float> cbuf;
    std::vector<bf16_t> abuf;
    for (int64_t t = t0; t < t1; ++t) {
      const WorkTile& w = tiles[static_cast<size_t>(t)];
      const int64_t m = w.r1 - w.r0, nb = w.n1 - w.n0;
      const bool use_panel = panel(w);
      const bf16_t* at = ap + w.r0 * sam;
      int64_t lda = sam;
      if (!use_panel || sak != 1 || k % 2 != 0) {
        // A copy with k pairs adjacent and a zero partner for an odd last k. The panel kernels
        // read a unit-stride A with even k in place (the copy cost ~5% at 128 rows/expert).
        abuf.resize(static_cast<size_t>(m * ldt));
        for (int64_t i = 0; i < m; ++i) {
          const bf16_t* src = ap + (w.r0 + i) * sam;
          bf16_t* dst = abuf.data() + i * ldt;
          if (sak == 1) {
            std::memcpy(dst, src, static_cast<size_t>(k) * sizeof(bf16_t));
          } else {
            for (int64_t p = 0; p < k; ++p) dst[p] = src[p * sak];
          }
          dst[k] = 0;  // the partner of the last k when k is odd
        }
        at = abuf.data();
        lda = ldt;
      }
      const bf16_t* be = bp + w.expert * b.stride(0) + w.n0 * sn;
      if (use_panel) {
        PanelDesc next;
        if (t + 1 < t1 && panel(tiles[static_cast<size_t>(t + 1)])) {
          const WorkTile& w1 = tiles[static_cast<size_t>(t + 1)];
          const PanelBlocks blk = panel_blocks(w1.n1 - w1.n0, k);
          next =
              panel_at(source(w1), 0, std::min(blk.nc, w1.n1 - w1.n0), 0, std::min(2 * blk.kq, k));
        }
        panel_gemm_bf16(m, nb, k, at, lda, source(w), op + w.r0 * n + w.n0, n, cbuf, pp, next);
        continue;
      }
      cbuf.resize(static_cast<size_t>(m * nb));
      if (sn == 1) {
        direct_gemm_bf16(m, nb, k, at, lda, be, sk, cbuf.data(), nb);
      } else {
        dot_gemm_bf16(m, nb, k, at, lda, be, sn, cbuf.data(), nb);
      }
      store_tile_bf16(cbuf.data(), nb, op + w.r0 * n + w.n0, n, m, nb);
    }
  });
}
#endif

// Which rows of a a thread's padded copy holds (grouped_gemm_tiles), and from which call.
struct ACopyKey {
  uint64_t call;
  int64_t r0, r1;
};
uint64_t next_call_id() {
  static std::atomic<uint64_t> calls{0};
  return calls.fetch_add(1, std::memory_order_relaxed) + 1;
}

template <typename scalar_t>
void grouped_gemm_tiles(const at::Tensor& a, const at::Tensor& b, const std::vector<int64_t>& off,
                        bool trans_b, at::Tensor& out) {
  const int64_t m = a.size(0), k = a.size(1), n = out.size(1);
  const int64_t num_experts = b.size(0);
  // fp32 b^T groups of at least kPackRowsTransB rows run the register-tile kernel on transposed
  // panels (packed once per tile); smaller ones the dot-product kernel (no packing).
  const auto packed_bt = [&](int64_t group) {
    return std::is_same_v<scalar_t, float> && trans_b && b.stride(2) == 1 &&
           gemm_isa() == Isa::kAvx512 && group >= kPackRowsTransB;
  };
  // fp32 groups on the AVX-512 kernels run in row ranges of up to kMBLarge rows (see there).
  const auto merge_rows = [&](int64_t group) {
    if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
      // bf16 panel kernels (see grouped_gemm_tiles_bf16).
      return bf16_dot_kernels(b, trans_b) &&
             ((trans_b ? b.stride(1) : b.stride(2)) == 1 || group >= kPanelRowsTransBBf16);
    }
    return packed_bt(group) ||
           (std::is_same_v<scalar_t, float> && !trans_b && gemm_isa() == Isa::kAvx512);
  };
  // Small-group tiles, enumerated with the row-tile schedule the CUDA kernel uses.
  std::vector<RowRange> rows;
  const int64_t row_tiles = grouped_gemm::row_tile_bound(m, num_experts, kMB);
  for (int64_t t = 0; t < row_tiles; ++t) {
    const auto rt = grouped_gemm::locate_row_tile(off.data(), num_experts, m, kMB, t);
    if (rt.row_begin == rt.row_end) continue;
    const int64_t group = off[rt.expert + 1] - off[rt.expert];
    if (is_large(group, a.scalar_type(), trans_b, false, b)) continue;
    if (merge_rows(group) && !rows.empty() && rows.back().expert == rt.expert &&
        rt.row_end - rows.back().r0 <= kMBLarge) {
      // One tile packs each B panel once for all its rows: merge row tiles of the group.
      rows.back().r1 = rt.row_end;
      continue;
    }
    rows.push_back({rt.expert, rt.row_begin, rt.row_end});
  }
  const std::vector<WorkTile> tiles = col_tiles(rows, n);
  if (tiles.empty()) return;
#if MOE_GG_X86
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    if (bf16_dot_kernels(b, trans_b))
      return grouped_gemm_tiles_bf16(tiles, a, b, off, trans_b, out);
  }
#endif
  const at::Tensor a32 = as_float_rows(a);
  const float* ap = a32.const_data_ptr<float>();
  const int64_t lda = a32.stride(0);
  // Identifies this call's copies of a (a later call may reuse the same address for new data).
  const uint64_t call = next_call_id();
  const scalar_t* bp = b.const_data_ptr<scalar_t>();
  // B(p, j) of expert e = b[e, p, j], or b[e, j, p] with trans_b.
  const int64_t sk = trans_b ? b.stride(2) : b.stride(1);
  const int64_t sn = trans_b ? b.stride(1) : b.stride(2);
  run_tiles<scalar_t>(tiles, out.mutable_data_ptr<scalar_t>(), n,
                      [&](const WorkTile& w, float* c, int64_t ldc, std::vector<float>& panel) {
                        const BView<scalar_t> bv{bp + w.expert * b.stride(0) + w.n0 * sn, sk, sn};
                        const int64_t rows = w.r1 - w.r0;
                        // The tile's rows of a, copied with a padded row stride: with a
                        // power-of-two stride (d_model) the rows of a micro-kernel's row block
                        // all fall into the same few L1 sets and evict each other. A thread's
                        // tiles come in row-range-major order, so the copy is kept for the
                        // column blocks that follow on the same rows (keyed by this call).
                        thread_local std::vector<float> abuf;
                        thread_local ACopyKey akey{};
                        const int64_t ldt = panel_ld(k);
                        if (akey.call != call || akey.r0 != w.r0 || akey.r1 != w.r1) {
                          abuf.resize(static_cast<size_t>(rows * ldt));
                          for (int64_t i = 0; i < rows; ++i)
                            std::memcpy(abuf.data() + i * ldt, ap + (w.r0 + i) * lda,
                                        static_cast<size_t>(k) * sizeof(float));
                          akey = {call, w.r0, w.r1};
                        }
                        const float* at = abuf.data();
                        const bool pack = packed_bt(off[w.expert + 1] - off[w.expert]);
                        if (direct_gemm(rows, w.n1 - w.n0, k, at, ldt, bv, c, ldc)) return;
                        if (!stream_gemm(rows, w.n1 - w.n0, k, at, ldt, bv, c, ldc) &&
                            (pack || !dot_gemm(rows, w.n1 - w.n0, k, at, ldt, bv, c, ldc))) {
                          tile_gemm(rows, w.n1 - w.n0, k, at, ldt, 1, bv, c, ldc, panel);
                        }
                      });
}

at::Tensor grouped_gemm_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets,
                            bool trans_b) {
  grouped_gemm::check_grouped_gemm_inputs(a, b, offsets, trans_b);
  const int64_t m = a.size(0);
  const int64_t num_experts = b.size(0);
  const int64_t n = trans_b ? b.size(1) : b.size(2);
  const std::vector<int64_t> off = read_offsets("grouped_gemm", offsets, m);
  at::Tensor out = at::empty({m, n}, a.options());
  advise_huge_pages(out);
  // Rows outside [offsets[0], offsets[E]) are zero; every other row is written exactly once.
  out.slice(0, 0, off[0]).zero_();
  out.slice(0, off[num_experts], m).zero_();
  if (a.size(1) == 0) {
    out.zero_();
    return out;
  }
  // Large groups: one BLAS call each (it parallelises internally over torch's pool).
  for (int64_t e = 0; e < num_experts; ++e) {
    const int64_t lo = off[e], hi = off[e + 1];
    if (hi == lo || !is_large(hi - lo, a.scalar_type(), trans_b, false, b)) continue;
    at::Tensor w = trans_b ? b[e].t() : b[e];
    at::Tensor dst = out.slice(0, lo, hi);
    at::mm_out(dst, a.slice(0, lo, hi), w);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "grouped_gemm", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      grouped_gemm_tiles<scalar_t>(a, b, off, trans_b, out);
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// grouped_gemm_wgrad: db[e] = a_e^T @ g_e ([K, N]) or g_e^T @ a_e ([N, K]) with trans_b. The
// reduction runs over the expert's rows in row order, inside one tile (never split across
// threads).

template <typename scalar_t>
void wgrad_tiles(const at::Tensor& a, const at::Tensor& g, const std::vector<int64_t>& off,
                 bool trans_b, at::Tensor& db) {
  const int64_t num_experts = db.size(0);
  // Output of expert e is [P, Q]: P = K, Q = N (or P = N, Q = K with trans_b); it reduces over
  // rows of x (the left factor, [rows, P]) and y (the right one, [rows, Q]).
  const int64_t p_dim = db.size(1), q_dim = db.size(2);
  std::vector<RowRange> blocks;
  // Output rows per tile: with the AVX-512 kernel, kMBLarge (each packed panel of y serves 512
  // rows of db[e], in <= 480-column blocks). Measured at 8 experts x 512 rows, K = 512 / 1792,
  // 1 thread, interleaved: 64 -> 512 rows 160-171 -> 178-208 GFLOP/s fp32 (+10-24%), fp16 +12-23%;
  // unchanged at 8-16 rows per expert.
  const int64_t pb = gemm_isa() == Isa::kAvx512 ? kMBLarge : kMB;
  for (int64_t e = 0; e < num_experts; ++e) {
    const int64_t rows = off[e + 1] - off[e];
    if (rows == 0 || is_large(rows, a.scalar_type(), trans_b, true, a)) continue;
    for (int64_t p0 = 0; p0 < p_dim; p0 += pb) blocks.push_back({e, p0, std::min(p_dim, p0 + pb)});
  }
  const std::vector<WorkTile> tiles = col_tiles(blocks, q_dim);
  if (tiles.empty()) return;
  const at::Tensor a32 = as_float_rows(a);
  const at::Tensor g32 = as_float_rows(g);
  const at::Tensor& x = trans_b ? g32 : a32;
  const at::Tensor& y = trans_b ? a32 : g32;
  const float* xp = x.const_data_ptr<float>();
  const float* yp = y.const_data_ptr<float>();
  const int64_t ldx = x.stride(0), ldy = y.stride(0);
  scalar_t* dbp = db.mutable_data_ptr<scalar_t>();
  const uint64_t call = next_call_id();
  // Each expert's output block starts at db[e]; tiles address it through r0 (rows of db[e]).
  at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> panel;
    std::vector<float> cbuf;
    for (int64_t t = t0; t < t1; ++t) {
      const WorkTile& w = tiles[static_cast<size_t>(t)];
      const int64_t lo = off[w.expert], rows = off[w.expert + 1] - lo;
      const int64_t m = w.r1 - w.r0, n = w.n1 - w.n0;
      scalar_t* dst = dbp + w.expert * p_dim * q_dim + w.r0 * q_dim + w.n0;
      // A(i, p) = x[lo + p, r0 + i] (copied below); B(p, j) = y[lo + p, n0 + j].
      const BView<float> bv{yp + lo * ldy + w.n0, ldy, 1};
      // With AVX-512: x[lo:, r0:r1] copied with a padded row stride (as a in
      // grouped_gemm_tiles): the micro-kernel reads one line of it per k, and with the stride of
      // x (d_model, or h) those lines fall into a few L1 sets. Kept for the column blocks that
      // follow on the same rows.
      thread_local std::vector<float> xbuf;
      thread_local ACopyKey xkey{};
      const float* ax = xp + lo * ldx + w.r0;
      int64_t ldt = ldx;
      if (gemm_isa() == Isa::kAvx512) {
        ldt = panel_ld(m);
        const int64_t key0 = w.expert * p_dim + w.r0;
        if (xkey.call != call || xkey.r0 != key0 || xkey.r1 != key0 + m) {
          xbuf.resize(static_cast<size_t>(rows * ldt));
          for (int64_t p = 0; p < rows; ++p)
            std::memcpy(xbuf.data() + p * ldt, ax + p * ldx,
                        static_cast<size_t>(m) * sizeof(float));
          xkey = {call, key0, key0 + m};
        }
        ax = xbuf.data();
      }
      if constexpr (std::is_same_v<scalar_t, float>) {
        tile_gemm(m, n, rows, ax, 1, ldt, bv, dst, q_dim, panel);
      } else {
        cbuf.resize(static_cast<size_t>(m * n));
        tile_gemm(m, n, rows, ax, 1, ldt, bv, cbuf.data(), n, panel);
        store_tile(cbuf.data(), n, dst, q_dim, m, n);
      }
    }
  });
}

#if MOE_GG_X86
// bf16 weight gradients of experts with at least kWgradPanelRowsBf16 rows on AVX512-BF16 CPUs:
// the panel micro-kernels (see wgrad_strips_bf16) instead of one oneDNN call per expert. Work
// items are (expert, 64-column strip of db[e]), split evenly over the threads; a thread packs
// x_e^T once per expert it touches. Measured, K = N = 1024, 1 thread, wgrad alone, panels vs
// oneDNN GFLOP/s (dense torch.mm of the same FLOPs ~420): 16 rows 114 vs 132, 32 rows 236 vs 218,
// 64 rows 275 vs 244, 128 rows 353 vs 331, 512 rows 403 vs 370 (N = 2048), 1024 rows 439 vs 387.
// Below 32 rows the output writes (db is E x K x N, written once) dominate, and oneDNN's are
// cheaper.
constexpr int64_t kWgradPanelRowsBf16 = 32;
bool wgrad_panels_bf16(int64_t rows, at::ScalarType dtype) {
  return dtype == at::kBFloat16 && use_avx512_bf16() && rows >= kWgradPanelRowsBf16;
}

void wgrad_bf16_panels(const at::Tensor& a, const at::Tensor& g, const std::vector<int64_t>& off,
                       bool trans_b, at::Tensor& db) {
  const int64_t num_experts = db.size(0), p_dim = db.size(1), q_dim = db.size(2);
  const int64_t strips = ceil_div(q_dim, kPS);
  std::vector<int64_t> items;  // expert * strips + strip
  for (int64_t e = 0; e < num_experts; ++e) {
    if (!wgrad_panels_bf16(off[e + 1] - off[e], a.scalar_type())) continue;
    for (int64_t s = 0; s < strips; ++s) items.push_back(e * strips + s);
  }
  if (items.empty()) return;
  const at::Tensor ac = a.stride(1) == 1 ? a : a.contiguous();
  const at::Tensor gc = g.stride(1) == 1 ? g : g.contiguous();
  const at::Tensor& x = trans_b ? gc : ac;
  const at::Tensor& y = trans_b ? ac : gc;
  const auto* xp = reinterpret_cast<const bf16_t*>(x.const_data_ptr<at::BFloat16>());
  const auto* yp = reinterpret_cast<const bf16_t*>(y.const_data_ptr<at::BFloat16>());
  const int64_t ldx = x.stride(0), ldy = y.stride(0);
  at::BFloat16* dbp = db.mutable_data_ptr<at::BFloat16>();
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t t0, int64_t t1) {
    std::vector<uint32_t> xt;
    std::vector<float> cbuf;
    PairPanel pp;
    for (int64_t t = t0; t < t1;) {
      const int64_t e = items[static_cast<size_t>(t)] / strips;
      // This thread's run of strips of expert e.
      int64_t t_end = t;
      while (t_end < t1 && items[static_cast<size_t>(t_end)] / strips == e) ++t_end;
      const int64_t s0 = items[static_cast<size_t>(t)] % strips;
      const int64_t s1 = items[static_cast<size_t>(t_end - 1)] % strips + 1;
      const int64_t lo = off[e], rows = off[e + 1] - lo;
      const int64_t ldq = ceil_div(ceil_div(rows, 2), 16) * 16;
      xt.resize(static_cast<size_t>(p_dim * ldq));
      pack_xt_pairs(xp + lo * ldx, ldx, rows, p_dim, xt.data(), ldq);
      wgrad_strips_bf16(rows, p_dim, s0 * kPS, std::min(q_dim, s1 * kPS), xt.data(), ldq,
                        yp + lo * ldy, ldy, dbp + e * p_dim * q_dim, q_dim, cbuf, pp);
      t = t_end;
    }
    _mm_sfence();  // order the non-temporal stores before the result is used
  });
}
#endif

at::Tensor grouped_gemm_wgrad_cpu(const at::Tensor& a, const at::Tensor& grad_out,
                                  const at::Tensor& offsets, bool trans_b) {
  grouped_gemm::check_grouped_gemm_wgrad_inputs(a, grad_out, offsets);
  const int64_t m = a.size(0);
  const int64_t k = a.size(1);
  const int64_t n = grad_out.size(1);
  const int64_t num_experts = offsets.size(0) - 1;
  const std::vector<int64_t> off = read_offsets("grouped_gemm_wgrad", offsets, m);
  at::Tensor db = trans_b ? at::empty({num_experts, n, k}, a.options())
                          : at::empty({num_experts, k, n}, a.options());
  advise_huge_pages(db);
  for (int64_t e = 0; e < num_experts; ++e) {
    const int64_t lo = off[e], hi = off[e + 1];
    at::Tensor dst = db[e];
    if (hi == lo) {
      dst.zero_();  // an expert without rows has a zero gradient
    } else if (is_large(hi - lo, a.scalar_type(), trans_b, true, a)
#if MOE_GG_X86
               && !wgrad_panels_bf16(hi - lo, a.scalar_type())
#endif
    ) {
      at::Tensor ae = a.slice(0, lo, hi);
      at::Tensor ge = grad_out.slice(0, lo, hi);
      if (trans_b) {
        at::mm_out(dst, ge.t(), ae);
      } else {
        at::mm_out(dst, ae.t(), ge);
      }
    }
  }
#if MOE_GG_X86
  if (a.scalar_type() == at::kBFloat16) wgrad_bf16_panels(a, grad_out, off, trans_b, db);
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "grouped_gemm_wgrad",
                                  [&] {
                                    if constexpr (!std::is_same_v<scalar_t, double>) {
                                      wgrad_tiles<scalar_t>(a, grad_out, off, trans_b, db);
                                    }
                                  });
  return db;
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_framework, CPU, m) {
  m.impl("grouped_gemm", &grouped_gemm_cpu);
  m.impl("grouped_gemm_wgrad", &grouped_gemm_wgrad_cpu);
}

}  // namespace moe_framework
