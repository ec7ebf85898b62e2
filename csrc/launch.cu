// The process-wide launch setting of the eet_pipe kernels (common.h: launch_kernel).
#include <atomic>

#include "common.h"
#include "ops.h"

namespace eet {
namespace {
std::atomic<bool> g_pdl{true};
}  // namespace

bool pdl_enabled() {
  return g_pdl.load(std::memory_order_relaxed) && at::cuda::getCurrentDeviceProperties()->major >= 9;
}

bool set_pdl(std::optional<bool> enabled) {
  return enabled.has_value() ? g_pdl.exchange(*enabled) : g_pdl.load();
}

}  // namespace eet
