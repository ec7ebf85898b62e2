// qkv_rotary_cache: split the fused qkv projection into heads, apply rotate-half rotary to q and k,
// write k and v into the slot-based KV cache, return q as [B, Hq, T, D].
// One thread handles VEC consecutive elements of one head (and, with rotary, their partners D/2 away).
#include "common.h"
#include "ops.h"

namespace eet {
namespace {

constexpr int kThreads = 256;

struct QkvArgs {
  const void* qkv;  // [B, T, (Hq + 2 Hkv) D] contiguous
  void* q;          // [B, Hq, T, D] contiguous
  void* k_cache;    // [S, Hkv, L, D], last dim contiguous
  void* v_cache;
  const void* cos;  // [B * T, D] rows, or a [P, D] table indexed by positions
  const void* sin;
  const int64_t* positions;  // [B * T] or null
  const int64_t* slots;      // [B]
  const int64_t* write_index;  // [B * T]
  int64_t rows;  // B * T
  int64_t table_rows;  // P (only with positions)
  int64_t num_slots, cache_len;
  int64_t k_stride[3], v_stride[3];  // slot, head, column strides in elements
  int tokens, num_heads, num_kv_heads, head_dim;
};

template <typename T, typename C, int V, bool ROTARY>
__global__ void qkv_rotary_cache_kernel(const QkvArgs a) {
  pdl_launch_dependents();
  pdl_wait();
  const int heads = a.num_heads + 2 * a.num_kv_heads;
  const int half = a.head_dim / 2;
  const int chunks = (ROTARY ? half : a.head_dim) / V;
  const int64_t total = a.rows * heads * chunks;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
    const int d0 = static_cast<int>(idx % chunks) * V;
    const int64_t rest = idx / chunks;
    const int head = static_cast<int>(rest % heads);
    const int64_t bt = rest / heads;
    const int64_t b = bt / a.tokens;
    const T* src = static_cast<const T*>(a.qkv) + (bt * heads + head) * a.head_dim;
    T* dst;
    if (head < a.num_heads) {
      dst = static_cast<T*>(a.q) + ((b * a.num_heads + head) * a.tokens + bt % a.tokens) * a.head_dim;
    } else {
      const int64_t slot = a.slots[b];
      const int64_t col = a.write_index[bt];
      CUDA_KERNEL_ASSERT(slot >= 0 && slot < a.num_slots && "qkv_rotary_cache: slot out of range");
      CUDA_KERNEL_ASSERT(col >= 0 && col < a.cache_len && "qkv_rotary_cache: write_index out of range");
      const bool is_v = head >= a.num_heads + a.num_kv_heads;
      const int kv_head = head - a.num_heads - (is_v ? a.num_kv_heads : 0);
      const int64_t* s = is_v ? a.v_stride : a.k_stride;
      dst = static_cast<T*>(is_v ? a.v_cache : a.k_cache) + slot * s[0] + kv_head * s[1] + col * s[2];
    }
    const Vec<T, V> x0 = load_vec<T, V>(src + d0);
    if (!ROTARY) {
      store_vec<T, V>(dst + d0, x0);
      continue;
    }
    const Vec<T, V> x1 = load_vec<T, V>(src + d0 + half);
    if (head >= a.num_heads + a.num_kv_heads) {  // v: plain copy of both halves
      store_vec<T, V>(dst + d0, x0);
      store_vec<T, V>(dst + d0 + half, x1);
      continue;
    }
    int64_t row = bt;
    if (a.positions != nullptr) {
      row = a.positions[bt];
      CUDA_KERNEL_ASSERT(row >= 0 && row < a.table_rows && "qkv_rotary_cache: position outside the cos/sin table");
    }
    const C* cos = static_cast<const C*>(a.cos) + row * a.head_dim + d0;
    const C* sin = static_cast<const C*>(a.sin) + row * a.head_dim + d0;
    Vec<T, V> o0, o1;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      // cos/sin are rounded to the activation dtype first, as the reference does.
      const float c0 = round_to<T>(to_float(cos[e])), c1 = round_to<T>(to_float(cos[e + half]));
      const float s0 = round_to<T>(to_float(sin[e])), s1 = round_to<T>(to_float(sin[e + half]));
      const float v0 = to_float(x0.v[e]), v1 = to_float(x1.v[e]);
      o0.v[e] = from_float<T>(v0 * c0 - v1 * s0);
      o1.v[e] = from_float<T>(v1 * c1 + v0 * s1);
    }
    store_vec<T, V>(dst + d0, o0);
    store_vec<T, V>(dst + d0 + half, o1);
  }
}

template <typename T, typename C, int V, bool ROTARY>
void launch(const QkvArgs& a) {
  const int heads = a.num_heads + 2 * a.num_kv_heads;
  const int64_t chunks = (ROTARY ? a.head_dim / 2 : a.head_dim) / V;
  const int64_t total = a.rows * heads * chunks;
  const int64_t blocks = std::min<int64_t>(ceil_div(total, kThreads), static_cast<int64_t>(num_sms()) * 32);
  launch_kernel(qkv_rotary_cache_kernel<T, C, V, ROTARY>, dim3(static_cast<unsigned>(blocks)), dim3(kThreads), 0, a);
}

// 16-byte vectors need every row start aligned: pointers and strides multiples of 16 bytes.
template <typename T>
bool can_vectorize(const QkvArgs& a, bool rotary) {
  constexpr int V = 16 / sizeof(T);
  bool ok = (rotary ? a.head_dim / 2 : a.head_dim) % V == 0;
  for (const void* p : {a.qkv, static_cast<const void*>(a.q), static_cast<const void*>(a.k_cache),
                        static_cast<const void*>(a.v_cache)}) {
    ok = ok && is_aligned(p, 16);
  }
  for (int i = 0; i < 3; ++i) ok = ok && a.k_stride[i] % V == 0 && a.v_stride[i] % V == 0;
  return ok;
}

template <typename T, typename C, bool ROTARY>
void launch_vec(const QkvArgs& a) {
  if (can_vectorize<T>(a, ROTARY)) {
    launch<T, C, 16 / sizeof(T), ROTARY>(a);
  } else {
    launch<T, C, 1, ROTARY>(a);
  }
}

void check_cache(const at::Tensor& cache, const at::Tensor& qkv, const char* name, int64_t kv_heads, int64_t dim) {
  const char* op = "qkv_rotary_cache";
  check_like(cache, qkv, op, name, "qkv");
  TORCH_CHECK(cache.dim() == 4 && cache.size(1) == kv_heads && cache.size(3) == dim, op, ": ", name,
              " must have shape [slots, num_kv_heads=", num(kv_heads), ", max_len, head_dim=", num(dim),
              "], got ", shape(cache.sizes()));
  TORCH_CHECK(cache.stride(3) == 1, op, ": ", name, " must be contiguous in its last dimension");
}

// cos/sin: [B, T, D] per token, or [P, D] tables with positions [B, T].
void check_rotary(const at::Tensor& qkv, const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
                  const std::optional<at::Tensor>& positions, int64_t dim) {
  const char* op = "qkv_rotary_cache";
  TORCH_CHECK(cos.has_value() && sin.has_value(), op, ": rotary=True needs cos and sin");
  TORCH_CHECK(dim % 2 == 0, op, ": rotary needs an even head_dim, got ", num(dim));
  for (const auto* t : {&*cos, &*sin}) {
    TORCH_CHECK(t->device() == qkv.device(), op, ": cos/sin are on ", t->device(), " but qkv is on ", qkv.device());
    TORCH_CHECK(t->scalar_type() == at::kFloat || t->scalar_type() == qkv.scalar_type(), op,
                ": cos/sin must be float32 or qkv's dtype ", qkv.scalar_type(), ", got ", t->scalar_type());
  }
  TORCH_CHECK(cos->scalar_type() == sin->scalar_type() && cos->sizes() == sin->sizes(), op,
              ": cos and sin must have the same dtype and shape, got ", cos->scalar_type(), shape(cos->sizes()),
              " and ", sin->scalar_type(), shape(sin->sizes()));
  if (positions.has_value()) {
    check_index(*positions, qkv, op, "positions");
    TORCH_CHECK(positions->dim() == 2 && positions->size(0) == qkv.size(0) && positions->size(1) == qkv.size(1), op,
                ": positions must have shape [B, T] = [", num(qkv.size(0)), ", ", num(qkv.size(1)), "], got ",
                shape(positions->sizes()));
    TORCH_CHECK(cos->dim() == 2 && cos->size(1) == dim, op, ": with positions, cos/sin must be tables [P, ", num(dim),
                "], got ", shape(cos->sizes()));
  } else {
    TORCH_CHECK(cos->dim() == 3 && cos->size(0) == qkv.size(0) && cos->size(1) == qkv.size(1) && cos->size(2) == dim,
                op, ": cos/sin must have shape [B, T, D] = [", num(qkv.size(0)), ", ", num(qkv.size(1)), ", ", num(dim),
                "] (or pass positions with [P, D] tables), got ", shape(cos->sizes()));
  }
}

}  // namespace

at::Tensor qkv_rotary_cache(const at::Tensor& qkv, const std::optional<at::Tensor>& cos,
                            const std::optional<at::Tensor>& sin, at::Tensor& k_cache, at::Tensor& v_cache,
                            const at::Tensor& slots, const at::Tensor& write_index, int64_t num_heads,
                            int64_t num_kv_heads, int64_t head_dim, bool rotary,
                            const std::optional<at::Tensor>& positions) {
  const char* op = "qkv_rotary_cache";
  check_cuda(qkv, op, "qkv");
  check_float_dtype(qkv, op, "qkv");
  TORCH_CHECK(num_heads > 0 && num_kv_heads > 0 && head_dim > 0, op, ": num_heads=", num(num_heads),
              ", num_kv_heads=", num(num_kv_heads), ", head_dim=", num(head_dim), " must all be positive");
  const int64_t width = (num_heads + 2 * num_kv_heads) * head_dim;
  TORCH_CHECK(qkv.dim() == 3 && qkv.size(2) == width, op, ": qkv must have shape [B, T, (num_heads + 2 * ",
              "num_kv_heads) * head_dim = ", num(width), "], got ", shape(qkv.sizes()));
  const int64_t batch = qkv.size(0), tokens = qkv.size(1);
  check_cache(k_cache, qkv, "k_cache", num_kv_heads, head_dim);
  check_cache(v_cache, qkv, "v_cache", num_kv_heads, head_dim);
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), op, ": v_cache has shape ", shape(v_cache.sizes()),
              " but k_cache has shape ", shape(k_cache.sizes()));
  check_index(slots, qkv, op, "slots");
  check_index(write_index, qkv, op, "write_index");
  TORCH_CHECK(slots.dim() == 1 && slots.size(0) == batch, op, ": slots must have shape [B] = [", num(batch), "], got ",
              shape(slots.sizes()));
  TORCH_CHECK(write_index.dim() == 2 && write_index.size(0) == batch && write_index.size(1) == tokens, op,
              ": write_index must have shape [B, T] = [", num(batch), ", ", num(tokens), "], got ",
              shape(write_index.sizes()));
  if (rotary) check_rotary(qkv, cos, sin, positions, head_dim);

  at::Tensor q = at::empty({batch, num_heads, tokens, head_dim}, qkv.options());
  if (q.numel() == 0) return q;
  const c10::cuda::CUDAGuard guard(qkv.device());
  const at::Tensor qkv_c = qkv.contiguous(), slots_c = slots.contiguous(), write_c = write_index.contiguous();
  at::Tensor cos_c, sin_c, pos_c;
  if (rotary) {
    cos_c = cos->contiguous();
    sin_c = sin->contiguous();
    if (positions.has_value()) pos_c = positions->contiguous();
  }
  QkvArgs a{};
  a.qkv = qkv_c.data_ptr();
  a.q = q.data_ptr();
  a.k_cache = k_cache.data_ptr();
  a.v_cache = v_cache.data_ptr();
  a.cos = rotary ? cos_c.data_ptr() : nullptr;
  a.sin = rotary ? sin_c.data_ptr() : nullptr;
  a.positions = pos_c.defined() ? pos_c.const_data_ptr<int64_t>() : nullptr;
  a.table_rows = rotary ? cos_c.size(0) : 0;
  a.slots = slots_c.const_data_ptr<int64_t>();
  a.write_index = write_c.const_data_ptr<int64_t>();
  a.rows = batch * tokens;
  a.num_slots = k_cache.size(0);
  a.cache_len = k_cache.size(2);
  for (int i = 0; i < 3; ++i) {
    a.k_stride[i] = k_cache.stride(i);
    a.v_stride[i] = v_cache.stride(i);
  }
  a.tokens = static_cast<int>(tokens);
  a.num_heads = static_cast<int>(num_heads);
  a.num_kv_heads = static_cast<int>(num_kv_heads);
  a.head_dim = static_cast<int>(head_dim);
  EET_DISPATCH_FLOAT(qkv.scalar_type(), "eet_pipe qkv_rotary_cache", [&] {
    if (!rotary) {
      launch_vec<scalar_t, scalar_t, false>(a);
    } else if (cos_c.scalar_type() == at::kFloat) {
      launch_vec<scalar_t, float, true>(a);
    } else {
      launch_vec<scalar_t, scalar_t, true>(a);
    }
  });
  return q;
}

}  // namespace eet
