// CPU kernels of route and route_backward.
//
// route has two paths with identical results (bit for bit). Rows split over torch's thread pool
// in fixed chunks. On CPUs with AVX-512, with k <= 8, E <= 256 and fp32/bf16/fp16 logits,
// BlockRouter routes 16 rows at
// a time, one vector lane per row (see "Row-block path" below); a tail of fewer than 4 rows goes
// row by row. Otherwise RowRouter runs one pass
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

#include "moe_framework/cpu_isa.h"

namespace moe_framework {
namespace {

using route::acc_t;

// Independent partial sums of the softmax denominator: a fixed order, so the baseline and AVX2
// builds (and any thread count) give the same bits.
constexpr int kLanes = 16;
// Row elements per task below which another thread costs more than it saves.
constexpr int64_t kMinWorkPerTask = 1 << 15;

int64_t num_tasks(int64_t rows, int64_t work_per_row) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t by_work =
      std::max<int64_t>(1, rows * std::max<int64_t>(1, work_per_row) / kMinWorkPerTask);
  return std::max<int64_t>(1, std::min({threads, by_work, rows}));
}

// ---------------------------------------------------------------------------------------------
// The row loops are compiled twice, for baseline x86-64 and with target("avx2,f16c"), and picked
// at run time. FMA is deliberately not enabled: both builds round every operation the same way,
// so results are bitwise identical whichever build runs.

// Max over the row (NaN ignored; max is exact, so the vector order does not matter) and whether
// the row holds a NaN.
template <typename T>
MOE_ALWAYS_INLINE void row_max_and_nan(const T* x, int64_t n, T& row_max, bool& has_nan) {
  T m = -route::pos_inf<T>();
  int nan = 0;
#pragma omp simd reduction(max : m) reduction(| : nan)
  for (int64_t e = 0; e < n; ++e) {
    const T v = x[e];
    nan |= v != v;
    m = v > m ? v : m;
  }
  row_max = m;
  has_nan = nan != 0;
}

// sum_e exp(x_e - row_max) over kLanes fixed partial sums (the softmax denominator).
template <typename T>
MOE_ALWAYS_INLINE T row_sum_exp(const T* x, int64_t n, T row_max) {
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
MOE_ALWAYS_INLINE void row_keys(const T* x, int64_t n, int scoring, T row_max, T row_inv_sum,
                                const T* bias, T* key) {
  if (scoring == route::kSoftmax) {
    if (std::isfinite(row_max)) {
      for (int64_t e = 0; e < n; ++e) key[e] = route::exp_acc(x[e] - row_max) * row_inv_sum;
    } else {
      for (int64_t e = 0; e < n; ++e)
        key[e] = route::softmax_numerator(x[e], row_max) * row_inv_sum;
    }
  } else {
    for (int64_t e = 0; e < n; ++e) key[e] = route::sigmoid(x[e]);
  }
  if (bias != nullptr) {
    for (int64_t e = 0; e < n; ++e) key[e] += bias[e];
  }
}

// The best two keys of a group (NaN ranks as -inf), as route::top2_push would find them. Large
// groups take three vector passes (max; is the max repeated; max below it) instead of a branchy
// scalar loop.
template <typename T>
MOE_ALWAYS_INLINE void group_top2(const T* key, int64_t n, T& first, T& second) {
  first = -route::pos_inf<T>();
  second = -route::pos_inf<T>();
  if (n < 8) {
    for (int64_t e = 0; e < n; ++e) route::top2_push(first, second, key[e]);
    return;
  }
  T m = -route::pos_inf<T>();
#pragma omp simd reduction(max : m)
  for (int64_t e = 0; e < n; ++e) m = key[e] > m ? key[e] : m;
  int repeats = 0;
#pragma omp simd reduction(+ : repeats)
  for (int64_t e = 0; e < n; ++e) repeats += key[e] == m;
  T below = -route::pos_inf<T>();
#pragma omp simd reduction(max : below)
  for (int64_t e = 0; e < n; ++e) below = (key[e] < m && key[e] > below) ? key[e] : below;
  first = m;
  second = repeats >= 2 ? m : below;
}

// Candidates above which select_by_rank sorts instead of counting ranks: the count costs n^2
// comparisons (vectorised), the partial sort O(n log k). Below it the count is faster.
constexpr int kMaxRankCount = 128;

// The k best of n >= k candidates (keys already through route::rank_key, ids distinct) in rank
// order. Few candidates go through an insertion list (the vector loop's set-up would dominate);
// up to kMaxRankCount, a candidate's rank is the number of candidates that route::ranks_before it,
// counted with a vector loop (no data-dependent branches; the ranks of a strict total order are
// distinct); more (thousands of groups) are partially sorted, so no input is quadratic. All three
// give the order of route::ranks_before. scratch_keys holds k keys, scratch_order n indices.
template <typename T>
MOE_ALWAYS_INLINE void select_by_rank(const T* keys, const int32_t* ids, int n, int k,
                                      int32_t* out_ids, T* scratch_keys, int32_t* scratch_order) {
  if (n <= 32) {
    int m = 0;
    for (int i = 0; i < n; ++i) route::topk_insert(scratch_keys, out_ids, k, m, keys[i], ids[i]);
    return;
  }
  if (n <= kMaxRankCount) {
    for (int i = 0; i < n; ++i) {
      const T ki = keys[i];
      const int32_t ii = ids[i];
      int rank = 0;
#pragma omp simd reduction(+ : rank)
      for (int j = 0; j < n; ++j)
        rank += route::ranks_before(keys[j], int64_t(ids[j]), ki, int64_t(ii));
      if (rank < k) out_ids[rank] = ii;
    }
    return;
  }
  // ranks_before is a strict total order (no NaN keys, distinct ids): any correct sort gives the
  // same k ids in the same order.
  const auto before = [keys, ids](int32_t a, int32_t b) {
    return route::ranks_before(keys[a], int64_t(ids[a]), keys[b], int64_t(ids[b]));
  };
  for (int i = 0; i < n; ++i) scratch_order[i] = i;
  std::nth_element(scratch_order, scratch_order + (k - 1), scratch_order + n, before);
  std::sort(scratch_order, scratch_order + k, before);
  for (int j = 0; j < k; ++j) out_ids[j] = ids[scratch_order[j]];
}

// Top-k over candidate ranges (disjoint, added in increasing id order) into a best-first id
// list, in the order of route::ranks_before.
//
// The ranges are cut into segments of at most kLanes experts and each segment's best key is taken
// with a vector max. The k-th largest segment best, `floor`, is a lower bound of the k-th best key
// (the k best segments each hold a key >= floor), so only segments whose best reaches the floor
// are visited. In them every key above the floor survives (they lie in the fewer than k segments
// whose best is above it: at most kLanes * (k - 1) keys), and of the keys equal to the floor only
// the k with the lowest ids (they may be needed to fill the list, and ties go to the lowest id).
// Typically ~2k survivors, ranked by select_by_rank, instead of a branchy insertion attempt per
// expert; and never more than kLanes * k, however many keys tie (a zero-initialised router, rows
// of NaN or -inf), so a row costs O(E) plus the ranking of O(k) survivors.
template <typename T>
class TopKSelector {
 public:
  // Segments are shorter when there are few candidates per selected expert, so that there are
  // enough of them (about 4k) for the floor to be tight.
  TopKSelector(int64_t candidates, int k)
      : seg_len_(segment_length(candidates, k)),
        seg_begin_(candidates / seg_len_ + candidates + 1),
        seg_end_(seg_begin_.size()),
        seg_best_(seg_begin_.size()),
        floor_scratch_(seg_begin_.size()),
        surv_keys_(candidates + 1),
        surv_ids_(candidates + 1),
        tie_ids_(k + 1),
        order_(candidates + 1) {}

  static int64_t segment_length(int64_t candidates, int k) {
    int64_t len = kLanes;
    while (len > 4 && candidates < 4 * k * len) len /= 2;
    return len;
  }

  void clear() { segments_ = 0; }

  // Adds the candidates [begin, end); ranges must arrive in increasing id order (the tie cap of
  // select keeps the first keys equal to the floor it sees).
  MOE_ALWAYS_INLINE void add_range(const T* key, int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; b += seg_len_) {
      const int64_t e = std::min<int64_t>(b + seg_len_, end);
      T m = -route::pos_inf<T>();
#pragma omp simd reduction(max : m)
      for (int64_t i = b; i < e; ++i) m = key[i] > m ? key[i] : m;  // NaN never wins
      seg_begin_[segments_] = b;
      seg_end_[segments_] = e;
      seg_best_[segments_] = m;
      ++segments_;
    }
  }

  MOE_ALWAYS_INLINE void select(const T* key, int k, int32_t* out_ids, T* scratch_keys,
                                int32_t* scratch_ids) {
    const T floor = kth_segment_best(k, scratch_keys, scratch_ids);
    // Survivors, compacted without branches: keys above the floor, then (capped at k, lowest ids
    // first) keys equal to it.
    int above = 0, ties = 0;
    for (int64_t s = 0; s < segments_; ++s) {
      if (!(seg_best_[s] >= floor)) continue;  // -inf segments still pass a -inf floor
      // A segment whose best is the floor holds nothing above it: once k ties are kept it has
      // nothing to offer (a tied row then skips all but its first segments).
      if (seg_best_[s] == floor && ties == k) continue;
      for (int64_t e = seg_begin_[s]; e < seg_end_[s]; ++e) {
        const T v = route::rank_key(key[e]);
        surv_keys_[above] = v;
        surv_ids_[above] = int32_t(e);
        above += v > floor;
        tie_ids_[ties] = int32_t(e);
        ties += (v == floor) & (ties < k);
      }
    }
    // Keys equal to the floor rank after every key above it: the lowest-id ones fill the list.
    int n = above;
    for (int i = 0; i < ties && n < k; ++i, ++n) {
      surv_keys_[n] = floor;
      surv_ids_[n] = tie_ids_[i];
    }
    select_by_rank(surv_keys_.data(), surv_ids_.data(), n, k, out_ids, scratch_keys, order_.data());
  }

 private:
  // The k-th largest segment best (-inf when there are fewer than k segments): by insertion for
  // small k, by a selection (O(segments)) for large k, where insertion would cost segments * k.
  MOE_ALWAYS_INLINE T kth_segment_best(int k, T* scratch_keys, int32_t* scratch_ids) {
    if (segments_ < k) return -route::pos_inf<T>();
    if (k <= 16) {
      int m = 0;
      for (int64_t s = 0; s < segments_; ++s) {
        route::topk_push(scratch_keys, scratch_ids, k, m, seg_best_[s], int32_t(s));
      }
      return scratch_keys[k - 1];
    }
    std::copy(seg_best_.begin(), seg_best_.begin() + segments_, floor_scratch_.begin());
    std::nth_element(floor_scratch_.begin(), floor_scratch_.begin() + (k - 1),
                     floor_scratch_.begin() + segments_, std::greater<T>());
    return floor_scratch_[k - 1];
  }

  int64_t seg_len_;
  std::vector<int64_t> seg_begin_, seg_end_;
  std::vector<T> seg_best_, floor_scratch_;
  std::vector<T> surv_keys_;
  std::vector<int32_t> surv_ids_, tie_ids_, order_;
  int64_t segments_ = 0;
};

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
        group_order_(p.n_group),
        chosen_groups_(p.topk_group),
        top_keys_(std::max<int64_t>(p.k, p.topk_group)),
        scratch_keys_(p.k),
        scratch_ids_(p.k),
        x_sel_(p.k),
        selector_(p.topk_group * (p.num_experts / p.n_group), p.k) {}

  // Routes one row (unit column stride): writes k weights and k ids, best first.
  MOE_ALWAYS_INLINE void run(const scalar_t* row, T* w_out, int32_t* id_out) {
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
    const bool needs_sum = p_.scoring == route::kSoftmax && (!p_.renormalize || !key_is_logit_);
    const T inv_sum = needs_sum ? route::safe_inverse(row_sum_exp(x, E, row_max)) : T(0);

    const T* key = x;
    if (!key_is_logit_) {
      row_keys(x, E, p_.scoring, row_max, inv_sum, bias_, key_.data());
      key = key_.data();
    }

    selector_.clear();
    if (p_.n_group == 1) {
      selector_.add_range(key, 0, E);
    } else {
      const int64_t gs = E / p_.n_group;
      const int tg = static_cast<int>(p_.topk_group);
      for (int64_t g = 0; g < p_.n_group; ++g) {
        T first, second;
        group_top2(key + g * gs, gs, first, second);
        group_keys_[g] = route::group_score(first, second, gs);
        group_ids_[g] = int32_t(g);
      }
      select_by_rank(group_keys_.data(), group_ids_.data(), static_cast<int>(p_.n_group), tg,
                     chosen_groups_.data(), top_keys_.data(), group_order_.data());
      // The selector wants its ranges in increasing id order (the choice itself does not depend
      // on the order the groups are added in).
      std::sort(chosen_groups_.begin(), chosen_groups_.end());
      for (int i = 0; i < tg; ++i) {
        const int64_t g = chosen_groups_[i];
        selector_.add_range(key, g * gs, (g + 1) * gs);
      }
    }
    selector_.select(key, k, id_out, scratch_keys_.data(), scratch_ids_.data());
    for (int j = 0; j < k; ++j) x_sel_[j] = x[id_out[j]];
    route::selected_weights(x_sel_.data(), k, p_.scoring, p_.renormalize, T(p_.scale), row_max,
                            inv_sum, has_nan, w_out);
  }

 private:
  RouteParams p_;
  const T* bias_;
  bool key_is_logit_;
  std::vector<T> x_, key_, group_keys_;
  std::vector<int32_t> group_ids_, group_order_, chosen_groups_;
  std::vector<T> top_keys_, scratch_keys_;
  std::vector<int32_t> scratch_ids_;
  std::vector<T> x_sel_;
  TopKSelector<T> selector_;
};

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
// build give identical bits; tests/test_route.py checks it.

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
