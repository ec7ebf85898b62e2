// Host-side argument checks and error-message helpers of the eet_pipe ops; plain C++, so host-only sources
// (gemm_lt.cpp) use them without the CUDA compiler. common.h includes it for the kernels.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>

namespace eet {

// Numbers in error messages are formatted with std::to_string, never streamed: on the lent GPU
// image (torch 2.11+cu130, g++ 13.3) streaming an integer from inside an extension (the
// std::ostream numeric path that TORCH_CHECK's message builder uses) segfaults instead of raising.
inline std::string num(int64_t value) { return std::to_string(value); }

inline std::string shape(at::IntArrayRef sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + "]";
}

inline void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
}

inline void check_float_dtype(const at::Tensor& t, const char* op, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16, op, ": ", name,
              " must be float32, float16 or bfloat16, got ", s);
}

inline void check_dtype(const at::Tensor& t, at::ScalarType want, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == want, op, ": ", name, " must be ", want, ", got ", t.scalar_type());
}

// `t` lives on the same device and has the same dtype as `ref` (named `ref_name`).
inline void check_like(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                       const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name,
              " is on ", ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but ", ref_name, " has dtype ", ref.scalar_type(), "; they must match");
}

inline void check_index(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but the data is on ",
              ref.device());
  check_dtype(t, at::kLong, op, name);
}

inline bool is_aligned(const void* ptr, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % static_cast<uintptr_t>(bytes) == 0;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace eet
