// Shared by the CPU and CUDA kernels: host/device qualifiers and input checks.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <initializer_list>
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

}  // namespace moe_framework
