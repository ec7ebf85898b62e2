// Host entry points of the eet_pipe CUDA ops; registered in bindings.cpp as torch.ops.eet_pipe.*.
// Semantics: eet_pipe/ops/reference.py (and eet_pipe/ops/quant.py for int8_linear).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>

namespace eet {

// norm.cu -- x: [..., H]; weight, bias: [H]
at::Tensor layer_norm(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      double eps);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
std::tuple<at::Tensor, at::Tensor> residual_layer_norm(const at::Tensor& x, const at::Tensor& residual,
                                                       const at::Tensor& weight,
                                                       const std::optional<at::Tensor>& bias, double eps);
std::tuple<at::Tensor, at::Tensor> residual_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                     const at::Tensor& weight, double eps);

// activation.cu -- element-wise; bias: [x.size(-1)]
at::Tensor activation(const at::Tensor& x, const std::string& kind);
at::Tensor bias_activation(const at::Tensor& x, const at::Tensor& bias, const std::string& kind);
at::Tensor gated_activation(const at::Tensor& gate, const at::Tensor& up, const std::string& kind);

// rotary_cache.cu -- qkv: [B, T, (Hq + 2 Hkv) D]; caches: [S, Hkv, L, D]; returns q [B, Hq, T, D]
at::Tensor qkv_rotary_cache(const at::Tensor& qkv, const std::optional<at::Tensor>& cos,
                            const std::optional<at::Tensor>& sin, at::Tensor& k_cache, at::Tensor& v_cache,
                            const at::Tensor& slots, const at::Tensor& write_index, int64_t num_heads,
                            int64_t num_kv_heads, int64_t head_dim, bool rotary,
                            const std::optional<at::Tensor>& positions);

// decode_attention.cu -- q: [B, Hq, 1, D]; caches: [S, Hkv, L, D]; valid: [S, L]; returns [B, Hq, 1, D]
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& slots, const at::Tensor& lengths, const at::Tensor& valid,
                            double scale);

// The same for a decode step straight from the fused projection, without rotary: qkv [B, (Hq + 2 Hkv) D] (or
// [B, 1, ...]) holds q, then k, then v heads; sequence b's k and v are stored in cache column write_index[b] ([B] or
// [B, 1]) of row slots[b] and take part as that column. k_cache / v_cache are written in place.
at::Tensor decode_attention_qkv(const at::Tensor& qkv, at::Tensor& k_cache, at::Tensor& v_cache,
                                const at::Tensor& slots, const at::Tensor& write_index, const at::Tensor& lengths,
                                const at::Tensor& valid, int64_t num_heads, double scale);

// gemv.cu -- x: [M <= 16, K]; weight: [N, K] in x's dtype, or int8 with scale [N]; bias: [N];
// the weight must not be written by the kernel launched just before (it is read early, see gemv.cu);
// residual: [M, N]; activation: "none", "gelu", "gelu_new" or "relu". Returns
// act(x @ (weight * scale[:, None]).T + bias) + residual, [M, N].
at::Tensor gemv(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& scale,
                const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                const std::string& activation);

// gemv.cu -- the first half of a gated MLP: act(x @ (gate * gate_scale[:, None]).T + gate_bias) *
// (x @ (up * up_scale[:, None]).T + up_bias), [M, N], for x [M <= 4, K]; gate and up [N, K] of one dtype (x's,
// or int8 with both scales); kind "silu_gated" or "gelu_gated". The weights are read early, as in gemv.
at::Tensor gemv_gated(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& up,
                      const std::optional<at::Tensor>& gate_scale, const std::optional<at::Tensor>& up_scale,
                      const std::optional<at::Tensor>& gate_bias, const std::optional<at::Tensor>& up_bias,
                      const std::string& kind);

// dequant.cu -- qweight [N, K] int8, scale [N] float: returns qweight * scale[:, None] in the scale's dtype.
at::Tensor dequantize_int8(const at::Tensor& qweight, const at::Tensor& scale);

// gemm_lt.cpp -- cuBLASLt GEMM, fp16/bf16: x [M, K], weight [N, K], bias [N], residual [M, N] (only with
// activation "none"; activation "none", "gelu_new" or "relu"), K and N multiples of 8, 16-byte aligned; returns
// act(x @ weight.T + bias) + residual, [M, N], run with `algo` (a row of gemm_lt_algos, with the workspace bytes
// it needs) or, without one, cuBLASLt's first heuristic choice.
at::Tensor gemm_lt(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                   const std::optional<at::Tensor>& residual, const std::string& activation,
                   const std::optional<at::Tensor>& algo, int64_t workspace);
// cuBLASLt's candidate algorithms for that problem, best estimate first: (uint8 [n, 64] algorithms, int64 [n]
// workspace bytes each), on the CPU, at most `count`.
std::tuple<at::Tensor, at::Tensor> gemm_lt_algos(const at::Tensor& x, const at::Tensor& weight,
                                                 const std::optional<at::Tensor>& bias,
                                                 const std::optional<at::Tensor>& residual,
                                                 const std::string& activation, int64_t count);

// The version of the cuBLASLt library loaded (an algorithm from gemm_lt_algos is valid for that version only).
int64_t cublaslt_version();

// launch.cu -- programmatic dependent launch of these kernels on (default) or off (None: unchanged); returns the
// setting before the call.
bool set_pdl(std::optional<bool> enabled);

}  // namespace eet
