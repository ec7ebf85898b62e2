// decode_attention: one query token per sequence against its KV-cache slot (flash-decoding).
//
// Grid (B * Hq, splits): each block handles one query head over one chunk of cache columns.
// Inside a block, groups of TPK lanes each own a few keys per round (16-byte loads of K and V), keep
// an online softmax (running max m, sum l, accumulator) and are merged through shared memory.
// With splits > 1 every block writes a normalised partial output and its log-sum-exp (base 2) and a
// second kernel combines them. Keys are columns j < lengths[b] with valid[slot, j]; a sequence with
// no such key gets zeros. All arithmetic in fp32. decode_attention_qkv reads q from the fused qkv projection
// and takes the step's own k and v from it too (as column write_index[b]); one block per kv group stores them
// in the cache, which spares the split-and-scatter kernel (qkv_rotary_cache) of a decode step without rotary.
#include <cmath>

#include "common.h"
#include "ops.h"

namespace eet {
namespace {

constexpr int kThreads = 256;
constexpr int kMinChunk = 256;  // fewest keys worth a split (a split costs the combine kernel, about two rounds of keys)
constexpr int kMaxSplits = 64;
constexpr int kMaxHeadDim = 256;
constexpr double kLog2e = 1.4426950408889634;

struct DecodeArgs {
  const void* q;  // row b, head h at q + b * q_stride + h * D
  int64_t q_stride;  // Hq * D ([B, Hq, D] contiguous), or the fused projection's width (decode_attention_qkv)
  // decode_attention_qkv: sequence b's new key and value (its kv head g at k_new + b * q_stride + g * D), which go
  // to cache column write_index[b] of its slot; null otherwise.
  const int64_t* write_index;
  const void* k_new;
  const void* v_new;
  const void* k;  // [S, Hkv, L, D] strided, last dim contiguous
  const void* v;
  void* out;  // [B, Hq, D] contiguous
  float* part_out;  // [B * Hq, splits, D] (splits > 1)
  float* part_lse;  // [B * Hq, splits]
  const int64_t* slots;
  const int64_t* lengths;
  const bool* valid;  // [S, L] strided
  int64_t k_stride[3], v_stride[3], valid_stride[2];
  int64_t num_slots;
  int num_heads, group, head_dim, cache_len, chunk, splits;
  float scale_log2;  // softmax scale * log2(e): scores live in the base-2 domain
};

template <typename T, int TPK, int NVPL>
__global__ void __launch_bounds__(kThreads) decode_attention_kernel(const DecodeArgs a) {
  constexpr int VEC = 16 / sizeof(T);
  constexpr int E = VEC * NVPL;  // elements of the head dim each lane holds
  extern __shared__ float smem[];  // [groups * D] accumulators, [groups] max, sum, weight
  pdl_launch_dependents();
  pdl_wait();

  const int bh = blockIdx.x, split = blockIdx.y;
  const int b = bh / a.num_heads, h = bh % a.num_heads, g = h / a.group;
  const int D = a.head_dim, nv = D / VEC;
  const int lane = threadIdx.x % TPK, kgroup = threadIdx.x / TPK, groups = blockDim.x / TPK;
  // The per-sequence values are loaded together, before any check: a load after an assert's branch waits for
  // the loads before it, and every key's address depends on these.
  const int64_t slot = a.slots[b];
  const int64_t length = a.lengths[b];
  const int64_t col = a.write_index != nullptr ? a.write_index[b] : -1;
  CUDA_KERNEL_ASSERT(slot >= 0 && slot < a.num_slots && "decode_attention: slot out of range");
  const int len = static_cast<int>(min(max(length, int64_t{0}), static_cast<int64_t>(a.cache_len)));
  const int start = split * a.chunk, end = min(start + a.chunk, len);

  float qr[E], acc[E];
  const T* q = static_cast<const T*>(a.q) + b * a.q_stride + static_cast<int64_t>(h) * D;
#pragma unroll
  for (int i = 0; i < NVPL; ++i) {
    const int vi = lane + i * TPK;
    Vec<T, VEC> qv;
    if (vi < nv) qv = load_vec<T, VEC>(q + vi * VEC);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      qr[i * VEC + e] = vi < nv ? to_float(qv.v[e]) * a.scale_log2 : 0.f;
      acc[i * VEC + e] = 0.f;
    }
  }

  const T* kbase = static_cast<const T*>(a.k) + slot * a.k_stride[0] + g * a.k_stride[1];
  const T* vbase = static_cast<const T*>(a.v) + slot * a.v_stride[0] + g * a.v_stride[1];
  // decode_attention_qkv: column `fresh` is this step's key and value, read from the projection (k_new, v_new);
  // the first query head of the kv group, in the split that holds the column, also stores them in the cache.
  // No block reads that column from the cache, so the store races with nothing.
  int fresh = -1;
  const T* knew = nullptr;
  const T* vnew = nullptr;
  if (a.write_index != nullptr) {
    CUDA_KERNEL_ASSERT(col >= 0 && col < a.cache_len && "decode_attention_qkv: write_index out of range");
    fresh = static_cast<int>(col);
    knew = static_cast<const T*>(a.k_new) + b * a.q_stride + static_cast<int64_t>(g) * D;
    vnew = static_cast<const T*>(a.v_new) + b * a.q_stride + static_cast<int64_t>(g) * D;
    if (h % a.group == 0 && split == min(fresh / a.chunk, a.splits - 1)) {
      T* kdst = const_cast<T*>(kbase) + col * a.k_stride[2];
      T* vdst = const_cast<T*>(vbase) + col * a.v_stride[2];
      for (int d = threadIdx.x; d < D; d += blockDim.x) {
        kdst[d] = knew[d];
        vdst[d] = vnew[d];
      }
    }
  }
  const bool* valid = a.valid + slot * a.valid_stride[0];
  const unsigned mask = TPK == 32 ? 0xffffffffu : (((1u << TPK) - 1u) << ((threadIdx.x & 31) / TPK * TPK));
  // Each key group takes U keys per round (j0, j0 + groups, ...): all their K, V and mask loads are issued
  // before any is used, so a round costs one memory latency instead of U. One key per round left GPT-2 XL's
  // decode at batch 64 latency-bound (5 dependent loads per group over 160 columns).
  constexpr int U = NVPL == 1 ? 4 : 2;
  float m = -INFINITY, l = 0.f;
  for (int j0 = start + kgroup; j0 < end; j0 += groups * U) {
    bool keep[U];
    Vec<T, VEC> kv[U][NVPL], vv[U][NVPL];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = j0 + u * groups;
      // The mask is loaded with K and V, not before them: a branch on it would put a second memory latency in
      // front of the keys. A masked key's score is computed and dropped (j < end <= cache_len: in bounds).
      keep[u] = j < end && valid[j * a.valid_stride[1]];  // uniform across the TPK lanes of this key
#pragma unroll
      for (int i = 0; i < NVPL; ++i) {
        const int vi = lane + i * TPK;
        if (j < end && vi < nv) {
          const bool is_new = j == fresh;
          kv[u][i] = load_vec<T, VEC>((is_new ? knew : kbase + j * a.k_stride[2]) + vi * VEC);
          vv[u][i] = load_vec<T, VEC>((is_new ? vnew : vbase + j * a.v_stride[2]) + vi * VEC);
        } else {
#pragma unroll
          for (int e = 0; e < VEC; ++e) kv[u][i].v[e] = vv[u][i].v[e] = from_float<T>(0.f);
        }
      }
    }
    float s[U];
    float m_new = m;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      s[u] = 0.f;
#pragma unroll
      for (int i = 0; i < NVPL; ++i) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) s[u] += qr[i * VEC + e] * to_float(kv[u][i].v[e]);
      }
#pragma unroll
      for (int offset = TPK / 2; offset > 0; offset >>= 1) s[u] += __shfl_xor_sync(mask, s[u], offset);
      if (keep[u]) m_new = fmaxf(m_new, s[u]);
    }
    if (m_new == -INFINITY) continue;  // no kept key in this round (nor before it)
    const float corr = exp2f(m - m_new);  // 0 while m is -inf
    l *= corr;
#pragma unroll
    for (int e = 0; e < E; ++e) acc[e] *= corr;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (!keep[u]) continue;
      const float p = exp2f(s[u] - m_new);
      l += p;
#pragma unroll
      for (int i = 0; i < NVPL; ++i) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[i * VEC + e] += p * to_float(vv[u][i].v[e]);
      }
    }
    m = m_new;
  }

  // Merge the key groups of this block.
  float* red_acc = smem;
  float* red_m = smem + groups * D;
  float* red_l = red_m + groups;
  float* red_w = red_l + groups;
#pragma unroll
  for (int i = 0; i < NVPL; ++i) {
    const int vi = lane + i * TPK;
    if (vi < nv) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) red_acc[kgroup * D + vi * VEC + e] = acc[i * VEC + e];
    }
  }
  if (lane == 0) {
    red_m[kgroup] = m;
    red_l[kgroup] = l;
  }
  __syncthreads();
  float mx = -INFINITY;
  for (int k = 0; k < groups; ++k) mx = fmaxf(mx, red_m[k]);
  if (threadIdx.x < groups) {
    red_w[threadIdx.x] = red_m[threadIdx.x] == -INFINITY ? 0.f : exp2f(red_m[threadIdx.x] - mx);
  }
  __syncthreads();
  float total = 0.f;
  for (int k = 0; k < groups; ++k) total += red_l[k] * red_w[k];
  const float inv = total > 0.f ? 1.f / total : 0.f;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float o = 0.f;
    for (int k = 0; k < groups; ++k) o += red_w[k] == 0.f ? 0.f : red_acc[k * D + d] * red_w[k];
    if (a.splits == 1) {
      static_cast<T*>(a.out)[static_cast<int64_t>(bh) * D + d] = from_float<T>(o * inv);
    } else {
      a.part_out[(static_cast<int64_t>(bh) * a.splits + split) * D + d] = o * inv;
    }
  }
  if (a.splits > 1 && threadIdx.x == 0) {
    a.part_lse[static_cast<int64_t>(bh) * a.splits + split] = total > 0.f ? mx + log2f(total) : -INFINITY;
  }
}

// Second pass: out = sum_s 2^(lse_s - max) * o_s / sum_s 2^(lse_s - max); empty splits have lse -inf.
template <typename T>
__global__ void decode_combine_kernel(const DecodeArgs a) {
  pdl_launch_dependents();
  pdl_wait();
  const int bh = blockIdx.x;
  const float* lse = a.part_lse + static_cast<int64_t>(bh) * a.splits;
  float mx = -INFINITY;
  for (int s = 0; s < a.splits; ++s) mx = fmaxf(mx, lse[s]);
  float total = 0.f;
  for (int s = 0; s < a.splits; ++s) total += lse[s] == -INFINITY ? 0.f : exp2f(lse[s] - mx);
  const float inv = total > 0.f ? 1.f / total : 0.f;
  for (int d = threadIdx.x; d < a.head_dim; d += blockDim.x) {
    float o = 0.f;
    for (int s = 0; s < a.splits; ++s) {
      if (lse[s] != -INFINITY) {
        o += exp2f(lse[s] - mx) * a.part_out[(static_cast<int64_t>(bh) * a.splits + s) * a.head_dim + d];
      }
    }
    static_cast<T*>(a.out)[static_cast<int64_t>(bh) * a.head_dim + d] = from_float<T>(o * inv);
  }
}

template <typename T, int TPK, int NVPL>
void launch(const DecodeArgs& a, int64_t batch_heads) {
  // Many blocks (decode of a large batch): half-size blocks. A 256-thread block fits 3-4 times per SM, so
  // GPT-2 XL at batch 64 (1600 blocks) ran in over 3 waves, and each block's merge walks 32 key groups for a
  // few keys each. 128 threads fit twice as often and merge 16 groups. Few blocks (one sequence) keep 256
  // threads: there the rounds of keys per group, walked one after another, are the latency.
  const int64_t blocks = batch_heads * a.splits;
  const int threads = blocks >= 4 * static_cast<int64_t>(num_sms()) ? kThreads / 2 : kThreads;
  const int groups = threads / TPK;
  const size_t smem = (static_cast<size_t>(groups) * a.head_dim + 3 * groups) * sizeof(float);
  const dim3 grid(static_cast<unsigned>(batch_heads), static_cast<unsigned>(a.splits));
  launch_kernel(decode_attention_kernel<T, TPK, NVPL>, grid, dim3(threads), smem, a);
  if (a.splits > 1) {
    const int combine_threads = static_cast<int>(ceil_div(a.head_dim, 32) * 32);
    launch_kernel(decode_combine_kernel<T>, dim3(static_cast<unsigned>(batch_heads)), dim3(combine_threads), 0, a);
  }
}

// Lanes per key: enough 16-byte vectors to cover D (8, 16 or 32 lanes, 1 or 2 vectors per lane).
template <typename T>
void dispatch_lanes(const DecodeArgs& a, int64_t batch_heads) {
  const int nv = a.head_dim / (16 / static_cast<int>(sizeof(T)));
  if (nv <= 8) {
    launch<T, 8, 1>(a, batch_heads);
  } else if (nv <= 16) {
    launch<T, 16, 1>(a, batch_heads);
  } else if (nv <= 32) {
    launch<T, 32, 1>(a, batch_heads);
  } else {
    launch<T, 32, 2>(a, batch_heads);
  }
}

// Enough blocks to fill the GPU twice, but at least kMinChunk columns per split.
void plan_splits(DecodeArgs& a, int64_t batch_heads) {
  const int64_t wanted = ceil_div(2 * static_cast<int64_t>(num_sms()), batch_heads);
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>({wanted, ceil_div(a.cache_len, kMinChunk), kMaxSplits}));
  a.chunk = static_cast<int>(ceil_div(a.cache_len, splits));
  a.splits = static_cast<int>(ceil_div(a.cache_len, a.chunk));
}

void check_decode_args(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                       const at::Tensor& slots, const at::Tensor& lengths, const at::Tensor& valid) {
  const char* op = "decode_attention";
  check_cuda(q, op, "q");
  check_float_dtype(q, op, "q");
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1, op, ": q must have shape [B, Hq, 1, D] (one token per sequence), got ",
              shape(q.sizes()));
  const int64_t dim = q.size(3);
  TORCH_CHECK(dim > 0 && dim % 8 == 0 && dim <= kMaxHeadDim, op, ": head dim must be a multiple of 8 and at most ",
              num(kMaxHeadDim), ", got ", num(dim));
  for (const auto& [cache, name] : {std::pair{&k_cache, "k_cache"}, std::pair{&v_cache, "v_cache"}}) {
    check_like(*cache, q, op, name, "q");
    TORCH_CHECK(cache->dim() == 4 && cache->size(3) == dim && cache->size(2) > 0, op, ": ", name,
                " must have shape [S, Hkv, L > 0, D=", num(dim), "], got ", shape(cache->sizes()));
    TORCH_CHECK(cache->stride(3) == 1 && is_aligned(cache->data_ptr(), 16), op, ": ", name,
                " must be contiguous in its last dimension and 16-byte aligned");
    const int64_t vec = 16 / cache->element_size();
    TORCH_CHECK(cache->stride(0) % vec == 0 && cache->stride(1) % vec == 0 && cache->stride(2) % vec == 0, op, ": ",
                name, " strides ", shape(cache->strides()), " must be multiples of ", num(vec), " elements (16 bytes)");
  }
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), op, ": v_cache has shape ", shape(v_cache.sizes()),
              " but k_cache has shape ", shape(k_cache.sizes()));
  TORCH_CHECK(q.size(1) % k_cache.size(1) == 0, op, ": query heads (", num(q.size(1)),
              ") must be a multiple of the cache's kv heads (", num(k_cache.size(1)), ")");
  check_index(slots, q, op, "slots");
  check_index(lengths, q, op, "lengths");
  TORCH_CHECK(slots.dim() == 1 && slots.size(0) == q.size(0) && lengths.dim() == 1 && lengths.size(0) == q.size(0),
              op, ": slots and lengths must have shape [B] = [", num(q.size(0)), "], got ", shape(slots.sizes()),
              " and ", shape(lengths.sizes()));
  TORCH_CHECK(valid.device() == q.device() && valid.scalar_type() == at::kBool, op,
              ": valid must be a bool tensor on ", q.device(), ", got ", valid.scalar_type(), " on ", valid.device());
  TORCH_CHECK(valid.dim() == 2 && valid.size(0) == k_cache.size(0) && valid.size(1) == k_cache.size(2), op,
              ": valid must have shape [S, L] = [", num(k_cache.size(0)), ", ", num(k_cache.size(2)), "], got ",
              shape(valid.sizes()));
}

// Everything but q (a.q and a.q_stride set by the caller; q_like: a tensor with q's dtype and device): fills a
// from the cache, slots, lengths and valid, plans the splits and launches into out [B, Hq, 1, D].
void run_decode(DecodeArgs& a, const at::Tensor& q_like, int64_t batch, int64_t num_heads, const at::Tensor& out,
                const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slots,
                const at::Tensor& lengths, const at::Tensor& valid, double scale) {
  const int64_t batch_heads = batch * num_heads;
  const at::Tensor slots_c = slots.contiguous(), lengths_c = lengths.contiguous();
  a.k = k_cache.data_ptr();
  a.v = v_cache.data_ptr();
  a.out = out.data_ptr();
  a.slots = slots_c.const_data_ptr<int64_t>();
  a.lengths = lengths_c.const_data_ptr<int64_t>();
  a.valid = valid.const_data_ptr<bool>();
  for (int i = 0; i < 3; ++i) {
    a.k_stride[i] = k_cache.stride(i);
    a.v_stride[i] = v_cache.stride(i);
  }
  a.valid_stride[0] = valid.stride(0);
  a.valid_stride[1] = valid.stride(1);
  a.num_slots = k_cache.size(0);
  a.num_heads = static_cast<int>(num_heads);
  a.group = static_cast<int>(num_heads / k_cache.size(1));
  a.head_dim = static_cast<int>(k_cache.size(3));
  a.cache_len = static_cast<int>(k_cache.size(2));
  a.scale_log2 = static_cast<float>(scale * kLog2e);
  plan_splits(a, batch_heads);
  at::Tensor part_out, part_lse;
  if (a.splits > 1) {
    part_out = at::empty({batch_heads, a.splits, a.head_dim}, q_like.options().dtype(at::kFloat));
    part_lse = at::empty({batch_heads, a.splits}, q_like.options().dtype(at::kFloat));
    a.part_out = part_out.data_ptr<float>();
    a.part_lse = part_lse.data_ptr<float>();
  }
  EET_DISPATCH_FLOAT(q_like.scalar_type(), "eet_pipe decode_attention",
                     [&] { dispatch_lanes<scalar_t>(a, batch_heads); });
}

}  // namespace

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& slots, const at::Tensor& lengths, const at::Tensor& valid,
                            double scale) {
  check_decode_args(q, k_cache, v_cache, slots, lengths, valid);
  at::Tensor qc = q.contiguous();
  if (!is_aligned(qc.data_ptr(), 16)) qc = qc.clone();  // 16-byte loads of q rows
  at::Tensor out = at::empty_like(qc);
  if (out.numel() == 0) return out;
  const c10::cuda::CUDAGuard guard(q.device());
  DecodeArgs a{};
  a.q = qc.data_ptr();
  a.q_stride = q.size(1) * q.size(3);
  run_decode(a, qc, q.size(0), q.size(1), out, k_cache, v_cache, slots, lengths, valid, scale);
  return out;
}

at::Tensor decode_attention_qkv(const at::Tensor& qkv, at::Tensor& k_cache, at::Tensor& v_cache,
                                const at::Tensor& slots, const at::Tensor& write_index, const at::Tensor& lengths,
                                const at::Tensor& valid, int64_t num_heads, double scale) {
  const char* op = "decode_attention_qkv";
  check_cuda(qkv, op, "qkv");
  check_float_dtype(qkv, op, "qkv");
  TORCH_CHECK(k_cache.dim() == 4, op, ": k_cache must have shape [S, Hkv, L, D], got ", shape(k_cache.sizes()));
  const int64_t batch = qkv.size(0), kv_heads = k_cache.size(1), dim = k_cache.size(3);
  TORCH_CHECK(num_heads > 0 && kv_heads > 0 && num_heads % kv_heads == 0, op, ": num_heads (", num(num_heads),
              ") must be a positive multiple of the cache's kv heads (", num(kv_heads), ")");
  const int64_t width = (num_heads + 2 * kv_heads) * dim;
  TORCH_CHECK((qkv.dim() == 2 || (qkv.dim() == 3 && qkv.size(1) == 1)) && qkv.size(-1) == width, op,
              ": qkv must have shape [B, (num_heads + 2 * kv_heads) * D = ", num(width), "] or [B, 1, ", num(width),
              "] (one token per sequence), got ", shape(qkv.sizes()));
  at::Tensor rows = qkv.reshape({batch, width});
  if (rows.stride(1) != 1 || rows.stride(0) % 8 != 0 || !is_aligned(rows.data_ptr(), 16)) rows = rows.contiguous();
  if (!is_aligned(rows.data_ptr(), 16)) rows = rows.clone();  // 16-byte loads of q, k and v rows
  const at::Tensor q_view = rows.narrow(1, 0, num_heads * dim).view({batch, num_heads, 1, dim});
  check_decode_args(q_view, k_cache, v_cache, slots, lengths, valid);
  check_index(write_index, qkv, op, "write_index");
  TORCH_CHECK(write_index.numel() == batch && (write_index.dim() == 1 || write_index.dim() == 2), op,
              ": write_index must have shape [B] or [B, 1] with B = ", num(batch), ", got ",
              shape(write_index.sizes()));
  at::Tensor out = at::empty({batch, num_heads, 1, dim}, qkv.options());
  if (out.numel() == 0) return out;
  const c10::cuda::CUDAGuard guard(qkv.device());
  const at::Tensor index_c = write_index.contiguous();
  DecodeArgs a{};
  const char* base = static_cast<const char*>(rows.data_ptr());
  const int64_t elem = rows.element_size();
  a.q = base;
  a.q_stride = rows.stride(0);
  a.write_index = index_c.const_data_ptr<int64_t>();
  a.k_new = base + num_heads * dim * elem;
  a.v_new = base + (num_heads + kv_heads) * dim * elem;
  run_decode(a, rows, batch, num_heads, out, k_cache, v_cache, slots, lengths, valid, scale);
  return out;
}

}  // namespace eet
