// The search engine shared by kg_search and dedup: the work plan (query groups x bank segments),
// the partial top-k lists, search_blocks (normalise a bank block, score it, keep the top-k) and
// merge_partials.
#pragma once

#include "blas_path.h"
#include "fused_rows.h"
#include "score_tiles_avx512.h"

namespace moe_framework {
namespace {

// How the (query block x bank block) grid is cut into tasks. Query blocks [qgroup[g], qgroup[g+1])
// form group g; bank blocks [segment[s], segment[s+1]) form segment s; task t = g * segs + s.
struct Plan {
  int64_t query_block = kQueryBlock;
  int64_t bank_block = 0;
  std::vector<int64_t> qgroup;
  std::vector<int64_t> segment;
  int64_t groups() const { return static_cast<int64_t>(qgroup.size()) - 1; }
  int64_t segs() const { return static_cast<int64_t>(segment.size()) - 1; }
};

// Tasks for `work` multiply-adds: a few per thread of torch's pool, none smaller than
// kMinTaskWork (small searches run inline, without waking the pool). Past one task per thread, a
// multiple of the thread count, so that equal tasks keep every thread equally busy.
int64_t task_target(double work) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const double by_work =
      std::max(1.0, std::floor(work / static_cast<double>(int64_t{kMinTaskWork})));
  int64_t t = std::max<int64_t>(1, std::min<int64_t>(int64_t{kTasksPerThread} * threads,
                                                     static_cast<int64_t>(std::min(by_work, 1e9))));
  if (t > threads) t -= t % threads;
  return t;
}

std::vector<int64_t> even_bounds(int64_t items, int64_t parts) {
  std::vector<int64_t> b(static_cast<size_t>(parts + 1));
  for (int64_t p = 0; p <= parts; ++p) b[p] = items * p / parts;
  return b;
}

// kg_search: bank segments first (they parallelise any q, including q = 1), query groups when
// the bank is too small to feed every thread.
Plan plan_search(int64_t q, int64_t nv, int64_t k, int64_t elem_size, int64_t d) {
  Plan p;
  p.bank_block = bank_block_rows(d, elem_size);
  const int64_t qblocks = ceil_div(q, p.query_block);
  const int64_t bblocks = ceil_div(nv, p.bank_block);
  // The fused pass (q <= kFusedMaxQueries) is bound by reading the bank: its cost per row is
  // about that of kFusedMaxQueries queries' multiply-adds.
  const double q_cost = static_cast<double>(std::max(q, kFusedMaxQueries));
  const int64_t target = task_target(q_cost * static_cast<double>(nv) * d);
  int64_t segs = std::min(bblocks, target);
  segs = std::max<int64_t>(1, std::min(segs, kMaxPartialEntries / std::max<int64_t>(1, q * k)));
  const int64_t groups = std::max<int64_t>(1, std::min(qblocks, ceil_div(target, segs)));
  p.segment = even_bounds(bblocks, segs);
  p.qgroup = even_bounds(qblocks, groups);
  return p;
}

// dedup (causal: query block i needs bank blocks up to its own rows, work grows with i): one bank
// segment, query groups cut where the cumulative triangular work crosses equal shares.
Plan plan_causal(int64_t n, int64_t elem_size, int64_t d) {
  Plan p;
  p.bank_block = bank_block_rows(d, elem_size);
  const int64_t qblocks = ceil_div(n, p.query_block);
  const int64_t target = task_target(0.5 * static_cast<double>(n) * static_cast<double>(n) * d);
  const int64_t groups = std::max<int64_t>(1, std::min(qblocks, target));
  p.segment = {0, ceil_div(n, p.bank_block)};
  p.qgroup.assign(1, 0);
  // work of query block i ~ its last row + 1 (the bank rows it scans)
  auto work_upto = [&](int64_t blocks) {  // sum over i < blocks
    double w = 0;
    for (int64_t i = 0; i < blocks; ++i)
      w += static_cast<double>(std::min(n, (i + 1) * kQueryBlock));
    return w;
  };
  const double total = work_upto(qblocks);
  double acc = 0;
  for (int64_t i = 0, g = 1; i < qblocks && g < groups; ++i) {
    acc += static_cast<double>(std::min(n, (i + 1) * kQueryBlock));
    if (acc >= total * static_cast<double>(g) / static_cast<double>(groups) && i + 1 < qblocks) {
      p.qgroup.push_back(i + 1);
      ++g;
    }
  }
  p.qgroup.push_back(qblocks);
  return p;
}

// Partial top-k lists: [segs][q][k] scores and ids, [segs][q] sizes.
template <typename acc_t>
struct Partials {
  std::vector<acc_t> score;
  std::vector<int64_t> id;
  std::vector<int64_t> size;
  int64_t q, k;
  Partials(int64_t segs, int64_t q_, int64_t k_)
      : score(static_cast<size_t>(segs * q_ * k_)),
        id(static_cast<size_t>(segs * q_ * k_)),
        size(static_cast<size_t>(segs * q_), 0),
        q(q_),
        k(k_) {}
};

// The engine. qn: normalised queries [q, d]. Bank rows [0, nv) of `bank` (row stride
// bank_stride); when bank_normalized (dedup) they are used in place, else each task normalises a
// block into its buffer. causal: query row r only sees bank rows < r. Returns the first bank row
// without a direction (-1 when all are fine).
// qpanels: the queries packed for the AVX-512 tiles (fp32 kg_search when use_avx512()), else
// null: BLAS blocks.
template <typename scalar_t, typename acc_t>
int64_t search_blocks(const acc_t* qn, int64_t q, int64_t d, const scalar_t* bank,
                      int64_t bank_stride, bool bank_normalized, int64_t nv, int64_t k, bool causal,
                      const Plan& plan, Partials<acc_t>& part, const float* qpanels = nullptr) {
  const int64_t QB = plan.query_block;
  const int64_t NB = plan.bank_block;
  const int64_t segs = plan.segs();
  const int64_t tasks = plan.groups() * segs;
  std::vector<int64_t> bad(static_cast<size_t>(tasks), -1);
  const acc_t margin = rescore_margin<acc_t>(d);
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    at::Tensor bank_buf, score_buf;
    std::vector<acc_t> scale(static_cast<size_t>(NB));
    std::vector<acc_t> rescore_row(static_cast<size_t>(d));
    std::vector<float> floors;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t g = t / segs;
      const int64_t s = t % segs;
      const int64_t row_begin = plan.qgroup[g] * QB;
      const int64_t row_end = std::min(q, plan.qgroup[g + 1] * QB);
      const bool tiles = std::is_same_v<acc_t, float> && qpanels != nullptr && !causal;
      if (tiles) {
        // this task's heaps start empty: every score passes until a heap holds k entries
        floors.resize(static_cast<size_t>(query_panels(q) * kPanelQ));
        for (int64_t r = row_begin; r < query_panels(row_end) * kPanelQ; ++r) {
          floors[r] = r < q ? -std::numeric_limits<float>::infinity()
                            : std::numeric_limits<float>::infinity();
        }
      }
      if (!score_buf.defined() && !tiles) {
        score_buf =
            at::empty({QB * NB}, at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
        if (!bank_normalized) {
          bank_buf = at::empty({NB * d},
                               at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
        }
      }
      if (tiles && !bank_buf.defined() && !bank_normalized) {
        bank_buf =
            at::empty({NB * d}, at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
      }
      acc_t* sbuf = tiles ? nullptr : score_buf.data_ptr<acc_t>();
      acc_t* part_score = part.score.data() + s * q * k;
      int64_t* part_id = part.id.data() + s * q * k;
      int64_t* part_size = part.size.data() + s * q;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        if (!bank_normalized && !causal && q <= kFusedMaxQueries) {
          const int64_t c0 = plan.segment[s] * NB;
          const int64_t c1 = std::min(nv, plan.segment[s + 1] * NB);
          bad[t] =
              fused_rows(qn, q, bank, bank_stride, c0, c1, d, k, part_score, part_id, part_size,
                         nv * d * static_cast<int64_t>(sizeof(scalar_t)) >= kPrefetchMinBankBytes &&
                             bank_prefetch_helps());
          continue;
        }
      }
      for (int64_t blk = plan.segment[s]; blk < plan.segment[s + 1]; ++blk) {
        const int64_t c0 = blk * NB;
        const int64_t c1 = std::min(nv, c0 + NB);
        if (causal && c0 + 1 >= row_end) break;  // no row of this group sees column c0
        const acc_t* b = nullptr;
        int64_t ldb = d;
        bool scaled = false;
        if (bank_normalized) {
          // scalar_t == acc_t here (dedup passes its normalised copy).
          b = reinterpret_cast<const acc_t*>(bank) + c0 * bank_stride;
          ldb = bank_stride;
        } else {
          if constexpr (std::is_same_v<scalar_t, acc_t>) {
            // Raw rows straight into the GEMM, scores scaled by 1/||row|| afterwards: no copy of
            // the block. Only when every squared norm is a normal acc_t number, so the raw
            // products neither overflow nor lose bits to subnormals; else the normalised copy.
            scaled = true;
            for (int64_t row = c0; row < c1 && scaled; ++row) {
              const acc_t ss = sum_of_squares<acc_t>(bank + row * bank_stride, d);
              scaled = norm_ok(ss) && ss >= std::numeric_limits<acc_t>::min();
              scale[row - c0] = scaled ? static_cast<acc_t>(inv_norm(ss)) : acc_t(0);
            }
            if (scaled) {
              b = bank + c0 * bank_stride;
              ldb = bank_stride;
            }
          }
          if (!scaled) {
            acc_t* buf = bank_buf.data_ptr<acc_t>();
            const int64_t r = normalize_rows(bank, bank_stride, c0, c1, d, buf);
            if (r >= 0) {
              bad[t] = r;
              break;
            }
            b = buf;
            ldb = d;
          }
        }
        const int64_t nb = c1 - c0;
#if MOE_CPU_AVX2_CLONE
        if constexpr (std::is_same_v<acc_t, float>) {
          if (tiles) {
            if (!scaled) std::fill(scale.begin(), scale.begin() + nb, 1.0f);
            const TileSink sink{part_score, part_id, part_size, floors.data(), k};
            score_block_avx512(qpanels, row_begin, row_end, b, ldb, scale.data(), c0, c1, d, sink);
            continue;
          }
        }
#endif
        for (int64_t r0 = row_begin; r0 < row_end; r0 += QB) {
          const int64_t r1 = std::min(row_end, r0 + QB);
          if (causal && r1 - 1 <= c0) continue;  // every row here precedes the block
          scores_gemm(qn + r0 * d, r1 - r0, b, nb, ldb, d, sbuf);
          for (int64_t r = r0; r < r1; ++r) {
            acc_t* srow = sbuf + (r - r0) * nb;
            if (scaled) {
              for (int64_t j = 0; j < nb; ++j) srow[j] *= scale[j];
            }
            acc_t* hs = part_score + r * k;
            int64_t* hi = part_id + r * k;
            int64_t& size = part_size[r];
            const int64_t lim = causal ? std::min(nb, std::max<int64_t>(0, r - c0)) : nb;
            // A BLAS score within `margin` of the heap's root may belong to a row whose own score
            // (candidate_score) enters; topk_push's full comparison decides on that score.
            acc_t floor_score = size < k ? -std::numeric_limits<acc_t>::infinity() : hs[0];
            for (int64_t j = 0; j < lim; ++j) {
              if (srow[j] >= floor_score - margin) {
                const acc_t sc =
                    candidate_score(qn + r * d, bank, bank_stride, bank_normalized, c0 + j, d,
                                    scaled ? scale[j] : acc_t(0), rescore_row.data());
                topk_push(hs, hi, size, k, clamp_cosine(sc), c0 + j);
                if (size == k) floor_score = hs[0];
              }
            }
          }
        }
      }
    }
  });
  int64_t first = -1;
  for (int64_t b : bad) {
    if (b >= 0 && (first < 0 || b < first)) first = b;
  }
  return first;
}

// Merge each query's partial lists (one per segment) into its final top-k, best first, padded
// with (-inf, -1). Calls out(r, score, id, count) per query with the sorted entries.
template <typename acc_t, typename Out>
void merge_partials(const Partials<acc_t>& part, int64_t segs, Out&& out) {
  const int64_t q = part.q;
  const int64_t k = part.k;
  at::parallel_for(0, q, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, k * segs)),
                   [&](int64_t r0, int64_t r1) {
                     std::vector<acc_t> hs(static_cast<size_t>(k));
                     std::vector<int64_t> hi(static_cast<size_t>(k));
                     for (int64_t r = r0; r < r1; ++r) {
                       int64_t size = 0;
                       for (int64_t s = 0; s < segs; ++s) {
                         const int64_t base = (s * q + r) * k;
                         const int64_t n = part.size[s * q + r];
                         for (int64_t e = 0; e < n; ++e) {
                           topk_push(hs.data(), hi.data(), size, k, part.score[base + e],
                                     part.id[base + e]);
                         }
                       }
                       topk_sort(hs.data(), hi.data(), size);
                       out(r, hs.data(), hi.data(), size);
                     }
                   });
}

}  // namespace
}  // namespace moe_framework
