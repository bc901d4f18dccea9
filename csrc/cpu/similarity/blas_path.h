// The BLAS path: scores_gemm (one at::mm_out per query block x bank block) and the exact
// rescoring of its candidates (dot_fixed, rescore_margin, candidate_score), so that equal bank
// rows get equal scores and ties go to the lowest id.
#pragma once

#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>

#include "normalize.h"

namespace moe_framework {
namespace {

// S [nq, nb] (row-major, ld nb) = Q [nq, d] (ld d) x B [nb, d]^T (ld ldb), one BLAS call on
// views of the caller's buffers (no copies).
template <typename acc_t>
void scores_gemm(const acc_t* qn, int64_t nq, const acc_t* b, int64_t nb, int64_t ldb, int64_t d,
                 acc_t* s) {
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const at::Tensor qt = at::from_blob(const_cast<acc_t*>(qn), {nq, d}, {d, 1}, opts);
  const at::Tensor bt = at::from_blob(const_cast<acc_t*>(b), {d, nb}, {1, ldb}, opts);
  at::Tensor st = at::from_blob(s, {nq, nb}, {nb, 1}, opts);
  at::mm_out(st, qt, bt);
}

// ---------------------------------------------------------------------------------------------
// Exact ties on the BLAS path. A BLAS GEMM rounds an entry differently depending on where it falls
// in its tiles and on the shape of the call (the last, partial bank block), so two copies of one
// bank row (an `expand`ed bank, duplicated embeddings) could get scores an ulp apart, and a higher
// id could beat a lower one. The BLAS scores therefore only select candidates, with a margin that
// covers their rounding; every candidate's score is recomputed by candidate_score, a fixed-order
// function of the query row and the bank row alone, so equal rows get equal scores and ties go to
// the lowest id wherever the rows sit. (The fused pass and the AVX-512 tiles compute every score
// with one fixed chain already.)

// sum_j q[j] * x[j] over 16 independent partial sums added in a fixed tree (sum_of_squares' order).
// Compiled for baseline x86-64 and AVX2 without FMA: the same operations per lane, so the same
// bits whichever runs.
template <typename T>
MOE_ALWAYS_INLINE T dot_fixed_impl(const T* q, const T* x, int64_t d) {
  constexpr int kLanes = 16;
  T part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) part[l] += q[i + l] * x[i + l];
  }
  for (; i < d; ++i) part[0] += q[i] * x[i];
  for (int w = kLanes / 2; w > 0; w /= 2) {
    for (int l = 0; l < w; ++l) part[l] += part[l + w];
  }
  return part[0];
}

template <typename T>
T dot_fixed_baseline(const T* q, const T* x, int64_t d) {
  return dot_fixed_impl(q, x, d);
}

#if MOE_CPU_AVX2_CLONE
template <typename T>
MOE_TARGET_AVX2 T dot_fixed_avx2(const T* q, const T* x, int64_t d) {
  return dot_fixed_impl(q, x, d);
}
#endif

template <typename T>
T dot_fixed(const T* q, const T* x, int64_t d) {
#if MOE_CPU_AVX2_CLONE
  if (use_avx2()) return dot_fixed_avx2(q, x, d);
#endif
  return dot_fixed_baseline(q, x, d);
}

// Bound on |BLAS score - candidate_score|: both are dot products of (nearly) unit rows, each within
// gamma_d = d u / (1 - d u) of the exact value in any summation order, plus the rounding of the
// row's scale; twice that with room to spare.
template <typename T>
T rescore_margin(int64_t d) {
  return static_cast<T>(2 * d + 8) * std::numeric_limits<T>::epsilon();
}

// The score of bank row `row` for the normalised query qrow, from the two rows only: rows already
// normalised (dedup) directly; rows whose squared norm is a normal number as the raw dot product
// times their scale, static_cast<acc_t>(inv_norm(sum_of_squares)) (`scale` when the caller has it
// already, else 0); others through a normalised copy in tmp [d] (normalize_rows). The caller has
// checked that the row has a direction.
template <typename scalar_t, typename acc_t>
acc_t candidate_score(const acc_t* qrow, const scalar_t* bank, int64_t bank_stride,
                      bool bank_normalized, int64_t row, int64_t d, acc_t scale, acc_t* tmp) {
  if (bank_normalized) {
    return dot_fixed(qrow, reinterpret_cast<const acc_t*>(bank) + row * bank_stride, d);
  }
  const scalar_t* x = bank + row * bank_stride;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (scale > acc_t(0)) return dot_fixed(qrow, x, d) * scale;
    const acc_t ss = sum_of_squares<acc_t>(x, d);
    if (norm_ok(ss) && ss >= std::numeric_limits<acc_t>::min()) {
      return dot_fixed(qrow, x, d) * static_cast<acc_t>(inv_norm(ss));
    }
  }
  normalize_rows(bank, bank_stride, row, row + 1, d, tmp);
  return dot_fixed(qrow, tmp, d);
}

}  // namespace
}  // namespace moe_framework
