// bf16 forward kernels for CPUs with AVX512-BF16 (vdpbf16ps): the direct kernel (tiles of 7-8
// rows), the panel kernels (pair panels and the 6 x 64 micro-kernel, also used by the bf16 weight
// gradient in wgrad.h) and the dot-product kernel for b^T.
#pragma once

#include "small_groups.h"

namespace moe_framework {
namespace {

// bf16 kernels for CPUs with AVX512-BF16: vdpbf16ps multiplies pairs of bf16 (adjacent k) and
// adds both products to an fp32 lane, so neither operand is converted to fp32 and twice the k
// values go through each instruction. A keeps its bf16 rows (k pairs are adjacent); B is read as
// pairs {B(2q, j), B(2q+1, j)} (32 bits, zero past k): interleaved in registers (direct kernel),
// packed into pair panels (panel kernels), or, for b^T, read as it is (a row of b is already a
// run of k pairs: dot-product kernel).
#if MOE_GG_X86
using bf16_t = uint16_t;

MOE_TARGET_AVX512_BF16 inline __m512bh as_bh(__m512i v) {
  return reinterpret_cast<__m512bh>(v);
}

MOE_TARGET_AVX512_BF16 inline __m512i bcast_pair(const bf16_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return _mm512_set1_epi32(v);
}

// 16 columns (lanes of km) of rows r0 and r1 (nullptr: zeros) of B as 16 bf16 pairs.
MOE_TARGET_AVX512_BF16 inline __m512bh pair_rows(const bf16_t* r0, const bf16_t* r1, __mmask16 km,
                                                 __m512i idx) {
  const __m512i x = _mm512_castsi256_si512(_mm256_maskz_loadu_epi16(km, r0));
  const __m512i y = r1 != nullptr ? _mm512_castsi256_si512(_mm256_maskz_loadu_epi16(km, r1))
                                  : _mm512_setzero_si512();
  return as_bh(_mm512_permutex2var_epi16(x, idx, y));
}

// Direct bf16 kernel for tiles of 7-8 rows (see direct_avx512, grouped_gemm_tiles_bf16): no panel;
// per k pair, the 48 columns of rows k and k+1 of B are loaded and interleaved into pairs in
// registers (three word permutes), then run through the 8x48 vdpbf16ps tile. Odd K pairs the
// last row with zeros. The pairs are summed in k order.
template <int MR>
MOE_TARGET_AVX512_BF16 void direct_bf16(int64_t k, const bf16_t* a, int64_t lda, const bf16_t* b,
                                        int64_t ldb, float* c, int64_t ldc, int64_t nr, bool pf) {
  __m512 acc[MR][3];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    acc[i][0] = _mm512_setzero_ps();
    acc[i][1] = acc[i][0];
    acc[i][2] = acc[i][0];
  }
  const __mmask16 k0 = strip_mask(nr), k1 = strip_mask(nr - 16), k2 = strip_mask(nr - 32);
  // Word j of the result: column j / 2 of the first source (even j) or of the second (odd j).
  const __m512i idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                       39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const int64_t kpf = pf ? std::max<int64_t>(0, k - kDirectPrefetch) : 0;
  const int64_t pfo = kDirectPrefetch * ldb;
  const bf16_t* bp = b;
  for (int64_t p = 0; p < k; p += 2, bp += 2 * ldb) {
    if (p < kpf) {
      const char* f = reinterpret_cast<const char*>(bp + pfo);
      _mm_prefetch(f, kStreamHint);
      _mm_prefetch(f + 94, kStreamHint);
      _mm_prefetch(f + 2 * ldb, kStreamHint);
      _mm_prefetch(f + 2 * ldb + 94, kStreamHint);
    }
    const bf16_t* r1 = p + 1 < k ? bp + ldb : nullptr;
    const __m512bh b0 = pair_rows(bp, r1, k0, idx);
    const __m512bh b1 = pair_rows(bp + 16, r1 != nullptr ? r1 + 16 : nullptr, k1, idx);
    const __m512bh b2 = pair_rows(bp + 32, r1 != nullptr ? r1 + 32 : nullptr, k2, idx);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512bh av = as_bh(bcast_pair(a + i * lda + p));
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], av, b0);
      acc[i][1] = _mm512_dpbf16_ps(acc[i][1], av, b1);
      acc[i][2] = _mm512_dpbf16_ps(acc[i][2], av, b2);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    float* cp = c + i * ldc;
    _mm512_mask_storeu_ps(cp, k0, acc[i][0]);
    _mm512_mask_storeu_ps(cp + 16, k1, acc[i][1]);
    _mm512_mask_storeu_ps(cp + 32, k2, acc[i][2]);
  }
}

void direct_bf16_rows(int64_t mr, int64_t k, const bf16_t* a, int64_t lda, const bf16_t* b,
                      int64_t ldb, float* c, int64_t ldc, int64_t nr, bool pf) {
  with_tile_rows<8>(
      mr, [&](auto r) { direct_bf16<decltype(r)::value>(k, a, lda, b, ldb, c, ldc, nr, pf); });
}

// C[m x n] = A[m x k] B[k x n] with the direct kernel (m <= kDirectRows, see direct_bf16).
void direct_gemm_bf16(int64_t m, int64_t n, int64_t k, const bf16_t* a, int64_t lda,
                      const bf16_t* b, int64_t sk, float* c, int64_t ldc) {
  const int64_t step = direct_pass_rows(m);
  for (int64_t j = 0; j < n; j += kNR512) {
    for (int64_t i = 0; i < m; i += step) {
      direct_bf16_rows(std::min(step, m - i), k, a + i * lda, lda, b + j, sk, c + i * ldc + j, ldc,
                       std::min(kNR512, n - j), i == 0);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// bf16 panel kernels (tiles of up to kMBLarge rows of one expert; see grouped_gemm_tiles_bf16).
// B of a tile is packed per (column block, k block) into a strip-major pair panel: strip s holds
// columns [64 s, 64 s + 64) of the block as kq rows of 64 words, word (q, j) = {B(2q, j),
// B(2q+1, j)}, zero past k and past the block. A strip is one contiguous run, so the micro-kernel
// reads 256 aligned bytes per k pair in sequence (the L1 prefetcher follows it; no set aliasing).
// The last strip of a block is 16 * ceil(w / 16) words wide (w: its columns). A panel of up to
// kPairsBf16 pairs x kPanelBytesBf16 stays in L2 while every row block of the tile's A runs over
// it (its A rows in L1); each 6 x 64 register tile sums a whole k block (1024 k) in registers,
// so C is loaded and stored once per 1024 k, and the last k block writes the bf16 output directly.
// Packing (a @ b[e]) is done by the first row block while it computes (micro_bf16<kPack>), not as
// a separate pass, and while a panel is computed the micro-kernels prefetch the source of the next
// panel (next k block, next column block, or the first panel of the thread's next tile) into L2,
// a few lines per k step: the weights stream from DRAM. The register tile is kPR x kPS: per k pair
// 4 panel loads, 6 broadcasts and 24 vdpbf16ps (an 8 x 48 tile needs 11 loads for 24).

// Source of B for a panel tile: B(p, j) = ptr[p * sk + j * sn] with sn == 1 (a @ b[e]) or
// sk == 1 (b[e]^T: a row of b is a run of k pairs).
struct PairB {
  const bf16_t* ptr;
  int64_t sk, sn;
};

// k pairs per k block and columns per column block of a tile of n columns and depth k. kq depends
// on k alone, so every output element sums its k blocks in the same order whatever the tiling.
struct PanelBlocks {
  int64_t kq, nc;
};
inline PanelBlocks panel_blocks(int64_t n, int64_t k) {
  const int64_t kq = std::min<int64_t>(kPairsBf16, ceil_div(k, 2));
  const int64_t nc_max = std::max<int64_t>(1, kPanelBytesBf16 / (kq * 4 * kPS)) * kPS;
  const int64_t blocks = ceil_div(n, nc_max);
  return {kq, std::min(nc_max, ceil_div(ceil_div(n, blocks), kPS) * kPS)};
}

inline int64_t strip_words(int64_t cols) {
  return std::min<int64_t>(kPS, ceil_div(cols, 16) * 16);
}

// Lines of the next panel's source, fetched into L2 a few at a time (see above).
struct PfStream {
  const char* row = nullptr;
  int64_t ld = 0, lines = 0;  // row stride (bytes), lines per row
  int64_t rows = 0, col = 0;  // rows left, next line of the current row
  int64_t budget = 0;         // lines this micro-kernel call may still fetch
};

// One panel: B(k0 + p, j0 + j) for p < kc, j < nc, src = &B(k0, j0).
struct PanelDesc {
  const bf16_t* src = nullptr;
  int64_t sk = 0, sn = 0, kc = 0, nc = 0;
};

inline PanelDesc panel_at(const PairB& b, int64_t j0, int64_t nc, int64_t k0, int64_t kc) {
  return {b.ptr + k0 * b.sk + j0 * b.sn, b.sk, b.sn, kc, nc};
}

inline PfStream panel_source(const PanelDesc& d) {
  PfStream s;
  if (d.src == nullptr) return s;
  const bool rows_k = d.sn == 1;  // source rows run along j (a @ b) or along k (b^T)
  s.row = reinterpret_cast<const char*>(d.src);
  s.ld = 2 * (rows_k ? d.sk : d.sn);
  // One more line than the row covers: rows need not start on a line.
  s.lines = ceil_div(2 * (rows_k ? d.nc : d.kc), 64) + 1;
  s.rows = rows_k ? d.kc : d.nc;
  return s;
}

MOE_ALWAYS_INLINE void pf_step(PfStream& s) {
  if (s.budget > 0 && s.rows > 0) {
    __builtin_prefetch(s.row + 64 * s.col, 0, 2);
    --s.budget;
    if (++s.col == s.lines) {
      s.col = 0;
      s.row += s.ld;
      --s.rows;
    }
  }
}

// Pack B(k0 + p, j0 + j) = b[j * sn + p] (b^T: k pairs adjacent) into the panel: 16 rows of b
// read as 16 runs of 16 pairs, transposed 16 x 16 (32-bit words) in registers.
MOE_TARGET_AVX512_BF16 void pack_pairs_cols(const bf16_t* b, int64_t sn, int64_t kc, int64_t nc,
                                            int64_t kq, uint32_t* panel) {
  for (int64_t j = 0; j < nc; j += 16) {
    const int64_t s = j / kPS, ws = strip_words(nc - s * kPS);
    uint32_t* base = panel + s * kq * kPS + j - s * kPS;
    const int64_t nj = std::min<int64_t>(16, nc - j);
    for (int64_t q = 0; q < kq; q += 16) {
      const int64_t left = kc - 2 * q;  // k values left: the odd last one pairs with a zero
      const __mmask32 km = left >= 32 ? ~__mmask32{0} : (__mmask32{1} << left) - 1;
      __m512 r[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) {
        r[i] = i < nj ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(km, b + (j + i) * sn + 2 * q))
                      : _mm512_setzero_ps();
      }
      transpose16(r);
      const int64_t nq = std::min<int64_t>(16, kq - q);
#pragma GCC unroll 16
      for (int w = 0; w < 16; ++w) {
        if (w < nq) _mm512_storeu_ps(reinterpret_cast<float*>(base + (q + w) * ws), r[w]);
      }
    }
  }
}

// Where a micro-kernel's C tile goes: fp32 (cin: partial sums of earlier k blocks to add, or
// nullptr) into cf, or rounded to bf16 into cb (the last k block).
struct TileOut {
  const float* cin;
  float* cf;
  at::BFloat16* cb;
  int64_t ldf, ldb;
  // Non-temporal bf16 stores of whole 64-column rows (cb 64-byte aligned, ldb a multiple of
  // 32): the weight gradient is written once and not read again by this op.
  bool nt = false;
};

// Row-major source of a strip that the micro-kernel packs while it runs (kPack): rows r, r + sk
// of B hold k pairs' halves; kc k values (odd: the last pair's second half is zero).
struct StripSource {
  const bf16_t* b;
  int64_t sk, kc;
};

// C[MR x 16 NV] (+)= A[MR x 2 kq] B-strip[2 kq x 16 NV], nr <= 16 NV columns stored. With kPack
// the strip is read from B's rows (pairs interleaved in registers, as in direct_bf16) and also
// written to the panel for the tile's other row blocks: the first row block packs the panel
// while it computes, so the packing hides behind its vdpbf16ps instead of running as a pass that
// waits for memory.
template <int MR, int NV, bool kPack>
MOE_TARGET_AVX512_BF16 void micro_bf16(int64_t kq, const bf16_t* a, int64_t lda, uint32_t* b,
                                       int64_t nr, const TileOut& o, PfStream& pf_io,
                                       const StripSource& src) {
  // A local copy: the compiler keeps it in registers (through the reference it reloads and
  // stores every field each iteration).
  PfStream pf = pf_io;
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
  }
  [[maybe_unused]] const __m512i idx =
      _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                       37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  [[maybe_unused]] __mmask16 km[NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) km[v] = strip_mask(nr - 16 * v);
  for (int64_t q = 0; q < kq; ++q, b += 16 * NV) {
    pf_step(pf);
    __m512bh bv[NV];
    if constexpr (kPack) {
      const bf16_t* r0 = src.b + 2 * q * src.sk;
      const bf16_t* r1 = 2 * q + 1 < src.kc ? r0 + src.sk : nullptr;
      if (2 * (q + kPackPrefetch) + 1 < src.kc) {
        const char* f = reinterpret_cast<const char*>(r0 + 2 * kPackPrefetch * src.sk);
        _mm_prefetch(f, kStreamHint);
        _mm_prefetch(f + 32 * NV - 2, kStreamHint);
        _mm_prefetch(f + 2 * src.sk, kStreamHint);
        _mm_prefetch(f + 2 * src.sk + 32 * NV - 2, kStreamHint);
      }
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        bv[v] = pair_rows(r0 + 16 * v, r1 != nullptr ? r1 + 16 * v : nullptr, km[v], idx);
        _mm512_storeu_si512(b + 16 * v, reinterpret_cast<__m512i>(bv[v]));
      }
    } else {
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) bv[v] = as_bh(_mm512_loadu_si512(b + 16 * v));
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512bh av = as_bh(bcast_pair(a + i * lda + 2 * q));
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], av, bv[v]);
    }
  }
  pf_io = pf;
  if constexpr (NV == 4) {
    if (o.nt) {
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        __m512 x[4];
#pragma GCC unroll 4
        for (int v = 0; v < 4; ++v) {
          x[v] = acc[i][v];
          if (o.cin != nullptr)
            x[v] = _mm512_add_ps(x[v], _mm512_loadu_ps(o.cin + i * o.ldf + 16 * v));
        }
        __m256i h[4];
#pragma GCC unroll 4
        for (int v = 0; v < 4; ++v) h[v] = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x[v]));
        __m512i* dst = reinterpret_cast<__m512i*>(o.cb + i * o.ldb);
        _mm512_stream_si512(dst, _mm512_inserti64x4(_mm512_castsi256_si512(h[0]), h[1], 1));
        _mm512_stream_si512(dst + 1, _mm512_inserti64x4(_mm512_castsi256_si512(h[2]), h[3], 1));
      }
      return;
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const __mmask16 kv = strip_mask(nr - 16 * v);
      __m512 x = acc[i][v];
      if (o.cin != nullptr) {
        x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(kv, o.cin + i * o.ldf + 16 * v));
      }
      if (o.cb != nullptr) {
        _mm256_mask_storeu_epi16(o.cb + i * o.ldb + 16 * v, kv,
                                 reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x)));
      } else {
        _mm512_mask_storeu_ps(o.cf + i * o.ldf + 16 * v, kv, x);
      }
    }
  }
}

template <bool kPack>
void micro_bf16_tile(int64_t mr, int64_t nr, int64_t kq, const bf16_t* a, int64_t lda, uint32_t* b,
                     const TileOut& o, PfStream& pf, const StripSource& src) {
  with_tile_rows<kPR>(mr, [&](auto r) {
    constexpr int kR = decltype(r)::value;
    if (nr > 48) {
      micro_bf16<kR, 4, kPack>(kq, a, lda, b, nr, o, pf, src);
    } else if (nr > 32) {
      micro_bf16<kR, 3, kPack>(kq, a, lda, b, nr, o, pf, src);
    } else if (nr > 16) {
      micro_bf16<kR, 2, kPack>(kq, a, lda, b, nr, o, pf, src);
    } else {
      micro_bf16<kR, 1, kPack>(kq, a, lda, b, nr, o, pf, src);
    }
  });
}

// Rows of the next row block when `left` rows remain: kPR, but a last block of fewer than
// kPR / 2 + 1 rows is balanced with the one before it (8 -> 4 + 4, not 6 + 2: a 2-row tile has
// too few accumulators to hide the vdpbf16ps latency).
inline int64_t row_block(int64_t left) {
  if (left <= kPR) return left;
  if (left < kPR + kPR / 2 + 1) return left / 2;
  return kPR;
}

// Panel buffer, 64-byte aligned (strip rows are whole cache lines).
struct PairPanel {
  std::vector<uint32_t> buf;
  uint32_t* get(int64_t words) {
    if (buf.size() < static_cast<size_t>(words + 16)) buf.resize(static_cast<size_t>(words + 16));
    const uintptr_t p = reinterpret_cast<uintptr_t>(buf.data());
    return buf.data() + ((64 - p % 64) % 64) / 4;
  }
};

// out[m x n] (bf16, row stride ldo) = A[m x k] B[k x n] with the panel kernels. A: bf16 rows
// (row stride lda, pairs at even k; element k is zero when k is odd). cbuf: fp32 partial sums
// (m x n) when k spans more than one k block. `next`: the first panel of the thread's next tile
// (src == nullptr: none), prefetched while this tile's last panel runs. Panels go in (column
// block, k block) order.
void panel_gemm_bf16(int64_t m, int64_t n, int64_t k, const bf16_t* a, int64_t lda, const PairB& b,
                     at::BFloat16* out, int64_t ldo, std::vector<float>& cbuf, PairPanel& pp,
                     const PanelDesc& next) {
  const PanelBlocks blk = panel_blocks(n, k);
  const int64_t kblocks = ceil_div(k, 2 * blk.kq);
  if (kblocks > 1) cbuf.resize(static_cast<size_t>(m * n));
  for (int64_t j0 = 0; j0 < n; j0 += blk.nc) {
    const int64_t nc = std::min(blk.nc, n - j0);
    for (int64_t kb = 0; kb < kblocks; ++kb) {
      const int64_t k0 = 2 * blk.kq * kb, kc = std::min(2 * blk.kq, k - k0);
      const int64_t kq = ceil_div(kc, 2);
      const PanelDesc cur = panel_at(b, j0, nc, k0, kc);
      // a @ b[e]: the first row block packs the panel (see micro_bf16); b^T: a packing pass.
      uint32_t* panel = pp.get(kq * blk.nc);
      if (b.sn != 1) pack_pairs_cols(cur.src, b.sn, kc, nc, kq, panel);
      // The next panel's source, prefetched over this panel's micro-kernel calls.
      PanelDesc nx = next;
      if (kb + 1 < kblocks) {
        const int64_t k1 = k0 + 2 * blk.kq;
        nx = panel_at(b, j0, nc, k1, std::min(2 * blk.kq, k - k1));
      } else if (j0 + nc < n) {
        nx = panel_at(b, j0 + nc, std::min(blk.nc, n - j0 - nc), 0, std::min(2 * blk.kq, k));
      }
      PfStream pf = panel_source(nx);
      const int64_t strips = ceil_div(nc, kPS);
      const int64_t calls = ceil_div(m, kPR) * strips;
      const int64_t share = ceil_div(pf.rows * pf.lines, calls);
      for (int64_t i = 0; i < m;) {
        const int64_t mr = row_block(m - i);
        for (int64_t s = 0; s < strips; ++s) {
          const int64_t jc = j0 + s * kPS, nr = std::min(kPS, n - jc);
          TileOut o{nullptr, nullptr, nullptr, n, ldo};
          if (kb > 0) o.cin = cbuf.data() + i * n + jc;
          if (kb + 1 < kblocks) {
            o.cf = cbuf.data() + i * n + jc;
          } else {
            o.cb = out + i * ldo + jc;
          }
          pf.budget = share;
          const StripSource src{cur.src + s * kPS, b.sk, kc};
          const bf16_t* ai = a + i * lda + k0;
          if (i == 0 && b.sn == 1) {
            micro_bf16_tile<true>(mr, nr, kq, ai, lda, panel + s * kq * kPS, o, pf, src);
          } else {
            micro_bf16_tile<false>(mr, nr, kq, ai, lda, panel + s * kq * kPS, o, pf, src);
          }
        }
        i += mr;
      }
    }
  }
}

// Dot-product kernel of b^T for bf16 (see dot_8x3): 32 k values (16 pairs) per instruction.
// A and b rows are bf16 with k even or zero-padded: lda, ldbj even, a row's element k is zero when
// k is odd (the b side is masked to k).
MOE_TARGET_AVX512_BF16 void dot_bf16_8x3(int64_t k, const bf16_t* a, int64_t lda, int64_t mi,
                                         const bf16_t* b, int64_t ldbj, int64_t nj, float* c,
                                         int64_t ldc, const bf16_t* pf) {
  const bf16_t* ar[8];
  const bf16_t* br[3];
  __m512 acc[8][3];
  dot_8x3_begin(a, lda, mi, b, ldbj, nj, ar, br, acc);
  for (int64_t p = 0; p < k; p += 32) {
    const __mmask32 km = k - p >= 32 ? ~__mmask32{0} : (__mmask32{1} << (k - p)) - 1;
    if (pf != nullptr) {
      __builtin_prefetch(pf + p, 0, 2);
      __builtin_prefetch(pf + ldbj + p, 0, 2);
      __builtin_prefetch(pf + 2 * ldbj + p, 0, 2);
    }
    const __m512bh b0 = as_bh(_mm512_maskz_loadu_epi16(km, br[0] + p));
    const __m512bh b1 = as_bh(_mm512_maskz_loadu_epi16(km, br[1] + p));
    const __m512bh b2 = as_bh(_mm512_maskz_loadu_epi16(km, br[2] + p));
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
      const __m512bh av = as_bh(_mm512_maskz_loadu_epi16(km, ar[i] + p));
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], av, b0);
      acc[i][1] = _mm512_dpbf16_ps(acc[i][1], av, b1);
      acc[i][2] = _mm512_dpbf16_ps(acc[i][2], av, b2);
    }
  }
  dot_8x3_end(acc, mi, nj, c, ldc);
}

void dot_gemm_bf16(int64_t m, int64_t n, int64_t k, const bf16_t* a, int64_t lda, const bf16_t* b,
                   int64_t ldbj, float* c, int64_t ldc) {
  for (int64_t j = 0; j < n; j += 3) {
    for (int64_t i = 0; i < m; i += 8) {
      const bf16_t* pf = (i == 0 && j + 3 < n) ? b + (j + 3) * ldbj : nullptr;
      dot_bf16_8x3(k, a + i * lda, lda, std::min<int64_t>(8, m - i), b + j * ldbj, ldbj,
                   std::min<int64_t>(3, n - j), c + i * ldc + j, ldc, pf);
    }
  }
}

// fp32 tile -> bf16 output, rounding to nearest even (as c10::BFloat16 does).
MOE_TARGET_AVX512_BF16 void store_tile_bf16(const float* src, int64_t lds, at::BFloat16* dst,
                                            int64_t ldd, int64_t m, int64_t n) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 km = strip_mask(n - j);
      const __m256bh v = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(km, src + i * lds + j));
      _mm256_mask_storeu_epi16(dst + i * ldd + j, km, reinterpret_cast<__m256i>(v));
    }
  }
}
#endif

}  // namespace
}  // namespace moe_framework
