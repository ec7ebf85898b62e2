// The process-wide launch setting of the eet_pipe kernels (common.h: launch_kernel).
#include <atomic>
#include <cstdint>

#include "common.h"
#include "ops.h"

namespace eet {
namespace {
std::atomic<bool> g_pdl{true};
constexpr int kMaxDevices = 64;
std::atomic<int8_t> g_capable[kMaxDevices];  // per device: 0 unknown, 1 yes, -1 no

// Stands for every kernel of this library: all are built with the same architecture flags.
__global__ void probe_kernel() {}

// The device is sm_90+ and the image of this library's code it runs was compiled for compute_90+ (so the
// kernels contain griddepcontrol): cudaFuncAttributes.ptxVersion is the virtual architecture of that image.
bool device_capable() {
  const int device = at::cuda::current_device();
  if (device < 0 || device >= kMaxDevices) return false;
  int8_t known = g_capable[device].load(std::memory_order_relaxed);
  if (known == 0) {
    cudaFuncAttributes attributes{};
    const bool ok = at::cuda::getCurrentDeviceProperties()->major >= 9 &&
                    cudaFuncGetAttributes(&attributes, probe_kernel) == cudaSuccess && attributes.ptxVersion >= 90;
    (void)cudaGetLastError();  // a failed query is an answer (no), not an error for the next launch to report
    known = ok ? 1 : -1;
    g_capable[device].store(known, std::memory_order_relaxed);
  }
  return known > 0;
}
}  // namespace

bool pdl_enabled() { return g_pdl.load(std::memory_order_relaxed) && device_capable(); }

bool set_pdl(std::optional<bool> enabled) {
  return enabled.has_value() ? g_pdl.exchange(*enabled) : g_pdl.load();
}

}  // namespace eet
