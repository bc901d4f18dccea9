// Run-time settable tuning knobs of the CPU kernels (grouped_gemm, kg_search / dedup).
//
// The kernels' thresholds and tile sizes are chosen by instruction set and shape
// (csrc/cpu/grouped_gemm/tuning.h, csrc/cpu/similarity/common.h); the knobs below are the ones
// that decide which kernel runs or how work is cut, and that the auto-tuner
// (`python -m moe_framework tune-kernels`, moe_framework/kernel_tuning.py) may move for this
// machine. Each starts at the built-in default, so nothing changes unless a tuning cache is loaded.
// They are process-wide: set them between calls, never while an op runs (a kernel reads each knob
// a few times per call). A given set of values always gives the same bits on a given CPU.
// Exposed as the ops tuning_names / tuning_get / tuning_set (schemas in csrc/registration.cpp).
#pragma once

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace moe_framework {
namespace tuning {

enum Knob : int {
  kGgBlasRowsFp32,     // fp32 groups of at least this many rows go to torch's BLAS (no AVX-512)
  kGgBlasRowsBf16,     // same for bf16 without AVX512-BF16 (0: the ISA default, 8 or 32)
  kGgStreamRows,       // AVX2 tiles of at most this many rows stream B (no packing)
  kGgDirectRowsAvx2,   // AVX2 fp32 tiles up to this many rows run the 4x24 tile on B (no packing)
  kGgRowTile,          // rows of one small-group work tile
  kGgMaxColBlock,      // widest column block of a work tile
  kGgTilesPerThread,   // column blocks are split until each thread has this many tiles
  kSimQueryBlock,      // query rows per GEMM call of kg_search / dedup
  kSimBankBlockBytes,  // bytes of one normalised bank block
  kSimTasksPerThread,  // parallel tasks per thread
  kSimMinTaskWork,     // multiply-adds below which another task costs more than it saves
  kGgqA8ColumnTiles,   // grouped_gemm_q INT4 x INT8 (AVX2): a tile's columns per call (1) or one
  kGgqA8GroupKernels,  // grouped_gemm_q x INT8 activations (AVX2): group kernels (1) or general
  kGgqPrefetchBytes,   // grouped_gemm_q column tiles (AVX2, AVX-512): weight prefetch distance
  kGgqWoColumnTiles,   // grouped_gemm_q INT8 weight-only (AVX2): a tile's columns per call (1)
  kGgqAvx512,          // grouped_gemm_q: AVX2 kernels (0), AVX-512 / VNNI ones where the CPU has
                       // them except INT8 x INT8 (1), or for INT8 x INT8 too (2)
  kNumKnobs
};

struct KnobInfo {
  const char* name;
  int64_t initial, min, max;
};

inline constexpr KnobInfo kKnobs[kNumKnobs] = {
    {"gg_blas_rows_fp32", 128, 1, int64_t{1} << 40},
    {"gg_blas_rows_bf16", 0, 0, int64_t{1} << 40},
    {"gg_stream_rows", 8, 0, 4096},
    {"gg_direct_rows_avx2", 64, 0, 4096},
    {"gg_row_tile", 64, 8, 512},
    {"gg_max_col_block", 1056, 48, int64_t{1} << 20},
    {"gg_tiles_per_thread", 4, 1, 1024},
    {"sim_query_block", 256, 16, 4096},
    {"sim_bank_block_bytes", 384 * 1024, 4096, int64_t{1} << 30},
    {"sim_tasks_per_thread", 4, 1, 1024},
    {"sim_min_task_work", int64_t{1} << 22, 1, int64_t{1} << 40},
    {"ggq_a8_column_tiles", 1, 0, 1},
    {"ggq_a8_group_kernels", 1, 0, 1},
    {"ggq_prefetch_bytes", 4096, 0, 1 << 20},
    {"ggq_wo_column_tiles", 1, 0, 1},
    {"ggq_avx512", 1, 0, 2},
};

// The current values: one definition for the whole library (an inline variable).
inline std::atomic<int64_t> g_values[kNumKnobs] = {
    kKnobs[0].initial,  kKnobs[1].initial,  kKnobs[2].initial,  kKnobs[3].initial,
    kKnobs[4].initial,  kKnobs[5].initial,  kKnobs[6].initial,  kKnobs[7].initial,
    kKnobs[8].initial,  kKnobs[9].initial,  kKnobs[10].initial, kKnobs[11].initial,
    kKnobs[12].initial, kKnobs[13].initial, kKnobs[14].initial, kKnobs[15].initial};

inline int64_t value(Knob knob) {
  return g_values[knob].load(std::memory_order_relaxed);
}

// A knob where a kernel used a constant: converts to its current value.
struct Tuned {
  Knob knob;
  operator int64_t() const { return value(knob); }
};

inline int knob_index(const std::string& name) {
  std::string known;
  for (int i = 0; i < kNumKnobs; ++i) {
    if (name == kKnobs[i].name) return i;
    known += (i ? ", " : "") + std::string(kKnobs[i].name);
  }
  TORCH_CHECK(false, "moe_framework tuning: unknown knob name '", name,
              "'; expected one of: ", known);
  return -1;
}

// ---- the ops (catch-all kernels, registered with their schemas)

inline std::vector<std::string> names() {
  std::vector<std::string> out;
  for (const KnobInfo& k : kKnobs) out.emplace_back(k.name);
  return out;
}

// The current value of `name`, or its built-in default with `initial`.
inline int64_t get(const std::string& name, bool initial) {
  const int i = knob_index(name);
  return initial ? kKnobs[i].initial : g_values[i].load(std::memory_order_relaxed);
}

// Set `name` to `value` (None: back to the built-in default); returns the previous value.
inline int64_t set(const std::string& name, std::optional<int64_t> value) {
  const int i = knob_index(name);
  const KnobInfo& k = kKnobs[i];
  const int64_t v = value.value_or(k.initial);
  TORCH_CHECK(v >= k.min && v <= k.max, "moe_framework tuning: ", k.name, " must be in [", k.min,
              ", ", k.max, "], got ", v);
  return g_values[i].exchange(v, std::memory_order_relaxed);
}

}  // namespace tuning
}  // namespace moe_framework
