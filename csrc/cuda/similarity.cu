// CUDA kernels of dedup and kg_search.
//
// The same engine as on CPU (csrc/cpu/similarity/), in three launches on the current stream and
// without any host sync (n_valid is read by the kernels, so a growing bank is searched inside a
// CUDA graph):
//   1. inv_norm: one warp per row computes 1/||row|| in fp64 (0 for rows without a direction:
//      zero, NaN or Inf, and for bank rows at or past n_valid);
//   2. search: a block takes a tile of kQT queries and a strided share ("split") of the bank's
//      kBT-row tiles; each tile is a shared-memory tiled product of unit-normalised rows (rows are
//      scaled while they are loaded), then one thread per query pushes the tile's scores into that
//      query's running top-k heap for this split (similarity.h, in global scratch);
//   3. merge: one thread per query merges its splits' heaps under the total rank order (score
//      desc, id asc), whose top-k is unique: the answer does not depend on the split.
// dedup is the engine run on emb against itself with k = 1 and a causal mask (row j only sees
// rows i < j), then the threshold.
//
// Rows without a direction cannot be reported from a kernel without a sync. The kernels give them
// a defined result instead: such bank rows are never returned, such query rows get (-inf, -1),
// such dedup rows are kept and never chosen as a representative. The Python wrappers raise for
// them in eager mode with one validity reduction (see moe_framework/ops/similarity.py).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "moe_framework/similarity.h"

namespace moe_framework {
namespace {

using namespace similarity;

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
// Search tile: kQT queries x kBT bank rows, the shared dimension in steps of kDK. 256 threads, each
// owning kQT/16 x kBT/16 = 2 x 4 dot products.
constexpr int kQT = 32;
constexpr int kBT = 64;
constexpr int kDK = 32;
constexpr int kThreads = 256;
constexpr int kTx = 16;  // threads along the bank rows of a tile
constexpr int kRowsPerThread = kQT / (kThreads / kTx);
constexpr int kColsPerThread = kBT / kTx;
constexpr int kNormRowsPerBlock = 8;  // warps per block of the inv_norm kernel
constexpr int kMergeThreads = 128;
// Cap on partial top-k entries over all splits (scratch memory) before fewer splits are used.
constexpr int64_t kMaxPartialEntries = int64_t{1} << 26;

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Valid bank rows: the device value of n_valid clamped to [0, N] (it cannot be checked without a
// sync), or all rows when there is no n_valid (dedup).
__device__ __forceinline__ int64_t valid_rows(const int64_t* n_valid, int64_t rows) {
  if (n_valid == nullptr) return rows;
  const int64_t v = *n_valid;
  return v < 0 ? 0 : (v > rows ? rows : v);
}

// inv[r] = 1/||x[r]|| for rows r < valid rows whose norm is finite and positive, else 0.
template <typename scalar_t>
__global__ void inv_norm_kernel(const scalar_t* __restrict__ x, int64_t stride, int64_t rows,
                                int64_t d, const int64_t* __restrict__ n_valid,
                                double* __restrict__ inv) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kNormRowsPerBlock + threadIdx.y;
  if (r >= rows) return;
  const int lane = threadIdx.x;
  // Rows past n_valid are never read: a preallocated bank's tail may hold anything.
  if (r >= valid_rows(n_valid, rows)) {
    if (lane == 0) inv[r] = 0.0;
    return;
  }
  double ss = 0.0;
  const scalar_t* row = x + r * stride;
  for (int64_t j = lane; j < d; j += kWarp) {
    const double v = static_cast<double>(row[j]);
    ss += v * v;
  }
  // fixed butterfly order: the same bits on every run
  for (int off = kWarp / 2; off > 0; off /= 2) ss += __shfl_xor_sync(kFullMask, ss, off);
  if (lane == 0) inv[r] = norm_ok(ss) ? inv_norm(ss) : 0.0;
}

template <typename scalar_t>
void launch_inv_norm(const at::Tensor& x, const int64_t* n_valid, at::Tensor& inv,
                     cudaStream_t stream) {
  const int64_t rows = x.size(0);
  if (rows == 0) return;
  inv_norm_kernel<scalar_t>
      <<<static_cast<unsigned>(ceil_div(rows, kNormRowsPerBlock)), dim3(kWarp, kNormRowsPerBlock),
         0, stream>>>(x.const_data_ptr<scalar_t>(), x.stride(0), rows, x.size(1), n_valid,
                      inv.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// One block: queries [q0, q0 + kQT) against bank tiles split, split + splits, ... below the limit.
// Partial heaps: part_score/part_id [splits][q][k], part_size [splits][q].
template <typename scalar_t, typename acc_t, bool kCausal>
__global__ void __launch_bounds__(kThreads)
    search_kernel(const scalar_t* __restrict__ queries, int64_t q_stride,
                  const double* __restrict__ q_inv, int64_t q, const scalar_t* __restrict__ bank,
                  int64_t b_stride, const double* __restrict__ b_inv, int64_t bank_rows,
                  const int64_t* __restrict__ n_valid, int64_t d, int64_t k,
                  acc_t* __restrict__ part_score, int64_t* __restrict__ part_id,
                  int64_t* __restrict__ part_size) {
  __shared__ acc_t qs[kQT][kDK + 1];
  __shared__ acc_t bs[kBT][kDK + 1];
  __shared__ acc_t ss[kQT][kBT + 1];

  const int tid = threadIdx.x;
  const int tx = tid % kTx;
  const int ty = tid / kTx;
  const int64_t q0 = static_cast<int64_t>(blockIdx.x) * kQT;
  const int64_t split = blockIdx.y;
  const int64_t splits = gridDim.y;
  const int64_t q_end = q0 + kQT < q ? q0 + kQT : q;
  // causal: query row r sees bank rows < r, so no row of this tile sees rows >= q_end - 1.
  int64_t limit = valid_rows(n_valid, bank_rows);
  if (kCausal && limit > q_end) limit = q_end;
  const acc_t invalid = -std::numeric_limits<acc_t>::infinity();

  // The heap of query q0 + tid (threads tid < kQT do the top-k updates).
  const int64_t my_q = q0 + tid;
  const bool owner = tid < kQT && my_q < q;
  acc_t* heap_s = part_score + (split * q + (owner ? my_q : 0)) * k;
  int64_t* heap_i = part_id + (split * q + (owner ? my_q : 0)) * k;
  int64_t size = 0;

  for (int64_t tile = split; tile * kBT < limit; tile += splits) {
    const int64_t b0 = tile * kBT;
    acc_t acc[kRowsPerThread][kColsPerThread];
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
#pragma unroll
      for (int c = 0; c < kColsPerThread; ++c) acc[i][c] = acc_t(0);
    }
    for (int64_t k0 = 0; k0 < d; k0 += kDK) {
      // Rows are scaled to unit length as they are loaded (in fp64, then rounded once).
      for (int e = tid; e < kQT * kDK; e += kThreads) {
        const int qi = e / kDK;
        const int kk = e % kDK;
        const int64_t r = q0 + qi;
        acc_t v = acc_t(0);
        if (r < q && k0 + kk < d) {
          v = static_cast<acc_t>(static_cast<double>(queries[r * q_stride + k0 + kk]) * q_inv[r]);
        }
        qs[qi][kk] = v;
      }
      for (int e = tid; e < kBT * kDK; e += kThreads) {
        const int bj = e / kDK;
        const int kk = e % kDK;
        const int64_t r = b0 + bj;
        acc_t v = acc_t(0);
        if (r < limit && k0 + kk < d) {
          v = static_cast<acc_t>(static_cast<double>(bank[r * b_stride + k0 + kk]) * b_inv[r]);
        }
        bs[bj][kk] = v;
      }
      __syncthreads();
#pragma unroll 8
      for (int kk = 0; kk < kDK; ++kk) {
        acc_t a[kRowsPerThread];
#pragma unroll
        for (int i = 0; i < kRowsPerThread; ++i) a[i] = qs[ty * kRowsPerThread + i][kk];
#pragma unroll
        for (int c = 0; c < kColsPerThread; ++c) {
          const acc_t b = bs[tx + c * kTx][kk];
#pragma unroll
          for (int i = 0; i < kRowsPerThread; ++i) acc[i][c] += a[i] * b;
        }
      }
      __syncthreads();
    }
    // Scores of the tile; pairs that are not candidates get -inf (a real cosine never is).
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const int qi = ty * kRowsPerThread + i;
      const int64_t r = q0 + qi;
#pragma unroll
      for (int c = 0; c < kColsPerThread; ++c) {
        const int bj = tx + c * kTx;
        const int64_t j = b0 + bj;
        const bool ok =
            r < q && j < limit && (!kCausal || j < r) && q_inv[r] != 0.0 && b_inv[j] != 0.0;
        ss[qi][bj] = ok ? clamp_cosine(acc[i][c]) : invalid;
      }
    }
    __syncthreads();
    if (owner) {
      for (int bj = 0; bj < kBT; ++bj) {
        const acc_t s = ss[tid][bj];
        if (s != invalid && topk_may_enter(heap_s, size, k, s)) {
          topk_push(heap_s, heap_i, size, k, s, b0 + bj);
        }
      }
    }
    __syncthreads();
  }
  if (owner) part_size[split * q + my_q] = size;
}

// One thread per query: merge the splits' heaps into heap [k] (scratch), sort best first.
template <typename acc_t>
__device__ int64_t merge_query(int64_t r, int64_t q, int64_t k, int64_t splits,
                               const acc_t* __restrict__ part_score,
                               const int64_t* __restrict__ part_id,
                               const int64_t* __restrict__ part_size, acc_t* heap_s,
                               int64_t* heap_i) {
  int64_t size = 0;
  for (int64_t s = 0; s < splits; ++s) {
    const int64_t base = (s * q + r) * k;
    const int64_t n = part_size[s * q + r];
    for (int64_t e = 0; e < n; ++e) {
      if (topk_may_enter(heap_s, size, k, part_score[base + e])) {
        topk_push(heap_s, heap_i, size, k, part_score[base + e], part_id[base + e]);
      }
    }
  }
  topk_sort(heap_s, heap_i, size);
  return size;
}

template <typename acc_t>
__global__ void merge_search_kernel(int64_t q, int64_t k, int64_t splits,
                                    const acc_t* __restrict__ part_score,
                                    const int64_t* __restrict__ part_id,
                                    const int64_t* __restrict__ part_size,
                                    acc_t* __restrict__ heap_score, float* __restrict__ scores,
                                    int64_t* __restrict__ ids) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kMergeThreads + threadIdx.x;
  if (r >= q) return;
  acc_t* hs = heap_score + r * k;
  int64_t* hi = ids + r * k;  // the heap's ids live in the output directly
  const int64_t n = merge_query(r, q, k, splits, part_score, part_id, part_size, hs, hi);
  for (int64_t e = 0; e < n; ++e) scores[r * k + e] = static_cast<float>(hs[e]);
  for (int64_t e = n; e < k; ++e) {
    scores[r * k + e] = -std::numeric_limits<float>::infinity();
    hi[e] = -1;
  }
}

template <typename acc_t>
__global__ void merge_dedup_kernel(int64_t n, int64_t splits, double threshold,
                                   const acc_t* __restrict__ part_score,
                                   const int64_t* __restrict__ part_id,
                                   const int64_t* __restrict__ part_size, bool* __restrict__ keep,
                                   int64_t* __restrict__ rep) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kMergeThreads + threadIdx.x;
  if (r >= n) return;
  acc_t best_s;
  int64_t best_i;
  const int64_t m =
      merge_query(r, n, int64_t{1}, splits, part_score, part_id, part_size, &best_s, &best_i);
  const bool dup = m > 0 && is_duplicate(best_s, threshold);
  keep[r] = !dup;
  rep[r] = dup ? best_i : r;
}

// Splits of the bank per query tile: enough blocks to fill the GPU a few times over, never more
// than there are bank tiles, and partial heaps within the scratch cap. Depends on shapes only
// (not on n_valid), so a captured graph stays valid as the bank fills.
int64_t choose_splits(int64_t q, int64_t bank_rows, int64_t k) {
  int device = 0;
  int sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t qtiles = ceil_div(q, kQT);
  int64_t splits = ceil_div(4 * static_cast<int64_t>(sms), qtiles);
  splits = std::min(splits, ceil_div(bank_rows, kBT));
  splits = std::min(splits, kMaxPartialEntries / std::max<int64_t>(1, q * k));
  return std::clamp<int64_t>(splits, 1, 65535);
}

template <typename scalar_t, bool kCausal>
void launch_search(const at::Tensor& queries, const at::Tensor& q_inv, const at::Tensor& bank,
                   const at::Tensor& b_inv, const int64_t* n_valid, int64_t k, int64_t splits,
                   at::Tensor& part_score, at::Tensor& part_id, at::Tensor& part_size,
                   cudaStream_t stream) {
  using acc = acc_t<scalar_t>;
  const dim3 grid(static_cast<unsigned>(ceil_div(queries.size(0), kQT)),
                  static_cast<unsigned>(splits));
  search_kernel<scalar_t, acc, kCausal><<<grid, kThreads, 0, stream>>>(
      queries.const_data_ptr<scalar_t>(), queries.stride(0), q_inv.const_data_ptr<double>(),
      queries.size(0), bank.const_data_ptr<scalar_t>(), bank.stride(0),
      b_inv.const_data_ptr<double>(), bank.size(0), n_valid, queries.size(1), k,
      part_score.mutable_data_ptr<acc>(), part_id.mutable_data_ptr<int64_t>(),
      part_size.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::ScalarType acc_scalar_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// ---------------------------------------------------------------------------------------------
// kg_search

std::tuple<at::Tensor, at::Tensor> kg_search_cuda(const at::Tensor& queries_in,
                                                  const at::Tensor& bank_in, int64_t k,
                                                  const at::Tensor& n_valid) {
  check_kg_search_inputs(queries_in, bank_in, k, n_valid);
  const c10::cuda::CUDAGuard guard(bank_in.device());
  const at::Tensor queries = with_unit_inner_stride(queries_in);
  const at::Tensor bank = with_unit_inner_stride(bank_in);
  const int64_t q = queries.size(0);
  const int64_t N = bank.size(0);
  at::Tensor scores = at::empty({q, k}, queries.options().dtype(at::kFloat));
  at::Tensor ids = at::empty({q, k}, queries.options().dtype(at::kLong));
  if (q == 0) return {scores, ids};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto dopts = bank.options().dtype(at::kDouble);
  at::Tensor q_inv = at::empty({q}, dopts);
  at::Tensor b_inv = at::empty({std::max<int64_t>(N, 1)}, dopts);
  const int64_t splits = choose_splits(q, N, k);
  const auto aopts = bank.options().dtype(acc_scalar_type(bank.scalar_type()));
  at::Tensor part_score = at::empty({splits * q * k}, aopts);
  at::Tensor part_id = at::empty({splits * q * k}, bank.options().dtype(at::kLong));
  at::Tensor part_size = at::empty({splits * q}, bank.options().dtype(at::kLong));
  at::Tensor heap_score = at::empty({q * k}, aopts);
  const int64_t* nv = n_valid.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, bank.scalar_type(), "kg_search", [&] {
    using acc = acc_t<scalar_t>;
    launch_inv_norm<scalar_t>(queries, nullptr, q_inv, stream);
    launch_inv_norm<scalar_t>(bank, nv, b_inv, stream);
    launch_search<scalar_t, false>(queries, q_inv, bank, b_inv, nv, k, splits, part_score, part_id,
                                   part_size, stream);
    merge_search_kernel<acc>
        <<<static_cast<unsigned>(ceil_div(q, kMergeThreads)), kMergeThreads, 0, stream>>>(
            q, k, splits, part_score.const_data_ptr<acc>(), part_id.const_data_ptr<int64_t>(),
            part_size.const_data_ptr<int64_t>(), heap_score.mutable_data_ptr<acc>(),
            scores.mutable_data_ptr<float>(), ids.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {scores, ids};
}

// ---------------------------------------------------------------------------------------------
// dedup

std::tuple<at::Tensor, at::Tensor> dedup_cuda(const at::Tensor& emb_in, double threshold) {
  check_dedup_inputs(emb_in, threshold);
  const c10::cuda::CUDAGuard guard(emb_in.device());
  const at::Tensor emb = with_unit_inner_stride(emb_in);
  const int64_t n = emb.size(0);
  at::Tensor keep = at::empty({n}, emb.options().dtype(at::kBool));
  at::Tensor rep = at::empty({n}, emb.options().dtype(at::kLong));
  if (n == 0) return {keep, rep};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor inv = at::empty({n}, emb.options().dtype(at::kDouble));
  const int64_t splits = choose_splits(n, n, 1);
  const auto aopts = emb.options().dtype(acc_scalar_type(emb.scalar_type()));
  at::Tensor part_score = at::empty({splits * n}, aopts);
  at::Tensor part_id = at::empty({splits * n}, emb.options().dtype(at::kLong));
  at::Tensor part_size = at::empty({splits * n}, emb.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, emb.scalar_type(), "dedup", [&] {
    using acc = acc_t<scalar_t>;
    launch_inv_norm<scalar_t>(emb, nullptr, inv, stream);
    launch_search<scalar_t, true>(emb, inv, emb, inv, nullptr, 1, splits, part_score, part_id,
                                  part_size, stream);
    merge_dedup_kernel<acc>
        <<<static_cast<unsigned>(ceil_div(n, kMergeThreads)), kMergeThreads, 0, stream>>>(
            n, splits, threshold, part_score.const_data_ptr<acc>(),
            part_id.const_data_ptr<int64_t>(), part_size.const_data_ptr<int64_t>(),
            keep.mutable_data_ptr<bool>(), rep.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {keep, rep};
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_framework, CUDA, m) {
  m.impl("dedup", &dedup_cuda);
  m.impl("kg_search", &kg_search_cuda);
}

}  // namespace moe_framework
