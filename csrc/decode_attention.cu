// decode_attention: one query token per sequence against its KV-cache slot (flash-decoding).
//
// A work item is one query head of one sequence over one chunk (split) of its cache columns. Groups of TPK
// lanes each own a few keys per round (16-byte loads of K and V) and keep an online softmax (running max m,
// sum l, accumulator). Block mode (few items: small batches) gives each item a block of 256 threads whose key
// groups merge through shared memory; warp mode (many items) gives each a warp whose groups merge by shuffles.
// With splits > 1 every item writes a normalised partial output and its log-sum-exp (base 2) and a
// second kernel combines them. Keys are columns j < lengths[b] with valid[slot, j]; a sequence with
// no such key gets zeros. All arithmetic in fp32.
#include <cmath>
#include <type_traits>

#include "common.h"
#include "ops.h"

namespace eet {
namespace {

constexpr int kThreads = 256;  // block mode
constexpr int kWarpModeThreads = 128;  // warp mode: four work items per block
constexpr int kMinChunk = 384;  // fewest keys worth a split of their own (block mode; plan_splits)
constexpr int kMinWarpChunk = 128;  // the same in warp mode
constexpr int kMaxSplits = 64;
constexpr int kMaxHeadDim = 256;
constexpr double kLog2e = 1.4426950408889634;

struct DecodeArgs {
  const void* q;  // [B, Hq, D] contiguous
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

// One (sequence, head, split) work item's query and keys, as seen by one lane of a key group of TPK lanes: the
// lane holds E = VEC * NVPL elements of the head dim (vector vi = lane + i * TPK), and key group `kgroup` of
// `groups` takes keys start + kgroup, + groups, ... below `end`.
template <typename T, int TPK, int NVPL>
struct Item {
  static constexpr int VEC = 16 / sizeof(T);
  static constexpr int E = VEC * NVPL;
  int bh, b, g, start, end;
  int64_t slot;
};

template <typename T, int TPK, int NVPL>
__device__ __forceinline__ Item<T, TPK, NVPL> make_item(const DecodeArgs& a, int bh, int split) {
  Item<T, TPK, NVPL> it;
  it.bh = bh;
  it.b = bh / a.num_heads;
  it.g = bh % a.num_heads / a.group;
  it.slot = a.slots[it.b];
  CUDA_KERNEL_ASSERT(it.slot >= 0 && it.slot < a.num_slots && "decode_attention: slot out of range");
  const int len = static_cast<int>(min(max(a.lengths[it.b], int64_t{0}), static_cast<int64_t>(a.cache_len)));
  it.start = split * a.chunk;
  it.end = min(it.start + a.chunk, len);
  return it;
}

// The online softmax of one key group over its keys: running max m, sum l and the accumulator acc (lane's
// slice), all in the base-2 domain. Each round takes U keys (j0, j0 + groups, ...) and issues all their K, V
// and mask loads before using any, so a round costs one memory latency instead of U.
template <typename T, int TPK, int NVPL, int U>
__device__ __forceinline__ void attend(const DecodeArgs& a, const Item<T, TPK, NVPL>& it, int lane, int kgroup,
                                       int groups, float (&acc)[Item<T, TPK, NVPL>::E], float& m, float& l) {
  constexpr int VEC = Item<T, TPK, NVPL>::VEC, E = Item<T, TPK, NVPL>::E;
  const int nv = a.head_dim / VEC;
  float qr[E];
  const T* q = static_cast<const T*>(a.q) + static_cast<int64_t>(it.bh) * a.head_dim;
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
  const T* kbase = static_cast<const T*>(a.k) + it.slot * a.k_stride[0] + it.g * a.k_stride[1];
  const T* vbase = static_cast<const T*>(a.v) + it.slot * a.v_stride[0] + it.g * a.v_stride[1];
  const bool* valid = a.valid + it.slot * a.valid_stride[0];
  const unsigned mask = TPK == 32 ? 0xffffffffu : (((1u << TPK) - 1u) << ((threadIdx.x & 31) / TPK * TPK));
  m = -INFINITY;
  l = 0.f;
  for (int j0 = it.start + kgroup; j0 < it.end; j0 += groups * U) {
    bool keep[U];
    Vec<T, VEC> kv[U][NVPL], vv[U][NVPL];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = j0 + u * groups;
      // The mask is loaded with K and V, not before them: a branch on it would put a second memory latency in
      // front of the keys. A masked key's score is computed and dropped (j < end <= cache_len: in bounds).
      keep[u] = j < it.end && valid[j * a.valid_stride[1]];  // uniform across the TPK lanes of this key
#pragma unroll
      for (int i = 0; i < NVPL; ++i) {
        const int vi = lane + i * TPK;
        if (j < it.end && vi < nv) {
          kv[u][i] = load_vec<T, VEC>(kbase + j * a.k_stride[2] + vi * VEC);
          vv[u][i] = load_vec<T, VEC>(vbase + j * a.v_stride[2] + vi * VEC);
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
}

// Element d of the item's output, normalised by its sum (`inv`), or its split's partial output; lse: the split's
// log-sum-exp (base 2), written by one thread.
template <typename T>
__device__ __forceinline__ void store_out(const DecodeArgs& a, int bh, int split, int d, float o) {
  if (a.splits == 1) {
    static_cast<T*>(a.out)[static_cast<int64_t>(bh) * a.head_dim + d] = from_float<T>(o);
  } else {
    a.part_out[(static_cast<int64_t>(bh) * a.splits + split) * a.head_dim + d] = o;
  }
}

__device__ __forceinline__ void store_lse(const DecodeArgs& a, int bh, int split, float mx, float total) {
  if (a.splits > 1) a.part_lse[static_cast<int64_t>(bh) * a.splits + split] = total > 0.f ? mx + log2f(total) : -INFINITY;
}

// Block mode (few work items: small batches): one block per (sequence, head, split), its key groups merged
// through shared memory.
template <typename T, int TPK, int NVPL, int U>
__global__ void __launch_bounds__(kThreads) decode_attention_kernel(const DecodeArgs a) {
  constexpr int E = Item<T, TPK, NVPL>::E, VEC = Item<T, TPK, NVPL>::VEC;
  extern __shared__ float smem[];  // [groups * D] accumulators, [groups] max, sum, weight
  pdl_launch_dependents();
  pdl_wait();
  const int split = blockIdx.y;
  const auto it = make_item<T, TPK, NVPL>(a, blockIdx.x, split);
  const int D = a.head_dim, nv = D / VEC;
  const int lane = threadIdx.x % TPK, kgroup = threadIdx.x / TPK, groups = blockDim.x / TPK;
  float acc[E], m, l;
  attend<T, TPK, NVPL, U>(a, it, lane, kgroup, groups, acc, m, l);

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
    store_out<T>(a, it.bh, split, d, o * inv);
  }
  if (threadIdx.x == 0) store_lse(a, it.bh, split, mx, total);
}

// Warp mode (many work items: large batches): each warp is one (sequence, head, split), its 32 / TPK key groups
// merged by shuffles. No shared memory or block barrier, and a grid of a quarter as many blocks: GPT-2 XL at
// batch 64 is 1600 items, which fit on an H100 at once, where one block per item ran in 2 waves and a tail.
template <typename T, int TPK, int NVPL, int U>
__global__ void __launch_bounds__(kWarpModeThreads, 4) decode_attention_warp_kernel(const DecodeArgs a,
                                                                                 int64_t items) {
  constexpr int E = Item<T, TPK, NVPL>::E, VEC = Item<T, TPK, NVPL>::VEC;
  pdl_launch_dependents();
  pdl_wait();
  const int64_t item = static_cast<int64_t>(blockIdx.x) * (kWarpModeThreads / 32) + threadIdx.x / 32;
  if (item >= items) return;  // whole warps
  const int split = static_cast<int>(item % a.splits);
  const auto it = make_item<T, TPK, NVPL>(a, static_cast<int>(item / a.splits), split);
  const int lane = threadIdx.x % TPK, kgroup = (threadIdx.x & 31) / TPK;
  float acc[E], m, l;
  attend<T, TPK, NVPL, U>(a, it, lane, kgroup, 32 / TPK, acc, m, l);
#pragma unroll
  for (int offset = TPK; offset < 32; offset <<= 1) {
    const float m_o = __shfl_xor_sync(0xffffffffu, m, offset);
    const float l_o = __shfl_xor_sync(0xffffffffu, l, offset);
    const float mx = fmaxf(m, m_o);
    const float w = m == -INFINITY ? 0.f : exp2f(m - mx);
    const float w_o = m_o == -INFINITY ? 0.f : exp2f(m_o - mx);
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const float acc_o = __shfl_xor_sync(0xffffffffu, acc[e], offset);
      acc[e] = acc[e] * w + acc_o * w_o;
    }
    l = l * w + l_o * w_o;
    m = mx;
  }
  if (kgroup != 0) return;
  const float inv = l > 0.f ? 1.f / l : 0.f;
  const int nv = a.head_dim / VEC;
#pragma unroll
  for (int i = 0; i < NVPL; ++i) {
    const int vi = lane + i * TPK;
    if (vi < nv) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) store_out<T>(a, it.bh, split, vi * VEC + e, acc[i * VEC + e] * inv);
    }
  }
  if (lane == 0) store_lse(a, it.bh, split, m, l);
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

// Warp mode from this many (sequence, head) pairs per SM: one warp per item then still gives each SM
// several items, each over a few rounds.
bool warp_mode(int64_t batch_heads) { return batch_heads >= num_sms(); }

template <typename T, int TPK, int NVPL>
void launch(const DecodeArgs& a, int64_t batch_heads) {
  // Keys per group per round: 8 (4 at two vectors per lane), 16-32 KB of K and V in flight per 256 threads. bf16
  // takes half as many: its K and V vectors compile to twice the registers (182 against 123 per thread at 8
  // keys), which would halve the warps per SM.
  constexpr int U = (std::is_same_v<T, c10::BFloat16> ? 4 : 8) / NVPL;
  const int64_t items = batch_heads * a.splits;
  if (warp_mode(batch_heads)) {
    constexpr int warps = kWarpModeThreads / 32;
    launch_kernel(decode_attention_warp_kernel<T, TPK, NVPL, U>, dim3(static_cast<unsigned>(ceil_div(items, warps))),
                  dim3(kWarpModeThreads), 0, a, items);
  } else {
    const int groups = kThreads / TPK;
    const size_t smem = (static_cast<size_t>(groups) * a.head_dim + 3 * groups) * sizeof(float);
    const dim3 grid(static_cast<unsigned>(batch_heads), static_cast<unsigned>(a.splits));
    launch_kernel(decode_attention_kernel<T, TPK, NVPL, U>, grid, dim3(kThreads), smem, a);
  }
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

// Splits of the cache columns: enough work items to fill the GPU (2 blocks per SM in block mode, 8 warps in warp
// mode), but at least kMinChunk (kMinWarpChunk) columns per split. A split costs the combine kernel, about
// as much as two more rounds of keys, so a block takes up to 384 columns (1.5 rounds of 256) before splitting.
void plan_splits(DecodeArgs& a, int64_t batch_heads) {
  const bool warps = warp_mode(batch_heads);
  const int64_t wanted = ceil_div((warps ? 8 : 2) * static_cast<int64_t>(num_sms()), batch_heads);
  const int64_t min_chunk = warps ? kMinWarpChunk : kMinChunk;
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>({wanted, ceil_div(a.cache_len, min_chunk), kMaxSplits}));
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

}  // namespace

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& slots, const at::Tensor& lengths, const at::Tensor& valid,
                            double scale) {
  check_decode_args(q, k_cache, v_cache, slots, lengths, valid);
  at::Tensor qc = q.contiguous();
  if (!is_aligned(qc.data_ptr(), 16)) qc = qc.clone();  // 16-byte loads of q rows
  at::Tensor out = at::empty_like(qc);
  const int64_t batch_heads = q.size(0) * q.size(1);
  if (batch_heads == 0) return out;
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor slots_c = slots.contiguous(), lengths_c = lengths.contiguous();

  DecodeArgs a{};
  a.q = qc.data_ptr();
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
  a.num_heads = static_cast<int>(q.size(1));
  a.group = static_cast<int>(q.size(1) / k_cache.size(1));
  a.head_dim = static_cast<int>(q.size(3));
  a.cache_len = static_cast<int>(k_cache.size(2));
  a.scale_log2 = static_cast<float>(scale * kLog2e);
  plan_splits(a, batch_heads);
  at::Tensor part_out, part_lse;
  if (a.splits > 1) {
    part_out = at::empty({batch_heads, a.splits, a.head_dim}, q.options().dtype(at::kFloat));
    part_lse = at::empty({batch_heads, a.splits}, q.options().dtype(at::kFloat));
    a.part_out = part_out.data_ptr<float>();
    a.part_lse = part_lse.data_ptr<float>();
  }
  EET_DISPATCH_FLOAT(q.scalar_type(), "eet_pipe decode_attention", [&] { dispatch_lanes<scalar_t>(a, batch_heads); });
  return out;
}

}  // namespace eet
