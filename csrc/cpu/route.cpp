// CPU kernels of route and route_backward.
//
// route runs one pass per token row, rows split over torch's thread pool in fixed chunks. A row is
// read once into a small per-thread buffer in the accumulation type; every full-row loop (max,
// NaN test, exp sums, scores, the "can anything here enter the top-k" filter) runs over
// kLanes independent lanes so that it vectorises without -ffast-math and sums in a fixed order.
// The insertion into the top-k list is scalar but rare: the filter rejects almost every block
// once the list is full. counts: each chunk histograms its own rows, then the chunk histograms are
// added in chunk order (integers, no atomics): the same result for any number of threads.
// Every loop here may assume FP operations do not trap (we never enable FP exceptions): GCC's
// default -ftrapping-math keeps the selects of route::exp_acc as branches, which stops the score
// loops from vectorising. Set before the includes so inlined header code gets the same setting.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#include "moe_framework/route.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <optional>
#include <type_traits>
#include <vector>

#include "moe_framework/cpu_isa.h"

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

// The k best of n candidates (keys already through route::rank_key, ids distinct) in rank order:
// a candidate's rank is the number of candidates that route::ranks_before it, counted with a
// vector loop (no data-dependent branches; the ranks of a strict total order are distinct).
// Few candidates (the vector loop's set-up would dominate) go through an insertion list instead;
// both give the order of route::ranks_before.
template <typename T>
MOE_ALWAYS_INLINE void select_by_rank(const T* keys, const int32_t* ids, int n, int k,
                                      int32_t* out_ids, T* scratch_keys) {
  if (n <= 32) {
    int m = 0;
    for (int i = 0; i < n; ++i) route::topk_insert(scratch_keys, out_ids, k, m, keys[i], ids[i]);
    return;
  }
  for (int i = 0; i < n; ++i) {
    const T ki = keys[i];
    const int32_t ii = ids[i];
    int rank = 0;
#pragma omp simd reduction(+ : rank)
    for (int j = 0; j < n; ++j)
      rank += route::ranks_before(keys[j], int64_t(ids[j]), ki, int64_t(ii));
    if (rank < k) out_ids[rank] = ii;
  }
}

// Top-k over candidate ranges (disjoint) into a best-first id list, in the order of
// route::ranks_before.
//
// The ranges are cut into segments of at most kLanes experts and each segment's best key is taken
// with a vector max. The k-th largest segment best, `floor`, is a lower bound of the k-th best key
// (the k best segments each hold a key >= floor), so only segments whose best reaches the floor
// are visited, and in them only keys >= floor survive: typically ~2k survivors, ranked by
// select_by_rank, instead of a branchy insertion attempt per expert.
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
        surv_keys_(candidates + 1),
        surv_ids_(candidates + 1) {}

  static int64_t segment_length(int64_t candidates, int k) {
    int64_t len = kLanes;
    while (len > 4 && candidates < 4 * k * len) len /= 2;
    return len;
  }

  void clear() { segments_ = 0; }

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
    T floor = -route::pos_inf<T>();
    if (segments_ >= k) {
      int m = 0;
      for (int64_t s = 0; s < segments_; ++s) {
        route::topk_push(scratch_keys, scratch_ids, k, m, seg_best_[s], int32_t(s));
      }
      floor = scratch_keys[k - 1];
    }
    // Survivors: the candidates whose key reaches the floor (at least k of them), compacted
    // without branches.
    int n = 0;
    for (int64_t s = 0; s < segments_; ++s) {
      if (!(seg_best_[s] >= floor)) continue;  // -inf segments still pass a -inf floor
      for (int64_t e = seg_begin_[s]; e < seg_end_[s]; ++e) {
        const T v = route::rank_key(key[e]);
        surv_keys_[n] = v;
        surv_ids_[n] = int32_t(e);
        n += v >= floor;
      }
    }
    select_by_rank(surv_keys_.data(), surv_ids_.data(), n, k, out_ids, scratch_keys);
  }

 private:
  int64_t seg_len_;
  std::vector<int64_t> seg_begin_, seg_end_;
  std::vector<T> seg_best_;
  std::vector<T> surv_keys_;
  std::vector<int32_t> surv_ids_;
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
                     chosen_groups_.data(), top_keys_.data());
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
  std::vector<int32_t> group_ids_, chosen_groups_;
  std::vector<T> top_keys_, scratch_keys_;
  std::vector<int32_t> scratch_ids_;
  std::vector<T> x_sel_;
  TopKSelector<T> selector_;
};

template <typename scalar_t>
struct RouteChunkArgs {
  RouteParams params;
  const scalar_t* x;
  int64_t row_stride;
  int64_t rows;
  int64_t rows_per_chunk;
  const acc_t<scalar_t>* bias;
  acc_t<scalar_t>* w;
  int32_t* ids;
  int32_t* chunk_counts;  // [chunks, E]
};

// Routes the rows of chunks [c0, c1) and histograms each chunk's experts.
template <typename scalar_t>
MOE_ALWAYS_INLINE void route_chunks_impl(const RouteChunkArgs<scalar_t>& a, int64_t c0,
                                         int64_t c1) {
  const int64_t E = a.params.num_experts;
  const int64_t k = a.params.k;
  RowRouter<scalar_t> router(a.params, a.bias);
  for (int64_t c = c0; c < c1; ++c) {
    int32_t* hist = a.chunk_counts + c * E;
    const int64_t t_end = std::min(a.rows, (c + 1) * a.rows_per_chunk);
    for (int64_t t = c * a.rows_per_chunk; t < t_end; ++t) {
      router.run(a.x + t * a.row_stride, a.w + t * k, a.ids + t * k);
      for (int64_t j = 0; j < k; ++j) ++hist[a.ids[t * k + j]];
    }
  }
}

template <typename scalar_t>
void route_chunks_baseline(const RouteChunkArgs<scalar_t>& a, int64_t c0, int64_t c1) {
  route_chunks_impl(a, c0, c1);
}

#if MOE_CPU_AVX2_CLONE
template <typename scalar_t>
MOE_TARGET_AVX2 void route_chunks_avx2(const RouteChunkArgs<scalar_t>& a, int64_t c0, int64_t c1) {
  route_chunks_impl(a, c0, c1);
}
#endif

// Rows use a unit column stride; any row stride is fine.
at::Tensor with_unit_inner_stride(const at::Tensor& t) {
  return (t.size(1) <= 1 || t.stride(1) == 1) ? t : t.contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> route_cpu(
    const at::Tensor& logits_in, int64_t k, c10::string_view scoring_name,
    const std::optional<at::Tensor>& correction_bias, int64_t n_group, int64_t topk_group,
    bool renormalize, double scaling_factor) {
  route::check_route_inputs(logits_in, k, correction_bias, n_group, topk_group, scaling_factor);
  const int scoring =
      route::parse_scoring(std::string_view(scoring_name.data(), scoring_name.size()), "route");
  const at::Tensor logits = with_unit_inner_stride(logits_in);
  const int64_t T = logits.size(0), E = logits.size(1);
  const auto wdtype = route::weights_dtype(logits.scalar_type());
  at::Tensor weights = at::empty({T, k}, logits.options().dtype(wdtype));
  at::Tensor ids = at::empty({T, k}, logits.options().dtype(at::kInt));
  at::Tensor counts = at::zeros({E}, logits.options().dtype(at::kInt));
  if (T == 0) return {weights, ids, counts};

  at::Tensor bias;
  if (correction_bias.has_value()) bias = correction_bias->to(wdtype).contiguous();
  const RouteParams params{E,          static_cast<int>(k), scoring,       n_group,
                           topk_group, renormalize,         scaling_factor};

  const int64_t chunks = num_tasks(T, E);
  const int64_t rows_per_chunk = (T + chunks - 1) / chunks;
  std::vector<int32_t> chunk_counts(static_cast<size_t>(chunks * E), 0);
  const bool avx2 = use_avx2();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "route_cpu", [&] {
    using T_acc = acc_t<scalar_t>;
    const RouteChunkArgs<scalar_t> args{params,
                                        logits.const_data_ptr<scalar_t>(),
                                        logits.stride(0),
                                        T,
                                        rows_per_chunk,
                                        bias.defined() ? bias.const_data_ptr<T_acc>() : nullptr,
                                        weights.mutable_data_ptr<T_acc>(),
                                        ids.mutable_data_ptr<int32_t>(),
                                        chunk_counts.data()};
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
#if MOE_CPU_AVX2_CLONE
      if (avx2) return route_chunks_avx2(args, c0, c1);
#endif
      route_chunks_baseline(args, c0, c1);
    });
  });
  int32_t* cnt = counts.mutable_data_ptr<int32_t>();
  for (int64_t c = 0; c < chunks; ++c) {
    const int32_t* hist = chunk_counts.data() + c * E;
    for (int64_t e = 0; e < E; ++e) cnt[e] += hist[e];
  }
  return {weights, ids, counts};
}

at::Tensor route_backward_cpu(const at::Tensor& grad_weights_in, const at::Tensor& logits_in,
                              const at::Tensor& ids_in, c10::string_view scoring_name,
                              bool renormalize, double scaling_factor) {
  route::check_route_backward_inputs(grad_weights_in, logits_in, ids_in);
  const int scoring = route::parse_scoring(
      std::string_view(scoring_name.data(), scoring_name.size()), "route_backward");
  const auto wdtype = route::weights_dtype(logits_in.scalar_type());
  TORCH_CHECK(grad_weights_in.scalar_type() == wdtype, "route_backward: grad_weights must have ",
              "dtype ", wdtype, " (the dtype of route's weights), got ",
              grad_weights_in.scalar_type());
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor grad_weights = grad_weights_in.contiguous();
  const at::Tensor ids = ids_in.contiguous();
  const int64_t T = logits.size(0), E = logits.size(1), k = ids.size(1);
  at::Tensor grad_logits = at::empty({T, E}, logits.options());
  if (T == 0) return grad_logits;
  {
    const int32_t* id = ids.const_data_ptr<int32_t>();
    for (int64_t s = 0; s < T * k; ++s) {
      TORCH_CHECK(id[s] >= 0 && id[s] < E, "route_backward: ids must be in [0, num_experts=", E,
                  "), got ids[", s / k, ", ", s % k, "] = ", id[s]);
    }
  }
  const bool dense = route::backward_is_dense(scoring, renormalize);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, logits.scalar_type(), "route_backward_cpu", [&] {
        using T_acc = acc_t<scalar_t>;
        const scalar_t* xp = logits.const_data_ptr<scalar_t>();
        const T_acc* gp = grad_weights.const_data_ptr<T_acc>();
        const int32_t* idp = ids.const_data_ptr<int32_t>();
        scalar_t* out = grad_logits.mutable_data_ptr<scalar_t>();
        const T_acc scale = static_cast<T_acc>(scaling_factor);
        at::parallel_for(
            0, T, std::max<int64_t>(1, kMinWorkPerTask / E), [&](int64_t t0, int64_t t1) {
              std::vector<T_acc> x(E), row_grad(E), x_sel(k), g_sel(k);
              for (int64_t t = t0; t < t1; ++t) {
                for (int64_t e = 0; e < E; ++e) x[e] = static_cast<T_acc>(xp[t * E + e]);
                const int32_t* id = idp + t * k;
                const T_acc* g = gp + t * k;
                T_acc row_max;
                bool has_nan;
                row_max_and_nan(x.data(), E, row_max, has_nan);
                if (has_nan) {
                  std::fill(row_grad.begin(), row_grad.end(),
                            std::numeric_limits<T_acc>::quiet_NaN());
                } else if (dense) {
                  const T_acc inv = route::safe_inverse(row_sum_exp(x.data(), E, row_max));
                  T_acc dot = T_acc(0);
                  for (int64_t j = 0; j < k; ++j) {
                    dot += scale * g[j] * route::softmax_numerator(x[id[j]], row_max) * inv;
                  }
                  for (int64_t e = 0; e < E; ++e) {
                    row_grad[e] = route::softmax_dense_grad(
                        route::softmax_numerator(x[e], row_max) * inv, T_acc(0), dot);
                  }
                  for (int64_t j = 0; j < k; ++j) {
                    row_grad[id[j]] +=
                        route::softmax_numerator(x[id[j]], row_max) * inv * scale * g[j];
                  }
                } else {
                  std::fill(row_grad.begin(), row_grad.end(), T_acc(0));
                  for (int64_t j = 0; j < k; ++j) x_sel[j] = x[id[j]];
                  route::selected_weights_backward(x_sel.data(), g, static_cast<int>(k), scoring,
                                                   renormalize, scale, false, g_sel.data());
                  for (int64_t j = 0; j < k; ++j) row_grad[id[j]] += g_sel[j];
                }
                for (int64_t e = 0; e < E; ++e) out[t * E + e] = static_cast<scalar_t>(row_grad[e]);
              }
            });
      });
  return grad_logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_framework, CPU, m) {
  m.impl("route", &route_cpu);
  m.impl("route_backward", &route_backward_cpu);
}

}  // namespace moe_framework
