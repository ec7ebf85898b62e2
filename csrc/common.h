// Shared helpers for the eet_pipe CUDA kernels: dtype dispatch, launches, vector loads, warp/block reductions,
// and (checks.h) the host-side argument checks. Everything here is header-only and used by every .cu file.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>
#include <string>

#include "checks.h"

namespace eet {

inline int num_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// Dispatch over the three float dtypes the kernels support (fp32, fp16, bf16).
#define EET_DISPATCH_FLOAT(TYPE, NAME, ...)                      \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                 \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

// ---------------------------------------------------------------- launches
// Programmatic dependent launch (PDL, sm_90+). A kernel launched with it may start while the kernel before
// it in the stream still runs -- once every block of that one has executed pdl_launch_dependents() -- and
// must execute pdl_wait() (which returns when the earlier kernel has finished and its writes are visible)
// before it reads or writes any memory an earlier kernel reads or writes. Every kernel here releases its
// successor first thing and waits before its first such access, so one kernel's launch latency and block
// start-up hide behind the one before; the GEMV also streams its first weights (constant, written at load)
// before it waits. A decode step is some 400 kernels of 2-10 us each, so the gaps are a large share of it.
// Without the launch attribute (set_pdl(false), a GPU before sm_90) both instructions do nothing and
// ordering is the stream's usual one. Kernels of other libraries in the stream keep their full ordering.

// Whether launches ask for PDL: set_pdl (ops.h; on by default) and the current device is sm_90+ and runs code
// of this library compiled for compute_90+ (a build for an older virtual architecture, JIT-compiled by the
// driver, lacks the griddepcontrol instructions, so its kernels must keep full stream ordering).
bool pdl_enabled();
// set_pdl turns it on or off for kernels launched from then on; CUDA graphs keep what they captured.

// Launches `kernel` on the current stream, with PDL when `overlap` and pdl_enabled(); checks the launch.
// overlap = false: the kernel starts only after the previous one has finished (for a kernel that reads
// something before its pdl_wait() which the kernel just before it may have written).
template <typename... Params, typename... Args>
void launch_kernel(bool overlap, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, Args... args) {
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = at::cuda::getCurrentCUDAStream();
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  config.attrs = &attribute;
  config.numAttrs = overlap && pdl_enabled() ? 1 : 0;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, static_cast<Params>(args)...));
}

template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, Args... args) {
  launch_kernel(true, kernel, grid, block, smem, args...);
}

// ---------------------------------------------------------------- device-side helpers

// Let the next kernel in the stream start (PDL; see launch_kernel).
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Wait until the kernels before this one have finished and their writes are visible (PDL).
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// N elements of T loaded/stored as one aligned access (N * sizeof(T) <= 16 bytes).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* ptr) {
  return *reinterpret_cast<const Vec<T, N>*>(ptr);
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* ptr, const Vec<T, N>& value) {
  *reinterpret_cast<Vec<T, N>*>(ptr) = value;
}

template <typename T>
__device__ __forceinline__ float to_float(T x) {
  return static_cast<float>(x);
}

template <typename T>
__device__ __forceinline__ T from_float(float x) {
  return static_cast<T>(x);
}

// Round through T and back: what a PyTorch op in dtype T would have stored.
template <typename T>
__device__ __forceinline__ float round_to(float x) {
  return static_cast<float>(static_cast<T>(x));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block; every thread gets the total. blockDim.x must be a multiple of 32.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float partial[32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // a previous call may still be reading `partial`
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  float total = 0.f;
  const int warps = blockDim.x >> 5;
  for (int i = 0; i < warps; ++i) total += partial[i];
  return total;
}

}  // namespace eet
