// The AVX-512 driver of grouped_gemm_q (kernels: kernels_avx512.h). Included by quant.cpp after its
// own driver pieces (Tile, ActQ8, kMaxRows, with_rows, prefetch), which it uses; quant.cpp calls
// avx512_takes() and run_avx512() and nothing else from here.
//
// Same work split as the AVX2 drivers: (expert, column block) tiles, rows in chunks of up to 4,
// every output element one thread's fixed-order sum (bitwise reproducible for a given CPU and
// build, and across thread counts), but a whole tile's columns per kernel call. The first chunk
// of rows of a tile reads the weights from memory: the tile's first ggq_prefetch_bytes are
// prefetched up front and the kernels keep the stream that far ahead of their reads.
#pragma once

#include <vector>

#include "kernels_avx512.h"

namespace moe_framework {
namespace {

// Whether the AVX-512 kernels run this call (knob ggq_avx512): weight-only with 1 or 2 where the
// CPU has AVX-512; INT4 x INT8 (groups of a multiple of 64 weights) with 1 or 2 where it has
// AVX512-VNNI; INT8 x INT8 only with 2: from DRAM the AVX2 group kernel streams 10-30% faster on
// Zen 4 (docs/performance.md), although the VNNI one computes faster from cache.
bool avx512_takes(const grouped_gemm_q::Scheme& s) {
#if MOE_GGQ_X86
  const int64_t knob = tuning::value(tuning::kGgqAvx512);
  if (knob == 0) return false;
  if (s.act_bits == 8) {
    return use_avx512_vnni() && (s.bits == 8 ? knob == 2 : s.group_size % 64 == 0);
  }
  return use_avx512();
#else
  return false;
#endif
}

#if MOE_GGQ_X86
// kernel(r0, rows, col, w, ncols, ahead, end, res): the tile's `rows` results of rows r0.. for
// columns col.. (= e * N + n) into res[r * ncols + j].
template <typename scalar_t, typename Kernel>
void run_tiles_avx512(const grouped_gemm_q::Scheme& s, const std::vector<Tile>& tiles,
                      const std::vector<int64_t>& off, const at::Tensor& qweight, at::Tensor& out,
                      const Kernel& kernel) {
  const int64_t row_bytes = s.bits == 8 ? s.k : s.k / 2;
  const uint8_t* wbase = static_cast<const uint8_t*>(qweight.const_data_ptr());
  const int64_t ahead = tuning::value(tuning::kGgqPrefetchBytes);
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
        kernel(r0, rows, e * s.n + tile.n0, tile_w, ncols, ahead, pf_end, buf.data());
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
#endif

// Runs the call on the AVX-512 kernels (avx512_takes(s)): weight-only with a32 (fp32 rows from
// offsets[0]) and asum (INT4 group sums), or act (the quantised rows: perm64 for INT4).
template <typename scalar_t>
void run_avx512(const grouped_gemm_q::Scheme& s, const std::vector<Tile>& tiles,
                const std::vector<int64_t>& off, const at::Tensor& a32, const at::Tensor& asum,
                const ActQ8& act, const at::Tensor& qweight, const at::Tensor& scales,
                const c10::optional<at::Tensor>& zeros, at::Tensor& out) {
#if MOE_GGQ_X86
  const int64_t row_bytes = s.bits == 8 ? s.k : s.k / 2;
  const float* sbase = scales.const_data_ptr<float>();
  const uint8_t* zbase = zeros.has_value() ? zeros->const_data_ptr<uint8_t>() : nullptr;
  const int64_t first = off[0];
  if (s.act_bits == 0) {
    const float* abase = a32.const_data_ptr<float>();
    const float* sumbase = asum.defined() ? asum.const_data_ptr<float>() : nullptr;
    run_tiles_avx512<scalar_t>(
        s, tiles, off, qweight, out,
        [&](int64_t r0, int64_t rows, int64_t col, const uint8_t* w, int64_t ncols, int64_t ahead,
            const uint8_t* end, float* res) {
          const ColumnArgs c{abase + (r0 - first) * s.k,
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
          with_rows(rows, [&](auto rc) {
            constexpr int R = decltype(rc)::value;
            if (s.bits == 8) {
              columns_q8_avx512<R>(c, ncols, row_bytes, ahead, end, res);
            } else {
              columns_q4_avx512<R>(c, ncols, row_bytes, ahead, end, res);
            }
          });
        });
    return;
  }
  // INT8 weights: -128 * the lane sums of every row's activations per group (kernels_avx512.h:
  // lane l of a 64-byte step holds its bytes 4l..4l+3).
  std::vector<int32_t> lanes128;
  if (s.bits == 8) {
    const int64_t rows = static_cast<int64_t>(act.q.size()) / std::max<int64_t>(s.k, 1);
    lanes128.assign(static_cast<size_t>(rows * s.groups * 16), 0);
    for (int64_t i = 0; i < rows * s.groups; ++i) {
      lanes128_vnni(act.q.data() + i * s.group_size, s.group_size, lanes128.data() + i * 16);
    }
  }
  run_tiles_avx512<scalar_t>(s, tiles, off, qweight, out,
                             [&](int64_t r0, int64_t rows, int64_t col, const uint8_t* w,
                                 int64_t ncols, int64_t ahead, const uint8_t* end, float* res) {
                               const int64_t r = r0 - first;
                               const ColumnArgsA8 c{
                                   act.q.data() + r * s.k,
                                   s.k,
                                   act.scale.data() + r * s.groups,
                                   act.sum.data() + r * s.groups,
                                   act.scaled_sum.data() + r * s.groups,
                                   s.groups,
                                   w,
                                   sbase + col * s.groups,
                                   zbase == nullptr ? nullptr : zbase + col * s.groups,
                                   s.bits == 8 ? 0 : 8,
                                   s.k,
                                   s.group_size,
                                   s.groups};
                               with_rows(rows, [&](auto rc) {
                                 constexpr int R = decltype(rc)::value;
                                 if (s.bits == 8) {
                                   columns_q8_a8_vnni<R>(c, lanes128.data() + r * s.groups * 16,
                                                         ncols, row_bytes, ahead, end, res);
                                 } else {
                                   columns_q4_a8_vnni<R>(c, ncols, row_bytes, ahead, end, res);
                                 }
                               });
                             });
#endif
}

}  // namespace
}  // namespace moe_framework
