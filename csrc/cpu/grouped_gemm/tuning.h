// Every threshold and tile constant of the grouped_gemm CPU kernels, each with the reason for its
// value. They were tuned on two AMD EPYC cores with AVX-512 and AVX512-BF16 (a Zen 5 class core
// with 512-bit units, a Zen 4 core with 256-bit units); the measurements behind them, and what was
// tried instead, are in docs/performance_log.md, "Grouped GEMM: kernel experiment log". They choose
// kernels and tilings by instruction set and shape, never by timing at run time, so a build gives
// the same bits on a given CPU every time. The constants that decide which kernel runs or how the
// work is cut are knobs (moe_framework/cpu_tuning.h): the value here is the default, and a tuning
// cache written by `python -m moe_framework tune-kernels` may set another for this machine.
#pragma once

#include "common.h"
#include "moe_framework/cpu_tuning.h"

namespace moe_framework {
namespace {

// ---- Which groups go to torch's BLAS (is_large, schedule.h)

// fp32 without AVX-512: from this many rows torch's BLAS is faster; below it, per-call overhead
// and thin GEMM shapes make our tiles faster.
// Knob gg_blas_rows_fp32 (default 128).
constexpr tuning::Tuned kLargeRows{tuning::kGgBlasRowsFp32};
// bf16 when the vdpbf16ps kernels do not run it: with AVX512-BF16, torch's bf16 GEMM uses bf16 dot
// products that our fp32-converting tiles cannot match beyond a handful of rows; with AVX-512 but
// without them it converts to fp32 like ours and wins only from 32 rows. With AVX2 only (Zen 3),
// torch 2.14's CPU bf16 GEMM ran at under 1 GFLOP/s (64 experts x 64 rows, 512 x 768: 2.6-4 s,
// our converting tiles 0.04 s): never.
// Knob gg_blas_rows_bf16 (0, the default: the value below).
int64_t large_rows_bf16() {
  if (const int64_t tuned = tuning::value(tuning::kGgBlasRowsBf16)) return tuned;
#if MOE_GG_X86
  static const int64_t rows = __builtin_cpu_supports("avx512bf16") ? 8
                              : gemm_isa() == Isa::kAvx2           ? INT64_MAX
                                                                   : 32;
  return rows;
#else
  return 32;
#endif
}

// ---- Which kernel runs a small group

// fp32 b^T with AVX-512: from this many rows, packing transposed panels for the 8x48 tile pays for
// itself; smaller groups run the dot-product kernel, which needs no packing.
constexpr int64_t kPackRowsTransB = 24;
// bf16 b^T on AVX512-BF16 CPUs: the same crossover between the pair panels and the bf16
// dot-product kernel.
constexpr int64_t kPanelRowsTransBBf16 = 20;
// AVX2 (no AVX-512): tiles of at most this many rows stream B (each weight feeds too few FMAs for
// packing to pay); with AVX-512 the packed and direct kernels are faster.
// Knob gg_stream_rows (default 8).
constexpr tuning::Tuned kStreamRows{tuning::kGgStreamRows};
// fp32 on AVX-512 with a unit-column-stride B: tiles of at most this many rows run the 8x48 tile
// directly on B (one or two passes); larger tiles amortise packing B into panels.
constexpr int64_t kDirectRows = 16;
// fp32 on AVX2 with a unit-column-stride B: tiles of kStreamRows + 1 to this many rows run the 4x24
// tile directly on B (direct_gemm_avx2); larger tiles pack B panels. A knob (gg_direct_rows_avx2).
constexpr tuning::Tuned kDirectRowsAvx2{tuning::kGgDirectRowsAvx2};

// ---- fp32 register tiles and packed panels (fp32_tiles.h, packing.h)

// AVX2+FMA register tile: kMR rows x kNR columns (3 ymm), 12 accumulators, which leaves the other
// 4 of the 16 ymm registers for B and the broadcast A.
constexpr int64_t kMR = 4;
constexpr int64_t kNR = 24;
// Deepest packed B panel: kKC x kNR floats (24 KiB) stay in L1 while the row groups of a tile
// sweep over them.
constexpr int64_t kKC = 256;
// A packed panel (k block x panel_ld(n) floats) stays within this many bytes (L2): sets the depth
// of its k block.
constexpr int64_t kPanelBytes = 256 * 1024;

#if MOE_GG_X86
// AVX-512 register tile: kMR512 rows x kNR512 columns (3 zmm), 24 accumulators, 3 B vectors and a
// broadcast within the 32 zmm registers (no spills).
constexpr int64_t kMR512 = 8;
constexpr int64_t kNR512 = 48;
#endif

// ---- Work tiles (schedule.h)

// Rows of one work tile (the row-tile schedule of grouped_gemm.h, shared with the CUDA kernel):
// small enough that many tiles balance the threads and a tile's rows of A stay in L2.
// Knob gg_row_tile (default 64).
constexpr tuning::Tuned kMB{tuning::kGgRowTile};
// fp32 groups on the AVX-512 kernels (and bf16 on the panel kernels) run in row ranges of up to
// this many rows of one expert, so each B panel is packed once for all of them.
constexpr int64_t kMBLarge = 512;
// Widest column block: a wide block reads each row of B as one long contiguous run (small groups
// are bound by streaming B from memory); 1056 columns, a multiple of both register tiles.
// Knob gg_max_col_block (default 1056).
constexpr tuning::Tuned kMaxNB{tuning::kGgMaxColBlock};
// Widest column block of a kMBLarge row range (10 AVX-512 register tiles): a narrower panel gets a
// deeper k block within kPanelBytes, so fewer reloads of the C tile.
constexpr int64_t kMaxNBLarge = 480;
// Column blocks are split until every thread has at least this many tiles (load balance).
// Knob gg_tiles_per_thread (default 4).
constexpr tuning::Tuned kTilesPerThread{tuning::kGgTilesPerThread};

#if MOE_GG_X86
// ---- Software prefetch

// Prefetches of B rows that lie a row stride apart (the direct kernels and the bf16 packing row
// block walk a strip of B down K; the hardware prefetchers do not follow that walk) go to L2, not
// L1: an L1 prefetch holds one of the core's few L1 miss buffers until its line arrives, which caps
// the lines in flight below what DRAM latency needs; L2 tracks many more misses.
constexpr auto kStreamHint = _MM_HINT_T1;
// Rows of B the direct kernels prefetch ahead: enough rows in flight to cover DRAM latency (on
// Zen 4, 16 and 32 rows measured slower).
constexpr int64_t kDirectPrefetch = 48;

// ---- bf16 panel kernels (bf16.h, wgrad.h)

// Register tile: kPR rows x kPS columns (4 zmm of fp32 sums per row, 24 in all); per k pair 4 panel
// loads, 6 broadcasts, 24 vdpbf16ps. Model widths are mostly multiples of 64, so the last strip of
// a row is rarely partial.
constexpr int64_t kPR = 6;
constexpr int64_t kPS = 64;
// k pairs per k block (1024 k): a register tile sums a whole k block in registers, so C is loaded
// and stored once per 1024 k.
constexpr int64_t kPairsBf16 = 512;
// A pair panel stays within this many bytes (L2) while every row block of the tile runs over it.
constexpr int64_t kPanelBytesBf16 = 256 * 1024;
// Rows of B (pairs) the packing row block prefetches ahead of its reads, in case the panel's
// source is not in L2 yet.
constexpr int64_t kPackPrefetch = 32;
// bf16 weight gradient: experts of at least this many rows run our panel micro-kernels; below it
// writing db (E x K x N, written once) dominates, and oneDNN's writes are cheaper.
constexpr int64_t kWgradPanelRowsBf16 = 32;
#endif

}  // namespace
}  // namespace moe_framework
