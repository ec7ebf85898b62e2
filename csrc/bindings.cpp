// Registers the eet_pipe CUDA ops as torch.ops.eet_pipe.* (schemas + CUDA kernels). Fake (meta)
// implementations live in eet_pipe/ops/fake.py; the Python dispatch point is eet_pipe/ops/__init__.py.
#include <torch/extension.h>
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(eet_pipe, m) {
  m.def("layer_norm(Tensor x, Tensor weight, Tensor? bias, float eps) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("residual_layer_norm(Tensor x, Tensor residual, Tensor weight, Tensor? bias, float eps) -> (Tensor, Tensor)");
  m.def("residual_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("activation(Tensor x, str kind) -> Tensor");
  m.def("bias_activation(Tensor x, Tensor bias, str kind) -> Tensor");
  m.def("gated_activation(Tensor gate, Tensor up, str kind) -> Tensor");
  m.def(
      "qkv_rotary_cache(Tensor qkv, Tensor? cos, Tensor? sin, Tensor(a!) k_cache, Tensor(b!) v_cache, "
      "Tensor slots, Tensor write_index, int num_heads, int num_kv_heads, int head_dim, bool rotary, "
      "Tensor? positions) -> Tensor");
  m.def(
      "decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor slots, Tensor lengths, Tensor valid, "
      "float scale) -> Tensor");
  m.def(
      "decode_attention_qkv(Tensor qkv, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slots, Tensor write_index, "
      "Tensor lengths, Tensor valid, int num_heads, float scale) -> Tensor");
  m.def("gemv(Tensor x, Tensor weight, Tensor? scale, Tensor? bias, Tensor? residual, str activation) -> Tensor");
  m.def("gemv_gated(Tensor x, Tensor gate, Tensor up, Tensor? gate_scale, Tensor? up_scale, Tensor? gate_bias, "
        "Tensor? up_bias, str kind) -> Tensor");
  m.def("dequantize_int8(Tensor qweight, Tensor scale) -> Tensor");
  m.def("gemm_lt(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, str activation, Tensor? algo, "
        "int workspace) -> Tensor");
  m.def("gemm_lt_algos(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, str activation, int count) "
        "-> (Tensor, Tensor)");
  m.def("cublaslt_version() -> int", &eet::cublaslt_version);  // no tensors: the catch-all kernel runs
  // Process-wide launch setting, not a tensor op (no tensor arguments: the catch-all kernel runs).
  m.def("set_pdl(bool? enabled) -> bool", &eet::set_pdl);
}

TORCH_LIBRARY_IMPL(eet_pipe, CUDA, m) {
  m.impl("layer_norm", &eet::layer_norm);
  m.impl("rms_norm", &eet::rms_norm);
  m.impl("residual_layer_norm", &eet::residual_layer_norm);
  m.impl("residual_rms_norm", &eet::residual_rms_norm);
  m.impl("activation", &eet::activation);
  m.impl("bias_activation", &eet::bias_activation);
  m.impl("gated_activation", &eet::gated_activation);
  m.impl("qkv_rotary_cache", &eet::qkv_rotary_cache);
  m.impl("decode_attention", &eet::decode_attention);
  m.impl("decode_attention_qkv", &eet::decode_attention_qkv);
  m.impl("gemv", &eet::gemv);
  m.impl("gemv_gated", &eet::gemv_gated);
  m.impl("dequantize_int8", &eet::dequantize_int8);
  m.impl("gemm_lt", &eet::gemm_lt);
  m.impl("gemm_lt_algos", &eet::gemm_lt_algos);
}

// Importable as eet_pipe._C (setup.py) so that importing it runs the registrations above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "eet_pipe fused CUDA kernels; the ops are registered as torch.ops.eet_pipe.*";
}
