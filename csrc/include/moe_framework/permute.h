// Index math and input checks shared by the CPU and CUDA kernels of permute / unpermute.
//
// Layout contract (docs/architecture.md): slots are flattened token-major, s = t*k + j. permute
// sorts slots stably by "bin": bin = expert id for routed slots, bin = num_experts for dropped
// ones, so dropped slots land after every expert, in rows offsets[E]..T*k (zero rows).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "moe_framework/common.h"

namespace moe_framework {
namespace permute {

// Accumulation type of the combine and of the weight gradient: fp32 for bf16/fp16/fp32, fp64 for
// fp64. One definition so CPU and CUDA round the same way.
template <typename scalar_t>
using acc_t = at::opmath_type<scalar_t>;

// Is `id` a legal entry of ids: an expert in [0, E) or -1 (dropped slot)?
MOE_HD bool valid_expert_id(int64_t id, int64_t num_experts) {
  return id >= -1 && id < num_experts;
}

// Sort key of a slot. Dropped slots (-1) go to bin E, after every expert. An illegal id also goes
// to bin E: the CPU kernel rejects such ids before this matters, the CUDA kernel (which cannot
// report an error without a host sync) treats the slot as dropped, so it never indexes out of
// bounds.
MOE_HD int64_t slot_bin(int64_t id, int64_t num_experts) {
  return (id >= 0 && id < num_experts) ? id : num_experts;
}

MOE_HD int64_t token_of_slot(int64_t slot, int64_t k) {
  return slot / k;
}

// The sort runs over fixed chunks of slots: each chunk histograms its bins, a bin-major scan of the
// [bins][chunks] histogram gives chunk c's first row of bin b, and a stable pass over the chunk
// hands out rows in slot order. The result is the unique stable order, whatever the chunking.
MOE_HD int64_t chunk_begin(int64_t chunk, int64_t chunk_size, int64_t n) {
  const int64_t b = chunk * chunk_size;
  return b < n ? b : n;
}
MOE_HD int64_t chunk_end(int64_t chunk, int64_t chunk_size, int64_t n) {
  return chunk_begin(chunk + 1, chunk_size, n);
}
MOE_HD int64_t num_chunks(int64_t n, int64_t chunk_size) {
  return (n + chunk_size - 1) / chunk_size;
}
// Index of the (bin, chunk) counter in the bin-major histogram [bins][chunks]: scanning it in
// memory order visits expert 0's chunks first, then expert 1's, ..., then the dropped bin.
MOE_HD int64_t hist_index(int64_t bin, int64_t chunk, int64_t chunks) {
  return bin * chunks + chunk;
}

// Does row `row` of a gathered buffer contribute? Rows in [0, limit) do: for unpermute limit is the
// number of rows of y_sorted (anything else is an invalid row, skipped on CUDA, an error on CPU),
// for permute_backward it is offsets[E] (rows past it hold dropped slots, whose x_sorted row is a
// constant zero, so they carry no gradient to x).
MOE_HD bool row_contributes(int64_t row, int64_t limit) {
  return row >= 0 && row < limit;
}

// One step of the fixed-order (j = 0..k-1) weighted sum of unpermute.
template <typename acc>
MOE_HD acc combine_step(acc sum, acc weight, acc value) {
  return sum + weight * value;
}

// ---- input checks shared by the CPU and CUDA entry points ----

inline void check_permute_inputs(const at::Tensor& x, const at::Tensor& ids, int64_t num_experts) {
  constexpr const char* op = "permute";
  check_same_device(op, {{"x", x}, {"ids", ids}});
  check_tensor(x, op, "x", 2, {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble});
  check_tensor(ids, op, "ids", 2, {at::kInt, at::kLong});
  TORCH_CHECK(ids.size(0) == x.size(0), op, ": ids must have one row per token of x (", x.size(0),
              "), got ", ids.size(0));
  TORCH_CHECK(ids.size(1) >= 1, op, ": ids must have k >= 1 columns, got ", ids.size(1));
  TORCH_CHECK(num_experts >= 1, op, ": num_experts must be >= 1, got ", num_experts);
}

inline void check_permute_backward_inputs(const at::Tensor& grad_x_sorted,
                                          const at::Tensor& row_of_slot, const at::Tensor& offsets,
                                          int64_t k) {
  constexpr const char* op = "permute_backward";
  check_same_device(
      op, {{"grad_x_sorted", grad_x_sorted}, {"row_of_slot", row_of_slot}, {"offsets", offsets}});
  check_tensor(grad_x_sorted, op, "grad_x_sorted", 2,
               {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble});
  check_tensor(row_of_slot, op, "row_of_slot", 1, {at::kLong});
  check_tensor(offsets, op, "offsets", 1, {at::kLong});
  TORCH_CHECK(k >= 1, op, ": k must be >= 1, got ", k);
  TORCH_CHECK(offsets.size(0) >= 2, op, ": offsets must have E+1 >= 2 entries, got ",
              offsets.size(0));
  TORCH_CHECK(row_of_slot.size(0) % k == 0, op, ": row_of_slot must have T*k entries (k=", k,
              "), got ", row_of_slot.size(0));
  TORCH_CHECK(grad_x_sorted.size(0) == row_of_slot.size(0), op,
              ": grad_x_sorted must have one row per slot (", row_of_slot.size(0), "), got ",
              grad_x_sorted.size(0));
}

// weights must be float32 (what route returns) or the dtype of y_sorted.
inline void check_unpermute_inputs(const char* op, const at::Tensor& y_sorted,
                                   const at::Tensor& row_of_slot, const at::Tensor& weights) {
  check_same_device(op,
                    {{"y_sorted", y_sorted}, {"row_of_slot", row_of_slot}, {"weights", weights}});
  check_tensor(y_sorted, op, "y_sorted", 2, {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble});
  check_tensor(row_of_slot, op, "row_of_slot", 1, {at::kLong});
  check_tensor(weights, op, "weights", 2, {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble});
  TORCH_CHECK(
      weights.scalar_type() == at::kFloat || weights.scalar_type() == y_sorted.scalar_type(), op,
      ": weights must be float32 or the dtype of y_sorted (", y_sorted.scalar_type(), "), got ",
      weights.scalar_type());
  const int64_t slots = weights.size(0) * weights.size(1);
  TORCH_CHECK(row_of_slot.size(0) == slots, op, ": row_of_slot must have T*k = ", slots,
              " entries (weights is ", weights.sizes(), "), got ", row_of_slot.size(0));
  TORCH_CHECK(y_sorted.size(0) == slots, op, ": y_sorted must have T*k = ", slots,
              " rows (weights is ", weights.sizes(), "), got ", y_sorted.size(0));
}

inline void check_unpermute_backward_inputs(const at::Tensor& grad_y, const at::Tensor& y_sorted,
                                            const at::Tensor& row_of_slot,
                                            const at::Tensor& weights) {
  constexpr const char* op = "unpermute_backward";
  check_same_device(op, {{"grad_y", grad_y},
                         {"y_sorted", y_sorted},
                         {"row_of_slot", row_of_slot},
                         {"weights", weights}});
  check_unpermute_inputs(op, y_sorted, row_of_slot, weights);
  check_tensor(grad_y, op, "grad_y", 2, {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble});
  TORCH_CHECK(grad_y.scalar_type() == y_sorted.scalar_type(), op,
              ": grad_y must have the dtype of y_sorted (", y_sorted.scalar_type(), "), got ",
              grad_y.scalar_type());
  TORCH_CHECK(grad_y.size(0) == weights.size(0) && grad_y.size(1) == y_sorted.size(1), op,
              ": grad_y must have shape [T, d] = [", weights.size(0), ", ", y_sorted.size(1),
              "], got ", grad_y.sizes());
}

// Calls fn(weight_t{}) with weight_t = float when weights is float32, else scalar_t (the other
// dtype check_unpermute_inputs accepts). Keeps the kernels' instantiations to two weight types.
template <typename scalar_t, typename Fn>
void dispatch_weight_type(const at::Tensor& weights, Fn&& fn) {
  if (weights.scalar_type() == at::kFloat) {
    fn(float{});
  } else {
    fn(scalar_t{});
  }
}

// Rows are read with a unit inner stride; only the row stride may be arbitrary. Returns `t` itself
// when it already qualifies (no copy), else a contiguous copy.
inline at::Tensor with_unit_inner_stride(const at::Tensor& t) {
  return (t.size(1) <= 1 || t.stride(1) == 1) ? t : t.contiguous();
}

}  // namespace permute
}  // namespace moe_framework
