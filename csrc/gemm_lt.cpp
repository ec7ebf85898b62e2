// cuBLASLt GEMM for the linears of a layer, with the layer's epilogue fused and the algorithm chosen by the
// caller:   y = act(x @ weight.T + bias + residual)      (act and residual never both: see gemm_lt below)
// cuBLAS's own choice for a decode-sized GEMM (a few dozen rows against a weight read once) comes from a
// heuristic tuned for compute-bound shapes: it often picks a split-K tile plus a separate reduce kernel, and
// `F.linear` adds the activation and the residual as two more kernels. Here the bias, the activation (the
// tanh GELU of GPT-2, or ReLU) and the residual (as cuBLASLt's C matrix, beta = 1) are applied in the GEMM's
// own epilogue, and the algorithm is one of cuBLASLt's heuristic candidates (gemm_lt_algos), timed per shape
// by eet_pipe/ops/gemm_select.py and kept in a cache file. Row-major y [M, N] is column-major y^T [N, M] =
// W [N, K] (column-major K x N, transposed) times x^T (column-major K x M), so weight is cuBLASLt's A.
//
// cuBLASLt comes from the library torch itself is linked against (libtorch_cuda needs libcublasLt): the
// symbols resolve through that dependency, and this file uses the header torch's ATen headers use. It has no
// device code, so the host compiler builds it.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublasLt.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "checks.h"
#include "ops.h"

namespace eet {
namespace {

constexpr int64_t kAlgoBytes = sizeof(cublasLtMatmulAlgo_t);
constexpr uint64_t kMaxWorkspace = 32ull << 20;  // split-K partial sums of a decode GEMM fit with room to spare
constexpr uint32_t kAlignment = 16;  // every pointer and leading dimension: what the candidates may assume

void check_lt(cublasStatus_t status, const char* what) {
  TORCH_CHECK(status == CUBLAS_STATUS_SUCCESS, "gemm_lt: ", what, " failed: ", cublasLtGetStatusString(status));
}

cublasLtEpilogue_t epilogue_for(const std::string& activation, bool bias) {
  if (activation == "none") return bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
  if (activation == "gelu_new") return bias ? CUBLASLT_EPILOGUE_GELU_BIAS : CUBLASLT_EPILOGUE_GELU;  // tanh form
  if (activation == "relu") return bias ? CUBLASLT_EPILOGUE_RELU_BIAS : CUBLASLT_EPILOGUE_RELU;
  TORCH_CHECK(false, "gemm_lt: activation must be none, gelu_new or relu (the epilogues cuBLASLt has), got '",
              activation, "'");
}

// The descriptors of one problem; destroyed with it.
struct Problem {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;  // c also describes the output
  cublasLtMatmulPreference_t preference = nullptr;
  Problem() = default;
  Problem(const Problem&) = delete;
  Problem& operator=(const Problem&) = delete;
  ~Problem() {
    if (preference) cublasLtMatmulPreferenceDestroy(preference);
    if (c) cublasLtMatrixLayoutDestroy(c);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

void check_inputs(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const std::optional<at::Tensor>& residual, const std::string& activation) {
  const char* op = "gemm_lt";
  check_cuda(x, op, "x");
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "gemm_lt: x must be float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, "gemm_lt: x must be [M, K] and weight [N, K], got ", shape(x.sizes()),
              " and ", shape(weight.sizes()));
  check_like(weight, x, op, "weight", "x");
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  TORCH_CHECK(weight.size(1) == k, "gemm_lt: weight ", shape(weight.sizes()), " does not match x ", shape(x.sizes()));
  TORCH_CHECK(m > 0 && n > 0 && k > 0, "gemm_lt: empty problem, x ", shape(x.sizes()), " weight ",
              shape(weight.sizes()));
  TORCH_CHECK(k % 8 == 0 && n % 8 == 0, "gemm_lt: K (", num(k), ") and N (", num(n),
              ") must be multiples of 8 (16-byte rows)");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "gemm_lt: x and weight must be contiguous");
  TORCH_CHECK(is_aligned(x.data_ptr(), kAlignment) && is_aligned(weight.data_ptr(), kAlignment),
              "gemm_lt: x and weight must be 16-byte aligned");
  if (bias) {
    check_like(*bias, x, op, "bias", "x");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->is_contiguous() &&
                    is_aligned(bias->data_ptr(), kAlignment),
                "gemm_lt: bias must be a contiguous, 16-byte aligned [", num(n), "], got ", shape(bias->sizes()));
  }
  if (residual) {
    check_like(*residual, x, op, "residual", "x");
    TORCH_CHECK(residual->dim() == 2 && residual->size(0) == m && residual->size(1) == n &&
                    residual->is_contiguous() && is_aligned(residual->data_ptr(), kAlignment),
                "gemm_lt: residual must be a contiguous, 16-byte aligned [", num(m), ", ", num(n), "], got ",
                shape(residual->sizes()));
    // cuBLASLt adds C before its epilogue's activation; the layer adds the residual after it.
    TORCH_CHECK(activation == "none", "gemm_lt: a residual is added after the activation, which cuBLASLt cannot "
                "do: pass activation 'none' with a residual (got '", activation, "')");
  }
}

void describe(Problem& p, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
              const std::string& activation) {
  const uint64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  const cudaDataType_t type = x.scalar_type() == at::kHalf ? CUDA_R_16F : CUDA_R_16BF;
  check_lt(cublasLtMatmulDescCreate(&p.op, CUBLAS_COMPUTE_32F, CUDA_R_32F), "creating the matmul descriptor");
  const cublasOperation_t transpose = CUBLAS_OP_T, keep = CUBLAS_OP_N;
  check_lt(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSA, &transpose, sizeof(transpose)),
           "setting TRANSA");
  check_lt(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSB, &keep, sizeof(keep)), "setting TRANSB");
  const cublasLtEpilogue_t epilogue = epilogue_for(activation, bias.has_value());
  check_lt(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof(epilogue)),
           "setting the epilogue");
  if (bias) {
    const void* pointer = bias->data_ptr();
    check_lt(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &pointer, sizeof(pointer)),
             "setting the bias");
  }
  check_lt(cublasLtMatrixLayoutCreate(&p.a, type, k, n, k), "creating the weight layout");
  check_lt(cublasLtMatrixLayoutCreate(&p.b, type, k, m, k), "creating the input layout");
  check_lt(cublasLtMatrixLayoutCreate(&p.c, type, n, m, n), "creating the output layout");
}

// cuBLASLt's heuristic candidates for the problem, best estimate first (at most `count`).
std::vector<cublasLtMatmulHeuristicResult_t> candidates(Problem& p, int count) {
  check_lt(cublasLtMatmulPreferenceCreate(&p.preference), "creating the preference");
  const uint64_t workspace = kMaxWorkspace;
  check_lt(cublasLtMatmulPreferenceSetAttribute(p.preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace,
                                                sizeof(workspace)), "setting the workspace limit");
  for (const auto attribute : {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                               CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES}) {
    check_lt(cublasLtMatmulPreferenceSetAttribute(p.preference, attribute, &kAlignment, sizeof(kAlignment)),
             "setting an alignment");
  }
  std::vector<cublasLtMatmulHeuristicResult_t> results(count);
  int found = 0;
  check_lt(cublasLtMatmulAlgoGetHeuristic(at::cuda::getCurrentCUDABlasLtHandle(), p.op, p.a, p.b, p.c, p.c,
                                          p.preference, count, results.data(), &found),
           "the heuristic query");
  results.resize(found);
  std::vector<cublasLtMatmulHeuristicResult_t> usable;
  for (const auto& result : results) {
    if (result.state == CUBLAS_STATUS_SUCCESS && result.workspaceSize <= kMaxWorkspace) usable.push_back(result);
  }
  return usable;
}

}  // namespace

at::Tensor gemm_lt(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                   const std::optional<at::Tensor>& residual, const std::string& activation,
                   const std::optional<at::Tensor>& algo, int64_t workspace) {
  check_inputs(x, weight, bias, residual, activation);
  const c10::cuda::CUDAGuard guard(x.device());
  Problem p;
  describe(p, x, weight, bias, activation);
  cublasLtMatmulAlgo_t chosen;
  uint64_t workspace_bytes = 0;
  if (algo) {
    TORCH_CHECK(algo->device().is_cpu() && algo->scalar_type() == at::kByte && algo->numel() == kAlgoBytes &&
                    algo->is_contiguous(),
                "gemm_lt: algo must be a contiguous CPU uint8 tensor of ", num(kAlgoBytes),
                " bytes (a row of gemm_lt_algos), got ", shape(algo->sizes()), " ", algo->scalar_type(), " on ",
                algo->device());
    TORCH_CHECK(workspace >= 0 && static_cast<uint64_t>(workspace) <= kMaxWorkspace, "gemm_lt: workspace ",
                num(workspace), " bytes is outside 0..", num(kMaxWorkspace));
    std::memcpy(&chosen, algo->data_ptr(), kAlgoBytes);
    workspace_bytes = static_cast<uint64_t>(workspace);
  } else {  // cuBLASLt's first choice
    const auto found = candidates(p, 1);
    TORCH_CHECK(!found.empty(), "gemm_lt: cuBLASLt has no algorithm for x ", shape(x.sizes()), " weight ",
                shape(weight.sizes()));
    chosen = found[0].algo;
    workspace_bytes = found[0].workspaceSize;
  }
  const int64_t m = x.size(0), n = weight.size(0);
  at::Tensor y = at::empty({m, n}, x.options());
  at::Tensor scratch = at::empty({static_cast<int64_t>(std::max<uint64_t>(workspace_bytes, 1))},
                                 x.options().dtype(at::kByte));
  const float alpha = 1.f, beta = residual ? 1.f : 0.f;
  const void* c = residual ? residual->data_ptr() : y.data_ptr();
  check_lt(cublasLtMatmul(at::cuda::getCurrentCUDABlasLtHandle(), p.op, &alpha, weight.data_ptr(), p.a,
                          x.data_ptr(), p.b, &beta, c, p.c, y.data_ptr(), p.c, &chosen, scratch.data_ptr(),
                          workspace_bytes, at::cuda::getCurrentCUDAStream()),
           "the matmul");
  return y;
}

int64_t cublaslt_version() { return static_cast<int64_t>(cublasLtGetVersion()); }

std::tuple<at::Tensor, at::Tensor> gemm_lt_algos(const at::Tensor& x, const at::Tensor& weight,
                                                 const std::optional<at::Tensor>& bias,
                                                 const std::optional<at::Tensor>& residual,
                                                 const std::string& activation, int64_t count) {
  check_inputs(x, weight, bias, residual, activation);
  TORCH_CHECK(count >= 1 && count <= 256, "gemm_lt_algos: count must be in 1..256, got ", num(count));
  const c10::cuda::CUDAGuard guard(x.device());
  Problem p;
  describe(p, x, weight, bias, activation);
  const auto found = candidates(p, static_cast<int>(count));
  const int64_t rows = static_cast<int64_t>(found.size());
  at::Tensor algos = at::empty({rows, kAlgoBytes}, at::TensorOptions().dtype(at::kByte));
  at::Tensor workspaces = at::empty({rows}, at::TensorOptions().dtype(at::kLong));
  for (int64_t i = 0; i < rows; ++i) {
    std::memcpy(algos.data_ptr<uint8_t>() + i * kAlgoBytes, &found[i].algo, kAlgoBytes);
    workspaces.data_ptr<int64_t>()[i] = static_cast<int64_t>(found[i].workspaceSize);
  }
  return {algos, workspaces};
}

}  // namespace eet
