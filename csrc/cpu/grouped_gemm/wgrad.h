// The weight gradient grouped_gemm_wgrad: db[e] = a_e^T @ g_e ([K, N]) or g_e^T @ a_e ([N, K])
// with trans_b, a reduction over the expert's rows. Experts that is_large leaves to us run
// wgrad_tiles (the fp32 packed-panel path, fp32 / bf16 / fp16); on AVX512-BF16 CPUs, bf16 experts
// of >= kWgradPanelRowsBf16 rows run the bf16 panel micro-kernels instead (wgrad_bf16_panels).
#pragma once

#include "bf16.h"
#include "packing.h"
#include "schedule.h"

namespace moe_framework {
namespace {

#if MOE_GG_X86
// bf16 weight gradient with the panel micro-kernels (AVX512-BF16 CPUs): db[e] = x_e^T y_e, a
// reduction over the expert's rows. Both operands need pairs of adjacent rows: the left factor
// x_e^T is packed once per expert (and thread) as transposed pairs, xp[i * ldq + q] =
// {x(2q, i), x(2q + 1, i)} (zero past the rows), and y_e is packed per 64-column strip by the
// first row block while it computes (micro_bf16<kPack>). A strip holds at most kPairsBf16 pairs
// (1024 rows) and stays in L1/L2 while every row block of db[e] runs over it; each 6 x 64
// register tile sums all of its pairs and writes bf16 once. More rows: k blocks of kPairsBf16
// pairs summed through an fp32 strip buffer, in k order. Each output element's sum order depends
// on the row count alone (not on threads or tiling).
MOE_TARGET_AVX512_BF16 void pack_xt_pairs(const bf16_t* x, int64_t ldx, int64_t rows, int64_t p,
                                          uint32_t* xp, int64_t ldq) {
  const int64_t kq = ceil_div(rows, 2);
  const __m512i idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                       39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  for (int64_t i0 = 0; i0 < p; i0 += 16) {
    const __mmask16 km = strip_mask(p - i0);
    const int64_t ni = std::min<int64_t>(16, p - i0);
    for (int64_t q0 = 0; q0 < ldq; q0 += 16) {
      __m512 r[16];
#pragma GCC unroll 16
      for (int t = 0; t < 16; ++t) {
        const int64_t q = q0 + t;
        if (q < kq) {
          const bf16_t* r0 = x + 2 * q * ldx + i0;
          const bf16_t* r1 = 2 * q + 1 < rows ? r0 + ldx : nullptr;
          r[t] = _mm512_castsi512_ps(reinterpret_cast<__m512i>(pair_rows(r0, r1, km, idx)));
        } else {
          r[t] = _mm512_setzero_ps();
        }
      }
      // Word moves only (the shuffles do not touch the bits).
      transpose16(r);
      for (int64_t c = 0; c < ni; ++c) {
        _mm512_storeu_si512(xp + (i0 + c) * ldq + q0, _mm512_castps_si512(r[c]));
      }
    }
  }
}

// db_e[p x n] (bf16, row stride ldo) = x_e^T y_e over `rows` rows; x_e: [rows, p] (row stride
// ldx), y_e: [rows, n] (row stride ldy), both bf16 with unit column stride. Columns [j0, j1)
// only (a thread's share of the strips); xp holds x_e^T packed by pack_xt_pairs (ldq words a row).
void wgrad_strips_bf16(int64_t rows, int64_t p, int64_t j0, int64_t j1, const uint32_t* xp,
                       int64_t ldq, const bf16_t* y, int64_t ldy, at::BFloat16* out, int64_t ldo,
                       std::vector<float>& cbuf, PairPanel& pp) {
  const int64_t kq_all = ceil_div(rows, 2);
  const int64_t kblocks = ceil_div(kq_all, kPairsBf16);
  if (kblocks > 1) cbuf.resize(static_cast<size_t>(p * kPS));
  // Whole 64-column rows of db go out with non-temporal stores: db is as large as all expert
  // weights and written once.
  const bool nt_ok = ldo % 32 == 0 && reinterpret_cast<uintptr_t>(out) % 64 == 0;
  PfStream pf;  // no prefetch stream (fetching the next row block's xp rows measured no gain)
  for (int64_t jc = j0; jc < j1; jc += kPS) {
    const int64_t nr = std::min(kPS, j1 - jc);
    for (int64_t kb = 0; kb < kblocks; ++kb) {
      const int64_t q0 = kb * kPairsBf16, kq = std::min(kPairsBf16, kq_all - q0);
      uint32_t* strip = pp.get(kq * kPS);
      const StripSource src{y + 2 * q0 * ldy + jc, ldy, std::min(2 * kq, rows - 2 * q0)};
      for (int64_t i = 0; i < p;) {
        const int64_t mr = row_block(p - i);
        TileOut o{nullptr, nullptr, nullptr, kPS, ldo};
        if (kb > 0) o.cin = cbuf.data() + i * kPS;
        if (kb + 1 < kblocks) {
          o.cf = cbuf.data() + i * kPS;
        } else {
          o.cb = out + i * ldo + jc;
          o.nt = nt_ok && nr == kPS;
        }
        // A(i, 2q + h) = x(2q + h, i): row i of xp, read as bf16 pairs.
        const bf16_t* ai = reinterpret_cast<const bf16_t*>(xp + i * ldq + q0);
        if (i == 0) {
          micro_bf16_tile<true>(mr, nr, kq, ai, 2 * ldq, strip, o, pf, src);
        } else {
          micro_bf16_tile<false>(mr, nr, kq, ai, 2 * ldq, strip, o, pf, src);
        }
        i += mr;
      }
    }
  }
}

#endif

// ---------------------------------------------------------------------------------------------
// grouped_gemm_wgrad: db[e] = a_e^T @ g_e ([K, N]) or g_e^T @ a_e ([N, K]) with trans_b. The
// reduction runs over the expert's rows in row order, inside one tile (never split across
// threads).

template <typename scalar_t>
void wgrad_tiles(const at::Tensor& a, const at::Tensor& g, const std::vector<int64_t>& off,
                 bool trans_b, at::Tensor& db) {
  const int64_t num_experts = db.size(0);
  // Output of expert e is [P, Q]: P = K, Q = N (or P = N, Q = K with trans_b); it reduces over
  // rows of x (the left factor, [rows, P]) and y (the right one, [rows, Q]).
  const int64_t p_dim = db.size(1), q_dim = db.size(2);
  std::vector<RowRange> blocks;
  // Output rows per tile: with the AVX-512 kernel, kMBLarge (each packed panel of y serves 512
  // rows of db[e], in <= 480-column blocks).
  const int64_t pb = gemm_isa() == Isa::kAvx512 ? kMBLarge : kMB;
  for (int64_t e = 0; e < num_experts; ++e) {
    const int64_t rows = off[e + 1] - off[e];
    if (rows == 0 || is_large(rows, a.scalar_type(), trans_b, true, a)) continue;
    for (int64_t p0 = 0; p0 < p_dim; p0 += pb) blocks.push_back({e, p0, std::min(p_dim, p0 + pb)});
  }
  const std::vector<WorkTile> tiles = col_tiles(blocks, q_dim);
  if (tiles.empty()) return;
  const at::Tensor a32 = as_float_rows(a);
  const at::Tensor g32 = as_float_rows(g);
  const at::Tensor& x = trans_b ? g32 : a32;
  const at::Tensor& y = trans_b ? a32 : g32;
  const float* xp = x.const_data_ptr<float>();
  const float* yp = y.const_data_ptr<float>();
  const int64_t ldx = x.stride(0), ldy = y.stride(0);
  scalar_t* dbp = db.mutable_data_ptr<scalar_t>();
  const uint64_t call = next_call_id();
  // Each expert's output block starts at db[e]; tiles address it through r0 (rows of db[e]).
  at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> panel;
    std::vector<float> cbuf;
    for (int64_t t = t0; t < t1; ++t) {
      const WorkTile& w = tiles[static_cast<size_t>(t)];
      const int64_t lo = off[w.expert], rows = off[w.expert + 1] - lo;
      const int64_t m = w.r1 - w.r0, n = w.n1 - w.n0;
      scalar_t* dst = dbp + w.expert * p_dim * q_dim + w.r0 * q_dim + w.n0;
      // A(i, p) = x[lo + p, r0 + i] (copied below); B(p, j) = y[lo + p, n0 + j].
      const BView<float> bv{yp + lo * ldy + w.n0, ldy, 1};
      // With AVX-512: x[lo:, r0:r1] copied with a padded row stride (as a in
      // grouped_gemm_tiles): the micro-kernel reads one line of it per k, and with the stride of
      // x (d_model, or h) those lines fall into a few L1 sets. Kept for the column blocks that
      // follow on the same rows.
      thread_local std::vector<float> xbuf;
      thread_local ACopyKey xkey{};
      const float* ax = xp + lo * ldx + w.r0;
      int64_t ldt = ldx;
      if (gemm_isa() == Isa::kAvx512) {
        ldt = panel_ld(m);
        const int64_t key0 = w.expert * p_dim + w.r0;
        if (xkey.call != call || xkey.r0 != key0 || xkey.r1 != key0 + m) {
          xbuf.resize(static_cast<size_t>(rows * ldt));
          for (int64_t p = 0; p < rows; ++p)
            std::memcpy(xbuf.data() + p * ldt, ax + p * ldx,
                        static_cast<size_t>(m) * sizeof(float));
          xkey = {call, key0, key0 + m};
        }
        ax = xbuf.data();
      }
      if constexpr (std::is_same_v<scalar_t, float>) {
        tile_gemm(m, n, rows, ax, 1, ldt, bv, dst, q_dim, panel);
      } else {
        cbuf.resize(static_cast<size_t>(m * n));
        tile_gemm(m, n, rows, ax, 1, ldt, bv, cbuf.data(), n, panel);
        store_tile(cbuf.data(), n, dst, q_dim, m, n);
      }
    }
  });
}

#if MOE_GG_X86
// bf16 weight gradients of experts with at least kWgradPanelRowsBf16 rows on AVX512-BF16 CPUs:
// the panel micro-kernels (see wgrad_strips_bf16) instead of one oneDNN call per expert. Work
// items are (expert, 64-column strip of db[e]), split evenly over the threads; a thread packs
// x_e^T once per expert it touches.
bool wgrad_panels_bf16(int64_t rows, at::ScalarType dtype) {
  return dtype == at::kBFloat16 && use_avx512_bf16() && rows >= kWgradPanelRowsBf16;
}

void wgrad_bf16_panels(const at::Tensor& a, const at::Tensor& g, const std::vector<int64_t>& off,
                       bool trans_b, at::Tensor& db) {
  const int64_t num_experts = db.size(0), p_dim = db.size(1), q_dim = db.size(2);
  const int64_t strips = ceil_div(q_dim, kPS);
  std::vector<int64_t> items;  // expert * strips + strip
  for (int64_t e = 0; e < num_experts; ++e) {
    if (!wgrad_panels_bf16(off[e + 1] - off[e], a.scalar_type())) continue;
    for (int64_t s = 0; s < strips; ++s) items.push_back(e * strips + s);
  }
  if (items.empty()) return;
  const at::Tensor ac = a.stride(1) == 1 ? a : a.contiguous();
  const at::Tensor gc = g.stride(1) == 1 ? g : g.contiguous();
  const at::Tensor& x = trans_b ? gc : ac;
  const at::Tensor& y = trans_b ? ac : gc;
  const auto* xp = reinterpret_cast<const bf16_t*>(x.const_data_ptr<at::BFloat16>());
  const auto* yp = reinterpret_cast<const bf16_t*>(y.const_data_ptr<at::BFloat16>());
  const int64_t ldx = x.stride(0), ldy = y.stride(0);
  at::BFloat16* dbp = db.mutable_data_ptr<at::BFloat16>();
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t t0, int64_t t1) {
    std::vector<uint32_t> xt;
    std::vector<float> cbuf;
    PairPanel pp;
    for (int64_t t = t0; t < t1;) {
      const int64_t e = items[static_cast<size_t>(t)] / strips;
      // This thread's run of strips of expert e.
      int64_t t_end = t;
      while (t_end < t1 && items[static_cast<size_t>(t_end)] / strips == e) ++t_end;
      const int64_t s0 = items[static_cast<size_t>(t)] % strips;
      const int64_t s1 = items[static_cast<size_t>(t_end - 1)] % strips + 1;
      const int64_t lo = off[e], rows = off[e + 1] - lo;
      const int64_t ldq = ceil_div(ceil_div(rows, 2), 16) * 16;
      xt.resize(static_cast<size_t>(p_dim * ldq));
      pack_xt_pairs(xp + lo * ldx, ldx, rows, p_dim, xt.data(), ldq);
      wgrad_strips_bf16(rows, p_dim, s0 * kPS, std::min(q_dim, s1 * kPS), xt.data(), ldq,
                        yp + lo * ldy, ldy, dbp + e * p_dim * q_dim, q_dim, cbuf, pp);
      t = t_end;
    }
    _mm_sfence();  // order the non-temporal stores before the result is used
  });
}
#endif

}  // namespace
}  // namespace moe_framework
