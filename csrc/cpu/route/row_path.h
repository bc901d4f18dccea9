// The row path of route: the full-row loops (max and NaN test, softmax denominator, keys, group
// top-2), the top-k selection (select_by_rank, TopKSelector), RouteParams and RowRouter, which
// routes one token row at a time.
#pragma once

#include <algorithm>
#include <cstring>
#include <functional>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "common.h"

namespace moe_framework {
namespace {

// ---------------------------------------------------------------------------------------------
// The row loops are compiled twice, for baseline x86-64 and with target("avx2,f16c"), and picked
// at run time. FMA is deliberately not enabled: both builds round every operation the same way,
// so results are bitwise identical whichever build runs.

// Max over the row (NaN ignored; max is exact, so the vector order does not matter) and whether
// the row holds a NaN.
template <typename T>
MOE_ALWAYS_INLINE void row_max_and_nan(const T* x, int64_t n, T& row_max, bool& has_nan) {
  T m = -route::pos_inf<T>();
  int nan = 0;
#pragma omp simd reduction(max : m) reduction(| : nan)
  for (int64_t e = 0; e < n; ++e) {
    const T v = x[e];
    nan |= v != v;
    m = v > m ? v : m;
  }
  row_max = m;
  has_nan = nan != 0;
}

// sum_e exp(x_e - row_max) over kLanes fixed partial sums (the softmax denominator).
template <typename T>
MOE_ALWAYS_INLINE T row_sum_exp(const T* x, int64_t n, T row_max) {
  T lane_sum[kLanes] = {};
  int64_t e = 0;
  if (std::isfinite(row_max)) {  // the common case: a plain subtraction, vectorised
    for (; e + kLanes <= n; e += kLanes) {
      for (int l = 0; l < kLanes; ++l) lane_sum[l] += route::exp_acc(x[e + l] - row_max);
    }
  }
  for (int l = 0; e < n; ++e, l = (l + 1) % kLanes) {
    lane_sum[l] += route::softmax_numerator(x[e], row_max);
  }
  T sum = T(0);
  for (int l = 0; l < kLanes; ++l) sum += lane_sum[l];
  return sum;
}

// key[e] = score(x[e]) + bias[e] for the whole row.
template <typename T>
MOE_ALWAYS_INLINE void row_keys(const T* x, int64_t n, int scoring, T row_max, T row_inv_sum,
                                const T* bias, T* key) {
  if (scoring == route::kSoftmax) {
    if (std::isfinite(row_max)) {
      for (int64_t e = 0; e < n; ++e) key[e] = route::exp_acc(x[e] - row_max) * row_inv_sum;
    } else {
      for (int64_t e = 0; e < n; ++e)
        key[e] = route::softmax_numerator(x[e], row_max) * row_inv_sum;
    }
  } else {
    for (int64_t e = 0; e < n; ++e) key[e] = route::sigmoid(x[e]);
  }
  if (bias != nullptr) {
    for (int64_t e = 0; e < n; ++e) key[e] += bias[e];
  }
}

// The best two keys of a group (NaN ranks as -inf), as route::top2_push would find them. Large
// groups take three vector passes (max; is the max repeated; max below it) instead of a branchy
// scalar loop.
template <typename T>
MOE_ALWAYS_INLINE void group_top2(const T* key, int64_t n, T& first, T& second) {
  first = -route::pos_inf<T>();
  second = -route::pos_inf<T>();
  if (n < 8) {
    for (int64_t e = 0; e < n; ++e) route::top2_push(first, second, key[e]);
    return;
  }
  T m = -route::pos_inf<T>();
#pragma omp simd reduction(max : m)
  for (int64_t e = 0; e < n; ++e) m = key[e] > m ? key[e] : m;
  int repeats = 0;
#pragma omp simd reduction(+ : repeats)
  for (int64_t e = 0; e < n; ++e) repeats += key[e] == m;
  T below = -route::pos_inf<T>();
#pragma omp simd reduction(max : below)
  for (int64_t e = 0; e < n; ++e) below = (key[e] < m && key[e] > below) ? key[e] : below;
  first = m;
  second = repeats >= 2 ? m : below;
}

// Candidates above which select_by_rank sorts instead of counting ranks: the count costs n^2
// comparisons (vectorised), the partial sort O(n log k). Below it the count is faster.
constexpr int kMaxRankCount = 128;

// The k best of n >= k candidates (keys already through route::rank_key, ids distinct) in rank
// order. Few candidates go through an insertion list (the vector loop's set-up would dominate);
// up to kMaxRankCount, a candidate's rank is the number of candidates that route::ranks_before it,
// counted with a vector loop (no data-dependent branches; the ranks of a strict total order are
// distinct); more (thousands of groups) are partially sorted, so no input is quadratic. All three
// give the order of route::ranks_before. scratch_keys holds k keys, scratch_order n indices.
template <typename T>
MOE_ALWAYS_INLINE void select_by_rank(const T* keys, const int32_t* ids, int n, int k,
                                      int32_t* out_ids, T* scratch_keys, int32_t* scratch_order) {
  if (n <= 32) {
    int m = 0;
    for (int i = 0; i < n; ++i) route::topk_insert(scratch_keys, out_ids, k, m, keys[i], ids[i]);
    return;
  }
  if (n <= kMaxRankCount) {
    for (int i = 0; i < n; ++i) {
      const T ki = keys[i];
      const int32_t ii = ids[i];
      int rank = 0;
#pragma omp simd reduction(+ : rank)
      for (int j = 0; j < n; ++j)
        rank += route::ranks_before(keys[j], int64_t(ids[j]), ki, int64_t(ii));
      if (rank < k) out_ids[rank] = ii;
    }
    return;
  }
  // ranks_before is a strict total order (no NaN keys, distinct ids): any correct sort gives the
  // same k ids in the same order.
  const auto before = [keys, ids](int32_t a, int32_t b) {
    return route::ranks_before(keys[a], int64_t(ids[a]), keys[b], int64_t(ids[b]));
  };
  for (int i = 0; i < n; ++i) scratch_order[i] = i;
  std::nth_element(scratch_order, scratch_order + (k - 1), scratch_order + n, before);
  std::sort(scratch_order, scratch_order + k, before);
  for (int j = 0; j < k; ++j) out_ids[j] = ids[scratch_order[j]];
}

// Top-k over candidate ranges (disjoint, added in increasing id order) into a best-first id
// list, in the order of route::ranks_before.
//
// The ranges are cut into segments of at most kLanes experts and each segment's best key is taken
// with a vector max. The k-th largest segment best, `floor`, is a lower bound of the k-th best key
// (the k best segments each hold a key >= floor), so only segments whose best reaches the floor
// are visited. In them every key above the floor survives (they lie in the fewer than k segments
// whose best is above it: at most kLanes * (k - 1) keys), and of the keys equal to the floor only
// the k with the lowest ids (they may be needed to fill the list, and ties go to the lowest id).
// Typically ~2k survivors, ranked by select_by_rank, instead of a branchy insertion attempt per
// expert; and never more than kLanes * k, however many keys tie (a zero-initialised router, rows
// of NaN or -inf), so a row costs O(E) plus the ranking of O(k) survivors.
template <typename T>
class TopKSelector {
 public:
  // Segments are shorter when there are few candidates per selected expert, so that there are
  // enough of them (about 4k) for the floor to be tight.
  TopKSelector(int64_t candidates, int k)
      : seg_len_(segment_length(candidates, k)),
        seg_begin_(candidates / seg_len_ + candidates + 1),
        seg_end_(seg_begin_.size()),
        seg_best_(seg_begin_.size()),
        floor_scratch_(seg_begin_.size()),
        surv_keys_(candidates + 1),
        surv_ids_(candidates + 1),
        tie_ids_(k + 1),
        order_(candidates + 1) {}

  static int64_t segment_length(int64_t candidates, int k) {
    int64_t len = kLanes;
    while (len > 4 && candidates < 4 * k * len) len /= 2;
    return len;
  }

  void clear() { segments_ = 0; }

  // Adds the candidates [begin, end); ranges must arrive in increasing id order (the tie cap of
  // select keeps the first keys equal to the floor it sees).
  MOE_ALWAYS_INLINE void add_range(const T* key, int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; b += seg_len_) {
      const int64_t e = std::min<int64_t>(b + seg_len_, end);
      T m = -route::pos_inf<T>();
#pragma omp simd reduction(max : m)
      for (int64_t i = b; i < e; ++i) m = key[i] > m ? key[i] : m;  // NaN never wins
      seg_begin_[segments_] = b;
      seg_end_[segments_] = e;
      seg_best_[segments_] = m;
      ++segments_;
    }
  }

  MOE_ALWAYS_INLINE void select(const T* key, int k, int32_t* out_ids, T* scratch_keys,
                                int32_t* scratch_ids) {
    const T floor = kth_segment_best(k, scratch_keys, scratch_ids);
    // Survivors, compacted without branches: keys above the floor, then (capped at k, lowest ids
    // first) keys equal to it.
    int above = 0, ties = 0;
    for (int64_t s = 0; s < segments_; ++s) {
      if (!(seg_best_[s] >= floor)) continue;  // -inf segments still pass a -inf floor
      // A segment whose best is the floor holds nothing above it: once k ties are kept it has
      // nothing to offer (a tied row then skips all but its first segments).
      if (seg_best_[s] == floor && ties == k) continue;
      for (int64_t e = seg_begin_[s]; e < seg_end_[s]; ++e) {
        const T v = route::rank_key(key[e]);
        surv_keys_[above] = v;
        surv_ids_[above] = int32_t(e);
        above += v > floor;
        tie_ids_[ties] = int32_t(e);
        ties += (v == floor) & (ties < k);
      }
    }
    // Keys equal to the floor rank after every key above it: the lowest-id ones fill the list.
    int n = above;
    for (int i = 0; i < ties && n < k; ++i, ++n) {
      surv_keys_[n] = floor;
      surv_ids_[n] = tie_ids_[i];
    }
    select_by_rank(surv_keys_.data(), surv_ids_.data(), n, k, out_ids, scratch_keys, order_.data());
  }

 private:
  // The k-th largest segment best (-inf when there are fewer than k segments): by insertion for
  // small k, by a selection (O(segments)) for large k, where insertion would cost segments * k.
  MOE_ALWAYS_INLINE T kth_segment_best(int k, T* scratch_keys, int32_t* scratch_ids) {
    if (segments_ < k) return -route::pos_inf<T>();
    if (k <= 16) {
      int m = 0;
      for (int64_t s = 0; s < segments_; ++s) {
        route::topk_push(scratch_keys, scratch_ids, k, m, seg_best_[s], int32_t(s));
      }
      return scratch_keys[k - 1];
    }
    std::copy(seg_best_.begin(), seg_best_.begin() + segments_, floor_scratch_.begin());
    std::nth_element(floor_scratch_.begin(), floor_scratch_.begin() + (k - 1),
                     floor_scratch_.begin() + segments_, std::greater<T>());
    return floor_scratch_[k - 1];
  }

  int64_t seg_len_;
  std::vector<int64_t> seg_begin_, seg_end_;
  std::vector<T> seg_best_, floor_scratch_;
  std::vector<T> surv_keys_;
  std::vector<int32_t> surv_ids_, tie_ids_, order_;
  int64_t segments_ = 0;
};

struct RouteParams {
  int64_t num_experts;
  int k;
  int scoring;
  int64_t n_group;
  int64_t topk_group;
  bool renormalize;
  double scale;
};

// Per-thread scratch and the routing of one row.
template <typename scalar_t>
class RowRouter {
 public:
  using T = acc_t<scalar_t>;

  RowRouter(const RouteParams& p, const T* bias)
      : p_(p),
        bias_(bias),
        key_is_logit_(route::key_is_logit(bias != nullptr, p.n_group)),
        x_(std::is_same_v<scalar_t, T> ? 0 : p.num_experts),
        key_(key_is_logit_ ? 0 : p.num_experts),
        group_keys_(p.n_group),
        group_ids_(p.n_group),
        group_order_(p.n_group),
        chosen_groups_(p.topk_group),
        top_keys_(std::max<int64_t>(p.k, p.topk_group)),
        scratch_keys_(p.k),
        scratch_ids_(p.k),
        x_sel_(p.k),
        selector_(p.topk_group * (p.num_experts / p.n_group), p.k) {}

  // Routes one row (unit column stride): writes k weights and k ids, best first.
  MOE_ALWAYS_INLINE void run(const scalar_t* row, T* w_out, int32_t* id_out) {
    const int64_t E = p_.num_experts;
    const int k = p_.k;
    const T* x;
    if constexpr (std::is_same_v<scalar_t, T>) {
      x = row;
    } else {
      for (int64_t e = 0; e < E; ++e) x_[e] = static_cast<T>(row[e]);
      x = x_.data();
    }
    T row_max;
    bool has_nan;
    row_max_and_nan(x, E, row_max, has_nan);
    const bool needs_sum = p_.scoring == route::kSoftmax && (!p_.renormalize || !key_is_logit_);
    const T inv_sum = needs_sum ? route::safe_inverse(row_sum_exp(x, E, row_max)) : T(0);

    const T* key = x;
    if (!key_is_logit_) {
      row_keys(x, E, p_.scoring, row_max, inv_sum, bias_, key_.data());
      key = key_.data();
    }

    selector_.clear();
    if (p_.n_group == 1) {
      selector_.add_range(key, 0, E);
    } else {
      const int64_t gs = E / p_.n_group;
      const int tg = static_cast<int>(p_.topk_group);
      for (int64_t g = 0; g < p_.n_group; ++g) {
        T first, second;
        group_top2(key + g * gs, gs, first, second);
        group_keys_[g] = route::group_score(first, second, gs);
        group_ids_[g] = int32_t(g);
      }
      select_by_rank(group_keys_.data(), group_ids_.data(), static_cast<int>(p_.n_group), tg,
                     chosen_groups_.data(), top_keys_.data(), group_order_.data());
      // The selector wants its ranges in increasing id order (the choice itself does not depend
      // on the order the groups are added in).
      std::sort(chosen_groups_.begin(), chosen_groups_.end());
      for (int i = 0; i < tg; ++i) {
        const int64_t g = chosen_groups_[i];
        selector_.add_range(key, g * gs, (g + 1) * gs);
      }
    }
    selector_.select(key, k, id_out, scratch_keys_.data(), scratch_ids_.data());
    for (int j = 0; j < k; ++j) x_sel_[j] = x[id_out[j]];
    route::selected_weights(x_sel_.data(), k, p_.scoring, p_.renormalize, T(p_.scale), row_max,
                            inv_sum, has_nan, w_out);
  }

 private:
  RouteParams p_;
  const T* bias_;
  bool key_is_logit_;
  std::vector<T> x_, key_, group_keys_;
  std::vector<int32_t> group_ids_, group_order_, chosen_groups_;
  std::vector<T> top_keys_, scratch_keys_;
  std::vector<int32_t> scratch_ids_;
  std::vector<T> x_sel_;
  TopKSelector<T> selector_;
};

}  // namespace
}  // namespace moe_framework
