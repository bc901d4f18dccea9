// Math and input checks shared by the CPU and CUDA kernels of route / route_backward.
//
// Semantics (docs/operators.md, section route):
//   score   = softmax(logits) or sigmoid(logits), in the accumulation type (fp32, fp64 for fp64).
//   key     = score + correction_bias (selection only). Without bias and groups the key is the
//             logit itself: both scorings are monotone in it, and ranking logits avoids the ties
//             that rounding creates (sigmoid saturates to 1.0 in fp32 for logits above ~17).
//   ranking = key descending, NaN keys rank as -inf, equal keys: lowest expert id first. Every
//             row therefore gets k distinct, in-range experts, whatever its values.
//   groups  = experts split into n_group contiguous groups; a group's score is the sum of its two
//             best keys (its best key if it has one expert); the topk_group best groups (lowest
//             group id first on ties) hold the candidates, the other experts are excluded.
//   weights = computed from the selected logits only (never from the bias):
//             softmax + renormalize: softmax over the k selected logits (the row's denominator
//                                    cancels), times scaling_factor;
//             softmax:               softmax(logits)[id] * scaling_factor;
//             sigmoid:               sigmoid(logit) (/ (sum of the k + 1e-20) with renormalize)
//                                    * scaling_factor.
//             A row with a NaN logit gets NaN weights (never hidden). +-Inf follow the limits:
//             sigmoid(+-inf) = 1 / 0; softmax puts all mass uniformly on the +inf logits; an
//             all -inf softmax row has zero weights.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string_view>

#include "moe_framework/common.h"
#include "moe_framework/fast_math.h"

namespace moe_framework {
namespace route {

// fp32 for fp32/bf16/fp16 logits, fp64 for fp64 (so gradcheck sees double precision).
template <typename scalar_t>
using acc_t = at::opmath_type<scalar_t>;

enum Scoring : int { kSoftmax = 0, kSigmoid = 1 };

// Added to the denominator of the sigmoid renormalisation (as DeepSeek-V3 does): an all-zero
// selection then gets zero weights instead of 0/0.
constexpr double kSigmoidRenormEps = 1e-20;

// pos_inf, is_nan, quiet_greater / quiet_less, float_from_bits, exp_acc and sigmoid: fast_math.h.
using namespace ::moe_framework::math;  // NOLINT: the route math is written against them

#if MOE_MATH_LANES
// 16-lane versions of the route math for the CPU row-block kernel (exp_acc and sigmoid per lane:
// fast_math.h's math::lanes).
#define MOE_ROUTE_LANES 1
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"  // always-inline helpers: no call ABI involved
namespace lanes {
using math::lanes::exp_acc;
using math::lanes::sigmoid;
using math::lanes::VF;
using math::lanes::VI;

// softmax_shift / softmax_numerator below, per lane.
inline __attribute__((always_inline)) VF softmax_numerator(VF x, VF row_max) {
  const VF inf = VF{} + pos_inf<float>();
  VF s = x - row_max;
  s = row_max == -inf ? -inf : s;
  s = row_max == inf ? (x == inf ? VF{} : -inf) : s;
  return exp_acc(s);
}
}  // namespace lanes
#pragma GCC diagnostic pop
#endif

// x - row_max for a softmax, with the limits of +-inf: when the row holds +inf logits, they share
// all the mass (shift 0) and finite logits get none (shift -inf); an all -inf row has no mass.
// Written as selects (no early returns) so that CPU loops applying it across rows or experts
// vectorise.
template <typename T>
MOE_HD T softmax_shift(T x, T row_max) {
  const T inf = pos_inf<T>();
  T s = x - row_max;
  s = row_max == -inf ? -inf : s;
  return row_max == inf ? (x == inf ? T(0) : -inf) : s;
}

// exp(x - row_max) with the limits above.
template <typename T>
MOE_HD T softmax_numerator(T x, T row_max) {
  return exp_acc(softmax_shift(x, row_max));
}

// 1 / sum of the numerators; 0 for an all -inf row (whose numerators are all 0).
template <typename T>
MOE_HD T safe_inverse(T sum) {
  return sum > T(0) ? T(1) / sum : T(0);
}

// ---- ranking ----

// NaN ranks like -inf: a NaN expert is only chosen when nothing better is left.
template <typename T>
MOE_HD T rank_key(T v) {
  return is_nan(v) ? -pos_inf<T>() : v;
}

// Total order of the selection: larger key first, lower id first among equal keys.
template <typename T>
MOE_HD bool ranks_before(T key_a, int64_t id_a, T key_b, int64_t id_b) {
  return key_a > key_b || (key_a == key_b && id_a < id_b);
}

// Insert (key, id) (key already through rank_key) into the best-first list of n <= k entries, in
// any arrival order: the list stays sorted by ranks_before.
template <typename T>
MOE_HD void topk_insert(T* keys, int32_t* ids, int k, int& n, T key, int32_t id) {
  if (n == k) {
    if (!ranks_before(key, int64_t(id), keys[k - 1], int64_t(ids[k - 1]))) return;
    --n;
  }
  int pos = n;
  while (pos > 0 && ranks_before(key, int64_t(id), keys[pos - 1], int64_t(ids[pos - 1]))) {
    keys[pos] = keys[pos - 1];
    ids[pos] = ids[pos - 1];
    --pos;
  }
  keys[pos] = key;
  ids[pos] = id;
  ++n;
}

// Insert (key, id) into the best-first list keys/ids of n <= k entries, the key through rank_key
// here. Meant for candidates arriving in increasing id (then an equal key never overtakes the lower
// id already in the list, so ranks_before's tie rule reduces to "strictly greater").
template <typename T>
MOE_HD void topk_push(T* keys, int32_t* ids, int k, int& n, T key, int32_t id) {
  topk_insert(keys, ids, k, n, rank_key(key), id);
}

// Running best two keys (first >= second) of a group; start both at -inf.
template <typename T>
MOE_HD void top2_push(T& first, T& second, T key) {
  key = rank_key(key);
  if (key > first) {
    second = first;
    first = key;
  } else if (key > second) {
    second = key;
  }
}

// A group's score: the sum of its two best keys, or its best key when it has a single expert.
// (+inf) + (-inf) = NaN ranks as -inf.
template <typename T>
MOE_HD T group_score(T first, T second, int64_t group_size) {
  return rank_key(group_size >= 2 ? first + second : first);
}

// ---- weights ----
//
// weight_j = numerator(x_j) * factor(sum of the k numerators). The CPU kernel sums the k terms in
// j order, the CUDA kernel across the lanes of a warp; both call these element formulas.

// softmax + renormalize: exp(x - max of the selected logits) (the row's denominator cancels);
// softmax: exp(x - row max); sigmoid: sigmoid(x).
template <typename T>
MOE_HD T weight_numerator(T x, int scoring, bool renormalize, T row_max, T selected_max) {
  if (scoring == kSoftmax) return softmax_numerator(x, renormalize ? selected_max : row_max);
  return sigmoid(x);
}

// row_inv_sum = 1 / sum over the whole row of exp(x - row max), read by softmax without
// renormalisation only.
template <typename T>
MOE_HD T weight_factor(T numerator_sum, int scoring, bool renormalize, T scale, T row_inv_sum) {
  if (scoring == kSoftmax) return (renormalize ? safe_inverse(numerator_sum) : row_inv_sum) * scale;
  return renormalize ? scale / (numerator_sum + T(kSigmoidRenormEps)) : scale;
}

// Gradient of the loss with respect to a selected logit, for the scorings whose gradient is zero
// outside the selection (sigmoid; softmax with renormalisation). num = weight_numerator(x),
// numerator_sum = sum of the k numerators, dot = sum_j g_j * num_j, g = gradient of this weight.
template <typename T>
MOE_HD T selected_logit_grad(T num, T g, T numerator_sum, T dot, int scoring, bool renormalize,
                             T scale) {
  if (scoring == kSoftmax) {  // w = scale * q, q = num / sum: dq_i/dx_j = q_i (delta_ij - q_j)
    const T inv = safe_inverse(numerator_sum);
    return scale * num * inv * (g - dot * inv);
  }
  // sigmoid: w_j = scale * s_j / D, D = sum s + eps with renormalize (else 1); ds/dx = s (1 - s)
  const T denom = renormalize ? numerator_sum + T(kSigmoidRenormEps) : T(1);
  const T gs = renormalize ? scale * (g - dot / denom) / denom : scale * g;
  return gs * num * (T(1) - num);
}

// The k weights of a row from its selected logits x_sel (CPU: sums in j order). row_has_nan
// makes every weight NaN.
template <typename T>
MOE_HD void selected_weights(const T* x_sel, int k, int scoring, bool renormalize, T scale,
                             T row_max, T row_inv_sum, bool row_has_nan, T* w) {
  if (row_has_nan) {
    for (int j = 0; j < k; ++j) w[j] = std::numeric_limits<T>::quiet_NaN();
    return;
  }
  T selected_max = -pos_inf<T>();
  for (int j = 0; j < k; ++j) selected_max = x_sel[j] > selected_max ? x_sel[j] : selected_max;
  T sum = T(0);
  for (int j = 0; j < k; ++j) {
    w[j] = weight_numerator(x_sel[j], scoring, renormalize, row_max, selected_max);
    sum += w[j];
  }
  const T factor = weight_factor(sum, scoring, renormalize, scale, row_inv_sum);
  for (int j = 0; j < k; ++j) w[j] *= factor;
}

// Backward of selected_weights for the sparse cases (see selected_logit_grad): g [k] is the
// gradient of the weights, gx [k] receives the gradient of x_sel. A NaN row gets NaN gradients.
template <typename T>
MOE_HD void selected_weights_backward(const T* x_sel, const T* g, int k, int scoring,
                                      bool renormalize, T scale, bool row_has_nan, T* gx) {
  if (row_has_nan) {
    for (int j = 0; j < k; ++j) gx[j] = std::numeric_limits<T>::quiet_NaN();
    return;
  }
  T selected_max = -pos_inf<T>();
  for (int j = 0; j < k; ++j) selected_max = x_sel[j] > selected_max ? x_sel[j] : selected_max;
  T sum = T(0), dot = T(0);
  for (int j = 0; j < k; ++j) {
    gx[j] = weight_numerator(x_sel[j], scoring, renormalize, T(0), selected_max);
    sum += gx[j];
    dot += g[j] * gx[j];
  }
  for (int j = 0; j < k; ++j) {
    gx[j] = selected_logit_grad(gx[j], g[j], sum, dot, scoring, renormalize, scale);
  }
}

// Softmax without renormalisation (w_j = scale * p[id_j]) has a dense gradient:
// dL/dx_e = p_e * (G_e - dot), with G_e = scale * g_j when e = id_j (else 0) and
// dot = sum_j G_j * p[id_j].
template <typename T>
MOE_HD T softmax_dense_grad(T p, T G, T dot) {
  return p * (G - dot);
}

// Does the backward touch every logit of the row (softmax without renormalisation), or only the k
// selected ones?
MOE_HD bool backward_is_dense(int scoring, bool renormalize) {
  return scoring == kSoftmax && !renormalize;
}

// Is the selection key the logit itself? (No bias and no groups: both scorings are monotone.)
MOE_HD bool key_is_logit(bool has_bias, int64_t n_group) {
  return !has_bias && n_group == 1;
}

// ---- input checks shared by the CPU and CUDA entry points ----

inline int parse_scoring(std::string_view scoring, const char* op) {
  if (scoring == "softmax") return kSoftmax;
  if (scoring == "sigmoid") return kSigmoid;
  TORCH_CHECK(false, op, ": scoring must be \"softmax\" or \"sigmoid\", got \"", scoring, "\"");
  return kSoftmax;
}

inline void check_route_inputs(const at::Tensor& logits, int64_t k,
                               const std::optional<at::Tensor>& correction_bias, int64_t n_group,
                               int64_t topk_group, double scaling_factor) {
  constexpr const char* op = "route";
  if (correction_bias.has_value()) {
    check_same_device(op, {{"logits", logits}, {"correction_bias", *correction_bias}});
  }
  check_tensor(logits, op, "logits", 2, {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble});
  const int64_t E = logits.size(1);
  TORCH_CHECK(E >= 1, op, ": logits must have at least one expert column, got shape ",
              logits.sizes());
  TORCH_CHECK(E <= std::numeric_limits<int32_t>::max(), op,
              ": num_experts (logits.shape[1]) must fit in int32, got ", E);
  TORCH_CHECK(k >= 1 && k <= E, op, ": k must be in [1, num_experts=", E, "], got ", k);
  TORCH_CHECK(n_group >= 1, op, ": n_group must be >= 1, got ", n_group);
  TORCH_CHECK(E % n_group == 0, op, ": n_group must divide num_experts=", E,
              ", got n_group=", n_group);
  TORCH_CHECK(topk_group >= 1 && topk_group <= n_group, op,
              ": topk_group must be in [1, n_group=", n_group, "], got ", topk_group);
  TORCH_CHECK(k <= topk_group * (E / n_group), op, ": k must be <= topk_group * (num_experts / ",
              "n_group) = ", topk_group * (E / n_group),
              " (the experts of the chosen groups), got ", k);
  TORCH_CHECK(std::isfinite(scaling_factor), op, ": scaling_factor must be finite, got ",
              scaling_factor);
  if (correction_bias.has_value()) {
    const at::Tensor& b = *correction_bias;
    check_tensor(b, op, "correction_bias", 1, {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble});
    TORCH_CHECK(b.size(0) == E, op, ": correction_bias must have num_experts=", E, " entries, got ",
                b.size(0));
  }
}

inline void check_route_backward_inputs(const at::Tensor& grad_weights, const at::Tensor& logits,
                                        const at::Tensor& ids) {
  constexpr const char* op = "route_backward";
  check_same_device(op, {{"grad_weights", grad_weights}, {"logits", logits}, {"ids", ids}});
  check_tensor(logits, op, "logits", 2, {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble});
  check_tensor(grad_weights, op, "grad_weights", 2, {at::kFloat, at::kDouble});
  check_tensor(ids, op, "ids", 2, {at::kInt});
  TORCH_CHECK(ids.size(0) == logits.size(0), op, ": ids must have one row per token (",
              logits.size(0), "), got ", ids.size(0));
  TORCH_CHECK(grad_weights.sizes() == ids.sizes(), op, ": grad_weights must have the shape of ids ",
              ids.sizes(), ", got ", grad_weights.sizes());
  TORCH_CHECK(ids.size(1) >= 1 && ids.size(1) <= logits.size(1), op,
              ": ids must have k in [1, num_experts=", logits.size(1), "] columns, got ",
              ids.size(1));
}

// Weights are fp32, or fp64 for fp64 logits.
inline at::ScalarType weights_dtype(at::ScalarType logits_dtype) {
  return logits_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace route
}  // namespace moe_framework
