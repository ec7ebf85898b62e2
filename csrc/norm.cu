// LayerNorm / RMSNorm, optionally fused with the residual add. One block per row; the row
// (x + residual, rounded to the input dtype as PyTorch would store it) is kept in shared memory in
// fp32; statistics in fp32; 16-byte loads/stores when the hidden size and pointers allow.
#include "common.h"
#include "ops.h"

namespace eet {
namespace {

constexpr int kMaxThreads = 1024;

struct NormArgs {
  void* out;
  void* summed;  // residual variants only
  const void* x;
  const void* residual;
  const void* weight;
  const void* bias;  // LayerNorm only, may be null
  int hidden;
  float eps;
};

// RMS: LLaMA order -- normalise in fp32, round to T, then multiply by the weight in T.
// LayerNorm: (v - mean) * rstd * w + b in fp32, rounded once.
template <typename T, int VEC, bool RESIDUAL, bool RMS>
__global__ void norm_kernel(const NormArgs a) {
  extern __shared__ float row[];  // [hidden], element (i, e) at row[e * nvec + i]: conflict-free
  pdl_launch_dependents();
  pdl_wait();
  const int nvec = a.hidden / VEC;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * a.hidden;
  const T* x = static_cast<const T*>(a.x) + base;

  float acc = 0.f;
  for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
    Vec<T, VEC> xv = load_vec<T, VEC>(x + i * VEC);
    if constexpr (RESIDUAL) {
      const Vec<T, VEC> rv = load_vec<T, VEC>(static_cast<const T*>(a.residual) + base + i * VEC);
#pragma unroll
      for (int e = 0; e < VEC; ++e) xv.v[e] = from_float<T>(to_float(xv.v[e]) + to_float(rv.v[e]));
      store_vec<T, VEC>(static_cast<T*>(a.summed) + base + i * VEC, xv);
    }
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float f = to_float(xv.v[e]);
      row[e * nvec + i] = f;
      acc += RMS ? f * f : f;
    }
  }
  const float stat = block_sum(acc) / a.hidden;
  float mean = 0.f;
  float rstd;
  if constexpr (RMS) {
    rstd = rsqrtf(stat + a.eps);
  } else {
    mean = stat;
    float var = 0.f;
    for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float d = row[e * nvec + i] - mean;
        var += d * d;
      }
    }
    rstd = rsqrtf(block_sum(var) / a.hidden + a.eps);
  }

  const T* w = static_cast<const T*>(a.weight);
  const T* b = static_cast<const T*>(a.bias);
  T* out = static_cast<T*>(a.out) + base;
  for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
    const Vec<T, VEC> wv = load_vec<T, VEC>(w + i * VEC);
    Vec<T, VEC> bv;
    if (!RMS && b != nullptr) bv = load_vec<T, VEC>(b + i * VEC);
    Vec<T, VEC> ov;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float n = (row[e * nvec + i] - mean) * rstd;
      if constexpr (RMS) {
        ov.v[e] = from_float<T>(to_float(wv.v[e]) * round_to<T>(n));
      } else {
        const float y = n * to_float(wv.v[e]) + (b != nullptr ? to_float(bv.v[e]) : 0.f);
        ov.v[e] = from_float<T>(y);
      }
    }
    store_vec<T, VEC>(out + i * VEC, ov);
  }
}

template <typename T, int VEC, bool RESIDUAL, bool RMS>
void launch(const NormArgs& args, int64_t rows) {
  const int nvec = args.hidden / VEC;
  const int threads = static_cast<int>(std::min<int64_t>(kMaxThreads, std::max<int64_t>(32, ceil_div(nvec, 32) * 32)));
  const size_t smem = static_cast<size_t>(args.hidden) * sizeof(float);
  auto kernel = norm_kernel<T, VEC, RESIDUAL, RMS>;
  if (smem > 48 * 1024) {
    const size_t limit = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
    TORCH_CHECK(smem <= limit, "norm: hidden size ", num(args.hidden), " needs ", num(smem),
                " bytes of shared memory per block but this GPU allows ", num(limit));
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  launch_kernel(kernel, dim3(static_cast<unsigned>(rows)), dim3(threads), smem, args);
}

void check_norm_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias, const at::Tensor* residual) {
  check_cuda(x, op, "x");
  check_float_dtype(x, op, "x");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, op, ": x must have a non-empty last dimension, got shape ",
              shape(x.sizes()));
  TORCH_CHECK(x.size(-1) <= INT32_MAX, op, ": hidden size ", num(x.size(-1)), " is too large");
  check_like(weight, x, op, "weight", "x");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1), op, ": weight must have shape [",
              num(x.size(-1)), "], got ", shape(weight.sizes()));
  if (bias.has_value()) {
    check_like(*bias, x, op, "bias", "x");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == x.size(-1), op, ": bias must have shape [",
                num(x.size(-1)), "], got ", shape(bias->sizes()));
  }
  if (residual != nullptr) {
    check_like(*residual, x, op, "residual", "x");
    TORCH_CHECK(residual->sizes() == x.sizes(), op, ": residual has shape ", shape(residual->sizes()),
                " but x has shape ", shape(x.sizes()));
  }
}

// Runs the kernel; `residual`/`summed` are undefined tensors for the plain variants.
template <bool RESIDUAL, bool RMS>
void run_norm(const at::Tensor& out, const at::Tensor& summed, const at::Tensor& x, const at::Tensor& residual,
              const at::Tensor& weight, const at::Tensor& bias, double eps) {
  if (x.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const int hidden = static_cast<int>(x.size(-1));
  const int64_t rows = x.numel() / hidden;
  NormArgs args{out.data_ptr(), RESIDUAL ? summed.data_ptr() : nullptr, x.data_ptr(),
                RESIDUAL ? residual.data_ptr() : nullptr, weight.data_ptr(),
                bias.defined() ? bias.data_ptr() : nullptr, hidden, static_cast<float>(eps)};
  EET_DISPATCH_FLOAT(x.scalar_type(), "eet_pipe norm", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    bool vec = hidden % kVec == 0;
    const std::initializer_list<const void*> ptrs{args.out, args.summed, args.x, args.residual, args.weight, args.bias};
    for (const void* p : ptrs) {
      vec = vec && (p == nullptr || is_aligned(p, 16));
    }
    if (vec) {
      launch<scalar_t, kVec, RESIDUAL, RMS>(args, rows);
    } else {
      launch<scalar_t, 1, RESIDUAL, RMS>(args, rows);
    }
  });
}

}  // namespace

at::Tensor layer_norm(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      double eps) {
  check_norm_args("layer_norm", x, weight, bias, nullptr);
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  run_norm<false, false>(out, at::Tensor(), xc, at::Tensor(), weight.contiguous(),
                         bias.has_value() ? bias->contiguous() : at::Tensor(), eps);
  return out;
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_norm_args("rms_norm", x, weight, std::nullopt, nullptr);
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  run_norm<false, true>(out, at::Tensor(), xc, at::Tensor(), weight.contiguous(), at::Tensor(), eps);
  return out;
}

std::tuple<at::Tensor, at::Tensor> residual_layer_norm(const at::Tensor& x, const at::Tensor& residual,
                                                       const at::Tensor& weight,
                                                       const std::optional<at::Tensor>& bias, double eps) {
  check_norm_args("residual_layer_norm", x, weight, bias, &residual);
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  at::Tensor summed = at::empty_like(xc);
  run_norm<true, false>(out, summed, xc, residual.contiguous(), weight.contiguous(),
                        bias.has_value() ? bias->contiguous() : at::Tensor(), eps);
  return {out, summed};
}

std::tuple<at::Tensor, at::Tensor> residual_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                     const at::Tensor& weight, double eps) {
  check_norm_args("residual_rms_norm", x, weight, std::nullopt, &residual);
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  at::Tensor summed = at::empty_like(xc);
  run_norm<true, true>(out, summed, xc, residual.contiguous(), weight.contiguous(), at::Tensor(), eps);
  return {out, summed};
}

}  // namespace eet
