// Shared by the CPU and CUDA kernels: host/device qualifiers and input checks.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <initializer_list>

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

// TORCH_CHECK that `t` lives on the same device as `ref`.
inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op,
                              const char* arg, const char* ref_arg) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", arg, " must be on the same device as ", ref_arg,
              " (", ref.device(), "), got ", t.device());
}

}  // namespace moe_framework
