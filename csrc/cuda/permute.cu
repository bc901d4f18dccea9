// CUDA kernels of permute, permute_backward, unpermute, unpermute_backward.
//
// permute is the same stable counting sort as on CPU, in four launches on the current stream and
// without any host sync (offsets never leave the device):
//   1. histogram: one warp per chunk of kSortChunk slots counts its bins;
//   2. scan: one block turns the bin-major [bins][chunks] counts into each chunk's first row per
//      bin (exclusive scan) and writes offsets;
//   3. rank: one warp per chunk walks its slots in order; __match_any_sync groups the lanes that
//      share a bin, so a slot's row is the chunk's cursor for its bin plus its rank among the
//      earlier lanes of its group. Rows are handed out in slot order: stable and deterministic,
//      no atomics;
//   4. copy: rows of x move to x_sorted (zero rows for dropped slots), vectorised.
// Illegal ids (outside [-1, E)) cannot be reported without a sync: they are treated as dropped.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>
#include <utility>

#include "moe_framework/permute.h"

namespace moe_framework {
namespace {

using permute::acc_t;

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
// Slots per sort chunk (one warp walks it): large enough that the [bins][chunks] scan stays small,
// small enough to give every SM several chunks at training sizes.
constexpr int64_t kSortChunk = 2048;
// Per-chunk bin counters live in shared memory up to this many bytes, else in a global scratch.
constexpr int64_t kMaxSharedCounters = 32 * 1024;
constexpr int kScanThreads = 1024;

// Bin of each lane's slot, or -1 for lanes past the end of the chunk (they still join the
// warp-wide __match_any_sync, grouped among themselves).
template <typename index_t>
__device__ __forceinline__ int64_t lane_bin(const index_t* ids, int64_t s, int64_t end,
                                            int64_t num_experts) {
  return s < end ? permute::slot_bin(static_cast<int64_t>(ids[s]), num_experts) : -1;
}

template <typename index_t>
__global__ void histogram_kernel(const index_t* __restrict__ ids, int64_t n, int64_t num_experts,
                                 int64_t chunks, int64_t* __restrict__ hist,
                                 int64_t* __restrict__ global_counters) {
  extern __shared__ int64_t shared_counters[];
  const int64_t bins = num_experts + 1;
  const int64_t c = blockIdx.x;
  const int lane = threadIdx.x;
  int64_t* count = global_counters ? global_counters + c * bins : shared_counters;
  for (int64_t b = lane; b < bins; b += kWarp) count[b] = 0;
  __syncwarp();
  const int64_t begin = permute::chunk_begin(c, kSortChunk, n);
  const int64_t end = permute::chunk_end(c, kSortChunk, n);
  for (int64_t base = begin; base < end; base += kWarp) {
    const int64_t bin = lane_bin(ids, base + lane, end, num_experts);
    const unsigned peers = __match_any_sync(kFullMask, bin);
    // One lane per bin updates its counter: no two lanes touch the same counter in a step.
    if (bin >= 0 && lane == __ffs(peers) - 1) count[bin] += __popc(peers);
    __syncwarp();
  }
  for (int64_t b = lane; b < bins; b += kWarp) hist[permute::hist_index(b, c, chunks)] = count[b];
}

// Exclusive scan of hist [bins][chunks] in memory order, in place, by one block; then
// offsets[b] = first row of bin b (offsets[E] = number of routed slots).
__global__ void scan_kernel(int64_t* __restrict__ hist, int64_t bins, int64_t chunks,
                            int64_t* __restrict__ offsets) {
  __shared__ int64_t warp_totals[kScanThreads / kWarp];
  const int64_t total = bins * chunks;
  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp;
  const int64_t per = (total + kScanThreads - 1) / kScanThreads;
  const int64_t lo = std::min<int64_t>(total, tid * per);
  const int64_t hi = std::min<int64_t>(total, lo + per);
  int64_t local = 0;
  for (int64_t i = lo; i < hi; ++i) local += hist[i];
  int64_t inclusive = local;
  for (int o = 1; o < kWarp; o <<= 1) {
    const int64_t v = __shfl_up_sync(kFullMask, inclusive, o);
    if (lane >= o) inclusive += v;
  }
  if (lane == kWarp - 1) warp_totals[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    const int64_t mine = warp_totals[lane];
    int64_t scanned = mine;
    for (int o = 1; o < kWarp; o <<= 1) {
      const int64_t v = __shfl_up_sync(kFullMask, scanned, o);
      if (lane >= o) scanned += v;
    }
    warp_totals[lane] = scanned - mine;  // exclusive prefix of the warps before
  }
  __syncthreads();
  int64_t running = warp_totals[warp] + inclusive - local;
  for (int64_t i = lo; i < hi; ++i) {
    const int64_t v = hist[i];
    hist[i] = running;
    running += v;
  }
  __syncthreads();
  for (int64_t b = tid; b < bins; b += kScanThreads) {
    offsets[b] = hist[permute::hist_index(b, 0, chunks)];
  }
}

template <typename index_t>
__global__ void rank_kernel(const index_t* __restrict__ ids, int64_t n, int64_t num_experts,
                            int64_t chunks, const int64_t* __restrict__ starts,
                            int64_t* __restrict__ row_of_slot,
                            int64_t* __restrict__ global_counters) {
  extern __shared__ int64_t shared_counters[];
  const int64_t bins = num_experts + 1;
  const int64_t c = blockIdx.x;
  const int lane = threadIdx.x;
  int64_t* next = global_counters ? global_counters + c * bins : shared_counters;
  for (int64_t b = lane; b < bins; b += kWarp) next[b] = starts[permute::hist_index(b, c, chunks)];
  __syncwarp();
  const unsigned lanes_before = (1u << lane) - 1u;
  const int64_t begin = permute::chunk_begin(c, kSortChunk, n);
  const int64_t end = permute::chunk_end(c, kSortChunk, n);
  for (int64_t base = begin; base < end; base += kWarp) {
    const int64_t s = base + lane;
    const int64_t bin = lane_bin(ids, s, end, num_experts);
    const unsigned peers = __match_any_sync(kFullMask, bin);
    const int64_t first = bin >= 0 ? next[bin] : 0;
    __syncwarp();
    if (bin >= 0 && lane == __ffs(peers) - 1) next[bin] = first + __popc(peers);
    if (bin >= 0) row_of_slot[s] = first + __popc(peers & lanes_before);
    __syncwarp();
  }
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Widest vector (16 bytes) that every row start of these buffers is aligned to.
template <typename scalar_t>
int pack_width(int64_t d, std::initializer_list<std::pair<const void*, int64_t>> buffers) {
  constexpr int wide = static_cast<int>(16 / sizeof(scalar_t));
  if (d % wide != 0) return 1;
  for (const auto& [ptr, stride] : buffers) {
    if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0 || stride % wide != 0) return 1;
  }
  return wide;
}

// Calls fn(std::integral_constant<int, W>) for W = the 16-byte width of scalar_t or 1.
template <typename scalar_t, typename Fn>
void dispatch_pack(int width, Fn&& fn) {
  constexpr int wide = static_cast<int>(16 / sizeof(scalar_t));
  if (width == wide) {
    fn(std::integral_constant<int, wide>{});
  } else {
    fn(std::integral_constant<int, 1>{});
  }
}

// x_sorted[row_of_slot[s]] = x[s / k] for routed rows (row < offsets[E]), zero otherwise.
// blockDim (32, rows per block): one warp per row.
template <typename scalar_t, int W>
__global__ void copy_rows_kernel(const scalar_t* __restrict__ x, int64_t x_stride,
                                 const int64_t* __restrict__ row_of_slot,
                                 const int64_t* __restrict__ routed_rows, int64_t n, int64_t k,
                                 int64_t d, scalar_t* __restrict__ out) {
  using P = Pack<scalar_t, W>;
  const int64_t routed = *routed_rows;
  const int64_t packs = d / W;
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; s < n;
       s += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t row = row_of_slot[s];
    P* dst = reinterpret_cast<P*>(out + row * d);
    if (row < routed) {
      const P* src = reinterpret_cast<const P*>(x + permute::token_of_slot(s, k) * x_stride);
      for (int64_t i = threadIdx.x; i < packs; i += kWarp) dst[i] = src[i];
    } else {
      P zero;
      for (int v = 0; v < W; ++v) zero.v[v] = scalar_t(0);
      for (int64_t i = threadIdx.x; i < packs; i += kWarp) dst[i] = zero;
    }
  }
}

int blocks_for(int64_t items, int64_t per_block) {
  const int64_t b = (items + per_block - 1) / per_block;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(b, 65535 * 16)));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> permute_cuda(const at::Tensor& x_in,
                                                            const at::Tensor& ids_in,
                                                            int64_t num_experts) {
  permute::check_permute_inputs(x_in, ids_in, num_experts);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = permute::with_unit_inner_stride(x_in);
  const at::Tensor ids = ids_in.contiguous();
  const int64_t k = ids.size(1);
  const int64_t n = ids.size(0) * k;
  const int64_t d = x.size(1);
  const int64_t bins = num_experts + 1;
  at::Tensor x_sorted = at::empty({n, d}, x.options());
  at::Tensor row_of_slot = at::empty({n}, ids.options().dtype(at::kLong));
  at::Tensor offsets = at::empty({bins}, ids.options().dtype(at::kLong));
  if (n == 0) {
    offsets.zero_();
    return {x_sorted, row_of_slot, offsets};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t chunks = permute::num_chunks(n, kSortChunk);
  at::Tensor hist = at::empty({bins * chunks}, offsets.options());
  const bool shared = bins * static_cast<int64_t>(sizeof(int64_t)) <= kMaxSharedCounters;
  at::Tensor scratch = shared ? at::Tensor() : at::empty({chunks * bins}, offsets.options());
  int64_t* counters = shared ? nullptr : scratch.mutable_data_ptr<int64_t>();
  const size_t smem = shared ? static_cast<size_t>(bins) * sizeof(int64_t) : 0;

  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "permute_cuda", [&] {
    histogram_kernel<index_t><<<static_cast<unsigned>(chunks), kWarp, smem, stream>>>(
        ids.const_data_ptr<index_t>(), n, num_experts, chunks, hist.mutable_data_ptr<int64_t>(),
        counters);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    scan_kernel<<<1, kScanThreads, 0, stream>>>(hist.mutable_data_ptr<int64_t>(), bins, chunks,
                                                offsets.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    rank_kernel<index_t><<<static_cast<unsigned>(chunks), kWarp, smem, stream>>>(
        ids.const_data_ptr<index_t>(), n, num_experts, chunks, hist.const_data_ptr<int64_t>(),
        row_of_slot.mutable_data_ptr<int64_t>(), counters);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (d == 0) return {x_sorted, row_of_slot, offsets};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "permute_cuda", [&] {
    const int width = pack_width<scalar_t>(
        d, {{x.const_data_ptr(), x.stride(0)}, {x_sorted.const_data_ptr(), d}});
    dispatch_pack<scalar_t>(width, [&](auto w) {
      constexpr int W = decltype(w)::value;
      constexpr int rows_per_block = 8;
      copy_rows_kernel<scalar_t, W>
          <<<blocks_for(n, rows_per_block), dim3(kWarp, rows_per_block), 0, stream>>>(
              x.const_data_ptr<scalar_t>(), x.stride(0), row_of_slot.const_data_ptr<int64_t>(),
              offsets.const_data_ptr<int64_t>() + num_experts, n, k, d,
              x_sorted.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {x_sorted, row_of_slot, offsets};
}

// ---------------------------------------------------------------------------------------------
// Gather-combine: out[t] = sum_{j in order} w[t, j] * src[rows[t*k+j]] over rows in [0, limit),
// limit = min(*limit_ptr, limit_max) when limit_ptr is given (permute_backward: offsets[E]).
// blockDim (32, tokens per block): one warp per token, each lane owns packs of the row.

template <typename scalar_t, typename weight_t, int W, bool kWeighted>
__global__ void gather_combine_kernel(const scalar_t* __restrict__ src, int64_t src_stride,
                                      const int64_t* __restrict__ rows,
                                      const weight_t* __restrict__ weights, int64_t T, int64_t k,
                                      int64_t d, int64_t limit_max,
                                      const int64_t* __restrict__ limit_ptr,
                                      scalar_t* __restrict__ out) {
  using acc = acc_t<scalar_t>;
  using P = Pack<scalar_t, W>;
  const int64_t limit = limit_ptr ? std::min<int64_t>(*limit_ptr, limit_max) : limit_max;
  const int64_t packs = d / W;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; t < T;
       t += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    for (int64_t i = threadIdx.x; i < packs; i += kWarp) {
      acc a[W];
      for (int v = 0; v < W; ++v) a[v] = acc(0);
      for (int64_t j = 0; j < k; ++j) {
        const int64_t s = t * k + j;
        const int64_t r = rows[s];
        if (!permute::row_contributes(r, limit)) continue;
        const P p = reinterpret_cast<const P*>(src + r * src_stride)[i];
        if constexpr (kWeighted) {
          const acc w = static_cast<acc>(weights[s]);
          for (int v = 0; v < W; ++v) a[v] = permute::combine_step(a[v], w, acc(p.v[v]));
        } else {
          for (int v = 0; v < W; ++v) a[v] += acc(p.v[v]);
        }
      }
      P o;
      for (int v = 0; v < W; ++v) o.v[v] = static_cast<scalar_t>(a[v]);
      reinterpret_cast<P*>(out + t * d)[i] = o;
    }
  }
}

template <typename scalar_t, typename weight_t, bool kWeighted>
void launch_gather_combine(const at::Tensor& src, const at::Tensor& rows, const weight_t* weights,
                           int64_t T, int64_t k, int64_t limit_max, const int64_t* limit_ptr,
                           at::Tensor& out) {
  const int64_t d = src.size(1);
  const int width =
      pack_width<scalar_t>(d, {{src.const_data_ptr(), src.stride(0)}, {out.const_data_ptr(), d}});
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_pack<scalar_t>(width, [&](auto w) {
    constexpr int W = decltype(w)::value;
    constexpr int tokens_per_block = 8;
    gather_combine_kernel<scalar_t, weight_t, W, kWeighted>
        <<<blocks_for(T, tokens_per_block), dim3(kWarp, tokens_per_block), 0, stream>>>(
            src.const_data_ptr<scalar_t>(), src.stride(0), rows.const_data_ptr<int64_t>(), weights,
            T, k, d, limit_max, limit_ptr, out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor permute_backward_cuda(const at::Tensor& grad_x_sorted_in,
                                 const at::Tensor& row_of_slot_in, const at::Tensor& offsets_in,
                                 int64_t k) {
  permute::check_permute_backward_inputs(grad_x_sorted_in, row_of_slot_in, offsets_in, k);
  const c10::cuda::CUDAGuard guard(grad_x_sorted_in.device());
  const at::Tensor g = permute::with_unit_inner_stride(grad_x_sorted_in);
  const at::Tensor rows = row_of_slot_in.contiguous();
  const at::Tensor offsets = offsets_in.contiguous();
  const int64_t n = rows.size(0);
  const int64_t T = n / k;
  at::Tensor grad_x = at::empty({T, g.size(1)}, g.options());
  if (T == 0 || g.size(1) == 0) return grad_x;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, g.scalar_type(), "permute_backward_cuda", [&] {
        // Rows at or past offsets[E] (read on the device) hold dropped slots: no gradient.
        launch_gather_combine<scalar_t, scalar_t, false>(
            g, rows, nullptr, T, k, n, offsets.const_data_ptr<int64_t>() + offsets.size(0) - 1,
            grad_x);
      });
  return grad_x;
}

at::Tensor unpermute_cuda(const at::Tensor& y_sorted_in, const at::Tensor& row_of_slot_in,
                          const at::Tensor& weights_in) {
  permute::check_unpermute_inputs("unpermute", y_sorted_in, row_of_slot_in, weights_in);
  const c10::cuda::CUDAGuard guard(y_sorted_in.device());
  const at::Tensor y = permute::with_unit_inner_stride(y_sorted_in);
  const at::Tensor rows = row_of_slot_in.contiguous();
  const at::Tensor weights = weights_in.contiguous();
  const int64_t T = weights.size(0), k = weights.size(1);
  at::Tensor out = at::empty({T, y.size(1)}, y.options());
  if (T == 0 || y.size(1) == 0) return out;
  if (k == 0) return out.zero_();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "unpermute_cuda", [&] {
    permute::dispatch_weight_type<scalar_t>(weights, [&](auto w_tag) {
      using weight_t = decltype(w_tag);
      // Rows outside [0, T*k) are skipped (they would be an error on CPU).
      launch_gather_combine<scalar_t, weight_t, true>(y, rows, weights.const_data_ptr<weight_t>(),
                                                      T, k, y.size(0), nullptr, out);
    });
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// unpermute_backward: one block per token. For each j in order the block writes
// grad_y_sorted[row] = w * grad_y[t] and reduces dot(grad_y[t], y_sorted[row]) with a fixed
// shuffle tree: the same bits on every run.

constexpr int kBackwardThreads = 128;

template <typename acc>
__device__ __forceinline__ acc block_sum(acc v, acc* scratch) {
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  acc total = acc(0);
  for (int w = 0; w < kBackwardThreads / kWarp; ++w) total += scratch[w];
  __syncthreads();  // scratch is reused by the next call
  return total;
}

template <typename scalar_t, typename weight_t, int W>
__global__ void unpermute_backward_kernel(const scalar_t* __restrict__ gy, int64_t gy_stride,
                                          const scalar_t* __restrict__ y, int64_t y_stride,
                                          const int64_t* __restrict__ rows,
                                          const weight_t* __restrict__ weights, int64_t T,
                                          int64_t k, int64_t d, int64_t num_rows,
                                          scalar_t* __restrict__ gys, weight_t* __restrict__ gw) {
  using acc = acc_t<scalar_t>;
  using P = Pack<scalar_t, W>;
  __shared__ acc scratch[kBackwardThreads / kWarp];
  const int64_t packs = d / W;
  for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
    const P* g = reinterpret_cast<const P*>(gy + t * gy_stride);
    for (int64_t j = 0; j < k; ++j) {
      const int64_t s = t * k + j;
      const int64_t r = rows[s];
      // Uniform across the block: an invalid row is skipped (grad_y_sorted stays zero there).
      if (!permute::row_contributes(r, num_rows)) {
        if (threadIdx.x == 0) gw[s] = weight_t(0);
        continue;
      }
      const acc w = static_cast<acc>(weights[s]);
      const P* yr = reinterpret_cast<const P*>(y + r * y_stride);
      P* out = reinterpret_cast<P*>(gys + r * d);
      acc part = acc(0);
      for (int64_t i = threadIdx.x; i < packs; i += kBackwardThreads) {
        const P gp = g[i], yp = yr[i];
        P o;
        for (int v = 0; v < W; ++v) {
          const acc gi = acc(gp.v[v]);
          o.v[v] = static_cast<scalar_t>(w * gi);
          part += gi * acc(yp.v[v]);
        }
        out[i] = o;
      }
      const acc dot = block_sum(part, scratch);
      if (threadIdx.x == 0) gw[s] = static_cast<weight_t>(dot);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> unpermute_backward_cuda(const at::Tensor& grad_y_in,
                                                           const at::Tensor& y_sorted_in,
                                                           const at::Tensor& row_of_slot_in,
                                                           const at::Tensor& weights_in) {
  permute::check_unpermute_backward_inputs(grad_y_in, y_sorted_in, row_of_slot_in, weights_in);
  const c10::cuda::CUDAGuard guard(y_sorted_in.device());
  const at::Tensor gy = permute::with_unit_inner_stride(grad_y_in);
  const at::Tensor y = permute::with_unit_inner_stride(y_sorted_in);
  const at::Tensor rows = row_of_slot_in.contiguous();
  const at::Tensor weights = weights_in.contiguous();
  const int64_t T = weights.size(0), k = weights.size(1), d = y.size(1);
  const int64_t n = T * k;
  // Zero-filled: without a host-side check of row_of_slot, rows no slot names must still be
  // defined.
  at::Tensor grad_y_sorted = at::zeros({n, d}, y.options());
  at::Tensor grad_weights = at::empty({T, k}, weights.options());
  if (n == 0) return {grad_y_sorted, grad_weights};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, y.scalar_type(), "unpermute_backward_cuda", [&] {
        permute::dispatch_weight_type<scalar_t>(weights, [&](auto w_tag) {
          using weight_t = decltype(w_tag);
          const int width = pack_width<scalar_t>(d, {{gy.const_data_ptr(), gy.stride(0)},
                                                     {y.const_data_ptr(), y.stride(0)},
                                                     {grad_y_sorted.const_data_ptr(), d}});
          dispatch_pack<scalar_t>(width, [&](auto wd) {
            constexpr int W = decltype(wd)::value;
            unpermute_backward_kernel<scalar_t, weight_t, W>
                <<<blocks_for(T, 1), kBackwardThreads, 0, stream>>>(
                    gy.const_data_ptr<scalar_t>(), gy.stride(0), y.const_data_ptr<scalar_t>(),
                    y.stride(0), rows.const_data_ptr<int64_t>(), weights.const_data_ptr<weight_t>(),
                    T, k, d, n, grad_y_sorted.mutable_data_ptr<scalar_t>(),
                    grad_weights.mutable_data_ptr<weight_t>());
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
        });
      });
  return {grad_y_sorted, grad_weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_framework, CUDA, m) {
  m.impl("permute", &permute_cuda);
  m.impl("permute_backward", &permute_backward_cuda);
  m.impl("unpermute", &unpermute_cuda);
  m.impl("unpermute_backward", &unpermute_backward_cuda);
}

}  // namespace moe_framework
