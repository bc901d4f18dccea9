// CPU kernels of grouped_gemm and grouped_gemm_wgrad.
#include "moe_framework/grouped_gemm.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <vector>

namespace moe_framework {
namespace {

using grouped_gemm::acc_t;

std::vector<int64_t> read_offsets(const char* op, const at::Tensor& offsets, int64_t m) {
  const at::Tensor off = offsets.contiguous();
  const int64_t n = off.size(0);
  std::vector<int64_t> v(off.const_data_ptr<int64_t>(), off.const_data_ptr<int64_t>() + n);
  grouped_gemm::check_offsets_values(op, v.data(), n - 1, m);
  return v;
}

at::Tensor grouped_gemm_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets,
                            bool trans_b) {
  grouped_gemm::check_grouped_gemm_inputs(a, b, offsets, trans_b);
  const int64_t m = a.size(0);
  const int64_t num_experts = b.size(0);
  const int64_t n = trans_b ? b.size(1) : b.size(2);
  const std::vector<int64_t> off = read_offsets("grouped_gemm", offsets, m);
  at::Tensor out = at::zeros({m, n}, a.options());
  const auto acc = a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (int64_t e = 0; e < num_experts; ++e) {
    const int64_t lo = off[e], hi = off[e + 1];
    if (hi == lo) continue;
    at::Tensor w = trans_b ? b[e].t() : b[e];
    out.slice(0, lo, hi).copy_(at::mm(a.slice(0, lo, hi).to(acc), w.to(acc)));
  }
  return out;
}

at::Tensor grouped_gemm_wgrad_cpu(const at::Tensor& a, const at::Tensor& grad_out,
                                  const at::Tensor& offsets, bool trans_b) {
  grouped_gemm::check_grouped_gemm_wgrad_inputs(a, grad_out, offsets);
  const int64_t m = a.size(0);
  const int64_t k = a.size(1);
  const int64_t n = grad_out.size(1);
  const int64_t num_experts = offsets.size(0) - 1;
  const std::vector<int64_t> off = read_offsets("grouped_gemm_wgrad", offsets, m);
  at::Tensor db = trans_b ? at::zeros({num_experts, n, k}, a.options())
                          : at::zeros({num_experts, k, n}, a.options());
  const auto acc = a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (int64_t e = 0; e < num_experts; ++e) {
    const int64_t lo = off[e], hi = off[e + 1];
    if (hi == lo) continue;
    at::Tensor ae = a.slice(0, lo, hi).to(acc);
    at::Tensor ge = grad_out.slice(0, lo, hi).to(acc);
    db[e].copy_(trans_b ? at::mm(ge.t(), ae) : at::mm(ae.t(), ge));
  }
  return db;
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_framework, CPU, m) {
  m.impl("grouped_gemm", &grouped_gemm_cpu);
  m.impl("grouped_gemm_wgrad", &grouped_gemm_wgrad_cpu);
}

}  // namespace moe_framework
