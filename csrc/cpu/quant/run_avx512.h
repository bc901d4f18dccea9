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
// columns col.. (= e * N + n) into res[r * ncols + j]; run_column_tiles (quant.cpp) with the
// ggq_prefetch_bytes distance.
template <typename scalar_t, typename Kernel>
void run_tiles_avx512(const grouped_gemm_q::Scheme& s, const std::vector<Tile>& tiles,
                      const std::vector<int64_t>& off, const at::Tensor& qweight, at::Tensor& out,
                      const Kernel& kernel) {
  const int64_t ahead = tuning::value(tuning::kGgqPrefetchBytes);
  run_column_tiles<scalar_t>(s, tiles, off, qweight, out, ahead,
                             [&](int64_t r0, int64_t rows, const uint8_t* tile_w, int64_t col,
                                 int64_t ncols, const uint8_t* pf_end, float* buf) {
                               kernel(r0, rows, col, tile_w, ncols, ahead, pf_end, buf);
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
    const WeightOnlyArgs args{s,
                              a32.const_data_ptr<float>(),
                              asum.defined() ? asum.const_data_ptr<float>() : nullptr,
                              sbase,
                              zbase,
                              first};
    run_tiles_avx512<scalar_t>(s, tiles, off, qweight, out,
                               [&](int64_t r0, int64_t rows, int64_t col, const uint8_t* w,
                                   int64_t ncols, int64_t ahead, const uint8_t* end, float* res) {
                                 const ColumnArgs c = args.at(r0, col, w);
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
