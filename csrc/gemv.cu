// Dense GEMV for decode (M <= 8 rows): y[m, n] = sum_k x[m, k] * w[n, k] + bias[n].
// A decode step multiplies a handful of rows by every weight matrix once, so its time is the time to
// stream the weights from memory; cuBLASLt's tiled kernels for M <= 8 (64 x 8 tiles, often split-K plus
// a reduce kernel) reach about half of the memory bandwidth there. Here one warp owns one output
// channel n: each lane streams 16 bytes of w's row per iteration (read-only, non-coherent loads,
// four iterations unrolled so that several loads are in flight), multiplies them into all M rows of x
// (every warp re-reads x, which is small and served from L1/L2), accumulates in fp32, and the warp sums once at the end. The bias is
// added in fp32 before the single rounding, as cuBLASLt's bias epilogue does.
#include "common.h"
#include "ops.h"

namespace eet {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxRows = 8;

template <typename T, int V>
__device__ __forceinline__ Vec<T, V> load_nc(const T* ptr) {
  static_assert(sizeof(T) * V == 16, "one 16-byte load");
  Vec<T, V> out;
  *reinterpret_cast<int4*>(&out) = __ldg(reinterpret_cast<const int4*>(ptr));
  return out;
}

template <typename T, int MT>
__global__ void __launch_bounds__(kThreads)
    gemv_kernel(T* __restrict__ y, const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
                int rows, int n_out, int k_in, int k_vec) {
  constexpr int V = 16 / sizeof(T);  // elements per 16-byte load
  const int lane = threadIdx.x & 31;
  const int n = blockIdx.x * kWarps + (threadIdx.x >> 5);
  if (n >= n_out) return;  // whole warp leaves together
  const T* wrow = w + static_cast<int64_t>(n) * k_in;
  float acc[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) acc[m] = 0.f;

#pragma unroll 4
  for (int k = lane * V; k < k_vec; k += 32 * V) {
    const Vec<T, V> wv = load_nc<T, V>(wrow + k);
    float wf[V];
#pragma unroll
    for (int e = 0; e < V; ++e) wf[e] = to_float(wv.v[e]);
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m < rows) {
        const Vec<T, V> xv = load_vec<T, V>(x + static_cast<int64_t>(m) * k_in + k);
#pragma unroll
        for (int e = 0; e < V; ++e) acc[m] += to_float(xv.v[e]) * wf[e];
      }
    }
  }
  for (int k = k_vec + lane; k < k_in; k += 32) {  // tail, or everything when unaligned
    const float wf = to_float(wrow[k]);
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m < rows) acc[m] += to_float(x[static_cast<int64_t>(m) * k_in + k]) * wf;
    }
  }

  const float b = bias != nullptr ? to_float(bias[n]) : 0.f;
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    const float total = warp_sum(acc[m]);
    if (lane == m && m < rows) y[static_cast<int64_t>(m) * n_out + n] = from_float<T>(total + b);
  }
}

template <typename T, int MT>
void launch(T* y, const T* x, const T* w, const T* bias, int rows, int n_out, int k_in, int k_vec) {
  const auto blocks = static_cast<unsigned>(ceil_div(n_out, kWarps));
  gemv_kernel<T, MT><<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(y, x, w, bias, rows, n_out, k_in,
                                                                                 k_vec);
  EET_CHECK_LAUNCH();
}

void check_gemv_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const char* op = "gemv";
  check_cuda(x, op, "x");
  check_float_dtype(x, op, "x");
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [M, K], got shape ", shape(x.sizes()));
  TORCH_CHECK(x.size(0) <= kMaxRows, op, ": the GEMV kernel handles at most ", num(kMaxRows),
              " rows, got M=", num(x.size(0)), "; eet_pipe.ops.linear uses a matmul for larger M");
  check_like(weight, x, op, "weight", "x");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1), op, ": weight must have shape [N, K=",
              num(x.size(1)), "], got ", shape(weight.sizes()));
  TORCH_CHECK(weight.size(0) <= INT32_MAX && x.size(1) <= INT32_MAX, op, ": weight ", shape(weight.sizes()),
              " is too large");
  if (bias.has_value()) {
    check_like(*bias, x, op, "bias", "x");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias must have shape [N=",
                num(weight.size(0)), "], got ", shape(bias->sizes()));
  }
}

}  // namespace

at::Tensor gemv(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_gemv_args(x, weight, bias);
  const int rows = static_cast<int>(x.size(0));
  const int n_out = static_cast<int>(weight.size(0));
  const int k_in = static_cast<int>(x.size(1));
  at::Tensor y = at::empty({rows, n_out}, x.options());
  if (y.numel() == 0) return y;
  if (k_in == 0) return bias.has_value() ? y.copy_(bias->expand({rows, n_out})) : y.zero_();
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  const int64_t per_load = 16 / static_cast<int64_t>(x.element_size());
  const bool vec = k_in % per_load == 0 && is_aligned(xc.data_ptr(), 16) && is_aligned(wc.data_ptr(), 16);
  const int k_vec = vec ? k_in : 0;
  EET_DISPATCH_FLOAT(x.scalar_type(), "eet_pipe gemv", [&] {
    auto* out = y.data_ptr<scalar_t>();
    const auto* xp = xc.const_data_ptr<scalar_t>();
    const auto* wp = wc.const_data_ptr<scalar_t>();
    const auto* bp = bc.defined() ? bc.const_data_ptr<scalar_t>() : nullptr;
    if (rows <= 1) {
      launch<scalar_t, 1>(out, xp, wp, bp, rows, n_out, k_in, k_vec);
    } else if (rows <= 2) {
      launch<scalar_t, 2>(out, xp, wp, bp, rows, n_out, k_in, k_vec);
    } else if (rows <= 4) {
      launch<scalar_t, 4>(out, xp, wp, bp, rows, n_out, k_in, k_vec);
    } else {
      launch<scalar_t, 8>(out, xp, wp, bp, rows, n_out, k_in, k_vec);
    }
  });
  return y;
}

}  // namespace eet
