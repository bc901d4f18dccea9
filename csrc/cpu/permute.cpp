// CPU kernels of permute, permute_backward, unpermute, unpermute_backward.
//
// permute is a stable counting sort of the T*k slots by expert: per-chunk histograms (parallel),
// one serial prefix sum over [bins x chunks] (deterministic), then a stable scatter per chunk
// (parallel) that also moves the rows of x. No atomics: the output is the unique stable order,
// whatever the number of threads. unpermute gathers each token's k rows and sums them in j order.
#include "moe_framework/permute.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "moe_framework/cpu_convert.h"
#include "moe_framework/cpu_isa.h"

namespace moe_framework {
namespace {

using permute::acc_t;

// Elements moved per task below which another thread costs more than it saves.
constexpr int64_t kMinWorkPerTask = 1 << 14;

// Number of parallel tasks for `items` items of `work_per_item` elements each: at most one per
// thread of torch's pool, never more than the work can feed.
int64_t num_tasks(int64_t items, int64_t work_per_item) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t by_work =
      std::max<int64_t>(1, items * std::max<int64_t>(1, work_per_item) / kMinWorkPerTask);
  return std::max<int64_t>(1, std::min({threads, by_work, items}));
}

// Grain (items per task) for at::parallel_for so that a task moves at least kMinWorkPerTask
// elements.
int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kMinWorkPerTask / std::max<int64_t>(1, work_per_item));
}

// ---------------------------------------------------------------------------------------------
// permute

template <typename scalar_t, typename index_t>
void permute_kernel(const at::Tensor& x, const at::Tensor& ids, int64_t num_experts,
                    at::Tensor& x_sorted, at::Tensor& row_of_slot, at::Tensor& offsets) {
  const int64_t k = ids.size(1);
  const int64_t n = ids.size(0) * k;
  const int64_t d = x.size(1);
  const int64_t bins = num_experts + 1;
  const index_t* id = ids.const_data_ptr<index_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const int64_t x_stride = x.stride(0);
  scalar_t* out = x_sorted.mutable_data_ptr<scalar_t>();
  int64_t* ros = row_of_slot.mutable_data_ptr<int64_t>();
  int64_t* off = offsets.mutable_data_ptr<int64_t>();

  const int64_t chunk_size = (n + num_tasks(n, d + 1) - 1) / num_tasks(n, d + 1);
  const int64_t chunks = permute::num_chunks(n, chunk_size);

  // Phase 1: histogram of each chunk, chunk-major so threads never share a cache line of counters.
  std::vector<int64_t> cursor(static_cast<size_t>(chunks * bins), 0);
  std::vector<int64_t> first_bad(static_cast<size_t>(chunks), -1);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* h = cursor.data() + c * bins;
      const int64_t end = permute::chunk_end(c, chunk_size, n);
      for (int64_t s = permute::chunk_begin(c, chunk_size, n); s < end; ++s) {
        const int64_t v = static_cast<int64_t>(id[s]);
        if (!permute::valid_expert_id(v, num_experts) && first_bad[c] < 0) first_bad[c] = s;
        ++h[permute::slot_bin(v, num_experts)];
      }
    }
  });
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t s = first_bad[c];
    TORCH_CHECK(s < 0, "permute: ids must be in [-1, num_experts) with num_experts=", num_experts,
                ", got ids[", s / k, ", ", s % k, "] = ", static_cast<int64_t>(id[s]));
  }

  // Phase 2: exclusive scan in (bin, chunk) order turns counts into each chunk's first row per bin.
  int64_t running = 0;
  for (int64_t b = 0; b < bins; ++b) {
    off[b] = running;  // off[E] = start of the dropped rows = number of routed slots
    for (int64_t c = 0; c < chunks; ++c) {
      int64_t& h = cursor[static_cast<size_t>(c * bins + b)];
      const int64_t count = h;
      h = running;
      running += count;
    }
  }

  // Phase 3: stable scatter. Each chunk hands out its rows in slot order and moves the data; every
  // row of x_sorted is written by exactly one slot.
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* next = cursor.data() + c * bins;
      const int64_t end = permute::chunk_end(c, chunk_size, n);
      for (int64_t s = permute::chunk_begin(c, chunk_size, n); s < end; ++s) {
        const int64_t b = permute::slot_bin(static_cast<int64_t>(id[s]), num_experts);
        const int64_t row = next[b]++;
        ros[s] = row;
        scalar_t* dst = out + row * d;
        if (b < num_experts) {
          std::memcpy(dst, xp + permute::token_of_slot(s, k) * x_stride, sizeof(scalar_t) * d);
        } else {
          std::fill(dst, dst + d, scalar_t(0));
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> permute_cpu(const at::Tensor& x_in,
                                                           const at::Tensor& ids_in,
                                                           int64_t num_experts) {
  permute::check_permute_inputs(x_in, ids_in, num_experts);
  const at::Tensor x = permute::with_unit_inner_stride(x_in);
  const at::Tensor ids = ids_in.contiguous();
  const int64_t n = ids.size(0) * ids.size(1);
  at::Tensor x_sorted = at::empty({n, x.size(1)}, x.options());
  at::Tensor row_of_slot = at::empty({n}, ids.options().dtype(at::kLong));
  at::Tensor offsets = at::empty({num_experts + 1}, ids.options().dtype(at::kLong));
  if (n == 0) {
    offsets.zero_();
    return {x_sorted, row_of_slot, offsets};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "permute", [&] {
    AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "permute", [&] {
      permute_kernel<scalar_t, index_t>(x, ids, num_experts, x_sorted, row_of_slot, offsets);
    });
  });
  return {x_sorted, row_of_slot, offsets};
}

// ---------------------------------------------------------------------------------------------
// Row-index checks: the CPU kernels refuse bad rows instead of reading out of bounds.

void check_rows_in_range(const char* op, const int64_t* rows, int64_t n, int64_t num_rows) {
  for (int64_t s = 0; s < n; ++s) {
    TORCH_CHECK(rows[s] >= 0 && rows[s] < num_rows, op, ": row_of_slot values must be in [0, ",
                num_rows, "), got row_of_slot[", s, "] = ", rows[s]);
  }
}

// unpermute_backward writes row row_of_slot[s] of grad_y_sorted once per slot: that is only a
// complete, race-free gradient if row_of_slot is a permutation (as permute returns).
void check_rows_permutation(const char* op, const int64_t* rows, int64_t n) {
  std::vector<uint8_t> seen(static_cast<size_t>(n), 0);
  for (int64_t s = 0; s < n; ++s) {
    const int64_t r = rows[s];
    TORCH_CHECK(r >= 0 && r < n, op, ": row_of_slot values must be in [0, ", n,
                "), got row_of_slot[", s, "] = ", r);
    TORCH_CHECK(!seen[static_cast<size_t>(r)], op,
                ": row_of_slot must be a permutation of [0, T*k) (as returned by permute), row ", r,
                " appears twice (second at slot ", s, ")");
    seen[static_cast<size_t>(r)] = 1;
  }
}

// ---------------------------------------------------------------------------------------------
// Vectorisable element conversions and an AVX2 build of the row loops.
//
// The row loops below are memory-bound but, compiled for baseline x86-64 (SSE2), they still lose
// ~30% to the arithmetic and bf16 conversions. Each kernel body is therefore compiled twice, once
// for the baseline and once with target("avx2,f16c"), and picked at run time. FMA is deliberately
// not enabled: without it both builds round every product and sum the same way, so results are
// bitwise identical whichever build runs.

// load_acc / store_acc: cpu_convert.h.
using cpu::load_acc;
using cpu::store_acc;

// ---------------------------------------------------------------------------------------------
// Gather-combine: out[t] = sum_{j in order} w[t, j] * src[rows[t*k+j]] over rows < limit.
// unpermute (kWeighted) and permute_backward (unit weights) are the same loop.

template <typename scalar_t, typename weight_t>
struct GatherArgs {
  const scalar_t* src;
  int64_t src_stride;
  const int64_t* rows;
  const weight_t* weights;  // unused without kWeighted
  int64_t k, d, limit;
  scalar_t* out;
};

template <typename scalar_t, typename weight_t, bool kWeighted>
MOE_ALWAYS_INLINE void gather_combine_tokens(const GatherArgs<scalar_t, weight_t>& p,
                                             acc_t<scalar_t>* __restrict__ buffer, int64_t t0,
                                             int64_t t1) {
  using acc = acc_t<scalar_t>;
  constexpr bool kDirect = std::is_same_v<acc, scalar_t>;
  const int64_t k = p.k, d = p.d;
  for (int64_t t = t0; t < t1; ++t) {
    scalar_t* __restrict__ o = p.out + t * d;
    acc* __restrict__ a = kDirect ? reinterpret_cast<acc*>(o) : buffer;
    bool started = false;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t s = t * k + j;
      const int64_t r = p.rows[s];
      if (!permute::row_contributes(r, p.limit)) continue;
      const scalar_t* __restrict__ y = p.src + r * p.src_stride;
      const acc w = kWeighted ? static_cast<acc>(p.weights[s]) : acc(1);
      // The first contributing row starts from an explicit zero (0 + w*y, like the reference's
      // zero-initialised sum) instead of a separate fill pass.
      if (!started) {
        for (int64_t i = 0; i < d; ++i) {
          a[i] = kWeighted ? permute::combine_step(acc(0), w, load_acc(y[i]))
                           : acc(0) + load_acc(y[i]);
        }
      } else {
        for (int64_t i = 0; i < d; ++i) {
          a[i] = kWeighted ? permute::combine_step(a[i], w, load_acc(y[i])) : a[i] + load_acc(y[i]);
        }
      }
      started = true;
    }
    if (!started) {
      for (int64_t i = 0; i < d; ++i) a[i] = acc(0);
    }
    if constexpr (!kDirect) {
      for (int64_t i = 0; i < d; ++i) o[i] = store_acc<scalar_t>(a[i]);
    }
  }
}

#if MOE_CPU_AVX2_CLONE
template <typename scalar_t, typename weight_t, bool kWeighted>
MOE_TARGET_AVX2 void gather_combine_avx2(const GatherArgs<scalar_t, weight_t>& p,
                                         acc_t<scalar_t>* buffer, int64_t t0, int64_t t1) {
  gather_combine_tokens<scalar_t, weight_t, kWeighted>(p, buffer, t0, t1);
}
#endif

template <typename scalar_t, typename weight_t, bool kWeighted>
void gather_combine_base(const GatherArgs<scalar_t, weight_t>& p, acc_t<scalar_t>* buffer,
                         int64_t t0, int64_t t1) {
  gather_combine_tokens<scalar_t, weight_t, kWeighted>(p, buffer, t0, t1);
}

template <typename scalar_t, typename weight_t, bool kWeighted>
void gather_combine(const GatherArgs<scalar_t, weight_t>& p, int64_t T) {
  using acc = acc_t<scalar_t>;
  constexpr bool kDirect = std::is_same_v<acc, scalar_t>;
  const bool avx2 = use_avx2();
  at::parallel_for(0, T, grain_for(p.k * p.d), [&](int64_t t0, int64_t t1) {
    // Half types accumulate in a per-task fp32 row; fp32/fp64 accumulate in the output row.
    std::vector<acc> buffer(kDirect ? 0 : static_cast<size_t>(p.d));
#if MOE_CPU_AVX2_CLONE
    if (avx2) return gather_combine_avx2<scalar_t, weight_t, kWeighted>(p, buffer.data(), t0, t1);
#endif
    gather_combine_base<scalar_t, weight_t, kWeighted>(p, buffer.data(), t0, t1);
  });
}

at::Tensor permute_backward_cpu(const at::Tensor& grad_x_sorted_in,
                                const at::Tensor& row_of_slot_in, const at::Tensor& offsets_in,
                                int64_t k) {
  permute::check_permute_backward_inputs(grad_x_sorted_in, row_of_slot_in, offsets_in, k);
  const at::Tensor g = permute::with_unit_inner_stride(grad_x_sorted_in);
  const at::Tensor rows = row_of_slot_in.contiguous();
  const int64_t n = rows.size(0);
  const int64_t T = n / k;
  const int64_t d = g.size(1);
  const int64_t routed = offsets_in[offsets_in.size(0) - 1].item<int64_t>();  // CPU: no sync
  TORCH_CHECK(routed >= 0 && routed <= n, "permute_backward: offsets[E] must be in [0, T*k = ", n,
              "], got ", routed);
  const int64_t* r = rows.const_data_ptr<int64_t>();
  check_rows_in_range("permute_backward", r, n, n);
  at::Tensor grad_x = at::empty({T, d}, g.options());
  if (T == 0 || d == 0) return grad_x;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, g.scalar_type(), "permute_backward", [&] {
        const GatherArgs<scalar_t, scalar_t> p{
            g.const_data_ptr<scalar_t>(),       g.stride(0), r, nullptr, k, d, routed,
            grad_x.mutable_data_ptr<scalar_t>()};
        gather_combine<scalar_t, scalar_t, false>(p, T);
      });
  return grad_x;
}

at::Tensor unpermute_cpu(const at::Tensor& y_sorted_in, const at::Tensor& row_of_slot_in,
                         const at::Tensor& weights_in) {
  permute::check_unpermute_inputs("unpermute", y_sorted_in, row_of_slot_in, weights_in);
  const at::Tensor y = permute::with_unit_inner_stride(y_sorted_in);
  const at::Tensor rows = row_of_slot_in.contiguous();
  const at::Tensor weights = weights_in.contiguous();
  const int64_t T = weights.size(0), k = weights.size(1), d = y.size(1);
  const int64_t n = T * k;
  const int64_t* r = rows.const_data_ptr<int64_t>();
  check_rows_in_range("unpermute", r, n, y.size(0));
  at::Tensor out = at::empty({T, d}, y.options());
  if (T == 0 || d == 0) return out;
  if (k == 0) return out.zero_();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "unpermute", [&] {
    permute::dispatch_weight_type<scalar_t>(weights, [&](auto w_tag) {
      using weight_t = decltype(w_tag);
      const GatherArgs<scalar_t, weight_t> p{y.const_data_ptr<scalar_t>(),
                                             y.stride(0),
                                             r,
                                             weights.const_data_ptr<weight_t>(),
                                             k,
                                             d,
                                             y.size(0),
                                             out.mutable_data_ptr<scalar_t>()};
      gather_combine<scalar_t, weight_t, true>(p, T);
    });
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// unpermute_backward: grad_y_sorted[row] = w * grad_y[t] and grad_w[t, j] = dot(grad_y[t], y[row]).

// The dot product keeps kLanes independent partial sums (lane i % kLanes) and adds them in a fixed
// tree: vectorisable, yet the same bits for every thread count.
constexpr int64_t kLanes = 16;

template <typename scalar_t, typename weight_t>
struct BackwardArgs {
  const scalar_t* gy;
  int64_t gy_stride;
  const scalar_t* y;
  int64_t y_stride;
  const int64_t* rows;
  const weight_t* weights;
  int64_t k, d;
  scalar_t* gys;
  weight_t* gw;
};

template <typename scalar_t, typename weight_t>
MOE_ALWAYS_INLINE void unpermute_backward_tokens(const BackwardArgs<scalar_t, weight_t>& p,
                                                 int64_t t0, int64_t t1) {
  using acc = acc_t<scalar_t>;
  const int64_t k = p.k, d = p.d;
  for (int64_t t = t0; t < t1; ++t) {
    const scalar_t* __restrict__ g = p.gy + t * p.gy_stride;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t s = t * k + j;
      const int64_t r = p.rows[s];
      const acc w = static_cast<acc>(p.weights[s]);
      const scalar_t* __restrict__ yr = p.y + r * p.y_stride;
      scalar_t* __restrict__ out = p.gys + r * d;
      acc part[kLanes] = {};
      int64_t i = 0;
      for (; i + kLanes <= d; i += kLanes) {
        for (int64_t l = 0; l < kLanes; ++l) {
          const acc gi = load_acc(g[i + l]);
          out[i + l] = store_acc<scalar_t>(w * gi);
          part[l] += gi * load_acc(yr[i + l]);
        }
      }
      for (int64_t l = 0; i + l < d; ++l) {
        const acc gi = load_acc(g[i + l]);
        out[i + l] = store_acc<scalar_t>(w * gi);
        part[l] += gi * load_acc(yr[i + l]);
      }
      for (int64_t width = kLanes / 2; width > 0; width /= 2) {
        for (int64_t l = 0; l < width; ++l) part[l] += part[l + width];
      }
      p.gw[s] = static_cast<weight_t>(part[0]);
    }
  }
}

#if MOE_CPU_AVX2_CLONE
template <typename scalar_t, typename weight_t>
MOE_TARGET_AVX2 void unpermute_backward_avx2(const BackwardArgs<scalar_t, weight_t>& p, int64_t t0,
                                             int64_t t1) {
  unpermute_backward_tokens(p, t0, t1);
}
#endif

template <typename scalar_t, typename weight_t>
void unpermute_backward_base(const BackwardArgs<scalar_t, weight_t>& p, int64_t t0, int64_t t1) {
  unpermute_backward_tokens(p, t0, t1);
}

template <typename scalar_t, typename weight_t>
void unpermute_backward_kernel(const BackwardArgs<scalar_t, weight_t>& p, int64_t T) {
  const bool avx2 = use_avx2();
  at::parallel_for(0, T, grain_for(2 * p.k * p.d), [&](int64_t t0, int64_t t1) {
#if MOE_CPU_AVX2_CLONE
    if (avx2) return unpermute_backward_avx2(p, t0, t1);
#endif
    unpermute_backward_base(p, t0, t1);
  });
}

std::tuple<at::Tensor, at::Tensor> unpermute_backward_cpu(const at::Tensor& grad_y_in,
                                                          const at::Tensor& y_sorted_in,
                                                          const at::Tensor& row_of_slot_in,
                                                          const at::Tensor& weights_in) {
  permute::check_unpermute_backward_inputs(grad_y_in, y_sorted_in, row_of_slot_in, weights_in);
  const at::Tensor gy = permute::with_unit_inner_stride(grad_y_in);
  const at::Tensor y = permute::with_unit_inner_stride(y_sorted_in);
  const at::Tensor rows = row_of_slot_in.contiguous();
  const at::Tensor weights = weights_in.contiguous();
  const int64_t T = weights.size(0), k = weights.size(1), d = y.size(1);
  const int64_t n = T * k;
  const int64_t* r = rows.const_data_ptr<int64_t>();
  check_rows_permutation("unpermute_backward", r, n);
  // Every row is written exactly once (row_of_slot is a permutation): no zero fill needed.
  at::Tensor grad_y_sorted = at::empty({n, d}, y.options());
  at::Tensor grad_weights = at::empty({T, k}, weights.options());
  if (n == 0) return {grad_y_sorted, grad_weights};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, y.scalar_type(), "unpermute_backward", [&] {
        permute::dispatch_weight_type<scalar_t>(weights, [&](auto w_tag) {
          using weight_t = decltype(w_tag);
          const BackwardArgs<scalar_t, weight_t> p{gy.const_data_ptr<scalar_t>(),
                                                   gy.stride(0),
                                                   y.const_data_ptr<scalar_t>(),
                                                   y.stride(0),
                                                   r,
                                                   weights.const_data_ptr<weight_t>(),
                                                   k,
                                                   d,
                                                   grad_y_sorted.mutable_data_ptr<scalar_t>(),
                                                   grad_weights.mutable_data_ptr<weight_t>()};
          unpermute_backward_kernel(p, T);
        });
      });
  return {grad_y_sorted, grad_weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_framework, CPU, m) {
  m.impl("permute", &permute_cpu);
  m.impl("permute_backward", &permute_backward_cpu);
  m.impl("unpermute", &unpermute_cpu);
  m.impl("unpermute_backward", &unpermute_backward_cpu);
}

}  // namespace moe_framework
