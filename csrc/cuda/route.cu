// CUDA kernels of route and route_backward, on the current stream, with no host sync.
//
// route: one warp per token row. Row statistics (max, NaN, softmax denominator) are butterfly
// reductions over the lanes (fixed order: every lane ends with the same bits). Selection is k
// rounds of a warp arg-max under the total order of route.h (key descending, lowest id first):
// round r takes the best expert ranked strictly after round r-1's winner, so nothing is stored
// per expert and any E works. Keys are recomputed from the logits each round (a few exps per lane)
// instead of being staged in shared memory. Grouped routing first scores the groups into a small
// global scratch [T, n_group], then marks the chosen groups the same way.
// counts: a second launch, one block per (chunk of slots, tile of experts); each thread counts its
// expert over the chunk staged in shared memory, writing a [chunks, E] partial table, and a third
// launch sums it per expert in chunk order. No atomics anywhere: the same bits on every run.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <optional>

#include "moe_framework/route.h"

namespace moe_framework {
namespace {

using route::acc_t;

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpsPerBlock = 4;
// counts: slots per chunk (staged in shared memory) and experts per block.
constexpr int kCountChunk = 4096;
constexpr int kCountThreads = 128;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int off = kWarp / 2; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

// Max ignoring NaN (NaN compares false): the row max of a softmax.
template <typename T>
__device__ __forceinline__ T warp_max(T v) {
  for (int off = kWarp / 2; off > 0; off >>= 1) {
    const T o = __shfl_xor_sync(kFullMask, v, off);
    v = o > v ? o : v;
  }
  return v;
}

// Best (key, id) across the warp under route::ranks_before (a strict total order, so every lane
// ends with the same winner).
template <typename T>
__device__ __forceinline__ void warp_argmax(T& key, int32_t& id) {
  for (int off = kWarp / 2; off > 0; off >>= 1) {
    const T ok = __shfl_xor_sync(kFullMask, key, off);
    const int32_t oi = __shfl_xor_sync(kFullMask, id, off);
    if (route::ranks_before(ok, int64_t(oi), key, int64_t(id))) {
      key = ok;
      id = oi;
    }
  }
}

template <typename scalar_t>
struct RowView {
  using T = acc_t<scalar_t>;
  const scalar_t* row;
  int scoring;
  const T* bias;
  bool key_is_logit;
  T row_max;
  T row_inv_sum;

  // Selection key of expert e (NaN already mapped to -inf).
  __device__ __forceinline__ T key(int64_t e) const {
    const T x = static_cast<T>(row[e]);
    if (key_is_logit) return route::rank_key(x);
    T score = scoring == route::kSoftmax ? route::softmax_numerator(x, row_max) * row_inv_sum
                                         : route::sigmoid(x);
    if (bias != nullptr) score += bias[e];
    return route::rank_key(score);
  }
};

// Row max, NaN flag and (when needed) 1 / softmax denominator, reduced over the warp.
template <typename scalar_t, typename T>
__device__ __forceinline__ void row_stats(const scalar_t* row, int64_t E, int lane, bool needs_sum,
                                          T& row_max, bool& has_nan, T& inv_sum) {
  T m = -route::pos_inf<T>();
  int nan = 0;
  for (int64_t e = lane; e < E; e += kWarp) {
    const T v = static_cast<T>(row[e]);
    nan |= route::is_nan(v);
    m = v > m ? v : m;
  }
  row_max = warp_max(m);
  has_nan = __any_sync(kFullMask, nan) != 0;
  inv_sum = T(0);
  if (needs_sum) {
    T s = T(0);
    for (int64_t e = lane; e < E; e += kWarp) {
      s += route::softmax_numerator(static_cast<T>(row[e]), row_max);
    }
    inv_sum = route::safe_inverse(warp_sum(s));
  }
}

template <typename scalar_t>
__global__ void route_kernel(const scalar_t* __restrict__ logits, int64_t row_stride, int64_t T_,
                             int64_t E, int k, int scoring,
                             const acc_t<scalar_t>* __restrict__ bias, int64_t n_group,
                             int64_t topk_group, bool renormalize, acc_t<scalar_t> scale,
                             acc_t<scalar_t>* __restrict__ group_scores,
                             uint8_t* __restrict__ group_chosen,
                             acc_t<scalar_t>* __restrict__ w_out, int32_t* __restrict__ id_out) {
  using T = acc_t<scalar_t>;
  const int lane = threadIdx.x % kWarp;
  const int64_t t = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (t >= T_) return;  // whole warps leave together
  const scalar_t* row = logits + t * row_stride;

  RowView<scalar_t> view{row, scoring, bias, route::key_is_logit(bias != nullptr, n_group)};
  bool has_nan;
  const bool needs_sum = scoring == route::kSoftmax && (!renormalize || !view.key_is_logit);
  row_stats(row, E, lane, needs_sum, view.row_max, has_nan, view.row_inv_sum);

  // A lane with no candidate offers (-inf, INT_MAX): any real expert, even at -inf, beats it.
  constexpr int32_t kNone = INT_MAX;
  const int64_t gs = E / n_group;
  uint8_t* chosen = group_chosen + t * n_group;
  if (n_group > 1) {
    T* gscore = group_scores + t * n_group;
    for (int64_t g = lane; g < n_group; g += kWarp) {
      T first = -route::pos_inf<T>(), second = -route::pos_inf<T>();
      for (int64_t e = g * gs; e < (g + 1) * gs; ++e) route::top2_push(first, second, view.key(e));
      gscore[g] = route::group_score(first, second, gs);
      chosen[g] = 0;
    }
    __syncwarp();
    T prev_key = route::pos_inf<T>();
    int32_t prev_id = -1;
    for (int64_t r = 0; r < topk_group; ++r) {
      T best_key = -route::pos_inf<T>();
      int32_t best_id = kNone;
      for (int64_t g = lane; g < n_group; g += kWarp) {
        const T kg = gscore[g];
        if (route::ranks_before(prev_key, int64_t(prev_id), kg, g) &&
            route::ranks_before(kg, g, best_key, int64_t(best_id))) {
          best_key = kg;
          best_id = int32_t(g);
        }
      }
      warp_argmax(best_key, best_id);
      if (lane == 0) chosen[best_id] = 1;
      prev_key = best_key;
      prev_id = best_id;
    }
    __syncwarp();
  }

  int32_t* ids = id_out + t * k;
  T prev_key = route::pos_inf<T>();
  int32_t prev_id = -1;
  for (int r = 0; r < k; ++r) {
    T best_key = -route::pos_inf<T>();
    int32_t best_id = kNone;
    for (int64_t e = lane; e < E; e += kWarp) {
      if (n_group > 1 && !chosen[e / gs]) continue;
      const T ke = view.key(e);
      if (route::ranks_before(prev_key, int64_t(prev_id), ke, e) &&
          route::ranks_before(ke, e, best_key, int64_t(best_id))) {
        best_key = ke;
        best_id = int32_t(e);
      }
    }
    warp_argmax(best_key, best_id);
    if (lane == 0) ids[r] = best_id;
    prev_key = best_key;
    prev_id = best_id;
  }
  __syncwarp();

  // Weights: lane j (and j + 32, ...) owns slot j.
  T* w = w_out + t * k;
  if (has_nan) {
    for (int j = lane; j < k; j += kWarp) w[j] = std::numeric_limits<T>::quiet_NaN();
    return;
  }
  T selected_max = -route::pos_inf<T>();
  for (int j = lane; j < k; j += kWarp) {
    const T x = static_cast<T>(row[ids[j]]);
    selected_max = x > selected_max ? x : selected_max;
  }
  selected_max = warp_max(selected_max);
  T sum = T(0);
  for (int j = lane; j < k; j += kWarp) {
    sum += route::weight_numerator(static_cast<T>(row[ids[j]]), scoring, renormalize, view.row_max,
                                   selected_max);
  }
  const T factor =
      route::weight_factor(warp_sum(sum), scoring, renormalize, scale, view.row_inv_sum);
  for (int j = lane; j < k; j += kWarp) {
    w[j] = route::weight_numerator(static_cast<T>(row[ids[j]]), scoring, renormalize, view.row_max,
                                   selected_max) *
           factor;
  }
}

// partial[c, e] = number of slots of chunk c routed to expert e.
__global__ void count_chunks_kernel(const int32_t* __restrict__ ids, int64_t n, int64_t E,
                                    int32_t* __restrict__ partial) {
  __shared__ int32_t tile[kCountChunk];
  const int64_t c = blockIdx.x;
  const int64_t begin = c * kCountChunk;
  const int len = static_cast<int>(std::min<int64_t>(kCountChunk, n - begin));
  for (int i = threadIdx.x; i < len; i += blockDim.x) tile[i] = ids[begin + i];
  __syncthreads();
  const int64_t e = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  if (e >= E) return;
  int32_t count = 0;
  for (int i = 0; i < len; ++i) count += tile[i] == e;  // broadcast reads, no bank conflicts
  partial[c * E + e] = count;
}

__global__ void sum_chunks_kernel(const int32_t* __restrict__ partial, int64_t chunks, int64_t E,
                                  int32_t* __restrict__ counts) {
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= E) return;
  int32_t total = 0;
  for (int64_t c = 0; c < chunks; ++c) total += partial[c * E + e];
  counts[e] = total;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> route_cuda(
    const at::Tensor& logits_in, int64_t k, c10::string_view scoring_name,
    const std::optional<at::Tensor>& correction_bias, int64_t n_group, int64_t topk_group,
    bool renormalize, double scaling_factor) {
  route::check_route_inputs(logits_in, k, correction_bias, n_group, topk_group, scaling_factor);
  const int scoring =
      route::parse_scoring(std::string_view(scoring_name.data(), scoring_name.size()), "route");
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits =
      (logits_in.size(1) <= 1 || logits_in.stride(1) == 1) ? logits_in : logits_in.contiguous();
  const int64_t T = logits.size(0), E = logits.size(1);
  const auto wdtype = route::weights_dtype(logits.scalar_type());
  at::Tensor weights = at::empty({T, k}, logits.options().dtype(wdtype));
  at::Tensor ids = at::empty({T, k}, logits.options().dtype(at::kInt));
  at::Tensor counts = at::zeros({E}, logits.options().dtype(at::kInt));
  if (T == 0) return {weights, ids, counts};

  at::Tensor bias;
  if (correction_bias.has_value()) bias = correction_bias->to(wdtype).contiguous();
  at::Tensor group_scores, group_chosen;
  if (n_group > 1) {
    group_scores = at::empty({T, n_group}, logits.options().dtype(wdtype));
    group_chosen = at::empty({T, n_group}, logits.options().dtype(at::kByte));
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, logits.scalar_type(), "route_cuda", [&] {
        using T_acc = acc_t<scalar_t>;
        const int64_t blocks = (T + kWarpsPerBlock - 1) / kWarpsPerBlock;
        route_kernel<scalar_t>
            <<<static_cast<unsigned>(blocks), kWarpsPerBlock * kWarp, 0, stream>>>(
                logits.const_data_ptr<scalar_t>(), logits.stride(0), T, E, static_cast<int>(k),
                scoring, bias.defined() ? bias.const_data_ptr<T_acc>() : nullptr, n_group,
                topk_group, renormalize, static_cast<T_acc>(scaling_factor),
                group_scores.defined() ? group_scores.mutable_data_ptr<T_acc>() : nullptr,
                group_chosen.defined() ? group_chosen.mutable_data_ptr<uint8_t>() : nullptr,
                weights.mutable_data_ptr<T_acc>(), ids.mutable_data_ptr<int32_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });

  const int64_t n = T * k;
  const int64_t chunks = (n + kCountChunk - 1) / kCountChunk;
  const int64_t expert_tiles = (E + kCountThreads - 1) / kCountThreads;
  at::Tensor partial = at::empty({chunks, E}, logits.options().dtype(at::kInt));
  count_chunks_kernel<<<dim3(static_cast<unsigned>(chunks), static_cast<unsigned>(expert_tiles)),
                        kCountThreads, 0, stream>>>(ids.const_data_ptr<int32_t>(), n, E,
                                                    partial.mutable_data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  sum_chunks_kernel<<<static_cast<unsigned>(expert_tiles), kCountThreads, 0, stream>>>(
      partial.const_data_ptr<int32_t>(), chunks, E, counts.mutable_data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {weights, ids, counts};
}

// One warp per row: the gradient of every logit of the row in one write (duplicated ids, which
// route never produces, are summed in j order; ids outside [0, E) are skipped: they cannot be
// reported without a host sync).
template <typename scalar_t>
__global__ void route_backward_kernel(const acc_t<scalar_t>* __restrict__ grad_w,
                                      const scalar_t* __restrict__ logits,
                                      const int32_t* __restrict__ ids_all, int64_t T_, int64_t E,
                                      int k, int scoring, bool renormalize, acc_t<scalar_t> scale,
                                      scalar_t* __restrict__ grad_logits) {
  using T = acc_t<scalar_t>;
  const int lane = threadIdx.x % kWarp;
  const int64_t t = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (t >= T_) return;
  const scalar_t* row = logits + t * E;
  const int32_t* ids = ids_all + t * k;
  const T* g = grad_w + t * k;
  scalar_t* out = grad_logits + t * E;
  const bool dense = route::backward_is_dense(scoring, renormalize);
  T row_max, inv_sum;
  bool has_nan;
  row_stats(row, E, lane, dense, row_max, has_nan, inv_sum);
  if (has_nan) {
    for (int64_t e = lane; e < E; e += kWarp) {
      out[e] = static_cast<scalar_t>(std::numeric_limits<T>::quiet_NaN());
    }
    return;
  }
  auto valid = [&](int32_t id) { return id >= 0 && id < E; };
  if (dense) {
    T dot = T(0);
    for (int j = lane; j < k; j += kWarp) {
      if (valid(ids[j])) {
        dot +=
            scale * g[j] * route::softmax_numerator(static_cast<T>(row[ids[j]]), row_max) * inv_sum;
      }
    }
    dot = warp_sum(dot);
    for (int64_t e = lane; e < E; e += kWarp) {
      T G = T(0);
      for (int j = 0; j < k; ++j) G += ids[j] == e ? scale * g[j] : T(0);
      const T p = route::softmax_numerator(static_cast<T>(row[e]), row_max) * inv_sum;
      out[e] = static_cast<scalar_t>(route::softmax_dense_grad(p, G, dot));
    }
    return;
  }
  T selected_max = -route::pos_inf<T>();
  for (int j = lane; j < k; j += kWarp) {
    if (!valid(ids[j])) continue;
    const T x = static_cast<T>(row[ids[j]]);
    selected_max = x > selected_max ? x : selected_max;
  }
  selected_max = warp_max(selected_max);
  T sum = T(0), dot = T(0);
  for (int j = lane; j < k; j += kWarp) {
    if (!valid(ids[j])) continue;
    const T num = route::weight_numerator(static_cast<T>(row[ids[j]]), scoring, renormalize, T(0),
                                          selected_max);
    sum += num;
    dot += g[j] * num;
  }
  sum = warp_sum(sum);
  dot = warp_sum(dot);
  for (int64_t e = lane; e < E; e += kWarp) {
    T grad = T(0);
    for (int j = 0; j < k; ++j) {
      if (ids[j] != e) continue;
      const T num =
          route::weight_numerator(static_cast<T>(row[e]), scoring, renormalize, T(0), selected_max);
      grad += route::selected_logit_grad(num, g[j], sum, dot, scoring, renormalize, scale);
    }
    out[e] = static_cast<scalar_t>(grad);
  }
}

at::Tensor route_backward_cuda(const at::Tensor& grad_weights_in, const at::Tensor& logits_in,
                               const at::Tensor& ids_in, c10::string_view scoring_name,
                               bool renormalize, double scaling_factor) {
  route::check_route_backward_inputs(grad_weights_in, logits_in, ids_in);
  const int scoring = route::parse_scoring(
      std::string_view(scoring_name.data(), scoring_name.size()), "route_backward");
  const auto wdtype = route::weights_dtype(logits_in.scalar_type());
  TORCH_CHECK(grad_weights_in.scalar_type() == wdtype, "route_backward: grad_weights must have ",
              "dtype ", wdtype, " (the dtype of route's weights), got ",
              grad_weights_in.scalar_type());
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor grad_weights = grad_weights_in.contiguous();
  const at::Tensor ids = ids_in.contiguous();
  const int64_t T = logits.size(0), E = logits.size(1), k = ids.size(1);
  at::Tensor grad_logits = at::empty({T, E}, logits.options());
  if (T == 0) return grad_logits;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, logits.scalar_type(), "route_backward_cuda", [&] {
        using T_acc = acc_t<scalar_t>;
        const int64_t blocks = (T + kWarpsPerBlock - 1) / kWarpsPerBlock;
        route_backward_kernel<scalar_t>
            <<<static_cast<unsigned>(blocks), kWarpsPerBlock * kWarp, 0, stream>>>(
                grad_weights.const_data_ptr<T_acc>(), logits.const_data_ptr<scalar_t>(),
                ids.const_data_ptr<int32_t>(), T, E, static_cast<int>(k), scoring, renormalize,
                static_cast<T_acc>(scaling_factor), grad_logits.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return grad_logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_framework, CUDA, m) {
  m.impl("route", &route_cuda);
  m.impl("route_backward", &route_backward_cuda);
}

}  // namespace moe_framework
