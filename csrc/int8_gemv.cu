// int8 weight-only GEMV for decode (M <= 16 rows): y[m, n] = scale[n] * sum_k x[m, k] * q[n, k] + bias[n].
// One warp per output channel n; each lane streams 16 int8 weights (one 16-byte load) at a time,
// converts them in registers and multiplies them into all M rows of x (fp32 accumulation). The
// per-channel scale is applied once after the warp reduction. Larger M is handled by the Python
// wrapper (dequantise + matmul), where the tensor cores win.
#include "common.h"
#include "ops.h"

namespace eet {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxRows = 16;
constexpr int kChunk = 16;  // int8 weights per 16-byte load

template <typename T, int MT>
__global__ void __launch_bounds__(kThreads)
    int8_gemv_kernel(T* __restrict__ y, const T* __restrict__ x, const int8_t* __restrict__ w,
                     const T* __restrict__ scale, const T* __restrict__ bias, int rows, int n_out, int k_in,
                     int k_vec) {
  constexpr int XV = 16 / sizeof(T);  // x elements per 16-byte load
  const int lane = threadIdx.x & 31;
  const int n = blockIdx.x * kWarps + (threadIdx.x >> 5);
  if (n >= n_out) return;  // whole warp leaves together
  const int8_t* wrow = w + static_cast<int64_t>(n) * k_in;
  float acc[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) acc[m] = 0.f;

#pragma unroll 2
  for (int k = lane * kChunk; k < k_vec; k += 32 * kChunk) {
    const int4 packed = __ldg(reinterpret_cast<const int4*>(wrow + k));
    const int8_t* bytes = reinterpret_cast<const int8_t*>(&packed);
    float wf[kChunk];
#pragma unroll
    for (int i = 0; i < kChunk; ++i) wf[i] = static_cast<float>(bytes[i]);
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m < rows) {
        const T* xr = x + static_cast<int64_t>(m) * k_in + k;
#pragma unroll
        for (int c = 0; c < kChunk / XV; ++c) {
          const Vec<T, XV> xv = load_vec<T, XV>(xr + c * XV);
#pragma unroll
          for (int e = 0; e < XV; ++e) acc[m] += to_float(xv.v[e]) * wf[c * XV + e];
        }
      }
    }
  }
  for (int k = k_vec + lane; k < k_in; k += 32) {  // tail, or everything when unaligned
    const float wf = static_cast<float>(wrow[k]);
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m < rows) acc[m] += to_float(x[static_cast<int64_t>(m) * k_in + k]) * wf;
    }
  }

  const float s = to_float(scale[n]);
  const float b = bias != nullptr ? to_float(bias[n]) : 0.f;
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    const float total = warp_sum(acc[m]);
    if (lane == m && m < rows) y[static_cast<int64_t>(m) * n_out + n] = from_float<T>(total * s + b);
  }
}

template <typename T, int MT>
void launch(T* y, const T* x, const int8_t* w, const T* scale, const T* bias, int rows, int n_out, int k_in,
            int k_vec) {
  const auto blocks = static_cast<unsigned>(ceil_div(n_out, kWarps));
  int8_gemv_kernel<T, MT><<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(y, x, w, scale, bias, rows,
                                                                                       n_out, k_in, k_vec);
  EET_CHECK_LAUNCH();
}

void check_int8_args(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                     const std::optional<at::Tensor>& bias) {
  const char* op = "int8_linear";
  check_cuda(x, op, "x");
  check_float_dtype(x, op, "x");
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [M, K], got shape ", shape(x.sizes()));
  TORCH_CHECK(x.size(0) <= kMaxRows, op, ": the GEMV kernel handles at most ", num(kMaxRows), " rows, got M=", num(x.size(0)),
              "; eet_pipe.ops.int8_linear dequantises and uses a matmul for larger M");
  TORCH_CHECK(qweight.device() == x.device() && qweight.scalar_type() == at::kChar, op,
              ": qweight must be an int8 tensor on ", x.device(), ", got ", qweight.scalar_type(), " on ",
              qweight.device());
  TORCH_CHECK(qweight.dim() == 2 && qweight.size(1) == x.size(1), op, ": qweight must have shape [N, K=", num(x.size(1)),
              "], got ", shape(qweight.sizes()));
  TORCH_CHECK(qweight.size(0) <= INT32_MAX && x.size(1) <= INT32_MAX, op, ": weight ", shape(qweight.sizes()),
              " is too large");
  check_like(scale, x, op, "scale", "x");
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == qweight.size(0), op, ": scale must have shape [N=",
              num(qweight.size(0)), "], got ", shape(scale.sizes()));
  if (bias.has_value()) {
    check_like(*bias, x, op, "bias", "x");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == qweight.size(0), op, ": bias must have shape [N=",
                num(qweight.size(0)), "], got ", shape(bias->sizes()));
  }
}

}  // namespace

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                       const std::optional<at::Tensor>& bias) {
  check_int8_args(x, qweight, scale, bias);
  const int rows = static_cast<int>(x.size(0));
  const int n_out = static_cast<int>(qweight.size(0));
  const int k_in = static_cast<int>(x.size(1));
  at::Tensor y = at::empty({rows, n_out}, x.options());
  if (y.numel() == 0) return y;
  if (k_in == 0) return bias.has_value() ? y.copy_(bias->expand({rows, n_out})) : y.zero_();
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), wc = qweight.contiguous(), sc = scale.contiguous();
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  const bool vec = k_in % kChunk == 0 && is_aligned(xc.data_ptr(), 16) && is_aligned(wc.data_ptr(), 16);
  const int k_vec = vec ? k_in : 0;
  EET_DISPATCH_FLOAT(x.scalar_type(), "eet_pipe int8_linear", [&] {
    auto* out = y.data_ptr<scalar_t>();
    const auto* xp = xc.const_data_ptr<scalar_t>();
    const auto* wp = wc.const_data_ptr<int8_t>();
    const auto* sp = sc.const_data_ptr<scalar_t>();
    const auto* bp = bc.defined() ? bc.const_data_ptr<scalar_t>() : nullptr;
    if (rows <= 1) {
      launch<scalar_t, 1>(out, xp, wp, sp, bp, rows, n_out, k_in, k_vec);
    } else if (rows <= 2) {
      launch<scalar_t, 2>(out, xp, wp, sp, bp, rows, n_out, k_in, k_vec);
    } else if (rows <= 4) {
      launch<scalar_t, 4>(out, xp, wp, sp, bp, rows, n_out, k_in, k_vec);
    } else if (rows <= 8) {
      launch<scalar_t, 8>(out, xp, wp, sp, bp, rows, n_out, k_in, k_vec);
    } else {
      launch<scalar_t, 16>(out, xp, wp, sp, bp, rows, n_out, k_in, k_vec);
    }
  });
  return y;
}

}  // namespace eet
