// Int8 weight-only dequantisation, w[n, k] = q[n, k] * scale[n] in the scale's dtype: the weight of an int8
// linear with more rows than the GEMV takes, for the tensor-core GEMM that follows. The whole step is the
// copy (1 byte read, 2 written per weight), so each thread moves 16 weights at a time: one 16-byte load of
// int8, 16-byte stores (two in fp16/bf16, four in fp32). Each value is computed as PyTorch's
// `qweight * scale[:, None]` does it (int8 -> fp32 exactly, times the scale in fp32, one rounding), so the kernel
// equals the reference bit for bit.
// The first chunk is loaded before the PDL wait (the codes and scales are constant); nothing is written
// before it.
#include "common.h"
#include "ops.h"

namespace eet {
namespace {

constexpr int kThreads = 256;
constexpr int kPerChunk = 16;  // int8 codes per 16-byte load

// VEC: rows of `cols` a multiple of 16 and 16-byte aligned pointers; else one element per step.
template <typename T, bool VEC>
__global__ void __launch_bounds__(kThreads) dequant_kernel(T* __restrict__ w, const int8_t* __restrict__ q,
                                                           const T* __restrict__ scale, int64_t rows, int64_t cols) {
  pdl_launch_dependents();
  constexpr int kOut = 16 / sizeof(T);  // outputs per 16-byte store
  const int64_t per_row = VEC ? cols / kPerChunk : cols;
  const int64_t total = rows * per_row;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if constexpr (VEC) {
    int4 packed = i < total ? reinterpret_cast<const int4*>(q)[i] : int4{};
    pdl_wait();
    for (; i < total; i += stride) {
      const int64_t next = i + stride;
      const int4 ahead = next < total ? reinterpret_cast<const int4*>(q)[next] : int4{};
      const float s = to_float(scale[i / per_row]);
      const int8_t* v = reinterpret_cast<const int8_t*>(&packed);
      T* out = w + i * kPerChunk;
#pragma unroll
      for (int part = 0; part < kPerChunk / kOut; ++part) {  // 16-byte stores: 2 (fp16/bf16) or 4 (fp32)
        Vec<T, kOut> o;
#pragma unroll
        for (int e = 0; e < kOut; ++e) o.v[e] = from_float<T>(static_cast<float>(v[part * kOut + e]) * s);
        store_vec<T, kOut>(out + part * kOut, o);
      }
      packed = ahead;
    }
  } else {
    pdl_wait();
    for (; i < total; i += stride) {
      w[i] = from_float<T>(static_cast<float>(q[i]) * to_float(scale[i / cols]));
    }
  }
}

}  // namespace

at::Tensor dequantize_int8(const at::Tensor& qweight, const at::Tensor& scale) {
  const char* op = "dequantize_int8";
  check_cuda(qweight, op, "qweight");
  check_dtype(qweight, at::kChar, op, "qweight");
  check_float_dtype(scale, op, "scale");
  TORCH_CHECK(scale.device() == qweight.device(), op, ": scale is on ", scale.device(), " but qweight is on ",
              qweight.device());
  TORCH_CHECK(qweight.dim() == 2, op, ": qweight must be [N, K], got shape ", shape(qweight.sizes()));
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == qweight.size(0), op, ": scale must have shape [N=",
              num(qweight.size(0)), "], got ", shape(scale.sizes()));
  const at::Tensor q = qweight.contiguous(), s = scale.contiguous();
  at::Tensor w = at::empty(q.sizes(), s.options());
  if (w.numel() == 0) return w;
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t rows = q.size(0), cols = q.size(1);
  const bool vec = cols % kPerChunk == 0 && is_aligned(q.data_ptr(), 16) && is_aligned(w.data_ptr(), 16);
  const int64_t items = vec ? w.numel() / kPerChunk : w.numel();
  const dim3 blocks(static_cast<unsigned>(std::min<int64_t>(ceil_div(items, kThreads), 8LL * num_sms())));
  // The first codes are read before the PDL wait: fine for the parameters, not for a copy .contiguous() made.
  const bool overlap = q.data_ptr() == qweight.data_ptr();
  EET_DISPATCH_FLOAT(s.scalar_type(), "eet_pipe dequantize_int8", [&] {
    const auto kernel = vec ? dequant_kernel<scalar_t, true> : dequant_kernel<scalar_t, false>;
    launch_kernel(overlap, kernel, blocks, dim3(kThreads), 0, w.data_ptr<scalar_t>(), q.data_ptr<int8_t>(),
                  s.data_ptr<scalar_t>(), rows, cols);
  });
  return w;
}

}  // namespace eet
