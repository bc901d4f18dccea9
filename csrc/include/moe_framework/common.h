// Shared by the CPU and CUDA kernels: host/device qualifiers and input checks.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <initializer_list>
#include <optional>
#include <string>

#if defined(__CUDACC__)
#define MOE_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// Always inline on the host too: shared math sits in hot per-element loops, and an out-of-line
// call there (GCC's choice for plain `inline` at times) stops them from vectorising.
#define MOE_HD inline __attribute__((always_inline))
#else
#define MOE_HD inline
#endif

namespace moe_framework {

// TORCH_CHECK that `t` has rank `dim` and one of `dtypes`, naming the op and the argument.
inline void check_tensor(const at::Tensor& t, const char* op, const char* arg, int64_t dim,
                         std::initializer_list<at::ScalarType> dtypes) {
  TORCH_CHECK(t.dim() == dim, op, ": ", arg, " must have ", dim, " dimensions, got ", t.dim(),
              " (shape ", t.sizes(), ")");
  bool ok = false;
  for (auto d : dtypes) ok = ok || t.scalar_type() == d;
  if (!ok) {
    std::string expected;
    for (auto d : dtypes) {
      if (!expected.empty()) expected += ", ";
      expected += c10::toString(d);
    }
    TORCH_CHECK(false, op, ": ", arg, " must have dtype in {", expected, "}, got ",
                t.scalar_type());
  }
}

// A tensor argument of an op and its name, for check_same_device.
struct NamedTensor {
  const char* name;
  const at::Tensor& tensor;
};

// TORCH_CHECK that every tensor argument of `op` lives on one device, e.g.
// check_same_device("permute", {{"x", x}, {"ids", ids}}). The message lists each argument with
// its device, the same text as the fake kernels' check (moe_framework/ops/_checks.py): "permute:
// tensor arguments must be on the same device, got x on meta, ids on cpu".
inline void check_same_device(const char* op, std::initializer_list<NamedTensor> args) {
  const at::Device device = args.begin()->tensor.device();
  bool same = true;
  for (const NamedTensor& a : args) same = same && a.tensor.device() == device;
  if (same) return;
  std::string got;
  for (const NamedTensor& a : args) {
    if (!got.empty()) got += ", ";
    got += std::string(a.name) + " on " + a.tensor.device().str();
  }
  TORCH_CHECK(false, op, ": tensor arguments must be on the same device, got ", got);
}

// moe_decode's optional arguments (both kernels): biases b_in [E, 2h] and b_out [E, d] with x's
// dtype and device, and the gate's name.
inline void check_decode_extras(const char* op, const at::Tensor& x, int64_t E, int64_t d,
                                int64_t h, const std::optional<at::Tensor>& b_in,
                                const std::optional<at::Tensor>& b_out, c10::string_view gate) {
  TORCH_CHECK(gate == "silu" || gate == "clamped", op,
              ": gate must be \"silu\" or \"clamped\", got \"", std::string(gate), "\"");
  const char* names[2] = {"b_in", "b_out"};
  const char* shapes[2] = {"[E, 2h]", "[E, d]"};
  const std::optional<at::Tensor>* biases[2] = {&b_in, &b_out};
  const int64_t cols[2] = {2 * h, d};
  for (int j = 0; j < 2; ++j) {
    if (!biases[j]->has_value()) continue;
    const at::Tensor& b = **biases[j];
    TORCH_CHECK(b.device() == x.device(), op, ": ", names[j], " must be on x's device ", x.device(),
                ", got ", b.device());
    TORCH_CHECK(b.dim() == 2 && b.size(0) == E && b.size(1) == cols[j], op, ": ", names[j],
                " must be ", shapes[j], " = [", E, ", ", cols[j], "], got ", b.sizes());
    TORCH_CHECK(b.scalar_type() == x.scalar_type(), op, ": ", names[j], " must have x's dtype ",
                x.scalar_type(), ", got ", b.scalar_type());
  }
}

}  // namespace moe_framework
