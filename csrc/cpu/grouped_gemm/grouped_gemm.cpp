// CPU kernels of grouped_gemm and grouped_gemm_wgrad: the entry points and the forward tile
// drivers. The kernels are headers of this folder, included only here (one translation unit, so
// they inline across files as they did in one file):
//   common.h        includes, the x86 switch, gemm_isa() (which fp32 micro-kernel runs)
//   tuning.h        every threshold and tile constant, with its reason
//   fp32_tiles.h    register-tile micro-kernels (scalar, AVX2+FMA 4x24, AVX-512 8x48)
//   packing.h       B -> fp32 panels (converting; transposing for b^T), tile_gemm
//   small_groups.h  kernels that read B in place: streaming (AVX2), direct (AVX-512), dot product
//   dot_avx2.h      the AVX2 dot-product kernel for b^T (b rows read in place, no packing)
//   bf16.h          vdpbf16ps kernels (AVX512-BF16): direct, pair panels + 6x64 tile, dot product
//   schedule.h      is_large (BLAS or our tiles), work tiles, the parallel tile loop
//   wgrad.h         the weight gradient (fp32 tiles; bf16 panel micro-kernels)
// Measurements behind the choices: docs/performance_log.md, "Grouped GEMM: kernel experiment log".
//
// Two paths, chosen per expert from its row count (the offsets are host memory on CPU):
//  * "large" groups call torch's BLAS (at::mm_out) on the contiguous row slice;
//  * the others are cut into (expert, row block, column block) tiles over all experts, run by one
//    at::parallel_for (no per-expert calls), each with a register-blocked FMA micro-kernel picked
//    at run time (gemm_isa(): AVX-512 8x48, AVX2+FMA 4x24, or a scalar loop).
//    With AVX-512, tiles of <= 16 rows with a unit-column-stride B (fp32, and bf16 on
//    AVX512-BF16 CPUs) run the 8x48 tile directly on B, without packing it (direct_avx512).
// Which groups are "large" (is_large; the thresholds are in tuning.h): fp64 (gradcheck) always;
// fp16 never (torch's CPU fp16 GEMM is orders of magnitude slower); fp32 from kLargeRows rows with
// AVX2, and with AVX-512 never (b^T groups from kPackRowsTransB rows pack transposed B panels for
// the 8x48 kernel, smaller ones run a dot-product kernel); bf16 on CPUs with AVX512-BF16 never in
// the forward (vdpbf16ps kernels: the 6x64 panel kernels, the direct 8x48 tile at 7-8 rows, the
// dot-product kernel for b^T below kPanelRowsTransBBf16 rows), and in the weight gradient only
// from large_rows_bf16() to kWgradPanelRowsBf16 - 1 rows (from there the panel micro-kernels run
// it, wgrad_bf16_panels); bf16 without AVX512-BF16 from large_rows_bf16() rows (32 with
// AVX-512, never on AVX2-only CPUs: torch's bf16 GEMM is far slower there).
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
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "bf16.h"
#include "common.h"
#include "schedule.h"
#include "tuning.h"
#include "wgrad.h"

namespace moe_framework {
namespace {

// Ask the kernel to back a freshly allocated output with transparent huge pages. The outputs of
// this op (notably the weight gradient, as large as all expert weights) are written once right
// after allocation, and with 4 KiB pages the first-touch page faults cost more than the writes
// (by an order of magnitude, measured: docs/performance_log.md). Only 2 MiB-aligned
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

// ---------------------------------------------------------------------------------------------
// grouped_gemm

#if MOE_GG_X86
// bf16 tiles with the vdpbf16ps kernels (B with a unit stride along j, or along k for b^T):
// a @ b[e] tiles of 7-8 rows run the direct kernel (one 8-row pass), b^T groups of fewer than
// kPanelRowsTransBBf16 rows the dot-product kernel, all others the panel kernels (the direct
// kernel runs 9-16 rows as two passes over B; the panel kernels pack B once; below 7 rows the
// 6-row panel tile measured faster).
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

// The small groups of grouped_gemm (those is_large leaves to us): cut into work tiles, each run
// on the first kernel that applies (direct, streaming, dot product; else the packed panels of
// tile_gemm). bf16 with the vdpbf16ps kernels goes to grouped_gemm_tiles_bf16 instead.
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
