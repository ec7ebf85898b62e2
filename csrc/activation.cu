// Element-wise activations: act(x), act(x + bias) and act(gate) * up. Computed in fp32 and rounded
// once; 16-byte vectors over the aligned body, scalar loop over the tail (or everything if unaligned).
#include <string>

#include "activation.h"
#include "common.h"
#include "ops.h"

namespace eet {
namespace {

constexpr int kThreads = 256;

// out = act(a [+ bias]) [* b]. `b` (GATED) and `bias` (BIAS) are unused otherwise.
template <typename T, Act A, bool GATED, bool BIAS>
__device__ __forceinline__ float compute(T a, T b, T bias) {
  float v = to_float(a);
  if constexpr (BIAS) v += to_float(bias);
  v = apply<A>(v);
  if constexpr (GATED) v *= to_float(b);
  return v;
}

// n elements; the first n_vec * VEC go through 16-byte vectors. Bias is indexed by i % cols.
template <typename T, Act A, bool GATED, bool BIAS>
__global__ void eltwise_kernel(T* __restrict__ out, const T* __restrict__ a, const T* __restrict__ b,
                               const T* __restrict__ bias, int64_t n, int64_t n_vec, int64_t cols) {
  constexpr int VEC = 16 / sizeof(T);
  pdl_launch_dependents();
  pdl_wait();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t i = first; i < n_vec; i += stride) {
    const Vec<T, VEC> av = load_vec<T, VEC>(a + i * VEC);
    Vec<T, VEC> bv, biasv, ov;
    if constexpr (GATED) bv = load_vec<T, VEC>(b + i * VEC);
    if constexpr (BIAS) biasv = load_vec<T, VEC>(bias + (i * VEC) % cols);
#pragma unroll
    for (int e = 0; e < VEC; ++e) ov.v[e] = from_float<T>(compute<T, A, GATED, BIAS>(av.v[e], bv.v[e], biasv.v[e]));
    store_vec<T, VEC>(out + i * VEC, ov);
  }
  for (int64_t i = n_vec * VEC + first; i < n; i += stride) {
    const T bi = GATED ? b[i] : T(0.f);
    const T biasi = BIAS ? bias[i % cols] : T(0.f);
    out[i] = from_float<T>(compute<T, A, GATED, BIAS>(a[i], bi, biasi));
  }
}

template <typename T, bool GATED, bool BIAS>
void launch(Act act, T* out, const T* a, const T* b, const T* bias, int64_t n, int64_t cols) {
  constexpr int VEC = 16 / sizeof(T);
  bool vec = is_aligned(out, 16) && is_aligned(a, 16) && (!GATED || is_aligned(b, 16)) &&
             (!BIAS || (is_aligned(bias, 16) && cols % VEC == 0));
  const int64_t n_vec = vec ? n / VEC : 0;
  const int64_t work = std::max<int64_t>(n_vec, n - n_vec * VEC);
  const int64_t blocks = std::min<int64_t>(ceil_div(work, kThreads), static_cast<int64_t>(num_sms()) * 32);
  switch (act) {
#define EET_ACT_CASE(ACT)                                                                                 \
  case ACT:                                                                                               \
    launch_kernel(eltwise_kernel<T, ACT, GATED, BIAS>, dim3(static_cast<unsigned>(blocks)), dim3(kThreads), 0, \
                  out, a, b, bias, n, n_vec, cols);                                                       \
    break;
    EET_ACT_CASE(Act::kNone)
    EET_ACT_CASE(Act::kGelu)
    EET_ACT_CASE(Act::kGeluNew)
    EET_ACT_CASE(Act::kRelu)
    EET_ACT_CASE(Act::kSilu)
    EET_ACT_CASE(Act::kGeluTanh)
#undef EET_ACT_CASE
  }
}

template <bool GATED, bool BIAS>
at::Tensor run(Act act, const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias) {
  at::Tensor out = at::empty_like(a);
  if (a.numel() == 0) return out;
  const c10::cuda::CUDAGuard guard(a.device());
  const int64_t cols = a.dim() > 0 ? a.size(-1) : 1;
  EET_DISPATCH_FLOAT(a.scalar_type(), "eet_pipe activation", [&] {
    launch<scalar_t, GATED, BIAS>(act, out.data_ptr<scalar_t>(), a.const_data_ptr<scalar_t>(),
                                  GATED ? b.const_data_ptr<scalar_t>() : nullptr,
                                  BIAS ? bias.const_data_ptr<scalar_t>() : nullptr, a.numel(), cols);
  });
  return out;
}

}  // namespace

at::Tensor activation(const at::Tensor& x, const std::string& kind) {
  const Act act = parse_activation(kind, "activation");
  check_cuda(x, "activation", "x");
  check_float_dtype(x, "activation", "x");
  return run<false, false>(act, x.contiguous(), at::Tensor(), at::Tensor());
}

at::Tensor bias_activation(const at::Tensor& x, const at::Tensor& bias, const std::string& kind) {
  const Act act = parse_activation(kind, "bias_activation");
  check_cuda(x, "bias_activation", "x");
  check_float_dtype(x, "bias_activation", "x");
  check_like(bias, x, "bias_activation", "bias", "x");
  TORCH_CHECK(x.dim() >= 1 && bias.dim() == 1 && bias.size(0) == x.size(-1),
              "bias_activation: bias must have shape [x.size(-1)] = [", num(x.dim() >= 1 ? x.size(-1) : 0),
              "], got ", shape(bias.sizes()));
  return run<false, true>(act, x.contiguous(), at::Tensor(), bias.contiguous());
}

at::Tensor gated_activation(const at::Tensor& gate, const at::Tensor& up, const std::string& kind) {
  const Act act = parse_gated(kind);
  check_cuda(gate, "gated_activation", "gate");
  check_float_dtype(gate, "gated_activation", "gate");
  check_like(up, gate, "gated_activation", "up", "gate");
  TORCH_CHECK(up.sizes() == gate.sizes(), "gated_activation: up has shape ", shape(up.sizes()),
              " but gate has shape ", shape(gate.sizes()));
  return run<true, false>(act, gate.contiguous(), up.contiguous(), at::Tensor());
}

}  // namespace eet
