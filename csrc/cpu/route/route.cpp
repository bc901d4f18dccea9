// CPU kernels of route and route_backward.
//
// route has two paths with identical results (bit for bit). Rows split over torch's thread pool
// in fixed chunks. On CPUs with AVX-512, with k <= 8, E <= 256 and fp32/bf16/fp16 logits,
// BlockRouter routes 16 rows at a time, one vector lane per row (see "Row-block path" in
// block_path.h); a tail of fewer than 4 rows goes row by row. Otherwise RowRouter runs one pass
// per token row: a row is read once into a small per-thread buffer in the accumulation type; every
// full-row loop (max, NaN test, exp sums, scores, the "can anything here enter the top-k" filter)
// runs over kLanes independent lanes so that it vectorises without -ffast-math and sums in a fixed
// order. The insertion into the top-k list is scalar but rare: the filter rejects almost every
// block once the list is full. counts: each chunk histograms its own rows, then the chunk
// histograms are added in chunk order (integers, no atomics): the same result for any number of
// threads. Every loop here may assume FP operations do not trap (we never enable FP exceptions):
// GCC's default -ftrapping-math keeps the selects of route::exp_acc as branches, which stops the
// score loops from vectorising. Set before the includes so inlined header code gets the same
// setting. No FMA contraction either (the build uses -ffp-contract=fast, and GCC's avx512f target
// implies FMA): a fused multiply-add rounds once where the baseline build rounds twice.
// The kernels are headers of this folder, included only here, after the pragma (one translation
// unit, so they inline across files as they did in one file):
//   common.h      includes, the accumulation type, kLanes, num_tasks
//   row_path.h    full-row loops, the top-k selection, RouteParams, RowRouter
//   block_path.h  the row-block path: BlockRouter (16 rows, one vector lane per row)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math", "fp-contract=off")
// The 64-byte vectors of the row-block path live in always-inline helpers: no call ABI involved.
#pragma GCC diagnostic ignored "-Wpsabi"
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
#include <cstring>
#include <functional>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "block_path.h"
#include "common.h"
#include "moe_framework/cpu_isa.h"
#include "row_path.h"

namespace moe_framework {
namespace {

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
  bool block_rows;        // BlockRouter (rows_per_chunk is then a multiple of kBlockRows)
};

// Routes the rows of chunks [c0, c1) and histograms each chunk's experts.
template <BlockIsa isa, typename scalar_t>
MOE_ALWAYS_INLINE void route_chunks_impl(const RouteChunkArgs<scalar_t>& a, int64_t c0,
                                         int64_t c1) {
  const int64_t E = a.params.num_experts;
  const int64_t k = a.params.k;
  if constexpr (isa == BlockIsa::kAvx512 && std::is_same_v<acc_t<scalar_t>, float>) {
    if (a.block_rows) {
      BlockRouter<scalar_t> router(a.params, a.bias);
      std::optional<RowRouter<scalar_t>> rows;
      for (int64_t c = c0; c < c1; ++c) {
        int32_t* hist = a.chunk_counts + c * E;
        const int64_t t_end = std::min(a.rows, (c + 1) * a.rows_per_chunk);
        for (int64_t t = c * a.rows_per_chunk; t < t_end; t += kBlockRows) {
          const int64_t n = std::min<int64_t>(kBlockRows, t_end - t);
          if (n >= kBlockMinRows) {
            router.template run<isa>(a.x + t * a.row_stride, a.row_stride, n, a.w + t * k,
                                     a.ids + t * k, hist);
            continue;
          }
          // A few rows (a decode step, the tail of a chunk): the padding lanes would cost more
          // than routing the rows one by one, with the same bits.
          if (!rows) rows.emplace(a.params, a.bias);
          for (int64_t r = t; r < t + n; ++r) {
            rows->run(a.x + r * a.row_stride, a.w + r * k, a.ids + r * k);
            for (int64_t j = 0; j < k; ++j) ++hist[a.ids[r * k + j]];
          }
        }
      }
      return;
    }
  }
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
  route_chunks_impl<BlockIsa::kBaseline>(a, c0, c1);
}

#if MOE_CPU_AVX2_CLONE
template <typename scalar_t>
MOE_TARGET_AVX2 void route_chunks_avx2(const RouteChunkArgs<scalar_t>& a, int64_t c0, int64_t c1) {
  route_chunks_impl<BlockIsa::kAvx2>(a, c0, c1);
}

// AVX-512 for the row-block path: one 16-row block is one register per quantity. GCC's avx512f
// implies FMA; the fp-contract=off above keeps every product rounded as in the other builds.
#define MOE_ROUTE_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,f16c")))
template <typename scalar_t>
MOE_ROUTE_TARGET_AVX512 void route_chunks_avx512(const RouteChunkArgs<scalar_t>& a, int64_t c0,
                                                 int64_t c1) {
  route_chunks_impl<BlockIsa::kAvx512>(a, c0, c1);
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
  bool block_rows = false;
  int64_t rows_per_chunk = (T + chunks - 1) / chunks;
  std::vector<int32_t> chunk_counts(static_cast<size_t>(chunks * E), 0);
  const bool avx2 = use_avx2();
  const bool avx512 = use_avx512();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "route_cpu", [&] {
    using T_acc = acc_t<scalar_t>;
    // The block path runs in the AVX-512 build only: GCC lowers the 16-lane vector code poorly
    // for AVX2 and SSE (measured 2-10x slower than the row path there), which gives the same bits.
    block_rows = avx512 && BlockRouter<scalar_t>::applies(params);
    if (block_rows) rows_per_chunk = (rows_per_chunk + kBlockRows - 1) / kBlockRows * kBlockRows;
    const RouteChunkArgs<scalar_t> args{params,
                                        logits.const_data_ptr<scalar_t>(),
                                        logits.stride(0),
                                        T,
                                        rows_per_chunk,
                                        bias.defined() ? bias.const_data_ptr<T_acc>() : nullptr,
                                        weights.mutable_data_ptr<T_acc>(),
                                        ids.mutable_data_ptr<int32_t>(),
                                        chunk_counts.data(),
                                        block_rows};
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
#if MOE_CPU_AVX2_CLONE
      if (avx512) return route_chunks_avx512(args, c0, c1);
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
