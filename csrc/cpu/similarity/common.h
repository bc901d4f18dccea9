// What every similarity CPU kernel file needs: the includes (immintrin.h where the x86 clones
// are built), the block and task constants and two small helpers.
//
// The files of this folder are headers included by one translation unit, similarity.cpp: the
// kernels stay in one unit so the compiler inlines across them exactly as before the split.
// Everything lives in an anonymous namespace (internal linkage), as it did in the single file.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "moe_framework/cpu_isa.h"
#include "moe_framework/cpu_tuning.h"
#include "moe_framework/similarity.h"

#if MOE_CPU_AVX2_CLONE
#include <immintrin.h>
#endif

namespace moe_framework {
namespace {

using namespace similarity;

// The four constants below are knobs (moe_framework/cpu_tuning.h): the defaults are given here, a
// tuning cache of `python -m moe_framework tune-kernels` may set others for this machine.
// Query rows per GEMM call: enough to amortise packing the bank block inside the BLAS (256).
constexpr tuning::Tuned kQueryBlock{tuning::kSimQueryBlock};
// Bytes of one normalised bank block: small enough to stay in the core's L2 between the
// normalisation pass and the GEMM that reads it (what keeps q = 1 searches memory bound, not
// twice memory bound). 384 KiB.
constexpr tuning::Tuned kBankBlockBytes{tuning::kSimBankBlockBytes};
// Parallel tasks per thread of torch's pool: some slack for uneven blocks (4).
constexpr tuning::Tuned kTasksPerThread{tuning::kSimTasksPerThread};
// Multiply-adds below which another task costs more than it saves (~50 us of one core; 2^22).
constexpr tuning::Tuned kMinTaskWork{tuning::kSimMinTaskWork};
// Cap on partial top-k entries (all tasks together) before fewer bank segments are used.
constexpr int64_t kMaxPartialEntries = int64_t{1} << 25;

int64_t bank_block_rows(int64_t d, int64_t elem_size) {
  const int64_t rows = int64_t{kBankBlockBytes} / std::max<int64_t>(1, d * elem_size);
  return std::clamp<int64_t>(rows / 16 * 16, 16, 4096);
}

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

}  // namespace
}  // namespace moe_framework
