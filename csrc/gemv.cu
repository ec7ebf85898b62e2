// GEMV for decode (M <= 16 rows), dense or int8 weight-only, with the layer's epilogue fused:
//   y[m, n] = act(scale[n] * sum_k x[m, k] * w[n, k] + bias[n]) + residual[m, n]
// A decode step multiplies a handful of rows by every weight matrix once, so its time is the time to
// stream the weights from memory. cuBLASLt's tiled kernels for M <= 8 (64 x 8 tiles, often split-K plus
// a reduce kernel) reach about half of the memory bandwidth there. Here one warp (or, for a long row at one
// row of x, 2-8 warps of a block, each a slice: plan_split) owns one output channel n and streams its weight
// row in 16-byte loads (8 fp16/bf16 or 16 int8 weights), issuing kLoads of them per lane before using any,
// so that every warp keeps 32 * kLoads * 16 bytes in flight; the loads bypass L1 (read once) while x, re-read
// by every warp, stays there. Each lane multiplies
// its weights into all M rows of x in fp32, the warp sums once at the end, and one rounding follows
// the epilogue (scale, bias, activation, residual) -- the activation and residual add would otherwise
// be two more kernels per layer. The first kLoads chunks are requested before the kernel waits for the one
// that writes x (programmatic dependent launch, common.h), so a short kernel before it (a norm, the
// attention) and its own start-up overlap the weight stream.
//
// gemv_gated is the first half of a gated MLP (SwiGLU / GeGLU) in one kernel:
//   y[m, n] = act(scale[n] * (x[m] . gate[n]) + bias[n]) * (scale2[n] * (x[m] . up[n]) + bias2[n])
// Each output channel's warps are doubled: the first half reads the gate row, the second the up row, and the
// block's shared-memory sum combines them, so the two projections and the activation are one kernel with one
// rounding instead of three kernels (two GEMVs and the element-wise product) and two intermediate tensors.
#include "activation.h"
#include "common.h"
#include "ops.h"

namespace eet {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxRows = 16;
constexpr int kLoads = 8;  // 16-byte weight loads in flight per lane

struct GemvArgs {
  void* y;  // [M, N]
  const void* x;  // [M, K]
  const void* w;  // [N, K], T or int8
  const void* scale;  // [N] (int8) or null
  const void* bias;  // [N] or null
  const void* residual;  // [M, N] or null
  int rows, n_out, k_in, k_chunks;  // k_chunks: 16-byte weight chunks per row (0 when unaligned)
  int split;  // warps per output channel (1, 2, 4 or 8), each reading one slice of the row; gated: per weight
  const void* w2;  // gated: the up weight [N, K] (w is the gate), with its scale2 and bias2 (or null)
  const void* scale2;
  const void* bias2;
};

// Warps per output channel: enough that each warp's slice is one round of kLoads loads per lane (all of it
// in flight at once, and requested before the PDL wait), at most a block's worth. A long row read by one
// warp would be kLoads chunks per lane, wait, multiply, repeat: GPT-2 XL's mlp.down (K = 6400) is four such
// rounds on 200 blocks, under one wave of the GPU.
int plan_split(int k_chunks) {
  int split = 1;
  while (split < kWarps && k_chunks > split * 32 * kLoads) split *= 2;
  return split;
}

__device__ __forceinline__ int4 load_stream(const int4* ptr) {
  int4 out;
  asm volatile("ld.global.nc.L1::no_allocate.v4.s32 {%0, %1, %2, %3}, [%4];"
               : "=r"(out.x), "=r"(out.y), "=r"(out.z), "=r"(out.w)
               : "l"(ptr));
  return out;
}

// Multiply one 16-byte chunk of weights (WV of them, starting at column k) into every row's sum.
template <typename T, typename W, int MT>
__device__ __forceinline__ void fma_chunk(float (&acc)[MT], const int4& packed, const T* __restrict__ x, int rows,
                                          int k_in, int k) {
  constexpr int WV = 16 / sizeof(W);  // weights per chunk
  constexpr int XV = 16 / sizeof(T);  // x elements per 16-byte load
  const W* wv = reinterpret_cast<const W*>(&packed);
  float wf[WV];
#pragma unroll
  for (int e = 0; e < WV; ++e) wf[e] = to_float(wv[e]);
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    if (m < rows) {
      const T* xr = x + static_cast<int64_t>(m) * k_in + k;
#pragma unroll
      for (int c = 0; c < (WV + XV - 1) / XV; ++c) {
        const Vec<T, XV> xv = load_vec<T, XV>(xr + c * XV);
#pragma unroll
        for (int e = 0; e < XV && c * XV + e < WV; ++e) acc[m] += to_float(xv.v[e]) * wf[c * XV + e];
      }
    }
  }
}

// SPLIT: the row's warps each read a slice (a.split of them, plan_split); otherwise one warp per row, with no
// slice bookkeeping or shared-memory sum (which cost registers: 79 against 64 per thread at one row, one
// block per SM less). GATED (always SPLIT): 2 * a.split warps per output channel, a.split per weight.
// The gated one-row kernel over fp16/bf16 weights is held to 80 registers (3 blocks per SM, as the plain sliced one:
// at 90 only 2 fit, and fewer loads are in flight); the others would spill.
template <typename T, typename W, int MT, Act A, bool SPLIT, bool GATED>
__global__ void __launch_bounds__(kThreads, GATED && MT == 1 && sizeof(W) > 1 ? 3 : 1) gemv_kernel(const GemvArgs a) {
  static_assert(SPLIT || !GATED, "the gated kernel sums its two halves through shared memory");
  constexpr int WV = 16 / sizeof(W);
  pdl_launch_dependents();
  const int split = SPLIT ? a.split : 1;
  const int per_out = GATED ? 2 * split : split;  // warps per output channel
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n = blockIdx.x * (kWarps / per_out) + warp / per_out;
  const int half = GATED ? (warp % per_out) / split : 0;  // gated: 0 reads the gate row, 1 the up row
  const int part = warp % split;  // which slice of the row this warp reads
  const bool active = n < a.n_out;  // the warps of one row are active or not together
  const T* __restrict__ x = static_cast<const T*>(a.x);
  const W* __restrict__ wrow =
      static_cast<const W*>(half ? a.w2 : a.w) + static_cast<int64_t>(active ? n : 0) * a.k_in;
  const int4* __restrict__ wchunks = reinterpret_cast<const int4*>(wrow);
  const int per_part = SPLIT ? (a.k_chunks + split - 1) / split : a.k_chunks;
  const int c_end = SPLIT ? min(a.k_chunks, (part + 1) * per_part) : a.k_chunks;

  // The weights are constant, so the first kLoads chunks per lane are requested before waiting for the
  // kernel that produces x (PDL): they stream in while that one finishes.
  int4 packed[kLoads];
  int c0 = part * per_part + lane;
  if (active) {
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      if (c0 + u * 32 < c_end) packed[u] = load_stream(wchunks + c0 + u * 32);
    }
  }
  pdl_wait();
  if constexpr (!SPLIT) {
    if (!active) return;  // no block-wide sum follows
  }

  float acc[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) acc[m] = 0.f;
  while (active) {
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      const int c = c0 + u * 32;
      if (c < c_end) fma_chunk<T, W, MT>(acc, packed[u], x, a.rows, a.k_in, c * WV);
    }
    c0 += 32 * kLoads;
    if (c0 >= c_end) break;
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      if (c0 + u * 32 < c_end) packed[u] = load_stream(wchunks + c0 + u * 32);
    }
  }
  if (active) {  // unaligned: everything, one element at a time, the row's warps interleaved
    for (int k = a.k_chunks * WV + part * 32 + lane; k < a.k_in; k += 32 * split) {
      const float wf = to_float(wrow[k]);
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        if (m < a.rows) acc[m] += to_float(x[static_cast<int64_t>(m) * a.k_in + k]) * wf;
      }
    }
  }

  const float s = active && a.scale != nullptr ? to_float(static_cast<const T*>(a.scale)[n]) : 1.f;
  const float b = active && a.bias != nullptr ? to_float(static_cast<const T*>(a.bias)[n]) : 0.f;
  auto store = [&](int m, float total, float total2) {  // row m of output channel n, through the epilogue
    const int64_t i = static_cast<int64_t>(m) * a.n_out + n;
    float v = apply<A>(total * s + b);
    if constexpr (GATED) {
      const float s2 = a.scale2 != nullptr ? to_float(static_cast<const T*>(a.scale2)[n]) : 1.f;
      const float b2 = a.bias2 != nullptr ? to_float(static_cast<const T*>(a.bias2)[n]) : 0.f;
      v *= total2 * s2 + b2;
    }
    if (a.residual != nullptr) v += to_float(static_cast<const T*>(a.residual)[i]);
    static_cast<T*>(a.y)[i] = from_float<T>(v);
  };
  if constexpr (!SPLIT) {
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      const float total = warp_sum(acc[m]);
      if (active && lane == m && m < a.rows) store(m, total, 0.f);
    }
  } else {  // sum each row over its warps: in the warp, then over the row's warps through shared memory
    __shared__ float partial[kWarps][MT];
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      const float total = warp_sum(acc[m]);
      if (lane == m) partial[warp][m] = total;
    }
    __syncthreads();  // every thread of the block gets here (no early exits above)
    if (active && warp % per_out == 0 && lane < a.rows) {
      float total = 0.f, total2 = 0.f;
      for (int w = warp; w < warp + split; ++w) total += partial[w][lane];
      if constexpr (GATED) {
        for (int w = warp + split; w < warp + per_out; ++w) total2 += partial[w][lane];
      }
      store(lane, total, total2);
    }
  }
}

// overlap: launch with PDL (the weight was not written by the kernel just before).
template <typename T, typename W, int MT, bool SPLIT>
void launch_rows(const GemvArgs& a, Act act, bool overlap) {
  const dim3 blocks(static_cast<unsigned>(ceil_div(a.n_out, kWarps / a.split)));
  switch (act) {
#define EET_GEMV_CASE(ACT)                                                                        \
  case ACT:                                                                                       \
    launch_kernel(overlap, gemv_kernel<T, W, MT, ACT, SPLIT, false>, blocks, dim3(kThreads), 0, a); \
    break;
    EET_GEMV_CASE(Act::kNone)
    EET_GEMV_CASE(Act::kGelu)
    EET_GEMV_CASE(Act::kGeluNew)
    EET_GEMV_CASE(Act::kRelu)
#undef EET_GEMV_CASE
    default:
      TORCH_CHECK(false, "gemv: activation not supported in the epilogue");
  }
}

// a.split > 1 only at one row (gemv below), so only the one-row kernel has a sliced instantiation.
template <typename T, typename W>
void launch(const GemvArgs& a, Act act, bool overlap) {
  if (a.split > 1) {
    launch_rows<T, W, 1, true>(a, act, overlap);
  } else if (a.rows <= 1) {
    launch_rows<T, W, 1, false>(a, act, overlap);
  } else if (a.rows <= 2) {
    launch_rows<T, W, 2, false>(a, act, overlap);
  } else if (a.rows <= 4) {
    launch_rows<T, W, 4, false>(a, act, overlap);
  } else if (a.rows <= 8) {
    launch_rows<T, W, 8, false>(a, act, overlap);
  } else {
    launch_rows<T, W, 16, false>(a, act, overlap);
  }
}

// gemv_gated: rows of x it takes (the int8 decode limit, INT8_GEMV_MAX_ROWS in eet_pipe.ops), instantiated for 1, 2 and 4.
constexpr int kMaxGatedRows = 4;

template <typename T, typename W>
void launch_gated(const GemvArgs& a, Act act, bool overlap) {
  const dim3 blocks(static_cast<unsigned>(ceil_div(a.n_out, kWarps / (2 * a.split))));
  auto go = [&](auto kernel) { launch_kernel(overlap, kernel, blocks, dim3(kThreads), 0, a); };
#define EET_GATED_ROWS(MT)                                         \
  if (act == Act::kSilu) {                                         \
    go(gemv_kernel<T, W, MT, Act::kSilu, true, true>);             \
  } else {                                                         \
    go(gemv_kernel<T, W, MT, Act::kGeluTanh, true, true>);         \
  }
  if (a.rows <= 1) {
    EET_GATED_ROWS(1)
  } else if (a.rows <= 2) {
    EET_GATED_ROWS(2)
  } else {
    EET_GATED_ROWS(4)
  }
#undef EET_GATED_ROWS
}

// `weight` names the weight in messages ("weight" for gemv, "gate" / "up" for gemv_gated); its scale and bias are
// "scale" and "bias", or "<weight>_scale" and "<weight>_bias".
void check_gemv_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& scale,
                     const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                     const char* op = "gemv", const std::string& wname = "weight", int max_rows = kMaxRows) {
  const std::string prefix = wname == "weight" ? "" : wname + "_";
  const std::string sname = prefix + "scale", bname = prefix + "bias";
  const char* w = wname.c_str();
  check_cuda(x, op, "x");
  check_float_dtype(x, op, "x");
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [M, K], got shape ", shape(x.sizes()));
  TORCH_CHECK(x.size(0) <= max_rows, op, ": the GEMV kernel handles at most ", num(max_rows), " rows, got M=",
              num(x.size(0)), "; eet_pipe.ops uses a matmul for larger M");
  TORCH_CHECK(weight.device() == x.device(), op, ": ", w, " is on ", weight.device(), " but x is on ", x.device());
  if (weight.scalar_type() == at::kChar) {
    TORCH_CHECK(scale.has_value(), op, ": an int8 ", w, " needs its per-channel ", sname);
  } else {
    TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": ", w, " has dtype ", weight.scalar_type(),
                " but x has dtype ", x.scalar_type(), "; it must match x or be int8 (with a ", sname, ")");
    TORCH_CHECK(!scale.has_value(), op, ": ", sname, " is only taken with an int8 ", w, ", got a ",
                weight.scalar_type(), " ", w);
  }
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1), op, ": ", w, " must have shape [N, K=",
              num(x.size(1)), "], got ", shape(weight.sizes()));
  TORCH_CHECK(weight.size(0) <= INT32_MAX && x.size(1) <= INT32_MAX, op, ": ", w, " ", shape(weight.sizes()),
              " is too large");
  const int64_t n_out = weight.size(0);
  for (const auto& [t, name] : {std::pair{&scale, &sname}, std::pair{&bias, &bname}}) {
    if (t->has_value()) {
      check_like(**t, x, op, name->c_str(), "x");
      TORCH_CHECK((*t)->dim() == 1 && (*t)->size(0) == n_out, op, ": ", *name, " must have shape [N=", num(n_out),
                  "], got ", shape((*t)->sizes()));
    }
  }
  if (residual.has_value()) {
    check_like(*residual, x, op, "residual", "x");
    TORCH_CHECK(residual->dim() == 2 && residual->size(0) == x.size(0) && residual->size(1) == n_out, op,
                ": residual must have shape [M, N] = [", num(x.size(0)), ", ", num(n_out), "], got ",
                shape(residual->sizes()));
  }
}

// The contiguous operands of one GEMV (kept alive until the launch) and the kernel's arguments over them.
struct Operands {
  at::Tensor x, w, scale, bias, residual, w2, scale2, bias2;
  GemvArgs args{};
  bool overlap = true;  // every weight is the caller's own tensor, not a copy just made (see gemv below)
  bool int8 = false;
};

const void* ptr(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

at::Tensor contiguous(const std::optional<at::Tensor>& t) { return t.has_value() ? t->contiguous() : at::Tensor(); }

Operands operands(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& scale,
                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                  const at::Tensor& y) {
  Operands o;
  o.x = x.contiguous();
  o.w = weight.contiguous();
  o.scale = contiguous(scale);
  o.bias = contiguous(bias);
  o.residual = contiguous(residual);
  const int k_in = static_cast<int>(x.size(1));
  const int64_t per_chunk = 16 / static_cast<int64_t>(weight.element_size());
  const bool vec = k_in % per_chunk == 0 && is_aligned(o.x.data_ptr(), 16) && is_aligned(o.w.data_ptr(), 16);
  GemvArgs& a = o.args;
  a.y = y.data_ptr();
  a.x = o.x.data_ptr();
  a.w = o.w.data_ptr();
  a.scale = ptr(o.scale);
  a.bias = ptr(o.bias);
  a.residual = ptr(o.residual);
  a.rows = static_cast<int>(x.size(0));
  a.n_out = static_cast<int>(weight.size(0));
  a.k_in = k_in;
  a.k_chunks = vec ? static_cast<int>(k_in / per_chunk) : 0;
  // Sliced rows only at one row (the decode of one sequence, where a long row's rounds of loads are the step's
  // critical path); several rows keep one warp per row.
  a.split = a.rows == 1 ? plan_split(vec ? a.k_chunks : static_cast<int>(ceil_div(k_in, per_chunk))) : 1;
  // The kernel reads its first weights before its PDL wait, which is safe for weights written long before
  // (parameters), not for a copy that .contiguous() has just made: then it runs after the copy has finished.
  o.overlap = o.w.data_ptr() == weight.data_ptr();
  o.int8 = weight.scalar_type() == at::kChar;
  return o;
}

}  // namespace

at::Tensor gemv(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& scale,
                const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                const std::string& activation) {
  check_gemv_args(x, weight, scale, bias, residual);
  const Act act = parse_activation(activation, "gemv", /*allow_none=*/true);
  at::Tensor y = at::empty({x.size(0), weight.size(0)}, x.options());
  if (y.numel() == 0) return y;
  const c10::cuda::CUDAGuard guard(x.device());
  const Operands o = operands(x, weight, scale, bias, residual, y);
  EET_DISPATCH_FLOAT(x.scalar_type(), "eet_pipe gemv", [&] {
    if (o.int8) {
      launch<scalar_t, int8_t>(o.args, act, o.overlap);
    } else {
      launch<scalar_t, scalar_t>(o.args, act, o.overlap);
    }
  });
  return y;
}

at::Tensor gemv_gated(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& up,
                      const std::optional<at::Tensor>& gate_scale, const std::optional<at::Tensor>& up_scale,
                      const std::optional<at::Tensor>& gate_bias, const std::optional<at::Tensor>& up_bias,
                      const std::string& kind) {
  const char* op = "gemv_gated";
  check_gemv_args(x, gate, gate_scale, gate_bias, std::nullopt, op, "gate", kMaxGatedRows);
  check_gemv_args(x, up, up_scale, up_bias, std::nullopt, op, "up", kMaxGatedRows);
  TORCH_CHECK(gate.sizes() == up.sizes() && gate.scalar_type() == up.scalar_type(), op, ": gate ",
              shape(gate.sizes()), " ", gate.scalar_type(), " and up ", shape(up.sizes()), " ", up.scalar_type(),
              " must have the same shape and dtype");
  const Act act = parse_gated(kind, op);
  at::Tensor y = at::empty({x.size(0), gate.size(0)}, x.options());
  if (y.numel() == 0) return y;
  const c10::cuda::CUDAGuard guard(x.device());
  Operands o = operands(x, gate, gate_scale, gate_bias, std::nullopt, y);
  o.w2 = up.contiguous();
  o.scale2 = contiguous(up_scale);
  o.bias2 = contiguous(up_bias);
  GemvArgs& a = o.args;
  a.w2 = o.w2.data_ptr();
  a.scale2 = ptr(o.scale2);
  a.bias2 = ptr(o.bias2);
  if (!is_aligned(a.w2, 16)) a.k_chunks = 0;  // both rows are read in the same chunks
  a.split = std::min(a.split, kWarps / 2);  // the gate's and the up's warps of a channel share one block
  o.overlap = o.overlap && o.w2.data_ptr() == up.data_ptr();
  EET_DISPATCH_FLOAT(x.scalar_type(), "eet_pipe gemv_gated", [&] {
    if (o.int8) {
      launch_gated<scalar_t, int8_t>(a, act, o.overlap);
    } else {
      launch_gated<scalar_t, scalar_t>(a, act, o.overlap);
    }
  });
  return y;
}

}  // namespace eet
