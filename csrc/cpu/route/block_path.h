// The row-block path of route (CPUs with AVX-512): BlockRouter routes 16 rows at a time, one
// vector lane per row, with the same operations in the same order as RowRouter (row_path.h).
#pragma once

#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "row_path.h"

namespace moe_framework {
namespace {

// ---------------------------------------------------------------------------------------------
// Row-block path: kBlockRows = 16 rows routed together, one vector lane per row (GCC vector
// extension: one AVX-512 register; used by the AVX-512 build only), a loop over the experts
// (columns). It removes the per-row fixed cost of the row path (short loops over the experts of
// one row, each with set-up and remainder, and the scalar selection), which dominates at small E,
// and replaces the top-k scan by a compare/select network per column.
//
// Every lane computes exactly what RowRouter computes for its row, with the same operations in the
// same order (max, the kLanes partial sums of the softmax denominator, keys, group top-2 sums,
// selection in the order of route::ranks_before, route::selected_weights), so both paths and every
// build give identical bits; tests/ops/test_route.py checks it.

using route::lanes::VF;
using route::lanes::VI;
constexpr int kBlockRows = 16;
static_assert(sizeof(VF) == kBlockRows * sizeof(float));
// Largest k (and topk_group) of the block path: the selection network costs O(k) per column.
constexpr int kBlockMaxK = 8;
// Fewest rows routed as a block; fewer go through the row path.
constexpr int64_t kBlockMinRows = 4;
// Largest E of the block path (its transposed block of logits stays in L1).
constexpr int64_t kBlockMaxExperts = 256;

// Set MOE_FRAMEWORK_ROUTE_ROW_KERNEL=1 to route every row with the row path (the tests compare
// the two paths; read on each call so that a benchmark can switch in one process).
bool block_path_disabled() {
  return std::getenv("MOE_FRAMEWORK_ROUTE_ROW_KERNEL") != nullptr;
}

MOE_ALWAYS_INLINE VF load_lanes(const float* p) {
  VF v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
// Every lane = v (a uniform initialiser becomes one broadcast; VF{} + v would also turn -0 into
// +0).
MOE_ALWAYS_INLINE VF splat(float v) {
  return VF{v, v, v, v, v, v, v, v, v, v, v, v, v, v, v, v};
}
MOE_ALWAYS_INLINE VI splat(int32_t v) {
  return VI{v, v, v, v, v, v, v, v, v, v, v, v, v, v, v, v};
}

// The ISA a clone of the block path is compiled for (picks the cheapest "any lane set" test and
// the transpose).
enum class BlockIsa { kBaseline, kAvx2, kAvx512 };

// Is any lane of the mask m set? The builtins are expanded in the clone they are inlined into.
template <BlockIsa isa>
MOE_ALWAYS_INLINE bool any_lane(VI m) {
#if defined(__GNUC__) && !defined(__clang__) && MOE_CPU_AVX2_CLONE
  if constexpr (isa == BlockIsa::kAvx512) {
    return __builtin_ia32_ptestmd512(m, m, static_cast<uint16_t>(0xffff)) != 0;
  } else if constexpr (isa == BlockIsa::kAvx2) {
    typedef long long V4 __attribute__((vector_size(32)));
    V4 h[2];
    std::memcpy(h, &m, sizeof(h));
    const V4 o = h[0] | h[1];
    return !__builtin_ia32_ptestz256(o, o);
  }
#endif
  uint64_t w[sizeof(VI) / 8];
  std::memcpy(w, &m, sizeof(w));
  uint64_t a = 0;
  for (uint64_t x : w) a |= x;
  return a != 0;
}

#if defined(__GNUC__) && !defined(__clang__)
#define MOE_ROUTE_SHUFFLE_TRANSPOSE 1
// One butterfly stage of a 16 x 16 fp32 transpose: rows i and i + h (bit h of i clear) swap their
// off-diagonal h x h sub-blocks. The four stages h = 1, 2, 4, 8 transpose the tile; each shuffle
// is one two-source permute (vpermt2ps) with AVX-512.
template <int h>
MOE_ALWAYS_INLINE void transpose_stage(VF* r, VI take_a, VI take_b) {
  for (int i = 0; i < kBlockRows; ++i) {
    if (i & h) continue;
    const VF a = r[i], b = r[i + h];
    r[i] = __builtin_shuffle(a, b, take_a);
    r[i + h] = __builtin_shuffle(a, b, take_b);
  }
}

// dst[c * 16 + l] = src[l * stride + c] for a 16 x 16 tile (data movement only: exact).
MOE_ALWAYS_INLINE void transpose_tile(const float* src, int64_t stride, float* dst) {
  VF r[kBlockRows];
  for (int i = 0; i < kBlockRows; ++i) {
    r[i] = load_lanes(src + i * stride);
    // The same tile of the next block: 16 interleaved row streams are more than the hardware
    // prefetcher follows (a prefetch never faults, past the end of the logits included).
    __builtin_prefetch(src + (kBlockRows + i) * stride);
  }
  transpose_stage<1>(r, VI{0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30},
                     VI{1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31});
  transpose_stage<2>(r, VI{0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29},
                     VI{2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31});
  transpose_stage<4>(r, VI{0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27},
                     VI{4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31});
  transpose_stage<8>(r, VI{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
                     VI{8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31});
  for (int c = 0; c < kBlockRows; ++c) std::memcpy(dst + c * kBlockRows, &r[c], sizeof(VF));
}
#else
#define MOE_ROUTE_SHUFFLE_TRANSPOSE 0
#endif

// Rank keys (route::rank_key, -0 made +0) as int32 with the same order and equality as the float
// comparisons of route::ranks_before. kNoKey stays below every key: it marks empty slots and
// excluded experts, which then never enter a selection.
MOE_ALWAYS_INLINE VI ordered_key(VF v) {
  v = v != v ? splat(-route::pos_inf<float>()) : v;  // route::rank_key
  v = v + 0.0f;                                      // -0 + 0 = +0: the float order has -0 == +0
  const VI b = reinterpret_cast<VI>(v);
  return b ^ ((b >> 31) & 0x7fffffff);  // negative floats: reverse the magnitude order
}
constexpr int32_t kNoKey = std::numeric_limits<int32_t>::min();

// Pushes candidate c (id cid in every lane) into each lane's best-first list key[0..n) (ids id).
// The candidates of a list arrive in increasing id, so "strictly greater" is the whole tie rule, as
// in route::topk_push. Slot j takes the candidate or its upper neighbour, or stays.
// The network itself, for int32 (VI) or float (VF) keys, without the early exit.
template <typename V>
MOE_ALWAYS_INLINE void insert_lanes(V* key, VI* id, int n, V c, VI cidv) {
  for (int j = n - 1; j > 0; --j) {
    const VI here = c > key[j];
    const VI above = c > key[j - 1];
    key[j] = here ? (above ? key[j - 1] : c) : key[j];
    id[j] = here ? (above ? id[j - 1] : cidv) : id[j];
  }
  const VI here = c > key[0];
  key[0] = here ? c : key[0];
  id[0] = here ? cidv : id[0];
}

template <BlockIsa isa>
MOE_ALWAYS_INLINE void block_push(VI* key, VI* id, int n, VI c, VI cidv) {
  if (!any_lane<isa>(c > key[n - 1])) return;
  insert_lanes(key, id, n, c, cidv);
}

// block_push of count (<= kBlockRows) consecutive candidates c[i] with ids first_id + i (every
// lane). Once the lists are full few candidates enter: one test for the whole run (against its
// maximum) skips them all. (GCC builds a broadcast of a run-time int lane by lane, so the ids are
// counted up in a vector.)
template <BlockIsa isa>
MOE_ALWAYS_INLINE void block_push_run(VI* key, VI* id, int n, const VI* c, int count, VI first_id) {
  VI best = c[0];
  for (int i = 1; i < count; ++i) best = c[i] > best ? c[i] : best;
  if (!any_lane<isa>(best > key[n - 1])) return;
  for (int i = 0; i < count; ++i) block_push<isa>(key, id, n, c[i], first_id + i);
}

template <typename scalar_t>
class BlockRouter {
 public:
  static constexpr int L = kBlockRows;

  static bool applies(const RouteParams& p) {
    return std::is_same_v<acc_t<scalar_t>, float> && p.k <= kBlockMaxK &&
           p.topk_group <= kBlockMaxK && p.num_experts <= kBlockMaxExperts &&
           !block_path_disabled();
  }

  BlockRouter(const RouteParams& p, const float* bias)
      : p_(p),
        bias_(bias),
        key_is_logit_(route::key_is_logit(bias != nullptr, p.n_group)),
        xt_(static_cast<size_t>(p.num_experts * L)),
        kt_(p.n_group > 1 ? static_cast<size_t>(p.num_experts * L) : 0) {}

  // Routes rows [0, n) (n <= L) of x (unit column stride): k weights and ids per row, best first,
  // and adds the chosen experts to hist. Lanes past n repeat row n - 1 and are discarded.
  // isa: the clone; the AVX-512 one transposes full fp32 blocks by vector shuffles (single
  // instructions there) instead of element by element.
  template <BlockIsa isa>
  MOE_ALWAYS_INLINE void run(const scalar_t* x, int64_t row_stride, int64_t n, float* w_out,
                             int32_t* id_out, int32_t* hist) {
    const int64_t E = p_.num_experts;
    const int k = p_.k;
    float* xt = xt_.data();
    int64_t e0 = 0;  // xt[e * L + l] = row l, expert e
#if MOE_ROUTE_SHUFFLE_TRANSPOSE
    if constexpr (isa == BlockIsa::kAvx512 && std::is_same_v<scalar_t, float>) {
      if (n == L) {
        for (; e0 + L <= E; e0 += L) transpose_tile(x + e0, row_stride, xt + e0 * L);
      }
    }
#endif
    for (int l = 0; l < L; ++l) {
      const scalar_t* row = x + std::min<int64_t>(l, n - 1) * row_stride;
      for (int64_t e = e0; e < E; ++e) xt[e * L + l] = static_cast<float>(row[e]);
    }
    const VF neg_inf = splat(-route::pos_inf<float>());
    VF row_max = neg_inf;
    VI has_nan = VI{}, has_neg_inf = VI{};
    for (int64_t e = 0; e < E; ++e) {
      const VF v = load_lanes(xt + e * L);
      has_nan |= v != v;
      has_neg_inf |= v == neg_inf;
      row_max = v > row_max ? v : row_max;
    }
    VF inv_sum = VF{};
    const bool softmax = p_.scoring == route::kSoftmax;
    if (softmax && (!p_.renormalize || !key_is_logit_)) {
      // The kLanes partial sums of row_sum_exp (expert e into partial e % kLanes), then their sum
      // in partial order.
      VF part[kLanes] = {};
      for (int64_t e = 0; e < E; ++e) {
        part[e % kLanes] += route::lanes::softmax_numerator(load_lanes(xt + e * L), row_max);
      }
      VF sum = VF{};
      for (int q = 0; q < kLanes; ++q) sum += part[q];
      inv_sum = sum > 0.0f ? 1.0f / sum : VF{};  // route::safe_inverse
    }

    VI top_key[kBlockMaxK], top_id[kBlockMaxK];
    for (int j = 0; j < k; ++j) {
      top_key[j] = splat(kNoKey);
      top_id[j] = splat(int32_t(j));
    }
    if (key_is_logit_ && !any_lane<isa>(has_nan | has_neg_inf)) {
      // The keys are the logits, all above -inf: rank them as floats, in registers.
      if (k <= 2) {
        select_finite_logits<isa, 2>(top_id);
      } else if (k <= 4) {
        select_finite_logits<isa, 4>(top_id);
      } else {
        select_finite_logits<isa, kBlockMaxK>(top_id);
      }
    } else if (p_.n_group == 1) {
      VI c[L];
      VI first_id = VI{};
      for (int64_t e0 = 0; e0 < E; e0 += L) {
        const int count = static_cast<int>(std::min<int64_t>(L, E - e0));
        for (int i = 0; i < count; ++i) {
          const int64_t e = e0 + i;
          c[i] = ordered_key(column_keys(load_lanes(xt + e * L), e, row_max, inv_sum));
        }
        block_push_run<isa>(top_key, top_id, k, c, count, first_id);
        first_id += L;
      }
    } else {
      select_in_groups<isa>(row_max, inv_sum, top_key, top_id);
    }

    // Weights from the selected logits (route::selected_weights).
    alignas(64) int32_t ids[kBlockMaxK][L];
    alignas(64) float xs[L];
    VF w[kBlockMaxK];
    VF sel_max = splat(-route::pos_inf<float>());
    for (int j = 0; j < k; ++j) {
      std::memcpy(ids[j], &top_id[j], sizeof(VI));
      for (int l = 0; l < L; ++l) xs[l] = xt[ids[j][l] * L + l];
      w[j] = load_lanes(xs);
      sel_max = w[j] > sel_max ? w[j] : sel_max;
    }
    const VF shift = p_.renormalize ? sel_max : row_max;
    VF num_sum = VF{};
    for (int j = 0; j < k; ++j) {  // route::weight_numerator
      w[j] = softmax ? route::lanes::softmax_numerator(w[j], shift) : route::lanes::sigmoid(w[j]);
      num_sum += w[j];
    }
    const float scale = static_cast<float>(p_.scale);
    VF factor;  // route::weight_factor
    if (softmax) {
      factor = (p_.renormalize ? (num_sum > 0.0f ? 1.0f / num_sum : VF{}) : inv_sum) * scale;
    } else if (p_.renormalize) {
      factor = scale / (num_sum + static_cast<float>(route::kSigmoidRenormEps));
    } else {
      factor = splat(scale);
    }
    alignas(64) float ws[kBlockMaxK][L];
    for (int j = 0; j < k; ++j) {
      const VF wj = has_nan != 0 ? splat(std::numeric_limits<float>::quiet_NaN()) : w[j] * factor;
      std::memcpy(ws[j], &wj, sizeof(VF));
    }
    for (int64_t l = 0; l < n; ++l) {
      for (int j = 0; j < k; ++j) {
        w_out[l * k + j] = ws[j][l];
        id_out[l * k + j] = ids[j][l];
        ++hist[ids[j][l]];
      }
    }
  }

 private:
  // The selection keys of expert e for the block's rows (RowRouter's row_keys; the logit without
  // bias and groups).
  MOE_ALWAYS_INLINE VF column_keys(VF x, int64_t e, VF row_max, VF inv_sum) const {
    if (key_is_logit_) return x;
    VF key = p_.scoring == route::kSoftmax ? route::lanes::softmax_numerator(x, row_max) * inv_sum
                                           : route::lanes::sigmoid(x);
    if (bias_ != nullptr) key += bias_[e];
    return key;
  }

  // The best K logits of each lane, for rows without NaN or -inf, into top_id[0..k) (K >= k: the
  // first k of the K best are the k best). The lists start full of -inf, which every logit beats,
  // and the candidates arrive in increasing id, so the strict comparisons give the order of
  // route::ranks_before (equal keys, -0 == +0 included: lowest id first). No early exit: with 16
  // rows a candidate column almost always enters some lane, so the network always runs.
  template <BlockIsa isa, int K>
  MOE_ALWAYS_INLINE void select_finite_logits(VI* top_id) const {
    const float* xt = xt_.data();
    VF key[K];
    VI id[K];
    for (int j = 0; j < K; ++j) {
      key[j] = splat(-route::pos_inf<float>());
      id[j] = splat(int32_t(j));
    }
    VI cid = VI{};
    for (int64_t e = 0; e < p_.num_experts; ++e, cid += 1) {
      insert_lanes(key, id, K, load_lanes(xt + e * L), cid);
    }
    for (int j = 0; j < p_.k; ++j) top_id[j] = id[j];
  }

  // Grouped top-k: group scores (sum of the two best keys), the topk_group best groups, then the
  // k best experts of those groups.
  template <BlockIsa isa>
  MOE_ALWAYS_INLINE void select_in_groups(VF row_max, VF inv_sum, VI* top_key, VI* top_id) {
    const int64_t E = p_.num_experts;
    const int64_t gs = E / p_.n_group;
    const int tg = static_cast<int>(p_.topk_group);
    const float* xt = xt_.data();
    float* kt = kt_.data();
    const VF neg_inf = splat(-route::pos_inf<float>());
    VI g_key[kBlockMaxK], g_id[kBlockMaxK];
    for (int j = 0; j < tg; ++j) {
      g_key[j] = splat(kNoKey);
      g_id[j] = splat(int32_t(j));
    }
    VI gv = VI{};  // g in every lane
    for (int64_t g = 0; g < p_.n_group; ++g) {
      VF first = neg_inf, second = neg_inf;
      for (int64_t e = g * gs; e < (g + 1) * gs; ++e) {
        VF key = column_keys(load_lanes(xt + e * L), e, row_max, inv_sum);
        key = key != key ? neg_inf : key;  // route::rank_key
        std::memcpy(kt + e * L, &key, sizeof(VF));
        // route::top2_push
        const VI above_first = key > first;
        second = above_first ? first : (key > second ? key : second);
        first = above_first ? key : first;
      }
      VF score = gs >= 2 ? first + second : first;  // route::group_score
      block_push<isa>(g_key, g_id, tg, ordered_key(score), gv);
      gv += 1;
    }
    const VI no_key = splat(kNoKey);
    VI c[L];
    gv = VI{};
    VI ev = VI{};  // the first expert of group g in every lane
    for (int64_t g = 0; g < p_.n_group; ++g, gv += 1, ev += static_cast<int32_t>(gs)) {
      VI chosen = VI{};
      for (int j = 0; j < tg; ++j) chosen |= g_id[j] == gv;
      if (!any_lane<isa>(chosen)) continue;  // no row of the block chose this group
      for (int64_t e0 = g * gs; e0 < (g + 1) * gs; e0 += L) {
        const int count = static_cast<int>(std::min<int64_t>(L, (g + 1) * gs - e0));
        for (int i = 0; i < count; ++i) {
          c[i] = chosen != 0 ? ordered_key(load_lanes(kt + (e0 + i) * L)) : no_key;
        }
        block_push_run<isa>(top_key, top_id, p_.k, c, count,
                            ev + static_cast<int32_t>(e0 - g * gs));
      }
    }
  }

  RouteParams p_;
  const float* bias_;
  bool key_is_logit_;
  std::vector<float> xt_, kt_;  // [E][L]: logits, keys (grouped selection only)
};

}  // namespace
}  // namespace moe_framework
