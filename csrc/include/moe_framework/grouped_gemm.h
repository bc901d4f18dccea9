// Tile scheduling and input checks shared by the CPU and CUDA kernels of grouped_gemm and
// grouped_gemm_wgrad.
//
// Row-tile schedule. Expert e owns rows [offsets[e], offsets[e+1]) of a and of the output. With
// tiles of `bm` rows, expert e's row tiles get the global indices
//     tile_start(e) + 0, tile_start(e) + 1, ...,   tile_start(e) = floor(offsets[e] / bm) + e.
// tile_start is non-decreasing in e and tile_start(e+1) - tile_start(e) >= ceil(count_e / bm), so
// the ranges never overlap, and every index is below row_tile_bound(M, E, bm) = ceil(M/bm) + E.
// A kernel can therefore launch a static grid of row_tile_bound tiles (no host sync: the bound
// only depends on shapes) and each tile finds its expert with a binary search over offsets on the
// device; tiles that fall in a gap belong to no rows and return at once.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "moe_framework/common.h"

namespace moe_framework {
namespace grouped_gemm {

// Accumulation type: fp32 for bf16/fp16/fp32, fp64 for fp64 (same on CPU and CUDA).
template <typename scalar_t>
using acc_t = at::opmath_type<scalar_t>;

MOE_HD int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Clamp an offset into [0, m]: the CUDA kernels cannot report bad offsets without a host sync, so
// they clamp instead and never index outside a (the CPU entry points reject bad offsets).
MOE_HD int64_t clamp_offset(int64_t v, int64_t m) {
  return v < 0 ? 0 : (v > m ? m : v);
}

MOE_HD int64_t tile_start(int64_t offset_e, int64_t e, int64_t bm) {
  return offset_e / bm + e;
}

// Upper bound on the number of row tiles over all experts, from shapes only.
MOE_HD int64_t row_tile_bound(int64_t m, int64_t num_experts, int64_t bm) {
  return ceil_div(m, bm) + num_experts;
}

// The rows [row_begin, row_end) of expert `expert` covered by one row tile.
struct RowTile {
  int64_t expert;
  int64_t row_begin;
  int64_t row_end;
};

// Find the expert and rows of global row tile `tile` (see the schedule above). Returns an empty
// range (row_begin == row_end) when the tile lies in a gap between experts. `offsets` has
// num_experts + 1 entries and may be read from device memory; values are clamped into [0, m].
MOE_HD RowTile locate_row_tile(const int64_t* offsets, int64_t num_experts, int64_t m, int64_t bm,
                               int64_t tile) {
  // Largest e in [0, E) with tile_start(e) <= tile (binary search: tile_start is monotone when
  // offsets are; with clamped, non-monotone offsets the search still ends on some valid e).
  int64_t lo = 0, hi = num_experts;  // invariant: answer in [lo, hi)
  if (tile < tile_start(clamp_offset(offsets[0], m), 0, bm)) return RowTile{0, 0, 0};
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (tile_start(clamp_offset(offsets[mid], m), mid, bm) <= tile) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  const int64_t first = clamp_offset(offsets[lo], m);
  const int64_t last = clamp_offset(offsets[lo + 1], m);
  const int64_t row_begin = first + (tile - tile_start(first, lo, bm)) * bm;
  int64_t row_end = row_begin + bm;
  if (row_end > last) row_end = last;
  if (row_begin >= row_end) return RowTile{lo, 0, 0};
  return RowTile{lo, row_begin, row_end};
}

// ---- input checks shared by the CPU and CUDA entry points ----

inline void check_offsets(const char* op, const at::Tensor& offsets) {
  check_tensor(offsets, op, "offsets", 1, {at::kLong});
  TORCH_CHECK(offsets.size(0) >= 2, op, ": offsets must have E+1 >= 2 entries, got ",
              offsets.size(0));
}

inline void check_grouped_gemm_inputs(const at::Tensor& a, const at::Tensor& b,
                                      const at::Tensor& offsets, bool trans_b) {
  constexpr const char* op = "grouped_gemm";
  check_same_device(op, {{"a", a}, {"b", b}, {"offsets", offsets}});
  check_tensor(a, op, "a", 2, {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble});
  check_tensor(b, op, "b", 3, {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble});
  TORCH_CHECK(b.scalar_type() == a.scalar_type(), op, ": b must have the dtype of a (",
              a.scalar_type(), "), got ", b.scalar_type());
  check_offsets(op, offsets);
  TORCH_CHECK(offsets.size(0) == b.size(0) + 1, op,
              ": offsets must have E+1 entries for b with E=", b.size(0), " experts, got ",
              offsets.size(0));
  const int64_t kb = trans_b ? b.size(2) : b.size(1);
  TORCH_CHECK(kb == a.size(1), op, ": inner dimensions differ: a is ", a.sizes(), ", b is ",
              b.sizes(), " (trans_b=", trans_b, ") so K=", a.size(1), " vs ", kb);
}

inline void check_grouped_gemm_wgrad_inputs(const at::Tensor& a, const at::Tensor& grad_out,
                                            const at::Tensor& offsets) {
  constexpr const char* op = "grouped_gemm_wgrad";
  check_same_device(op, {{"a", a}, {"grad_out", grad_out}, {"offsets", offsets}});
  check_tensor(a, op, "a", 2, {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble});
  check_tensor(grad_out, op, "grad_out", 2, {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble});
  TORCH_CHECK(grad_out.scalar_type() == a.scalar_type(), op,
              ": grad_out must have the dtype of a (", a.scalar_type(), "), got ",
              grad_out.scalar_type());
  TORCH_CHECK(grad_out.size(0) == a.size(0), op, ": grad_out must have the M=", a.size(0),
              " rows of a, got ", grad_out.size(0));
  check_offsets(op, offsets);
}

// CPU only (the values are on the host there): offsets[0] >= 0, non-decreasing, offsets[E] <= M.
inline void check_offsets_values(const char* op, const int64_t* off, int64_t num_experts,
                                 int64_t m) {
  TORCH_CHECK(off[0] >= 0, op, ": offsets[0] must be >= 0, got ", off[0]);
  for (int64_t e = 0; e < num_experts; ++e) {
    TORCH_CHECK(off[e + 1] >= off[e], op, ": offsets must be non-decreasing, got offsets[", e,
                "] = ", off[e], " > offsets[", e + 1, "] = ", off[e + 1]);
  }
  TORCH_CHECK(off[num_experts] <= m, op, ": offsets[E] must be <= M = ", m,
              " (the rows of a), got offsets[", num_experts, "] = ", off[num_experts]);
}

}  // namespace grouped_gemm
}  // namespace moe_framework
