// CPU kernels of dedup and kg_search.
//
// Both are one engine: a blocked GEMM of unit-normalised query rows against unit-normalised bank
// rows, each block of scores scanned into a running top-k per query (similarity.h). kg_search is
// the engine with k results per query over bank rows [0, n_valid); dedup is the engine with k = 1
// run on emb against itself, "causally" (row j only sees rows i < j), followed by the threshold.
//
// Memory: the normalised queries ([q, d], like the input), one [NB, d] bank block and one
// [QB, NB] score block per task, and the partial top-k lists. Never [q, N] or n x n x d.
//
// Scores: with AVX-512 (fp32 scores), our own register-tiled GEMM whose epilogue scales and tests
// the scores in registers (score_block_avx512); otherwise BLAS (at::mm) on [QB, d] x [d, NB]
// blocks and a scan of the stored score block, whose candidates are rescored in a fixed order
// (candidate_score: exact ties between equal rows). A few queries (<= kFusedMaxQueries) against an
// fp32/fp64 bank take a fused pass that reads each bank row once (fused_rows).
//
// Work split: queries in fixed blocks of QB rows, bank rows in fixed blocks of NB rows, so every
// score comes out of the same GEMM call shape whatever the thread count. Tasks own a group of query
// blocks x a segment of bank blocks and keep a partial top-k per query; the partial lists merge
// under the total rank order (score desc, id asc), whose top-k is unique: the result does not
// depend on how the work was split.
//
// The kernels are headers of this folder, included only here (one translation unit, so they
// inline across files as they did in one file):
//   common.h              includes, block and task constants, bank_block_rows, ceil_div
//   normalize.h           row norms and normalisation
//   blas_path.h           BLAS score blocks and the exact rescoring of their candidates
//   fused_rows.h          the fused pass for a few queries (fp32/fp64 bank)
//   score_tiles_avx512.h  AVX-512 register tiles with the top-k test in the epilogue
//   engine.h              work plan, partial top-k lists, search_blocks, merge_partials
#include "moe_framework/similarity.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "moe_framework/cpu_isa.h"

#if MOE_CPU_AVX2_CLONE
#include <immintrin.h>
#endif

#include "common.h"
#include "engine.h"

namespace moe_framework {
namespace {

// ---------------------------------------------------------------------------------------------
// kg_search

template <typename scalar_t>
void kg_search_kernel(const at::Tensor& queries, const at::Tensor& bank, int64_t k, int64_t nv,
                      at::Tensor& scores, at::Tensor& ids) {
  using acc = acc_t<scalar_t>;
  const int64_t q = queries.size(0);
  const int64_t d = queries.size(1);
  const scalar_t* bp = bank.const_data_ptr<scalar_t>();
  const int64_t bstride = bank.stride(0);
  if (q == 0) {
    // Nothing to rank, but a bad bank is still an error, whatever the number of queries.
    const int64_t bad = first_bad_row<scalar_t, acc>(bp, bstride, nv, d);
    TORCH_CHECK(bad < 0, "kg_search: bank row ", bad, " (within the first n_valid = ", nv,
                " rows) has a zero, NaN or Inf norm: cosine similarity is undefined");
    return;
  }
  std::vector<acc> qn(static_cast<size_t>(q * d));
  const int64_t bad_q = normalize_all<scalar_t, acc>(queries.const_data_ptr<scalar_t>(),
                                                     queries.stride(0), q, d, qn.data());
  TORCH_CHECK(bad_q < 0, "kg_search: queries row ", bad_q,
              " has a zero, NaN or Inf norm: cosine similarity is undefined");

  const Plan plan = plan_search(q, nv, k, sizeof(acc), d);
  Partials<acc> part(plan.segs(), q, k);
  if (nv > 0) {
    // fp32 scores (fp32, bf16, fp16 inputs) past the fused few-query pass: AVX-512 tiles
    std::vector<float> qpanels;
    if constexpr (std::is_same_v<acc, float>) {
      const bool fused = std::is_same_v<scalar_t, float> && q <= kFusedMaxQueries;
      if (use_avx512() && !fused) {
        qpanels.resize(static_cast<size_t>(query_panels(q) * kPanelQ * d));
        pack_query_panels(qn.data(), q, d, qpanels.data());
      }
    }
    const int64_t bad =
        search_blocks<scalar_t, acc>(qn.data(), q, d, bp, bstride, false, nv, k, false, plan, part,
                                     qpanels.empty() ? nullptr : qpanels.data());
    TORCH_CHECK(bad < 0, "kg_search: bank row ", bad, " (within the first n_valid = ", nv,
                " rows) has a zero, NaN or Inf norm: cosine similarity is undefined");
  }
  float* so = scores.mutable_data_ptr<float>();
  int64_t* io = ids.mutable_data_ptr<int64_t>();
  merge_partials(part, plan.segs(), [&](int64_t r, const acc* hs, const int64_t* hi, int64_t n) {
    for (int64_t e = 0; e < n; ++e) {
      so[r * k + e] = static_cast<float>(hs[e]);
      io[r * k + e] = hi[e];
    }
    for (int64_t e = n; e < k; ++e) {
      so[r * k + e] = -std::numeric_limits<float>::infinity();
      io[r * k + e] = -1;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> kg_search_cpu(const at::Tensor& queries_in,
                                                 const at::Tensor& bank_in, int64_t k,
                                                 const at::Tensor& n_valid) {
  check_kg_search_inputs(queries_in, bank_in, k, n_valid);
  const int64_t nv = n_valid.item<int64_t>();  // a CPU scalar: no device sync
  TORCH_CHECK(nv >= 0 && nv <= bank_in.size(0), "kg_search: n_valid must be in [0, ",
              bank_in.size(0), "] (the rows of bank), got ", nv);
  const at::Tensor queries = with_unit_inner_stride(queries_in);
  const at::Tensor bank = with_unit_inner_stride(bank_in);
  const int64_t q = queries.size(0);
  at::Tensor scores = at::empty({q, k}, queries.options().dtype(at::kFloat));
  at::Tensor ids = at::empty({q, k}, queries.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, bank.scalar_type(), "kg_search", [&] {
    kg_search_kernel<scalar_t>(queries, bank, k, nv, scores, ids);
  });
  return {scores, ids};
}

// ---------------------------------------------------------------------------------------------
// dedup

template <typename scalar_t>
void dedup_kernel(const at::Tensor& emb, double threshold, at::Tensor& keep, at::Tensor& rep) {
  using acc = acc_t<scalar_t>;
  const int64_t n = emb.size(0);
  const int64_t d = emb.size(1);
  std::vector<acc> en(static_cast<size_t>(n * d));
  const int64_t bad =
      normalize_all<scalar_t, acc>(emb.const_data_ptr<scalar_t>(), emb.stride(0), n, d, en.data());
  TORCH_CHECK(bad < 0, "dedup: emb row ", bad,
              " has a zero, NaN or Inf norm: cosine similarity is undefined");
  const Plan plan = plan_causal(n, sizeof(acc), d);
  Partials<acc> part(plan.segs(), n, 1);
  search_blocks<acc, acc>(en.data(), n, d, en.data(), d, true, n, 1, true, plan, part);
  bool* keep_out = keep.mutable_data_ptr<bool>();
  int64_t* rep_out = rep.mutable_data_ptr<int64_t>();
  merge_partials(part, plan.segs(), [&](int64_t r, const acc* hs, const int64_t* hi, int64_t m) {
    const bool dup = m > 0 && is_duplicate(hs[0], threshold);
    keep_out[r] = !dup;
    rep_out[r] = dup ? hi[0] : r;
  });
}

std::tuple<at::Tensor, at::Tensor> dedup_cpu(const at::Tensor& emb_in, double threshold) {
  check_dedup_inputs(emb_in, threshold);
  const at::Tensor emb = with_unit_inner_stride(emb_in);
  const int64_t n = emb.size(0);
  at::Tensor keep = at::empty({n}, emb.options().dtype(at::kBool));
  at::Tensor rep = at::empty({n}, emb.options().dtype(at::kLong));
  if (n == 0) return {keep, rep};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, emb.scalar_type(), "dedup",
                                  [&] { dedup_kernel<scalar_t>(emb, threshold, keep, rep); });
  return {keep, rep};
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_framework, CPU, m) {
  m.impl("dedup", &dedup_cpu);
  m.impl("kg_search", &kg_search_cpu);
}

}  // namespace moe_framework
