// What every route CPU kernel file needs: the includes, the accumulation type, the lane count
// of the fixed-order partial sums and the task count of a parallel loop.
//
// The files of this folder are headers included by one translation unit, route.cpp, after its
// `#pragma GCC optimize("no-trapping-math", "fp-contract=off")`: the pragma must precede every
// kernel (without it the score loops do not vectorise and the AVX-512 clones contract to FMA,
// which changes the bits), and one unit lets the compiler inline across the files exactly as
// before the split. Everything lives in an anonymous namespace (internal linkage), as it did in
// the single file.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "moe_framework/cpu_isa.h"
#include "moe_framework/route.h"

namespace moe_framework {
namespace {

using route::acc_t;

// Independent partial sums of the softmax denominator: a fixed order, so the baseline and AVX2
// builds (and any thread count) give the same bits.
constexpr int kLanes = 16;
// Row elements per task below which another thread costs more than it saves.
constexpr int64_t kMinWorkPerTask = 1 << 15;

int64_t num_tasks(int64_t rows, int64_t work_per_row) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t by_work =
      std::max<int64_t>(1, rows * std::max<int64_t>(1, work_per_row) / kMinWorkPerTask);
  return std::max<int64_t>(1, std::min({threads, by_work, rows}));
}

}  // namespace
}  // namespace moe_framework
