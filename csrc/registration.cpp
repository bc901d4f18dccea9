// Every operator schema of the moe_framework library, defined once. Device files
// (csrc/cpu/*.cpp, csrc/cuda/*.cu) only add TORCH_LIBRARY_IMPL blocks for their own kernels; fake
// kernels and autograd are registered in Python next to each wrapper (moe_framework/ops/).
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <Python.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include "moe_framework/cpu_tuning.h"

extern "C" {
// A dummy module init: `import moe_framework._C` loads this library, which runs the static
// registrations below. No pybind11 and no libtorch_python are needed.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(moe_framework, m) {
  // ---- route: fused gate, logits [T, E] -> weights [T, k] f32, ids [T, k] i32, counts [E] i32
  // ---- scoring is "softmax" or "sigmoid"; correction_bias [E] (optional) shifts selection only.
  m.def(
      "route(Tensor logits, int k, str scoring, Tensor? correction_bias, int n_group, "
      "int topk_group, bool renormalize, float scaling_factor) -> (Tensor weights, Tensor ids, "
      "Tensor counts)");
  // Gradient of route's weights with respect to its logits (ids fixed by the forward).
  m.def(
      "route_backward(Tensor grad_weights, Tensor logits, Tensor ids, str scoring, "
      "bool renormalize, float scaling_factor) -> Tensor");

  // ---- permute / unpermute: dropless token <-> expert-sorted layout, offsets on the device ----
  // x [T, d], ids [T, k] (-1 = dropped slot) -> x_sorted [T*k, d], row_of_slot [T*k] i64,
  // offsets [E+1] i64. Stable: within an expert, slots keep their flat order t*k + j.
  m.def(
      "permute(Tensor x, Tensor ids, int num_experts) -> (Tensor x_sorted, Tensor row_of_slot, "
      "Tensor offsets)");
  // grad_x [T, d] = sum over the k routed slots of each token of grad_x_sorted[row_of_slot[t*k+j]];
  // rows >= offsets[E] hold dropped slots (constant zero rows) and carry no gradient.
  m.def(
      "permute_backward(Tensor grad_x_sorted, Tensor row_of_slot, Tensor offsets, int k) -> "
      "Tensor");
  // y [T, d] = sum_j weights[t, j] * y_sorted[row_of_slot[t*k+j]], summed in j order (no atomics).
  m.def("unpermute(Tensor y_sorted, Tensor row_of_slot, Tensor weights) -> Tensor");
  // grad_y_sorted [T*k, d]: row row_of_slot[t*k+j] = weights[t, j] * grad_y[t];
  // grad_weights [T, k] (dtype of weights) = dot(grad_y[t], y_sorted[row_of_slot[t*k+j]]).
  m.def(
      "unpermute_backward(Tensor grad_y, Tensor y_sorted, Tensor row_of_slot, Tensor weights) -> "
      "(Tensor grad_y_sorted, Tensor grad_weights)");

  // ---- grouped_gemm: rows offsets[e]:offsets[e+1] of a [M, K] times b[e] ----
  // b is [E, K, N], or [E, N, K] with trans_b. Rows outside [offsets[0], offsets[E]) give zeros.
  m.def("grouped_gemm(Tensor a, Tensor b, Tensor offsets, bool trans_b) -> Tensor");
  // Weight gradient: db[e] = a_e^T @ grad_out_e ([E, K, N]), or its transpose ([E, N, K]) with
  // trans_b.
  m.def("grouped_gemm_wgrad(Tensor a, Tensor grad_out, Tensor offsets, bool trans_b) -> Tensor");

  // ---- grouped_gemm_q: weight-only INT8 / INT4 grouped GEMM, out = a_e @ dequant(qweight[e])^T --
  // qweight int8 [E, N, K] (bits 8) or packed uint8 [E, N, K/2] (bits 4), scales f32 [E, N, G],
  // zeros u8 [E, N, G] (asymmetric INT4) or None; format:
  // csrc/include/moe_framework/grouped_gemm_q.h. act_bits=8: activations quantised to INT8 per
  // (row, group) and integer dot products (same header).
  m.def(
      "grouped_gemm_q(Tensor a, Tensor qweight, Tensor scales, Tensor? zeros, Tensor offsets, "
      "int bits, int group_size, int act_bits=0) -> Tensor");

  // ---- swiglu: the SwiGLU activation of expert FFNs, h [..., 2H] = [gate | up] ----
  // silu(h[..., :H]) * h[..., H:] -> [..., H], computed in fp32 (fp64 for fp64), one rounding.
  m.def("swiglu(Tensor h) -> Tensor");
  // Gradient of swiglu with respect to h for grad [..., H]: [..., 2H] = [d gate | d up].
  m.def("swiglu_backward(Tensor grad, Tensor h) -> Tensor");
  // swiglu_backward written over h itself (contiguous h): for callers that own h and no longer
  // need it, so the backward allocates no [..., 2H] buffer.
  m.def("swiglu_backward_(Tensor grad, Tensor(a!) h) -> ()");

  // ---- issue 14 (Hugging Face experts): GPT-OSS's clamped SwiGLU and the small-T decode path ----
  // h [..., 2H] (gate, up) pairs, interleaved or [gate | up] -> (clamp(up, -limit, limit) + 1) *
  // g * sigmoid(alpha * g) with g = min(gate, limit): [..., H], fp32 math, one rounding.
  m.def("clamped_swiglu(Tensor h, float alpha, float limit, bool interleaved) -> Tensor");
  m.def(
      "clamped_swiglu_backward(Tensor grad, Tensor h, float alpha, float limit, bool interleaved) "
      "-> Tensor");
  // y [T, d] = sum_j weights[t, j] * FFN_{ids[t, j]}(x[t]) (SwiGLU experts, w_in [E, d, 2h] and
  // w_out [E, h, d], or [E, 2h, d] / [E, d, h] with trans_b): each selected expert's weights read
  // once for all its tokens; ids -1 = dropped slot. For few tokens (T*k <= 4E), no autograd.
  m.def(
      "moe_decode(Tensor x, Tensor ids, Tensor weights, Tensor w_in, Tensor w_out, bool trans_b, "
      "Tensor? b_in=None, Tensor? b_out=None, str gate=\"silu\", float alpha=1.702, "
      "float limit=7.0, bool interleaved=False) -> Tensor");

  // ---- similarity: librarian dedup and knowledge-graph search ----
  // keep [n] bool, representative [n] i64 (most similar earlier kept-or-not item, self when kept).
  m.def("dedup(Tensor emb, float threshold) -> (Tensor keep, Tensor representative)");
  // cosine top-k of queries [q, d] over the first n_valid (0-dim i64 tensor) rows of bank [N, d].
  m.def(
      "kg_search(Tensor queries, Tensor bank, int k, Tensor n_valid) -> (Tensor scores, Tensor "
      "ids)");

  // ---- tuning: the CPU kernels' run-time knobs (moe_framework/cpu_tuning.h; no tensors, so
  // ---- catch-all kernels). tuning_set returns the previous value; value None = the default.
  m.def("tuning_names() -> str[]", &moe_framework::tuning::names);
  m.def("tuning_get(str name, bool initial=False) -> int", &moe_framework::tuning::get);
  m.def("tuning_set(str name, int? value) -> int", &moe_framework::tuning::set);
}

namespace {

// swiglu_backward_ writes over h: bump h's version counter, as built-in in-place ops do, so that
// autograd refuses (instead of silently reading the new values) when h was saved for a backward
// that runs later (e.g. a second backward through the same graph). The dispatcher does not do
// this for custom ops; the ADInplaceOrView kernel is where ATen's own in-place ops do it.
void swiglu_backward_inplace_bump(c10::DispatchKeySet keys, const at::Tensor& grad,
                                  const at::Tensor& h) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("moe_framework::swiglu_backward_", "")
                             .typed<void(const at::Tensor&, const at::Tensor&)>();
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatch(keys & c10::after_ADInplaceOrView_keyset, grad, h);
  }
  torch::autograd::impl::bump_version(h);
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_framework, ADInplaceOrView, m) {
  m.impl("swiglu_backward_", TORCH_FN(swiglu_backward_inplace_bump));
}
