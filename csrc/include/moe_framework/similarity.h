// Math and input checks shared by the CPU and CUDA kernels of dedup and kg_search.
//
// Both ops rank candidates by cosine similarity. The order is total and the same everywhere:
// a higher score ranks first, equal scores rank the lower id first. Running top-k lists are
// binary heaps under that order whose root is the entry ranked LAST (the one a better candidate
// evicts), so a push is O(log k); a final heap sort lists them best first. Because the order is
// total and ids are unique, the top-k of a set is unique: any split of the candidates into
// partial heaps merges to the same answer, which is what makes the parallel kernels deterministic.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "moe_framework/common.h"

namespace moe_framework {
namespace similarity {

// Accumulation type of the dot products: float64 for float64 inputs, float32 otherwise (bf16 and
// fp16 rows are widened to fp32 before the GEMM so scores are never rounded to 16 bits).
template <typename scalar_t>
struct acc_type {
  using type = float;
};
template <>
struct acc_type<double> {
  using type = double;
};
template <typename scalar_t>
using acc_t = typename acc_type<scalar_t>::type;

// A row's squared norm is usable when it is finite and positive: zero rows have no direction, and a
// NaN/Inf entry makes the sum NaN/Inf. (NaN fails both comparisons.)
template <typename T>
MOE_HD bool norm_ok(T sum_sq) {
  return sum_sq > T(0) && sum_sq <= std::numeric_limits<T>::max();
}

// The factor that scales a row with squared norm `sum_sq` to unit length.
MOE_HD double inv_norm(double sum_sq) {
  return 1.0 / sqrt(sum_sq);
}

// Rounding can push the dot product of two unit vectors slightly outside [-1, 1]; clamping keeps
// scores in the range cosine promises (so threshold = 1 never flags a duplicate, for example).
template <typename T>
MOE_HD T clamp_cosine(T c) {
  return c > T(1) ? T(1) : (c < T(-1) ? T(-1) : c);
}

// Rank order of candidates: higher score first, lower id first among equal scores.
template <typename T>
MOE_HD bool ranks_before(T score_a, int64_t id_a, T score_b, int64_t id_b) {
  return score_a > score_b || (score_a == score_b && id_a < id_b);
}

// dedup: item j duplicates its best earlier item when their cosine is strictly above threshold.
template <typename T>
MOE_HD bool is_duplicate(T best_score, double threshold) {
  return static_cast<double>(best_score) > threshold;
}

// ---- running top-k: heap of `size` <= k entries, root = the entry ranked last ----

template <typename T>
MOE_HD void heap_swap(T* score, int64_t* id, int64_t a, int64_t b) {
  const T s = score[a];
  score[a] = score[b];
  score[b] = s;
  const int64_t i = id[a];
  id[a] = id[b];
  id[b] = i;
}

// Restore the heap below `pos` in [0, size): a parent ranks after both children.
template <typename T>
MOE_HD void heap_sift_down(T* score, int64_t* id, int64_t size, int64_t pos) {
  while (true) {
    const int64_t l = 2 * pos + 1;
    if (l >= size) return;
    int64_t worst = l;
    const int64_t r = l + 1;
    if (r < size && ranks_before(score[l], id[l], score[r], id[r])) worst = r;
    if (!ranks_before(score[pos], id[pos], score[worst], id[worst])) return;
    heap_swap(score, id, pos, worst);
    pos = worst;
  }
}

// Can (s, i) enter a full heap? Cheap pre-filter callers use before topk_push: scores below the
// root's never can.
template <typename T>
MOE_HD bool topk_may_enter(const T* score, int64_t size, int64_t k, T s) {
  return size < k || s >= score[0];
}

// Offer candidate (s, i) to the running top-k held in score/id [k] with `size` entries.
template <typename T>
MOE_HD void topk_push(T* score, int64_t* id, int64_t& size, int64_t k, T s, int64_t i) {
  if (size < k) {
    int64_t pos = size++;
    score[pos] = s;
    id[pos] = i;
    while (pos > 0) {
      const int64_t parent = (pos - 1) / 2;
      if (!ranks_before(score[parent], id[parent], score[pos], id[pos])) return;
      heap_swap(score, id, parent, pos);
      pos = parent;
    }
    return;
  }
  if (!ranks_before(s, i, score[0], id[0])) return;
  score[0] = s;
  id[0] = i;
  heap_sift_down(score, id, size, int64_t{0});
}

// Heap sort in place: afterwards entry 0 is the best, entry size-1 the worst.
template <typename T>
MOE_HD void topk_sort(T* score, int64_t* id, int64_t size) {
  for (int64_t end = size - 1; end > 0; --end) {
    heap_swap(score, id, int64_t{0}, end);  // the root (worst left) goes to the back
    heap_sift_down(score, id, end, int64_t{0});
  }
}

// ---- input checks shared by the CPU and CUDA entry points ----

inline void check_dedup_inputs(const at::Tensor& emb, double threshold) {
  constexpr const char* op = "dedup";
  check_tensor(emb, op, "emb", 2, {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble});
  TORCH_CHECK(emb.size(1) >= 1, op, ": emb must have d >= 1 columns, got shape ", emb.sizes());
  TORCH_CHECK(threshold >= -1.0 && threshold <= 1.0, op,
              ": threshold must be a cosine in [-1, 1], got ", threshold);
}

inline void check_kg_search_inputs(const at::Tensor& queries, const at::Tensor& bank, int64_t k,
                                   const at::Tensor& n_valid) {
  constexpr const char* op = "kg_search";
  check_same_device(op, {{"queries", queries}, {"bank", bank}, {"n_valid", n_valid}});
  check_tensor(queries, op, "queries", 2, {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble});
  check_tensor(bank, op, "bank", 2, {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble});
  check_tensor(n_valid, op, "n_valid", 0, {at::kLong});
  TORCH_CHECK(queries.scalar_type() == bank.scalar_type(), op,
              ": queries must have the dtype of bank (", bank.scalar_type(), "), got ",
              queries.scalar_type());
  TORCH_CHECK(bank.size(1) >= 1, op, ": bank must have d >= 1 columns, got shape ", bank.sizes());
  TORCH_CHECK(queries.size(1) == bank.size(1), op, ": queries must have d = ", bank.size(1),
              " columns like bank, got shape ", queries.sizes());
  TORCH_CHECK(k >= 1, op, ": k must be >= 1, got ", k);
}

// Rows are read with a unit inner stride; only the row stride may be arbitrary.
inline at::Tensor with_unit_inner_stride(const at::Tensor& t) {
  return (t.size(1) <= 1 || t.stride(1) == 1) ? t : t.contiguous();
}

}  // namespace similarity
}  // namespace moe_framework
