// Activation functions shared by the element-wise kernels (activation.cu) and the GEMV epilogue
// (gemv.cu). All computed in fp32.
#pragma once

#include <string>

#include "common.h"

namespace eet {

enum class Act { kNone, kGelu, kGeluNew, kRelu, kSilu, kGeluTanh };

// The plain activations of eet_pipe.ops.reference.ACTIVATIONS; `allow_none` also accepts "none".
inline Act parse_activation(const std::string& kind, const char* op, bool allow_none = false) {
  if (allow_none && kind == "none") return Act::kNone;
  if (kind == "gelu") return Act::kGelu;
  if (kind == "gelu_new") return Act::kGeluNew;
  if (kind == "relu") return Act::kRelu;
  TORCH_CHECK(false, op, ": unknown activation '", kind, "'; allowed: ", allow_none ? "none, " : "",
              "gelu, gelu_new, relu");
}

inline Act parse_gated(const std::string& kind, const char* op = "gated_activation") {
  if (kind == "silu_gated") return Act::kSilu;
  if (kind == "gelu_gated") return Act::kGeluTanh;
  TORCH_CHECK(false, op, ": unknown gated activation '", kind, "'; allowed: silu_gated, gelu_gated");
}

template <Act A>
__device__ __forceinline__ float apply(float x) {
  if constexpr (A == Act::kNone) {
    return x;
  } else if constexpr (A == Act::kGelu) {
    return 0.5f * x * (1.f + erff(x * 0.70710678118654752f));
  } else if constexpr (A == Act::kGeluNew || A == Act::kGeluTanh) {
    // 0.5 x (1 + tanh(u)) == x / (1 + exp(-2u)): same function, no cancellation for x < 0.
    const float two_u = 1.5957691216057308f * (x + 0.044715f * x * x * x);
    return x / (1.f + expf(-two_u));
  } else if constexpr (A == Act::kRelu) {
    return x < 0.f ? 0.f : x;  // keeps NaN like torch.relu
  } else {
    return x / (1.f + expf(-x));
  }
}

}  // namespace eet
