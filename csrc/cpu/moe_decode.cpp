// CPU kernel of moe_decode: a whole gated MoE experts step for a few tokens (decode) in one op,
// reading each selected expert's weights once. The gate is SwiGLU (silu(g) * u) or GPT-OSS's
// clamped SwiGLU ((clamp(u, -l, l) + 1) * g' * sigmoid(alpha g'), g' = min(g, l)), the gate/up
// halves of w_in's output either concatenated (gate first) or interleaved (gate at even columns),
// with optional per-expert biases b_in [E, 2h] (added before the gate) and b_out [E, d].
//
// The general path (permute -> grouped_gemm -> swiglu -> grouped_gemm -> unpermute) is built for
// many rows per expert: at T = 1 its cost is fixed per-call work (five ops, their allocations and
// checks, two thread-pool wake-ups per GEMM, the GEMM's packing of b panels it then uses for one
// row). Here the slots are grouped by expert on the host (at most a few dozen), and two parallel
// passes run over (expert, column block) tasks:
//   1. a[p, c] = silu(w_in[e] gate row c . x[t_p]) * (w_in[e] up row c . x[t_p]) for the m_e slots
//      p of expert e, each weight row loaded once and dotted with the m_e token rows (in L1);
//   2. y_p[i] = w_out[e] row i . a[p] (trans_b) or sum_c a[p, c] w_out[e][c, i] (in_out),
// then y[t] = sum_j weights[t, j] * y_{slot t*k+j} in j order (no atomics: the same bits for any
// thread count). Every product accumulates in fp32 (fp64 for fp64); the hidden activation stays
// in fp32 between the two projections (the general path rounds it to the input dtype).
// The loops are compiled three times: baseline x86-64, AVX2+FMA and AVX-512 (16-lane dot
// products; bf16 / fp16 weights only), picked at run time (MOE_FRAMEWORK_CPU_NO_AVX512 /
// _BASELINE apply).
// clamped_swiglu.h brings swiglu.h's 64-byte lane helpers, always-inline: no call ABI involved.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "moe_framework/clamped_swiglu.h"
#include "moe_framework/common.h"
#include "moe_framework/cpu_convert.h"
#include "moe_framework/cpu_isa.h"

namespace moe_framework {
namespace {

using cpu::load_acc;
using cpu::store_acc;

constexpr int64_t kBlock = 32;  // output columns per task ([out, in] weights: one row per column)
// Output columns per task with [in, out] weights: each task walks every input row and reads a
// contiguous segment of it, so a task takes whole rows where it can (then it streams its expert's
// matrix front to back). Measured at GPT-OSS's shape (d = h = 512, T = 1, k = 4, fp32, Zen 4):
// 32 columns per task 6-9 ms (a DRAM miss per 4 KB-strided row), 256 columns 1.5-1.8 ms, 1024
// (whole rows) 0.64 ms, against 0.47-0.56 ms with [out, in] weights.
constexpr int64_t kBlockIO = 1024;
constexpr int64_t kSlotsIO = 4;  // slots per accumulation chunk of a [in, out] task

template <typename scalar_t>
struct Problem {
  using acc = at::opmath_type<scalar_t>;
  const acc* x;         // [T, d] converted
  const scalar_t* win;  // expert e, row r (of its [2h, d] or [d, 2h] matrix): win + e*se + r*sr
  int64_t win_se, win_sr;
  const scalar_t* wout;
  int64_t wout_se, wout_sr;
  bool trans_b;
  int64_t d, h;
  const int64_t* sorted_token;  // token of sorted slot p
  const int64_t* group_expert;  // expert of group g
  const int64_t* group_begin;   // sorted slots group_begin[g]:group_begin[g+1]
  const scalar_t* bin;          // [E, 2h] bias of w_in's output (nullptr: none): bin + e*bin_se + j
  int64_t bin_se;
  const scalar_t* bout;  // [E, d] bias of the output (nullptr: none)
  int64_t bout_se;
  bool clamped, interleaved;
  acc alpha, limit;
  acc* a;  // [n, h]
  acc* y;  // [n, d]
};

// dot(w[0:n], v[0:n]) with kLanes independent partial sums (vectorised by the compiler): 8 on
// the baseline / AVX2 builds, 16 (one zmm) on AVX-512. The 8-lane order is the same as before
// the AVX-512 build existed; 16 lanes fold lane l + 8 into lane l first, then the same tree.
template <int kLanes, typename scalar_t, typename acc>
MOE_ALWAYS_INLINE acc dot(const scalar_t* __restrict__ w, const acc* __restrict__ v, int64_t n) {
  static_assert(kLanes == 8 || kLanes == 16, "dot: 8 or 16 lanes");
  acc s[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) s[l] += load_acc(w[i + l]) * v[i + l];
  }
  if constexpr (kLanes == 16) {
    for (int l = 0; l < 8; ++l) s[l] += s[l + 8];
  }
  acc r = ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
  for (; i < n; ++i) r += load_acc(w[i]) * v[i];
  return r;
}

template <typename acc>
MOE_ALWAYS_INLINE acc silu(acc g) {
  return g / (acc(1) + std::exp(-g));
}

// The gate of hidden column c from its gate and up pre-activations (biases added here). kPlain:
// SwiGLU, concatenated halves, no bias (known at compile time: the common case has no branch).
template <bool kPlain, typename scalar_t, typename acc>
MOE_ALWAYS_INLINE acc gate_of(const Problem<scalar_t>& P, int64_t e, int64_t c, acc g, acc u) {
  if constexpr (kPlain) return silu(g) * u;
  if (P.bin != nullptr) {
    const scalar_t* b = P.bin + e * P.bin_se;
    g += load_acc(b[P.interleaved ? 2 * c : c]);
    u += load_acc(b[P.interleaved ? 2 * c + 1 : P.h + c]);
  }
  if (!P.clamped) return silu(g) * u;
  return clamped_swiglu::forward(g, u, P.alpha, P.limit);  // the clamped_swiglu op's math
}

// Pass 1, one task: expert group g, hidden columns [c0, c1).
template <int kLanes, bool kPlain, typename scalar_t>
MOE_ALWAYS_INLINE void up_task(const Problem<scalar_t>& P, int64_t g, int64_t c0, int64_t c1) {
  using acc = at::opmath_type<scalar_t>;
  const int64_t e = P.group_expert[g], p0 = P.group_begin[g], p1 = P.group_begin[g + 1];
  const scalar_t* W = P.win + e * P.win_se;
  const int64_t d = P.d, h = P.h;
  // Gate column c * gs, up column c * gs + uo.
  const int64_t gs = !kPlain && P.interleaved ? 2 : 1, uo = !kPlain && P.interleaved ? 1 : h;
  if (P.trans_b) {  // W [2h, d]: gate row c, up row h + c (interleaved: 2c and 2c + 1)
    for (int64_t c = c0; c < c1; ++c) {
      const scalar_t* wg = W + c * gs * P.win_sr;
      const scalar_t* wu = W + (c * gs + uo) * P.win_sr;
      for (int64_t p = p0; p < p1; ++p) {
        const acc* xv = P.x + P.sorted_token[p] * d;
        P.a[p * h + c] = gate_of<kPlain>(P, e, c, dot<kLanes>(wg, xv, d), dot<kLanes>(wu, xv, d));
      }
    }
    return;
  }
  // W [d, 2h]: out[c] = sum_i x[i] W[i, c]; accumulate the block's 2 nc columns of w_in's output
  // (gate segment then up segment, or the interleaved pairs in place) for up to kSlotsIO slots.
  const int64_t nc = c1 - c0, m = p1 - p0;
  acc hbuf[kSlotsIO * 2 * kBlockIO];
  for (int64_t q0 = 0; q0 < m; q0 += kSlotsIO) {
    const int64_t mq = std::min<int64_t>(kSlotsIO, m - q0);
    std::fill(hbuf, hbuf + mq * 2 * nc, acc(0));
    for (int64_t i = 0; i < d; ++i) {
      const scalar_t* __restrict__ wr = W + i * P.win_sr;
      const scalar_t* __restrict__ seg0 = gs == 1 ? wr + c0 : wr + 2 * c0;
      for (int64_t q = 0; q < mq; ++q) {
        const acc xi = P.x[P.sorted_token[p0 + q0 + q] * d + i];
        acc* __restrict__ hq = hbuf + q * 2 * nc;
        if (gs == 1) {
          const scalar_t* __restrict__ seg1 = wr + h + c0;
          for (int64_t c = 0; c < nc; ++c) hq[c] += xi * load_acc(seg0[c]);
          for (int64_t c = 0; c < nc; ++c) hq[nc + c] += xi * load_acc(seg1[c]);
        } else {
          for (int64_t c = 0; c < 2 * nc; ++c) hq[c] += xi * load_acc(seg0[c]);
        }
      }
    }
    for (int64_t q = 0; q < mq; ++q) {
      const acc* hq = hbuf + q * 2 * nc;
      for (int64_t c = 0; c < nc; ++c) {
        const acc g = gs == 1 ? hq[c] : hq[2 * c], u = gs == 1 ? hq[nc + c] : hq[2 * c + 1];
        P.a[(p0 + q0 + q) * h + c0 + c] = gate_of<kPlain>(P, e, c0 + c, g, u);
      }
    }
  }
}

// Pass 2, one task: expert group g, output columns [i0, i1).
template <int kLanes, typename scalar_t>
MOE_ALWAYS_INLINE void down_task(const Problem<scalar_t>& P, int64_t g, int64_t i0, int64_t i1) {
  using acc = at::opmath_type<scalar_t>;
  const int64_t e = P.group_expert[g], p0 = P.group_begin[g], p1 = P.group_begin[g + 1];
  const scalar_t* W = P.wout + e * P.wout_se;
  const int64_t d = P.d, h = P.h;
  const scalar_t* bo = P.bout != nullptr ? P.bout + e * P.bout_se : nullptr;
  if (P.trans_b) {  // W [d, h]
    for (int64_t i = i0; i < i1; ++i) {
      const scalar_t* wr = W + i * P.wout_sr;
      const acc b = bo != nullptr ? load_acc(bo[i]) : acc(0);
      for (int64_t p = p0; p < p1; ++p) P.y[p * d + i] = dot<kLanes>(wr, P.a + p * h, h) + b;
    }
    return;
  }
  // W [h, d]: y[i] = sum_c a[c] W[c, i] (+ b[i], added last).
  const int64_t ni = i1 - i0;
  for (int64_t p = p0; p < p1; ++p) std::fill(P.y + p * d + i0, P.y + p * d + i1, acc(0));
  for (int64_t c = 0; c < h; ++c) {
    const scalar_t* __restrict__ wr = W + c * P.wout_sr + i0;
    for (int64_t p = p0; p < p1; ++p) {
      const acc ac = P.a[p * h + c];
      acc* __restrict__ yp = P.y + p * d + i0;
      for (int64_t i = 0; i < ni; ++i) yp[i] += ac * load_acc(wr[i]);
    }
  }
  if (bo != nullptr) {
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t i = i0; i < i1; ++i) P.y[p * d + i] += load_acc(bo[i]);
    }
  }
}

template <typename scalar_t>
MOE_ALWAYS_INLINE int64_t block_width(const Problem<scalar_t>& P) {
  return P.trans_b ? kBlock : kBlockIO;
}

template <bool kDown, int kLanes, typename scalar_t>
MOE_ALWAYS_INLINE void run_tasks(const Problem<scalar_t>& P, int64_t blocks, int64_t width,
                                 int64_t t0, int64_t t1) {
  const int64_t bw = block_width(P);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t g = t / blocks, b = t % blocks;
    const int64_t c0 = b * bw, c1 = std::min(width, c0 + bw);
    if constexpr (kDown) {
      down_task<kLanes>(P, g, c0, c1);
    } else if (!P.clamped && !P.interleaved && P.bin == nullptr) {
      up_task<kLanes, true>(P, g, c0, c1);
    } else {
      up_task<kLanes, false>(P, g, c0, c1);
    }
  }
}

#if MOE_CPU_AVX2_CLONE
template <bool kDown, typename scalar_t>
MOE_TARGET_AVX512 void tasks_avx512(const Problem<scalar_t>& P, int64_t blocks, int64_t width,
                                    int64_t t0, int64_t t1) {
  run_tasks<kDown, 16>(P, blocks, width, t0, t1);
}
template <bool kDown, typename scalar_t>
MOE_TARGET_AVX2_FMA void tasks_avx2(const Problem<scalar_t>& P, int64_t blocks, int64_t width,
                                    int64_t t0, int64_t t1) {
  run_tasks<kDown, 8>(P, blocks, width, t0, t1);
}
#endif
template <bool kDown, typename scalar_t>
void tasks_base(const Problem<scalar_t>& P, int64_t blocks, int64_t width, int64_t t0, int64_t t1) {
  run_tasks<kDown, 8>(P, blocks, width, t0, t1);
}

template <bool kDown, typename scalar_t>
void run_pass(const Problem<scalar_t>& P, int64_t groups, int64_t width) {
  static const bool avx2 = use_avx2() && __builtin_cpu_supports("fma");
  // The AVX-512 build for bf16 / fp16 weights only: there it widens and multiplies 16 weights per
  // step (1.5x the AVX2 build's speed, Zen 4); with fp32 weights, a stream from memory at these
  // sizes, it measured 10-25% slower than the AVX2 build (docs/performance.md), so fp32 / fp64 stay
  // on AVX2.
  static const bool avx512 = avx2 && use_avx512() && sizeof(scalar_t) == 2;
  const int64_t blocks = (width + block_width(P) - 1) / block_width(P);
  at::parallel_for(0, groups * blocks, 1, [&](int64_t t0, int64_t t1) {
#if MOE_CPU_AVX2_CLONE
    if (avx512) return tasks_avx512<kDown>(P, blocks, width, t0, t1);
    if (avx2) return tasks_avx2<kDown>(P, blocks, width, t0, t1);
#endif
    tasks_base<kDown>(P, blocks, width, t0, t1);
  });
}

void check_inputs(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights,
                  const at::Tensor& w_in, const at::Tensor& w_out, bool trans_b,
                  const std::optional<at::Tensor>& b_in, const std::optional<at::Tensor>& b_out,
                  c10::string_view gate) {
  const char* op = "moe_decode";
  check_same_device(
      op, {{"x", x}, {"ids", ids}, {"weights", weights}, {"w_in", w_in}, {"w_out", w_out}});
  TORCH_CHECK(x.dim() == 2, op, ": x must be [T, d], got shape ", x.sizes());
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf, op,
              ": x must have dtype in {Float, Double, BFloat16, Half}, got ", st);
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == x.size(0), op, ": ids must be [T, k] = [", x.size(0),
              ", k], got shape ", ids.sizes());
  TORCH_CHECK(ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong, op,
              ": ids must be int32 or int64, got ", ids.scalar_type());
  TORCH_CHECK(weights.sizes() == ids.sizes(), op, ": weights must be [T, k] = ", ids.sizes(),
              ", got ", weights.sizes());
  TORCH_CHECK(weights.scalar_type() == at::kFloat || weights.scalar_type() == st, op,
              ": weights must be float32 or x's dtype ", st, ", got ", weights.scalar_type());
  TORCH_CHECK(w_in.dim() == 3 && w_out.dim() == 3, op,
              ": w_in and w_out must be 3-D [E, ., .], got shapes ", w_in.sizes(), " and ",
              w_out.sizes());
  TORCH_CHECK(w_in.scalar_type() == st && w_out.scalar_type() == st, op,
              ": w_in and w_out must have x's dtype ", st, ", got ", w_in.scalar_type(), " and ",
              w_out.scalar_type());
  const int64_t E = w_in.size(0), d = x.size(1);
  const int64_t two_h = trans_b ? w_in.size(1) : w_in.size(2);
  const int64_t d_in = trans_b ? w_in.size(2) : w_in.size(1);
  TORCH_CHECK(d_in == d && two_h % 2 == 0, op, ": w_in must be ",
              trans_b ? "[E, 2h, d]" : "[E, d, 2h]", " with d = ", d, ", got ", w_in.sizes());
  const int64_t h = two_h / 2;
  const bool out_ok = w_out.size(0) == E && (trans_b ? (w_out.size(1) == d && w_out.size(2) == h)
                                                     : (w_out.size(1) == h && w_out.size(2) == d));
  TORCH_CHECK(out_ok, op, ": w_out must be ", trans_b ? "[E, d, h] = [" : "[E, h, d] = [", E, ", ",
              trans_b ? d : h, ", ", trans_b ? h : d, "], got ", w_out.sizes());
  check_decode_extras(op, x, E, d, h, b_in, b_out, gate);
}

at::Tensor moe_decode_cpu(const at::Tensor& x_in, const at::Tensor& ids_in,
                          const at::Tensor& weights_in, const at::Tensor& w_in_in,
                          const at::Tensor& w_out_in, bool trans_b,
                          const std::optional<at::Tensor>& b_in_in,
                          const std::optional<at::Tensor>& b_out_in, c10::string_view gate,
                          double alpha, double limit, bool interleaved) {
  check_inputs(x_in, ids_in, weights_in, w_in_in, w_out_in, trans_b, b_in_in, b_out_in, gate);
  const int64_t T = x_in.size(0), d = x_in.size(1), k = ids_in.size(1), E = w_in_in.size(0);
  const int64_t h = (trans_b ? w_in_in.size(1) : w_in_in.size(2)) / 2;
  at::Tensor out = at::empty({T, d}, x_in.options());
  if (out.numel() == 0) return out;
  // Unit inner stride for the weight rows (a view as HF stores them; a copy otherwise).
  const at::Tensor w_in = w_in_in.stride(2) == 1 ? w_in_in : w_in_in.contiguous();
  const at::Tensor w_out = w_out_in.stride(2) == 1 ? w_out_in : w_out_in.contiguous();
  const at::Tensor b_in = b_in_in.has_value() ? b_in_in->contiguous() : at::Tensor();
  const at::Tensor b_out = b_out_in.has_value() ? b_out_in->contiguous() : at::Tensor();
  const at::Tensor ids = ids_in.to(at::kLong).contiguous();
  const at::Tensor weights =
      weights_in.to(x_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).contiguous();
  const int64_t n = T * k;
  const int64_t* id = ids.const_data_ptr<int64_t>();
  // Slots grouped by expert, stable (slot order inside an expert); dropped slots (-1) skipped.
  std::vector<int64_t> order;
  order.reserve(n);
  for (int64_t s = 0; s < n; ++s) {
    TORCH_CHECK(id[s] >= -1 && id[s] < E, "moe_decode: ids must be in [0, ", E,
                ") or -1 (dropped), got ", id[s], " at slot ", s);
    if (id[s] >= 0) order.push_back(s);
  }
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return id[a] < id[b]; });
  const int64_t nv = static_cast<int64_t>(order.size());
  std::vector<int64_t> pos(n, -1), token(nv), gexp, gbeg;
  for (int64_t p = 0; p < nv; ++p) {
    pos[order[p]] = p;
    token[p] = order[p] / k;
    if (p == 0 || id[order[p]] != id[order[p - 1]]) {
      gexp.push_back(id[order[p]]);
      gbeg.push_back(p);
    }
  }
  gbeg.push_back(nv);
  const int64_t groups = static_cast<int64_t>(gexp.size());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x_in.scalar_type(), "moe_decode", [&] {
    using acc = at::opmath_type<scalar_t>;
    const at::Tensor xc = x_in.contiguous();
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const acc* wt = weights.const_data_ptr<acc>();
    std::vector<acc> xs(T * d), a(std::max<int64_t>(1, nv * h)), ys(std::max<int64_t>(1, nv * d));
    for (int64_t i = 0; i < T * d; ++i) xs[i] = load_acc(xp[i]);
    const Problem<scalar_t> P{xs.data(),
                              w_in.const_data_ptr<scalar_t>(),
                              w_in.stride(0),
                              w_in.stride(1),
                              w_out.const_data_ptr<scalar_t>(),
                              w_out.stride(0),
                              w_out.stride(1),
                              trans_b,
                              d,
                              h,
                              token.data(),
                              gexp.data(),
                              gbeg.data(),
                              b_in.defined() ? b_in.const_data_ptr<scalar_t>() : nullptr,
                              2 * h,
                              b_out.defined() ? b_out.const_data_ptr<scalar_t>() : nullptr,
                              d,
                              gate == "clamped",
                              interleaved,
                              static_cast<acc>(alpha),
                              static_cast<acc>(limit),
                              a.data(),
                              ys.data()};
    if (groups > 0) {  // with h = 0 the down pass writes y = b_out (or 0)
      if (h > 0) run_pass<false>(P, groups, h);
      run_pass<true>(P, groups, d);
    }
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    for (int64_t t = 0; t < T; ++t) {
      std::vector<acc> row(d, acc(0));
      for (int64_t j = 0; j < k; ++j) {
        const int64_t p = pos[t * k + j];
        if (p < 0) continue;
        const acc w = wt[t * k + j];
        const acc* yp = ys.data() + p * d;
        for (int64_t i = 0; i < d; ++i) row[i] += w * yp[i];
      }
      for (int64_t i = 0; i < d; ++i) op[t * d + i] = store_acc<scalar_t>(row[i]);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_framework, CPU, m) {
  m.impl("moe_decode", &moe_decode_cpu);
}

}  // namespace moe_framework
