// The small-group path's schedule: which groups go to torch's BLAS instead (is_large), the work
// tiles the other groups are cut into (col_tiles) and the parallel loop that runs them
// (run_tiles), shared by the forward and the weight gradient.
#pragma once

#include "fp32_tiles.h"

namespace moe_framework {
namespace {

// A work tile of the small-group path: rows [r0, r1) x columns [n0, n1) of expert e's output.
struct WorkTile {
  int64_t expert, r0, r1, n0, n1;
};

// True when bf16 tiles of this b run the vdpbf16ps kernels (CPU support, and b has a unit
// stride along j, or along k for b^T).
bool bf16_dot_kernels(const at::Tensor& b, bool trans_b) {
  if (!use_avx512_bf16()) return false;
  return (trans_b ? b.stride(1) : b.stride(2)) == 1 || (trans_b ? b.stride(2) : b.stride(1)) == 1;
}

// True when a group of `rows` rows goes to torch's BLAS (one at::mm_out) instead of our tiles
// (the rules: the top of grouped_gemm.cpp; `wgrad`: for grouped_gemm_wgrad, where b is `a`).
bool is_large(int64_t rows, at::ScalarType dtype, bool trans_b, bool wgrad, const at::Tensor& b) {
  if (dtype == at::kDouble) return true;
  if (dtype == at::kHalf) return false;
  if (dtype == at::kBFloat16 && !wgrad && bf16_dot_kernels(b, trans_b)) {
    // The panel kernels run bf16 forward groups (b^T: from kPanelRowsTransBBf16 rows) at about
    // the rate of one dense oneDNN GEMM, faster than the per-expert oneDNN loop.
    return false;
  }
  if (dtype == at::kFloat && gemm_isa() == Isa::kAvx512) {
    // With the AVX-512 micro-kernel our tiles beat torch's fp32 BLAS at every group size for
    // a @ b[e], b[e]^T (transposed panels from kPackRowsTransB rows) and the weight gradient
    // (the BLAS runs AVX2 code on the AMD CPUs measured).
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
// ranges of more than kMB rows) while leaving at least kTilesPerThread tiles per thread.
std::vector<WorkTile> col_tiles(const std::vector<RowRange>& rows, int64_t n) {
  std::vector<WorkTile> tiles;
  if (rows.empty() || n == 0) return tiles;
  const int64_t want = kTilesPerThread * std::max<int64_t>(1, at::get_num_threads());
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

// Which rows of `a` a thread's padded copy holds (grouped_gemm_tiles), and from which call.
struct ACopyKey {
  uint64_t call;
  int64_t r0, r1;
};
uint64_t next_call_id() {
  static std::atomic<uint64_t> calls{0};
  return calls.fetch_add(1, std::memory_order_relaxed) + 1;
}

}  // namespace
}  // namespace moe_framework
