// CPU kernels of route and route_backward.
//
// route runs one pass per token row, rows split over torch's thread pool in fixed chunks. A row is
// read once into a small per-thread buffer in the accumulation type; every full-row loop (max,
// NaN test, exp sums, scores, the "can anything here enter the top-k" filter) runs over
// kLanes independent lanes so that it vectorises without -ffast-math and sums in a fixed order.
// The insertion into the top-k list is scalar but rare: the filter rejects almost every block
// once the list is full. counts: each chunk histograms its own rows, then the chunk histograms are
// added in chunk order (integers, no atomics): the same result for any number of threads.
#include "moe_framework/route.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <type_traits>
#include <vector>

namespace moe_framework {
namespace {

using route::acc_t;

// Independent lanes of the row loops: two AVX2 / one AVX-512 register of fp32.
constexpr int kLanes = 16;
// Row elements per task below which another thread costs more than it saves.
constexpr int64_t kMinWorkPerTask = 1 << 15;

int64_t num_tasks(int64_t rows, int64_t work_per_row) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t by_work =
      std::max<int64_t>(1, rows * std::max<int64_t>(1, work_per_row) / kMinWorkPerTask);
  return std::max<int64_t>(1, std::min({threads, by_work, rows}));
}

// Max over the row (NaN ignored) and whether the row holds a NaN.
template <typename T>
void row_max_and_nan(const T* x, int64_t n, T& row_max, bool& has_nan) {
  T lane_max[kLanes];
  int lane_nan[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    lane_max[l] = -route::pos_inf<T>();
    lane_nan[l] = 0;
  }
  int64_t e = 0;
  for (; e + kLanes <= n; e += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const T v = x[e + l];
      lane_nan[l] |= v != v;
      lane_max[l] = v > lane_max[l] ? v : lane_max[l];
    }
  }
  for (int l = 0; e < n; ++e, ++l) {
    const T v = x[e];
    lane_nan[l] |= v != v;
    lane_max[l] = v > lane_max[l] ? v : lane_max[l];
  }
  T m = -route::pos_inf<T>();
  int nan = 0;
  for (int l = 0; l < kLanes; ++l) {
    m = lane_max[l] > m ? lane_max[l] : m;
    nan |= lane_nan[l];
  }
  row_max = m;
  has_nan = nan != 0;
}

// sum_e exp(x_e - row_max) in a fixed lane order (the softmax denominator).
template <typename T>
T row_sum_exp(const T* x, int64_t n, T row_max) {
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
void row_keys(const T* x, int64_t n, int scoring, T row_max, T row_inv_sum, const T* bias,
              T* key) {
  if (scoring == route::kSoftmax) {
    if (std::isfinite(row_max)) {
      for (int64_t e = 0; e < n; ++e) key[e] = route::exp_acc(x[e] - row_max) * row_inv_sum;
    } else {
      for (int64_t e = 0; e < n; ++e) key[e] = route::softmax_numerator(x[e], row_max) * row_inv_sum;
    }
  } else {
    for (int64_t e = 0; e < n; ++e) key[e] = route::sigmoid(x[e]);
  }
  if (bias != nullptr) {
    for (int64_t e = 0; e < n; ++e) key[e] += bias[e];
  }
}

// Offer experts [begin, end) (in increasing id) to the best-first list top_keys/top_ids.
template <typename T>
void scan_topk(const T* key, int64_t begin, int64_t end, int k, T* top_keys, int32_t* top_ids,
               int& n) {
  int64_t e = begin;
  for (; e < end && n < k; ++e) route::topk_push(top_keys, top_ids, k, n, key[e], int32_t(e));
  for (; e + kLanes <= end; e += kLanes) {
    // Only a key strictly above the current k-th can enter (ties keep the lower id already in);
    // NaN compares false, as it should (it ranks as -inf).
    const T threshold = top_keys[k - 1];
    int any = 0;
    for (int l = 0; l < kLanes; ++l) any |= key[e + l] > threshold;
    if (any) {
      for (int l = 0; l < kLanes; ++l) {
        route::topk_push(top_keys, top_ids, k, n, key[e + l], int32_t(e + l));
      }
    }
  }
  for (; e < end; ++e) route::topk_push(top_keys, top_ids, k, n, key[e], int32_t(e));
}

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
        top_keys_(p.k),
        x_sel_(p.k) {}

  // Routes one row (unit column stride): writes k weights and k ids, best first.
  void run(const scalar_t* row, T* w_out, int32_t* id_out) {
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
    const bool needs_sum =
        p_.scoring == route::kSoftmax && (!p_.renormalize || !key_is_logit_);
    const T inv_sum = needs_sum ? route::safe_inverse(row_sum_exp(x, E, row_max)) : T(0);

    const T* key = x;
    if (!key_is_logit_) {
      row_keys(x, E, p_.scoring, row_max, inv_sum, bias_, key_.data());
      key = key_.data();
    }

    int n = 0;
    if (p_.n_group == 1) {
      scan_topk(key, 0, E, k, top_keys_.data(), id_out, n);
    } else {
      const int64_t gs = E / p_.n_group;
      const int tg = static_cast<int>(p_.topk_group);
      int ng = 0;
      for (int64_t g = 0; g < p_.n_group; ++g) {
        T first = -route::pos_inf<T>(), second = -route::pos_inf<T>();
        for (int64_t e = g * gs; e < (g + 1) * gs; ++e) route::top2_push(first, second, key[e]);
        route::topk_push(group_keys_.data(), group_ids_.data(), tg, ng,
                         route::group_score(first, second, gs), int32_t(g));
      }
      // Visit the chosen groups in increasing id, so experts arrive in increasing id.
      std::sort(group_ids_.begin(), group_ids_.begin() + tg);
      for (int i = 0; i < tg; ++i) {
        const int64_t g = group_ids_[i];
        scan_topk(key, g * gs, (g + 1) * gs, k, top_keys_.data(), id_out, n);
      }
    }
    for (int j = 0; j < k; ++j) x_sel_[j] = x[id_out[j]];
    route::selected_weights(x_sel_.data(), k, p_.scoring, p_.renormalize, T(p_.scale), row_max,
                            inv_sum, has_nan, w_out);
  }

 private:
  RouteParams p_;
  const T* bias_;
  bool key_is_logit_;
  std::vector<T> x_, key_, group_keys_;
  std::vector<int32_t> group_ids_;
  std::vector<T> top_keys_, x_sel_;
};

// Rows use a unit column stride; any row stride is fine.
at::Tensor with_unit_inner_stride(const at::Tensor& t) {
  return (t.size(1) <= 1 || t.stride(1) == 1) ? t : t.contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> route_cpu(
    const at::Tensor& logits_in, int64_t k, c10::string_view scoring_name,
    const std::optional<at::Tensor>& correction_bias, int64_t n_group, int64_t topk_group,
    bool renormalize, double scaling_factor) {
  route::check_route_inputs(logits_in, k, correction_bias, n_group, topk_group, scaling_factor);
  const int scoring = route::parse_scoring(
      std::string_view(scoring_name.data(), scoring_name.size()), "route");
  const at::Tensor logits = with_unit_inner_stride(logits_in);
  const int64_t T = logits.size(0), E = logits.size(1);
  const auto wdtype = route::weights_dtype(logits.scalar_type());
  at::Tensor weights = at::empty({T, k}, logits.options().dtype(wdtype));
  at::Tensor ids = at::empty({T, k}, logits.options().dtype(at::kInt));
  at::Tensor counts = at::zeros({E}, logits.options().dtype(at::kInt));
  if (T == 0) return {weights, ids, counts};

  at::Tensor bias;
  if (correction_bias.has_value()) bias = correction_bias->to(wdtype).contiguous();
  const RouteParams params{E, static_cast<int>(k), scoring, n_group, topk_group, renormalize,
                           scaling_factor};

  const int64_t chunks = num_tasks(T, E);
  const int64_t rows_per_chunk = (T + chunks - 1) / chunks;
  std::vector<int32_t> chunk_counts(static_cast<size_t>(chunks * E), 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "route_cpu", [&] {
    using T_acc = acc_t<scalar_t>;
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    const int64_t row_stride = logits.stride(0);
    const T_acc* b = bias.defined() ? bias.const_data_ptr<T_acc>() : nullptr;
    T_acc* w = weights.mutable_data_ptr<T_acc>();
    int32_t* id = ids.mutable_data_ptr<int32_t>();
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      RowRouter<scalar_t> router(params, b);
      for (int64_t c = c0; c < c1; ++c) {
        int32_t* hist = chunk_counts.data() + c * E;
        const int64_t t_end = std::min(T, (c + 1) * rows_per_chunk);
        for (int64_t t = c * rows_per_chunk; t < t_end; ++t) {
          router.run(x + t * row_stride, w + t * k, id + t * k);
          for (int64_t j = 0; j < k; ++j) ++hist[id[t * k + j]];
        }
      }
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
        at::parallel_for(0, T, std::max<int64_t>(1, kMinWorkPerTask / E), [&](int64_t t0,
                                                                              int64_t t1) {
          std::vector<T_acc> x(E), row_grad(E), x_sel(k), g_sel(k);
          for (int64_t t = t0; t < t1; ++t) {
            for (int64_t e = 0; e < E; ++e) x[e] = static_cast<T_acc>(xp[t * E + e]);
            const int32_t* id = idp + t * k;
            const T_acc* g = gp + t * k;
            T_acc row_max;
            bool has_nan;
            row_max_and_nan(x.data(), E, row_max, has_nan);
            if (has_nan) {
              std::fill(row_grad.begin(), row_grad.end(), std::numeric_limits<T_acc>::quiet_NaN());
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
                row_grad[id[j]] += route::softmax_numerator(x[id[j]], row_max) * inv * scale * g[j];
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
