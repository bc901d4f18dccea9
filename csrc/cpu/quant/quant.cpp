// CPU kernel of grouped_gemm_q, the weight-only INT8 / INT4 grouped GEMM (format and checks:
// moe_framework/grouped_gemm_q.h; column micro-kernels: kernels.h).
//
// Work: (expert, column block) tiles over the experts that have rows, one at::parallel_for. A tile
// runs its expert's rows in chunks of up to 4 and, for each chunk, every column of its block: the
// block's packed weights (sized to stay in L1, kTileBytes) come from memory once and from L1 for
// the following chunks, so each selected expert's weights are read from memory once per call;
// experts without rows are not touched. The activations of the routed rows are converted to fp32
// once (and, for INT4, summed per group for the zero point). Every output element is one thread's
// fixed-order sum: results are bitwise reproducible for a given build and CPU (the AVX2 and scalar
// kernels differ in rounding: FMA, summation order). Offsets are host memory on the CPU.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "kernels.h"
#include "kernels_a8.h"
#include "moe_framework/cpu_convert.h"
#include "moe_framework/cpu_tuning.h"
#include "moe_framework/grouped_gemm_q.h"

namespace moe_framework {
namespace {

// Packed weights of one tile: fits in L1 (32 KiB on current x86 cores) with room for the
// activations of a 4-row chunk.
constexpr int64_t kTileBytes = 16 * 1024;
constexpr int kMaxRows = 4;

// How far ahead of the column being computed the weights are prefetched (a few columns: DRAM
// latency is ~300 cycles, one INT4 column of K = 1024 about 150).
constexpr int64_t kAheadBytes = 2048;

MOE_ALWAYS_INLINE void prefetch(const uint8_t* p) {
#if MOE_GGQ_X86
  _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0);
#else
  __builtin_prefetch(p);
#endif
}

struct Tile {
  int64_t expert, n0, n1;
};

bool avx2_fma() {
#if MOE_GGQ_X86
  static const bool ok = use_avx2() && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

template <int R>
void run_column(int bits, const ColumnArgs& c, float* res) {
#if MOE_GGQ_X86
  if (avx2_fma()) {
    if (bits == 8) {
      column_q8_avx2<R>(c, res);
    } else {
      column_q4_avx2<R>(c, res);
    }
    return;
  }
#endif
  if (bits == 8) {
    column_q8_scalar<R>(c, res);
  } else {
    column_q4_scalar<R>(c, res);
  }
}

template <int R>
void run_column_a8(int bits, const ColumnArgsA8& c, float* res) {
#if MOE_GGQ_X86
  if (avx2_fma()) {
    if (bits == 8) {
      column_q8_a8_avx2<R>(c, res);
    } else {
      column_q4_a8_avx2<R>(c, res);
    }
    return;
  }
#endif
  if (bits == 8) {
    column_q8_a8_scalar<R>(c, res);
  } else {
    column_q4_a8_scalar<R>(c, res);
  }
}

// Which AVX2 path runs grouped_gemm_q with INT8 activations: the group kernels (INT4 groups of a
// multiple of 64 weights, INT8 of 32; knob ggq_a8_group_kernels), the INT4 column tiles (knob
// ggq_a8_column_tiles), or the per-column kernels (run_column_a8: also the scalar fallback).
enum class A8Path { kGroupTiles, kColumnTiles, kColumns };

A8Path a8_path(const grouped_gemm_q::Scheme& s) {
  if (!avx2_fma()) return A8Path::kColumns;
  const bool fits = s.group_size % (s.bits == 4 ? 64 : 32) == 0;
  if (fits && tuning::value(tuning::kGgqA8GroupKernels) != 0) return A8Path::kGroupTiles;
  if (s.bits == 4 && tuning::value(tuning::kGgqA8ColumnTiles) != 0) return A8Path::kColumnTiles;
  return A8Path::kColumns;
}

// The activation rows quantised to INT8 per (row, group): q = round(a / scale) (round half to
// even, as torch.round), scale = max|a| / 127 (0 for an all-zero group: q = 0), and sum of q.
struct ActQ8 {
  std::vector<int8_t> q;
  std::vector<float> scale;
  std::vector<int32_t> sum;
  std::vector<float> scaled_sum;  // scale * sum, for the zero point of the AVX2 INT4 kernel
};

// One group of n activations x to INT8 q (scale returned, sum of q in *sum): scalar, and the same
// arithmetic on AVX2 (max|x| ignoring NaN as std::max, IEEE division, round half to even, clamp),
// so both give the same bytes.
float quantize_group_scalar(const float* x, int64_t n, int8_t* q, int32_t* sum) {
  float amax = 0.f;
  for (int64_t j = 0; j < n; ++j) amax = std::max(amax, std::fabs(x[j]));
  const float scale = amax / 127.f;
  int32_t s = 0;
  for (int64_t j = 0; j < n; ++j) {
    const float v = scale > 0.f ? std::nearbyint(x[j] / scale) : 0.f;
    q[j] = static_cast<int8_t>(std::clamp(v, -127.f, 127.f));
    s += q[j];
  }
  *sum = s;
  return scale;
}

#if MOE_GGQ_X86
// round(x / scale) clamped to [-127, 127], 8 lanes as int32
MOE_TARGET_AVX2_FMA MOE_ALWAYS_INLINE __m256i q8_of(const float* x, __m256 vs) {
  const __m256 v = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x), vs),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm256_cvtps_epi32(
      _mm256_min_ps(_mm256_max_ps(v, _mm256_set1_ps(-127.f)), _mm256_set1_ps(127.f)));
}

MOE_TARGET_AVX2_FMA float quantize_group_avx2(const float* x, int64_t n, int8_t* q, int32_t* sum) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 vmax = _mm256_setzero_ps();
  int64_t j = 0;
  // max(|x|, vmax): the second operand when either is NaN, as std::max(amax, |x|)
  for (; j + 8 <= n; j += 8)
    vmax = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(x + j), abs_mask), vmax);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  float amax = 0.f;
  for (float v : lanes) amax = std::max(amax, v);
  for (; j < n; ++j) amax = std::max(amax, std::fabs(x[j]));
  const float scale = amax / 127.f;
  if (!(scale > 0.f)) {
    std::memset(q, 0, static_cast<size_t>(n));
    *sum = 0;
    return scale;
  }
  const __m256 vs = _mm256_set1_ps(scale);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  __m256i vsum = _mm256_setzero_si256();
  j = 0;
  for (; j + 32 <= n; j += 32) {
    const __m256i i0 = q8_of(x + j, vs), i1 = q8_of(x + j + 8, vs), i2 = q8_of(x + j + 16, vs),
                  i3 = q8_of(x + j + 24, vs);
    vsum = _mm256_add_epi32(vsum,
                            _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3)));
    const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + j), _mm256_permutevar8x32_epi32(b, order));
  }
  alignas(32) int32_t sums[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(sums), vsum);
  int32_t s = 0;
  for (int32_t v : sums) s += v;
  for (; j < n; ++j) {
    const float v = std::nearbyint(x[j] / scale);
    q[j] = static_cast<int8_t>(std::clamp(v, -127.f, 127.f));
    s += q[j];
  }
  *sum = s;
  return scale;
}
#endif

// Rows [first, first + rows) of a ([M, K] with a unit stride along K, any dtype of the op) to
// INT8. perm64 (the INT4 group kernel, columns_q4x64_a8_avx2): within each group, every 64 values
// are stored with their 16-byte quarters 1 and 2 swapped (k 0..15, 32..47, 16..31, 48..63).
// Reads the input dtype directly: a bf16 / fp16 group is widened to fp32 into a small buffer
// first (exact), so the bytes are those of quantising the fp32 copy, without making that copy.
template <typename scalar_t>
ActQ8 quantize_rows(const at::Tensor& a, int64_t first, int64_t rows, int64_t groups,
                    int64_t group_size, bool perm64) {
  const int64_t k = a.size(1), lda = a.stride(0);
  ActQ8 act{std::vector<int8_t>(static_cast<size_t>(rows * k)),
            std::vector<float>(static_cast<size_t>(rows * groups)),
            std::vector<int32_t>(static_cast<size_t>(rows * groups)),
            std::vector<float>(static_cast<size_t>(rows * groups))};
  const scalar_t* abase = a.const_data_ptr<scalar_t>() + first * lda;
  at::parallel_for(0, rows * groups, 64, [&](int64_t i0, int64_t i1) {
    std::vector<float> widened;
    if constexpr (!std::is_same_v<scalar_t, float>) widened.resize(static_cast<size_t>(group_size));
    for (int64_t i = i0; i < i1; ++i) {  // i = row * groups + g
      const scalar_t* src = abase + (i / groups) * lda + (i % groups) * group_size;
      const float* x;
      if constexpr (std::is_same_v<scalar_t, float>) {
        x = src;
      } else {
        for (int64_t j = 0; j < group_size; ++j) widened[static_cast<size_t>(j)] = float(src[j]);
        x = widened.data();
      }
      int8_t* q = act.q.data() + i * group_size;
      int32_t sum;
#if MOE_GGQ_X86
      const float scale = avx2_fma() ? quantize_group_avx2(x, group_size, q, &sum)
                                     : quantize_group_scalar(x, group_size, q, &sum);
#else
      const float scale = quantize_group_scalar(x, group_size, q, &sum);
#endif
      if (perm64) {
        for (int64_t j = 0; j + 64 <= group_size; j += 64) {
          int8_t t[16];
          std::memcpy(t, q + j + 16, 16);
          std::memcpy(q + j + 16, q + j + 32, 16);
          std::memcpy(q + j + 32, t, 16);
        }
      }
      act.scale[static_cast<size_t>(i)] = scale;
      act.sum[static_cast<size_t>(i)] = sum;
      act.scaled_sum[static_cast<size_t>(i)] = scale * static_cast<float>(sum);
    }
  });
  return act;
}

// Calls f(std::integral_constant<int, R>{}) for rows = R in [1, kMaxRows].
template <typename F>
void with_rows(int64_t rows, F&& f) {
  switch (rows) {
    case 1:
      return f(std::integral_constant<int, 1>{});
    case 2:
      return f(std::integral_constant<int, 2>{});
    case 3:
      return f(std::integral_constant<int, 3>{});
    default:
      return f(std::integral_constant<int, kMaxRows>{});
  }
}

// Runs the tiles: column(r0, rows, col, res) computes the `rows` (<= kMaxRows) results of rows
// r0.. for column col (= e * N + n) into res; the driver prefetches the weights and stores.
template <typename scalar_t, typename Column>
void run_tiles(const grouped_gemm_q::Scheme& s, const std::vector<Tile>& tiles,
               const std::vector<int64_t>& off, const at::Tensor& qweight, at::Tensor& out,
               const Column& column) {
  const int64_t row_bytes = s.bits == 8 ? s.k : s.k / 2;
  const uint8_t* wbase = static_cast<const uint8_t*>(qweight.const_data_ptr());
  scalar_t* obase = out.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const Tile& tile = tiles[static_cast<size_t>(t)];
      const int64_t e = tile.expert;
      // Software prefetch, kAheadBytes ahead of the column being read, up to the end of the
      // expert's weights (the next tile of this expert is adjacent, usually this thread's next):
      // hardware prefetchers stop at 4 KiB page boundaries, prefetch instructions do not.
      const uint8_t* tile_w = wbase + (e * s.n + tile.n0) * row_bytes;
      const int64_t ahead_end = (s.n - tile.n0) * row_bytes;
      for (int64_t b = 0; b < std::min(ahead_end, kAheadBytes); b += 64) prefetch(tile_w + b);
      for (int64_t r0 = off[e]; r0 < off[e + 1]; r0 += kMaxRows) {
        const int64_t rows = std::min<int64_t>(kMaxRows, off[e + 1] - r0);
        for (int64_t n = tile.n0; n < tile.n1; ++n) {
          if (r0 == off[e]) {  // the first chunk of rows reads the weights from memory
            const int64_t lo = (n - tile.n0) * row_bytes + kAheadBytes;
            const int64_t hi = std::min(ahead_end, lo + row_bytes);
            for (int64_t b = lo & ~int64_t{63}; b < hi; b += 64) prefetch(tile_w + b);
          }
          float res[kMaxRows];
          column(r0, rows, e * s.n + n, res);
          for (int64_t r = 0; r < rows; ++r) {
            obase[(r0 + r) * s.n + n] = cpu::store_acc<scalar_t>(res[r]);
          }
        }
      }
    }
  });
}

// Runs the tiles with a kernel that takes a whole tile's columns per call:
// kernel(r0, rows, tile_w, col, ncols, pf_end, buf) computes rows r0.. (<= kMaxRows) of the ncols
// columns from col (= e * N + n0, weights at tile_w) into buf[i * ncols + j]; pf_end (the expert's
// end, or nullptr) tells it to prefetch `ahead` bytes on: the first chunk of rows reads the
// weights from memory, the following ones from L1. The driver prefetches each tile's first
// `ahead` bytes and stores.
template <typename scalar_t, typename Kernel>
void run_column_tiles(const grouped_gemm_q::Scheme& s, const std::vector<Tile>& tiles,
                      const std::vector<int64_t>& off, const at::Tensor& qweight, at::Tensor& out,
                      int64_t ahead, const Kernel& kernel) {
  const int64_t row_bytes = s.bits == 8 ? s.k : s.k / 2;
  const uint8_t* wbase = static_cast<const uint8_t*>(qweight.const_data_ptr());
  scalar_t* obase = out.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> buf;
    for (int64_t t = t0; t < t1; ++t) {
      const Tile& tile = tiles[static_cast<size_t>(t)];
      const int64_t e = tile.expert, ncols = tile.n1 - tile.n0;
      const uint8_t* tile_w = wbase + (e * s.n + tile.n0) * row_bytes;
      const uint8_t* end = wbase + (e + 1) * s.n * row_bytes;
      for (int64_t b = 0; b < ahead && tile_w + b < end; b += 64) prefetch(tile_w + b);
      buf.resize(static_cast<size_t>(kMaxRows * ncols));
      for (int64_t r0 = off[e]; r0 < off[e + 1]; r0 += kMaxRows) {
        const int64_t rows = std::min<int64_t>(kMaxRows, off[e + 1] - r0);
        const uint8_t* pf_end = r0 == off[e] && ahead > 0 ? end : nullptr;
        kernel(r0, rows, tile_w, e * s.n + tile.n0, ncols, pf_end, buf.data());
        for (int64_t i = 0; i < rows; ++i) {
          for (int64_t j = 0; j < ncols; ++j) {
            obase[(r0 + i) * s.n + tile.n0 + j] =
                cpu::store_acc<scalar_t>(buf[static_cast<size_t>(i * ncols + j)]);
          }
        }
      }
    }
  });
}

// What a weight-only column kernel reads for rows r0.. (a32 rows from `first`, INT4 group sums
// in sumbase or nullptr) against columns col.. (= e * N + n) with weights at w.
struct WeightOnlyArgs {
  const grouped_gemm_q::Scheme& s;
  const float* abase;
  const float* sumbase;
  const float* sbase;
  const uint8_t* zbase;
  int64_t first;

  ColumnArgs at(int64_t r0, int64_t col, const void* w) const {
    return ColumnArgs{abase + (r0 - first) * s.k,
                      s.k,
                      w,
                      sbase + col * s.groups,
                      zbase == nullptr ? nullptr : zbase + col * s.groups,
                      s.bits == 8 ? 0.f : 8.f,
                      sumbase == nullptr ? nullptr : sumbase + (r0 - first) * s.groups,
                      s.groups,
                      s.k,
                      s.group_size,
                      s.groups};
  }
};

// Weight-only: fp32 activations (a32, rows from offsets[0]) and, for INT4, their group sums.
template <typename scalar_t>
void run_weight_only(const grouped_gemm_q::Scheme& s, const std::vector<Tile>& tiles,
                     const std::vector<int64_t>& off, const at::Tensor& a32, const at::Tensor& asum,
                     const at::Tensor& qweight, const at::Tensor& scales,
                     const c10::optional<at::Tensor>& zeros, at::Tensor& out) {
  const int64_t row_bytes = s.bits == 8 ? s.k : s.k / 2;
  const uint8_t* wbase = static_cast<const uint8_t*>(qweight.const_data_ptr());
  const float* sbase = scales.const_data_ptr<float>();
  const uint8_t* zbase = zeros.has_value() ? zeros->const_data_ptr<uint8_t>() : nullptr;
  const float* abase = a32.const_data_ptr<float>();
  const float* sumbase = asum.defined() ? asum.const_data_ptr<float>() : nullptr;
  const WeightOnlyArgs args{s, abase, sumbase, sbase, zbase, off[0]};
#if MOE_GGQ_X86
  if (s.bits == 8 && avx2_fma() && tuning::value(tuning::kGgqWoColumnTiles) != 0) {
    // INT8 on AVX2: a whole tile's columns per kernel call (columns_q8_avx2)
    const int64_t ahead = tuning::value(tuning::kGgqPrefetchBytes);
    run_column_tiles<scalar_t>(s, tiles, off, qweight, out, ahead,
                               [&](int64_t r0, int64_t rows, const uint8_t* tile_w, int64_t col,
                                   int64_t ncols, const uint8_t* pf_end, float* buf) {
                                 const ColumnArgs c = args.at(r0, col, tile_w);
                                 with_rows(rows, [&](auto rc) {
                                   columns_q8_avx2<decltype(rc)::value>(c, ncols, row_bytes, ahead,
                                                                        pf_end, buf);
                                 });
                               });
    return;
  }
#endif
  run_tiles<scalar_t>(
      s, tiles, off, qweight, out, [&](int64_t r0, int64_t rows, int64_t col, float* res) {
        const ColumnArgs c = args.at(r0, col, wbase + col * row_bytes);
        with_rows(rows, [&](auto rc) { run_column<decltype(rc)::value>(s.bits, c, res); });
      });
}

// INT8 activations: aq int8 [rows, K], asc f32 [rows, G], aqsum i32 [rows, G] (kernels_a8.h).
template <typename scalar_t>
void run_act8(const grouped_gemm_q::Scheme& s, const std::vector<Tile>& tiles,
              const std::vector<int64_t>& off, A8Path path, const ActQ8& act,
              const at::Tensor& qweight, const at::Tensor& scales,
              const c10::optional<at::Tensor>& zeros, at::Tensor& out) {
  const int64_t row_bytes = s.bits == 8 ? s.k : s.k / 2;
  const uint8_t* wbase = static_cast<const uint8_t*>(qweight.const_data_ptr());
  const float* sbase = scales.const_data_ptr<float>();
  const uint8_t* zbase = zeros.has_value() ? zeros->const_data_ptr<uint8_t>() : nullptr;
  const int64_t first = off[0];
#if MOE_GGQ_X86
  if (path != A8Path::kColumns) {
    // AVX2: a whole tile's columns per kernel call, the group kernels (columns_q4x64_a8_avx2,
    // columns_q8x32_a8_avx2) or the INT4 column tiles (columns_q4_a8_avx2).
    const int64_t ahead =
        path == A8Path::kColumnTiles ? kAheadBytes : tuning::value(tuning::kGgqPrefetchBytes);
    run_column_tiles<scalar_t>(
        s, tiles, off, qweight, out, ahead,
        [&](int64_t r0, int64_t rows, const uint8_t* tile_w, int64_t col, int64_t ncols,
            const uint8_t* pf_end, float* buf) {
          const int64_t r = r0 - first;
          const ColumnArgsA8 c{act.q.data() + r * s.k,
                               s.k,
                               act.scale.data() + r * s.groups,
                               act.sum.data() + r * s.groups,
                               act.scaled_sum.data() + r * s.groups,
                               s.groups,
                               tile_w,
                               sbase + col * s.groups,
                               zbase == nullptr ? nullptr : zbase + col * s.groups,
                               s.bits == 8 ? 0 : 8,
                               s.k,
                               s.group_size,
                               s.groups};
          with_rows(rows, [&](auto rc) {
            constexpr int R = decltype(rc)::value;
            if (path == A8Path::kColumnTiles) {
              columns_q4_a8_avx2<R>(c, ncols, row_bytes, ahead, pf_end, buf);
            } else if (s.bits == 8) {
              columns_q8x32_a8_avx2<R>(c, ncols, row_bytes, ahead, pf_end, buf);
            } else {
              columns_q4x64_a8_avx2<R>(c, ncols, row_bytes, ahead, pf_end, buf);
            }
          });
        });
    return;
  }
#endif
  run_tiles<scalar_t>(
      s, tiles, off, qweight, out, [&](int64_t r0, int64_t rows, int64_t col, float* res) {
        const int64_t r = r0 - first;
        const ColumnArgsA8 c{act.q.data() + r * s.k,
                             s.k,
                             act.scale.data() + r * s.groups,
                             act.sum.data() + r * s.groups,
                             act.scaled_sum.data() + r * s.groups,
                             s.groups,
                             wbase + col * row_bytes,
                             sbase + col * s.groups,
                             zbase == nullptr ? nullptr : zbase + col * s.groups,
                             s.bits == 8 ? 0 : 8,
                             s.k,
                             s.group_size,
                             s.groups};
        with_rows(rows, [&](auto rc) { run_column_a8<decltype(rc)::value>(s.bits, c, res); });
      });
}

}  // namespace
}  // namespace moe_framework

// AVX-512 / VNNI kernels (avx512_takes, run_avx512): after the helpers above, which they use.
#include "run_avx512.h"

namespace moe_framework {
namespace {

at::Tensor grouped_gemm_q_cpu(const at::Tensor& a, const at::Tensor& qweight_in,
                              const at::Tensor& scales_in,
                              const c10::optional<at::Tensor>& zeros_in, const at::Tensor& offsets,
                              int64_t bits, int64_t group_size, int64_t act_bits) {
  constexpr const char* op = "grouped_gemm_q";
  const grouped_gemm_q::Scheme s = grouped_gemm_q::check_inputs(
      a, qweight_in, scales_in, zeros_in, offsets, bits, group_size, act_bits);
  const int64_t m = a.size(0);
  const at::Tensor off_t = offsets.contiguous();
  const std::vector<int64_t> off(off_t.const_data_ptr<int64_t>(),
                                 off_t.const_data_ptr<int64_t>() + s.num_experts + 1);
  grouped_gemm::check_offsets_values(op, off.data(), s.num_experts, m);
  at::Tensor out = at::empty({m, s.n}, a.options());
  const int64_t first = off[0], last = off[s.num_experts];
  // Rows outside [offsets[0], offsets[E]) belong to no expert: zeros.
  if (first > 0) out.slice(0, 0, first).zero_();
  if (last < m) out.slice(0, last, m).zero_();
  if (last == first || s.n == 0) return out;
  if (s.k == 0) {
    out.slice(0, first, last).zero_();
    return out;
  }
  const at::Tensor qweight = qweight_in.contiguous();
  const at::Tensor scales = scales_in.contiguous();
  c10::optional<at::Tensor> zeros;
  if (zeros_in.has_value()) zeros = zeros_in->contiguous();
  at::Tensor a32, asum;
  ActQ8 act;
  const A8Path path = a8_path(s);  // read once: the activations' layout depends on it
  const bool avx512 = avx512_takes(s);
  if (s.act_bits == 8) {
    // Quantised straight from a (no fp32 copy: a per-call allocation and conversion less).
    const at::Tensor a_rows = a.stride(1) == 1 ? a : a.contiguous();
    const bool perm64 = s.bits == 4 && (avx512 || path == A8Path::kGroupTiles);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), op, [&] {
      if constexpr (!std::is_same_v<scalar_t, double>) {
        act = quantize_rows<scalar_t>(a_rows, first, last - first, s.groups, s.group_size, perm64);
      }
    });
  } else {
    a32 = (first == 0 && last == m ? a : a.slice(0, first, last)).to(at::kFloat).contiguous();
    if (s.bits == 4) asum = a32.view({last - first, s.groups, s.group_size}).sum(-1).contiguous();
  }

  const int64_t row_bytes = s.bits == 8 ? s.k : s.k / 2;
  const int64_t block = std::clamp<int64_t>(kTileBytes / std::max<int64_t>(row_bytes, 1), 1, s.n);
  std::vector<Tile> tiles;
  for (int64_t e = 0; e < s.num_experts; ++e) {
    if (off[e + 1] == off[e]) continue;
    for (int64_t n0 = 0; n0 < s.n; n0 += block) tiles.push_back({e, n0, std::min(s.n, n0 + block)});
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), op, [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      if (avx512) {
        run_avx512<scalar_t>(s, tiles, off, a32, asum, act, qweight, scales, zeros, out);
      } else if (s.act_bits == 8) {
        run_act8<scalar_t>(s, tiles, off, path, act, qweight, scales, zeros, out);
      } else {
        run_weight_only<scalar_t>(s, tiles, off, a32, asum, qweight, scales, zeros, out);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_framework, CPU, m) {
  m.impl("grouped_gemm_q", &grouped_gemm_q_cpu);
}

}  // namespace moe_framework
