"""CUDA kernels vs their references over odd shapes (GPU only: ``pytest -m cuda tests/ops``).

Outputs the kernels allocate are poisoned: every call runs inside a private memory pool whose
memory was filled with 0xFF (NaN in fp32/fp16/bf16) first, so an element a kernel forgets to write
fails the comparison. Caches the kernels write in place start full of random old values that must
survive outside the written columns. Inputs are fresh random tensors per case.

Tolerances (atol, rtol) per op and dtype are in TOL. Each kernel computes in fp32 and rounds once;
it is compared with the reference run in the same dtype where the reference itself computes in
fp32 (norms, decode attention) and with the reference run on fp32/fp64 copies otherwise (rotary;
activations and int8 in fp64, because PyTorch's own fp32 tanh-GELU is off by ~3e-5), so the bound
is about one or two units in the last place of the output dtype.
"""

from __future__ import annotations

import contextlib
import zlib

import pytest
import torch

from eet_pipe import ops
from eet_pipe.ops import reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not ops.HAVE_EXT, reason=f"CUDA extension missing: {ops.EXT_REASON}"),
]

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTYPES = [F32, F16, BF16]
TOL = {  # op -> dtype -> (atol, rtol)
    "norm": {F32: (1e-5, 1e-5), F16: (2e-3, 2e-3), BF16: (1.6e-2, 1.6e-2)},
    "activation": {F32: (1e-5, 1e-5), F16: (1e-3, 1e-3), BF16: (8e-3, 8e-3)},
    "rotary": {F32: (1e-5, 1e-5), F16: (1e-3, 1e-3), BF16: (8e-3, 8e-3)},
    "attention": {F32: (5e-5, 5e-5), F16: (1e-3, 1e-3), BF16: (8e-3, 8e-3)},
    "int8": {F32: (1e-4, 1e-4), F16: (2e-3, 2e-3), BF16: (1.6e-2, 1.6e-2)},
    "gemv": {F32: (1e-4, 1e-4), F16: (2e-3, 2e-3), BF16: (1.6e-2, 1.6e-2)},
}
POISON_BYTES = 64 << 20


@pytest.fixture(autouse=True)
def _reproducible_exact_references(request: pytest.FixtureRequest):
    """Seed the global RNG per test (randperm/randint/rand cases) and keep fp32 references out of TF32."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextlib.contextmanager
def poisoned():
    """Allocations inside come from memory pre-filled with 0xFF; keep the yielded pool alive."""
    torch.cuda.empty_cache()  # let earlier tests' pools go
    pool = torch.cuda.MemPool()
    with torch.cuda.use_mem_pool(pool):
        blocks = [torch.full((1 << 20,), 0xFF, dtype=torch.uint8, device="cuda") for _ in range(16)]  # small pool
        blocks.append(torch.full((POISON_BYTES,), 0xFF, dtype=torch.uint8, device="cuda"))  # large pool
        torch.cuda.synchronize()
        del blocks
        yield pool


def rand(*shape: int, dtype: torch.dtype = F32, seed: object = 0, scale: float = 1.0) -> torch.Tensor:
    """Fresh standard-normal tensor on the GPU, seeded from `seed` (any repr-able case id)."""
    gen = torch.Generator(device="cuda").manual_seed(zlib.crc32(repr((shape, seed)).encode()))
    return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(dtype)


def close(got: torch.Tensor, want: torch.Tensor, op: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
    assert not got.isnan().any(), "output has NaN: an element was not written"
    atol, rtol = TOL[op][got.dtype]
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


# ---------------------------------------------------------------- norms

NORM_SHAPES = [(1, 1, 100), (3, 7, 1600), (64, 1, 4096), (3, 5, 1601), (2, 3, 12289), (1, 2, 8192)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", NORM_SHAPES)
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_norms(kind: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    case = (kind, shape, dtype)
    h = shape[-1]
    x, r = rand(*shape, dtype=dtype, seed=(case, 1)), rand(*shape, dtype=dtype, seed=(case, 2), scale=4)
    w = (1 + rand(h, seed=(case, 3), scale=0.5)).to(dtype)
    b = rand(h, dtype=dtype, seed=(case, 4), scale=0.5)
    x_strided = rand(*shape[:-1], h + 8, dtype=dtype, seed=(case, 5))[..., 3:h + 3]  # not contiguous
    with poisoned() as _pool:
        if kind == "layer":
            got = [torch.ops.eet_pipe.layer_norm(x, w, b, 1e-5), torch.ops.eet_pipe.layer_norm(x, w, None, 1e-5),
                   *torch.ops.eet_pipe.residual_layer_norm(x, r, w, b, 1e-5),
                   torch.ops.eet_pipe.layer_norm(x_strided, w, b, 1e-5)]
        else:
            got = [torch.ops.eet_pipe.rms_norm(x, w, 1e-6), *torch.ops.eet_pipe.residual_rms_norm(x, r, w, 1e-6),
                   torch.ops.eet_pipe.rms_norm(x_strided, w, 1e-6)]
    if kind == "layer":
        want = [reference.layer_norm(x, w, b, 1e-5), reference.layer_norm(x, w, None, 1e-5),
                *reference.residual_layer_norm(x, r, w, b, 1e-5), reference.layer_norm(x_strided, w, b, 1e-5)]
    else:
        want = [reference.rms_norm(x, w, 1e-6), *reference.residual_rms_norm(x, r, w, 1e-6),
                reference.rms_norm(x_strided, w, 1e-6)]
    for i, (g, e) in enumerate(zip(got, want, strict=True)):
        is_sum = (kind == "layer" and i == 3) or (kind == "rms" and i == 2)
        if is_sum:  # x + residual rounds exactly as PyTorch's add
            torch.testing.assert_close(g, e, atol=0, rtol=0)
        else:
            close(g, e, "norm")


# ---------------------------------------------------------------- activations

ACT_SHAPES = [(3, 7, 100), (64, 1, 1600), (1, 13, 4096), (1001,), (5, 11008)]


def _misaligned(n: int, dtype: torch.dtype, seed: object) -> torch.Tensor:
    return rand(n + 1, dtype=dtype, seed=seed, scale=3)[1:]  # contiguous, 2-4 bytes off a 16-byte boundary


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ACT_SHAPES)
@pytest.mark.parametrize("kind", ["gelu", "gelu_new", "relu"])
def test_activation(kind: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    case = (kind, shape, dtype)
    x, bias = rand(*shape, dtype=dtype, seed=(case, 1), scale=3), rand(shape[-1], dtype=dtype, seed=(case, 2))
    odd = _misaligned(999, dtype, (case, 3))
    with poisoned() as _pool:
        got = [torch.ops.eet_pipe.activation(x, kind), torch.ops.eet_pipe.bias_activation(x, bias, kind),
               torch.ops.eet_pipe.activation(odd, kind)]
    want = [reference.activation(x.double(), kind), reference.bias_activation(x.double(), bias.double(), kind),
            reference.activation(odd.double(), kind)]
    for g, e in zip(got, want, strict=True):
        close(g, e.to(dtype), "activation")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ACT_SHAPES)
@pytest.mark.parametrize("kind", ["silu_gated", "gelu_gated"])
def test_gated_activation(kind: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    case = (kind, shape, dtype)
    gate, up = rand(*shape, dtype=dtype, seed=(case, 1), scale=3), rand(*shape, dtype=dtype, seed=(case, 2))
    odd_gate, odd_up = _misaligned(777, dtype, (case, 3)), _misaligned(777, dtype, (case, 4))
    with poisoned() as _pool:
        got = [torch.ops.eet_pipe.gated_activation(gate, up, kind),
               torch.ops.eet_pipe.gated_activation(odd_gate, odd_up, kind)]
    want = [reference.gated_activation(gate.double(), up.double(), kind),
            reference.gated_activation(odd_gate.double(), odd_up.double(), kind)]
    for g, e in zip(got, want, strict=True):
        close(g, e.to(dtype), "activation")


# ---------------------------------------------------------------- qkv split + rotary + cache write

QKV_CASES = [  # B, T, Hq, Hkv, D
    (1, 1, 25, 25, 64), (3, 13, 25, 25, 80), (64, 1, 32, 4, 128), (3, 7, 32, 4, 128), (3, 5, 8, 1, 64),
    (2, 3, 4, 2, 72), (3, 9, 6, 3, 96),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["table", "per_token", "no_rotary"])
@pytest.mark.parametrize(("b", "t", "hq", "hkv", "d"), QKV_CASES)
def test_qkv_rotary_cache(b: int, t: int, hq: int, hkv: int, d: int, mode: str, dtype: torch.dtype) -> None:
    case = (b, t, hq, hkv, d, mode, dtype)
    slots_total, length = b + 3, t + 30
    qkv = rand(b, t, (hq + 2 * hkv) * d, dtype=dtype, seed=(case, 1))
    k_old, v_old = (rand(slots_total, hkv, length, d, dtype=dtype, seed=(case, i)) for i in (2, 3))
    slots = torch.randperm(slots_total, device="cuda")[:b]
    write = torch.stack([torch.randperm(length, device="cuda")[:t] for _ in range(b)])  # [B, T], distinct
    positions = torch.randint(0, 4096, (b, t), device="cuda")
    freqs = torch.outer(torch.arange(4096, device="cuda").float(),
                        1.0 / 10000 ** (torch.arange(0, d, 2, device="cuda").float() / d))
    cos_t, sin_t = torch.cat((freqs, freqs), -1).cos(), torch.cat((freqs, freqs), -1).sin()  # fp32 [P, D]
    if mode == "table":
        args = (cos_t, sin_t, True, positions)
        ref_cos, ref_sin = cos_t[positions].to(dtype).float(), sin_t[positions].to(dtype).float()
    elif mode == "per_token":
        args = (cos_t[positions].to(dtype), sin_t[positions].to(dtype), True, None)
        ref_cos, ref_sin = args[0].float(), args[1].float()
    else:
        args = (None, None, False, None)
        ref_cos = ref_sin = None
    kc, vc = k_old.clone(), v_old.clone()
    with poisoned() as _pool:
        q = torch.ops.eet_pipe.qkv_rotary_cache(qkv, args[0], args[1], kc, vc, slots, write, hq, hkv, d, args[2],
                                                args[3])
    kc_ref, vc_ref = k_old.float(), v_old.float()
    q_ref = reference.qkv_rotary_cache(qkv.float(), ref_cos, ref_sin, kc_ref, vc_ref, slots, write, hq, hkv, d,
                                       args[2])
    close(q, q_ref.to(dtype), "rotary")
    written = torch.zeros(slots_total, length, dtype=torch.bool, device="cuda")
    written[slots.view(-1, 1).expand_as(write), write] = True
    by_col = lambda c: c.permute(0, 2, 1, 3)  # [S, L, Hkv, D]
    close(by_col(kc)[written], by_col(kc_ref)[written].to(dtype), "rotary")
    assert torch.equal(by_col(kc)[~written], by_col(k_old)[~written]), "k_cache changed outside the written columns"
    assert torch.equal(vc, vc_ref.to(dtype)), "v_cache differs (a plain copy)"


# ---------------------------------------------------------------- decode attention

DECODE_CASES = [  # B, Hq, Hkv, D, L
    (1, 25, 25, 64, 37), (3, 25, 25, 80, 1037), (3, 32, 4, 128, 517), (64, 32, 4, 128, 203), (64, 8, 1, 64, 1001),
    (1, 8, 1, 128, 4099), (3, 12, 12, 256, 300), (3, 16, 2, 96, 77), (3, 25, 25, 72, 129), (3, 4, 4, 8, 20),
    # many blocks over short caches (half-size blocks): GPT-2 XL at batch 64, head dims 128 and 256
    (64, 25, 25, 64, 96), (48, 16, 4, 128, 128), (40, 16, 16, 256, 64),
]


def _decode_inputs(b: int, hq: int, hkv: int, d: int, length: int, dtype: torch.dtype, case: object):
    slots_total = b + 3
    q = rand(b, hq, 1, d, dtype=dtype, seed=(case, 1))
    k_cache, v_cache = (rand(slots_total, hkv, length, d, dtype=dtype, seed=(case, i)) for i in (2, 3))
    slots = torch.randperm(slots_total, device="cuda")[:b]
    lengths = torch.randint(1, length + 1, (b,), device="cuda")
    lengths[0] = length  # one sequence over the whole cache
    valid = torch.rand(slots_total, length, device="cuda") < 0.85
    valid[slots, lengths - 1] = True  # the newest column is the query's own token
    if b >= 2:  # a sequence whose only valid key is itself
        valid[slots[1]] = False
        valid[slots[1], lengths[1] - 1] = True
    if b >= 3:
        lengths[2] = 1
        valid[slots[2], 0] = True
    if b >= 4:  # a sequence with no valid key at all gets zeros
        valid[slots[3]] = False
    return q, k_cache, v_cache, slots, lengths, valid


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("b", "hq", "hkv", "d", "length"), DECODE_CASES)
def test_decode_attention(b: int, hq: int, hkv: int, d: int, length: int, dtype: torch.dtype) -> None:
    case = (b, hq, hkv, d, length, dtype)
    q, k_cache, v_cache, slots, lengths, valid = _decode_inputs(b, hq, hkv, d, length, dtype, case)
    scale = d**-0.5
    with poisoned() as _pool:
        out = torch.ops.eet_pipe.decode_attention(q, k_cache, v_cache, slots, lengths, valid, scale)
    close(out, reference.decode_attention(q, k_cache, v_cache, slots, lengths, valid, scale), "attention")
    if b >= 4:
        assert torch.equal(out[3], torch.zeros_like(out[3]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("b", "hq", "hkv", "d", "length"), DECODE_CASES)
def test_decode_attention_qkv(b: int, hq: int, hkv: int, d: int, length: int, dtype: torch.dtype) -> None:
    """Attention straight from the fused projection: the new k and v land in the cache (the other columns keep
    their old values) and take part as the newest column, on a view [:, :, :length] of a longer cache."""
    case = ("qkv", b, hq, hkv, d, length, dtype)
    _, k_full, v_full, slots, lengths, valid = _decode_inputs(b, hq, hkv, d, length + 5, dtype, case)
    lengths = lengths.clamp(max=length)
    write_index = (lengths - 1).view(b, 1)
    valid[slots, write_index[:, 0]] = True
    qkv = rand(b, 1, (hq + 2 * hkv) * d, dtype=dtype, seed=(case, 9))
    want_k, want_v = k_full.clone(), v_full.clone()
    q = reference.qkv_rotary_cache(qkv, None, None, want_k[:, :, :length], want_v[:, :, :length], slots, write_index,
                                   hq, hkv, d, rotary=False)
    want = reference.decode_attention(q, want_k[:, :, :length], want_v[:, :, :length], slots, lengths,
                                      valid[:, :length], d**-0.5)
    with poisoned() as _pool:
        out = torch.ops.eet_pipe.decode_attention_qkv(qkv, k_full[:, :, :length], v_full[:, :, :length], slots,
                                                      write_index, lengths, valid[:, :length], hq, d**-0.5)
    close(out, want, "attention")
    written = torch.zeros(k_full.shape[0], length + 5, dtype=torch.bool, device="cuda")
    written[slots, write_index[:, 0]] = True
    for got, ref in ((k_full, want_k), (v_full, want_v)):  # the new columns as given, the rest untouched
        assert torch.equal(got.transpose(1, 2)[written], ref.transpose(1, 2)[written])
        assert torch.equal(got.transpose(1, 2)[~written], ref.transpose(1, 2)[~written])


def test_decode_attention_qkv_checks_its_arguments() -> None:
    qkv = rand(2, 1, 3 * 4 * 16, dtype=F16, seed="qkv")
    cache = rand(4, 4, 8, 16, dtype=F16, seed="c")
    slots, index = torch.tensor([0, 1], device="cuda"), torch.tensor([[3], [5]], device="cuda")
    lengths, valid = index.view(2) + 1, torch.ones(4, 8, dtype=torch.bool, device="cuda")
    op = torch.ops.eet_pipe.decode_attention_qkv
    with pytest.raises(RuntimeError, match="qkv must have shape"):
        op(qkv, cache, cache.clone(), slots, index, lengths, valid, 8, 0.25)  # 8 q heads + 8 kv: 256 wide
    with pytest.raises(RuntimeError, match="write_index must have shape"):
        op(qkv, cache, cache.clone(), slots, index[:1], lengths, valid, 4, 0.25)
    with pytest.raises(RuntimeError, match="multiple"):
        op(qkv, cache, cache.clone(), slots, index, lengths, valid, 3, 0.25)


@pytest.mark.parametrize("dtype", [F16, BF16])
def test_decode_attention_on_a_cache_view(dtype: torch.dtype) -> None:
    """A [:, :, :K] view of a longer cache (strided rows) gives the same as a compact copy."""
    q, k_cache, v_cache, slots, lengths, valid = _decode_inputs(5, 32, 4, 128, 600, dtype, ("view", dtype))
    kv_len = int(lengths.max())
    views = k_cache[:, :, :kv_len], v_cache[:, :, :kv_len], valid[:, :kv_len]
    with poisoned() as _pool:
        out = torch.ops.eet_pipe.decode_attention(q, views[0], views[1], slots, lengths, views[2], 0.1)
    want = reference.decode_attention(q, *(v.contiguous() for v in views[:2]), slots, lengths,
                                      views[2].contiguous(), 0.1)
    close(out, want, "attention")


# ---------------------------------------------------------------- GEMV: int8 weight-only and dense, epilogue

INT8_SHAPES = [(100, 100), (1600, 1600), (4800, 1600), (1600, 6400), (4096, 4096), (1601, 1000), (33, 72)]
# At one row, long rows are read by 2-8 warps each (plan_split): (1601, 4000) leaves idle rows in the last
# block, (7, 20000) takes 8 warps per row and two rounds of loads per warp.
GEMV_SHAPES = [(100, 104), (1600, 1600), (4800, 1600), (1600, 6400), (6400, 1600), (50304, 1600), (1601, 1000),
               (1601, 4000), (7, 20000), (33, 72), (7, 13)]


def _gemv_want(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, scale: torch.Tensor | None = None,
               act: str | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """The op in fp64, rounded once to x's dtype (what the kernel computes)."""
    wd = w.double() if scale is None else w.double() * scale.double()[:, None]
    y = x.double() @ wd.T
    y = y if b is None else y + b.double()
    y = y if act is None else reference.activation(y, act)
    return (y if residual is None else y + residual.double()).to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 7, 16])
@pytest.mark.parametrize(("n", "k"), INT8_SHAPES)
def test_int8_gemv(n: int, k: int, rows: int, dtype: torch.dtype) -> None:
    case = (n, k, rows, dtype)
    qweight, scale = ops.quantize_int8(rand(n, k, dtype=dtype, seed=(case, 1), scale=0.02))
    x, bias = rand(rows, k, dtype=dtype, seed=(case, 2)), rand(n, dtype=dtype, seed=(case, 3))
    with poisoned() as _pool:
        got = [torch.ops.eet_pipe.gemv(x, qweight, scale, bias, None, "none"),
               torch.ops.eet_pipe.gemv(x, qweight, scale, None, None, "none")]
    for g, b in zip(got, (bias, None), strict=True):
        want = reference.int8_linear(x.double(), qweight, scale.double(), None if b is None else b.double())
        close(g, want.to(dtype), "int8")


def test_int8_linear_dispatch_by_rows() -> None:
    qweight, scale = ops.quantize_int8(rand(300, 256, dtype=F16, seed="w", scale=0.02))
    for shape in [(2, 5, 256), (17, 256), (4, 32, 256)]:  # kernel, then the dequantise + matmul path
        x = rand(*shape, dtype=F16, seed=shape)
        want = reference.int8_linear(x.double(), qweight, scale.double()).to(F16)
        close(ops.int8_linear(x, qweight, scale), want, "int8")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 16])
@pytest.mark.parametrize(("n", "k"), GEMV_SHAPES)
def test_gemv(n: int, k: int, rows: int, dtype: torch.dtype) -> None:
    case = (n, k, rows, dtype)
    w = rand(n, k, dtype=dtype, seed=(case, 1), scale=0.02)
    x, bias = rand(rows, k, dtype=dtype, seed=(case, 2)), rand(n, dtype=dtype, seed=(case, 3))
    with poisoned() as _pool:
        got = [torch.ops.eet_pipe.gemv(x, w, None, bias, None, "none"),
               torch.ops.eet_pipe.gemv(x, w, None, None, None, "none")]
    for g, b in zip(got, (bias, None), strict=True):
        close(g, _gemv_want(x, w, b), "gemv")


@pytest.mark.parametrize("dtype", [F16, BF16])
@pytest.mark.parametrize("act", [None, "gelu", "gelu_new", "relu"])
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize(("n", "k", "rows"), [(6400, 1600, 1), (1600, 6400, 1), (1601, 4000, 1), (1600, 6400, 4),
                                              (1601, 1000, 3), (300, 0, 2)])
def test_gemv_epilogue(n: int, k: int, rows: int, int8: bool, act: str | None, dtype: torch.dtype) -> None:
    """act(x W^T * scale + b) + residual in one kernel; K = 0 leaves act(b) + residual."""
    case = (n, k, rows, int8, act, dtype)
    w = rand(n, k, dtype=dtype, seed=(case, 1), scale=0.02)
    qweight, scale = ops.quantize_int8(w) if int8 and k else (w, None)
    if int8 and not k:
        qweight, scale = torch.zeros(n, 0, dtype=torch.int8, device="cuda"), rand(n, dtype=dtype, seed=(case, 5))
    x, bias = rand(rows, k, dtype=dtype, seed=(case, 2)), rand(n, dtype=dtype, seed=(case, 3))
    residual = rand(rows, n, dtype=dtype, seed=(case, 4))
    with poisoned() as _pool:
        got = torch.ops.eet_pipe.gemv(x, qweight, scale, bias, residual, act or "none")
    close(got, _gemv_want(x, qweight, bias, scale, act, residual), "int8" if int8 else "gemv")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "k"), [(3, 256), (1, 5000), (3, 5000)])  # one row of 5000: sliced rows
def test_gemv_unaligned_inputs(rows: int, k: int, dtype: torch.dtype) -> None:
    n = 300
    w_flat = rand(n * k + 1, dtype=dtype, seed=("w", dtype), scale=0.02)
    x_flat = rand(rows * k + 1, dtype=dtype, seed=("x", dtype))
    w_al, x_al = w_flat[: n * k].view(n, k), x_flat[: rows * k].view(rows, k)
    w_un, x_un = w_flat[1:].view(n, k), x_flat[1:].view(rows, k)  # contiguous, not 16-byte aligned
    for x, w in [(x_un, w_al), (x_al, w_un), (x_un, w_un)]:
        close(torch.ops.eet_pipe.gemv(x, w, None, None, None, "none"), _gemv_want(x, w, None), "gemv")


def _kernel_names(fn) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.key for e in prof.key_averages()]


def test_linear_dispatch_by_rows_and_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops, "GEMV_ENABLED", True)
    w, b = rand(300, 256, dtype=F16, seed="lw", scale=0.02), rand(300, dtype=F16, seed="lb")
    for shape in [(1, 1, 256), (2, 4, 256), (9, 256), (3, 32, 256)]:
        kernel = shape[0] * (shape[1] if len(shape) == 3 else 1) <= ops.GEMV_MAX_ROWS
        x = rand(*shape, dtype=F16, seed=shape)
        res = rand(*shape[:-1], 300, dtype=F16, seed=(shape, "r"))
        close(ops.linear(x, w, b), _gemv_want(x.reshape(-1, 256), w, b).view(*shape[:-1], 300), "gemv")
        # the epilogue: fused in the kernel, or separate ops after cuBLAS (two roundings: looser bound)
        want = _gemv_want(x.reshape(-1, 256), w, b, act="gelu_new", residual=res.reshape(-1, 300))
        torch.testing.assert_close(ops.linear(x, w, b, "gelu_new", res), want.view(*shape[:-1], 300),
                                   atol=4e-3, rtol=4e-3)
        ran = any("gemv_kernel" in name for name in _kernel_names(lambda x=x: ops.linear(x, w, b)))
        assert ran == kernel, (shape, ran)
    x32 = rand(2, 256, seed="f32")
    assert torch.equal(ops.linear(x32, w.float(), b.float()), torch.nn.functional.linear(x32, w.float(), b.float()))
    wg = w.clone().requires_grad_()  # anything that needs gradients takes F.linear
    assert not any("gemv_kernel" in name for name in _kernel_names(lambda: ops.linear(rand(1, 256, dtype=F16), wg)))
    res_g = rand(1, 300, dtype=F16, seed="rg").requires_grad_()
    assert not any("gemv_kernel" in name
                   for name in _kernel_names(lambda: ops.linear(rand(1, 256, dtype=F16), w, b, None, res_g)))
    monkeypatch.setattr(ops, "GEMV_ENABLED", False)  # cuBLAS for dense weights
    assert not any("gemv_kernel" in name for name in _kernel_names(lambda: ops.linear(rand(1, 256, dtype=F16), w)))


# ---------------------------------------------------------------- dispatch, errors, tracing


def test_public_ops_dispatch_to_the_kernels_on_cuda() -> None:
    x, w = rand(3, 64, dtype=F16, seed="x"), rand(64, dtype=F16, seed="w")
    assert torch.equal(ops.rms_norm(x, w, 1e-6), torch.ops.eet_pipe.rms_norm(x, w, 1e-6))
    assert torch.equal(ops.activation(x, "gelu"), torch.ops.eet_pipe.activation(x, "gelu"))
    q, k_cache, v_cache, slots, lengths, valid = _decode_inputs(3, 8, 2, 20, 40, F16, "d20")
    close(ops.decode_attention(q, k_cache, v_cache, slots, lengths, valid),  # head dim 20: the reference
          reference.decode_attention(q, k_cache, v_cache, slots, lengths, valid), "attention")


def test_bad_arguments_raise_clear_errors() -> None:
    x = rand(2, 64, dtype=F16, seed="e")
    with pytest.raises(RuntimeError, match="weight must have shape"):
        torch.ops.eet_pipe.rms_norm(x, rand(63, dtype=F16), 1e-6)
    with pytest.raises(RuntimeError, match="weight has dtype"):
        torch.ops.eet_pipe.layer_norm(x, rand(64), None, 1e-5)
    with pytest.raises(RuntimeError, match="weight is on cpu"):
        torch.ops.eet_pipe.rms_norm(x, torch.ones(64, dtype=F16), 1e-6)
    with pytest.raises(RuntimeError, match="unknown activation"):
        torch.ops.eet_pipe.activation(x, "swish")
    q, k_cache, v_cache, slots, lengths, valid = _decode_inputs(3, 8, 2, 20, 40, F16, "err")
    with pytest.raises(RuntimeError, match="multiple of 8"):
        torch.ops.eet_pipe.decode_attention(q, k_cache, v_cache, slots, lengths, valid, 0.2)
    with pytest.raises(RuntimeError, match="qkv must have shape"):
        torch.ops.eet_pipe.qkv_rotary_cache(rand(1, 1, 10, dtype=F16), None, None, k_cache, v_cache, slots[:1],
                                            lengths[:1].view(1, 1), 8, 2, 20, False, None)
    qweight, scale = ops.quantize_int8(rand(8, 64, dtype=F16))
    w8 = rand(8, 64, dtype=F16)
    gemv = torch.ops.eet_pipe.gemv
    with pytest.raises(RuntimeError, match="at most 16 rows"):
        gemv(rand(17, 64, dtype=F16), qweight, scale, None, None, "none")
    with pytest.raises(RuntimeError, match="weight must have shape"):
        gemv(rand(2, 64, dtype=F16), rand(8, 63, dtype=F16), None, None, None, "none")
    with pytest.raises(RuntimeError, match="bias has dtype"):
        gemv(rand(2, 64, dtype=F16), w8, None, rand(8), None, "none")
    with pytest.raises(RuntimeError, match="needs its per-channel scale"):
        gemv(rand(2, 64, dtype=F16), qweight, None, None, None, "none")
    with pytest.raises(RuntimeError, match="only taken with an int8 weight"):
        gemv(rand(2, 64, dtype=F16), w8, scale, None, None, "none")
    with pytest.raises(RuntimeError, match="residual must have shape"):
        gemv(rand(2, 64, dtype=F16), w8, None, None, rand(2, 9, dtype=F16), "none")
    with pytest.raises(RuntimeError, match="unknown activation 'swish'; allowed: none, gelu"):
        gemv(rand(2, 64, dtype=F16), w8, None, None, None, "swish")


def _decode_step(x, residual, w, qkv, cos, sin, k_cache, v_cache, slots, write, positions, lengths, valid):
    normed, summed = ops.residual_rms_norm(x, residual, w, 1e-6)
    q = ops.qkv_rotary_cache(qkv, cos, sin, k_cache, v_cache, slots, write, 8, 2, 64, True, positions)
    return normed, summed, ops.decode_attention(q, k_cache, v_cache, slots, lengths, valid)


def _decode_step_inputs(seed: object) -> list[torch.Tensor]:
    q, k_cache, v_cache, slots, lengths, valid = _decode_inputs(3, 8, 2, 64, 50, F16, seed)
    write = (lengths - 1).view(-1, 1)
    cos, sin = rand(64, 64, seed=(seed, "c")), rand(64, 64, seed=(seed, "s"))
    return [rand(3, 1, 256, dtype=F16, seed=(seed, "x")), rand(3, 1, 256, dtype=F16, seed=(seed, "r")),
            rand(256, dtype=F16, seed=(seed, "w")), rand(3, 1, 12 * 64, dtype=F16, seed=(seed, "qkv")), cos, sin,
            k_cache, v_cache, slots, write, write.clone(), lengths, valid]


def test_ops_trace_under_torch_compile() -> None:
    inputs = _decode_step_inputs("compile")
    eager_in = [t.clone() for t in inputs]
    compiled = torch.compile(_decode_step, backend="aot_eager", fullgraph=True)
    for got, want in zip(compiled(*inputs), _decode_step(*eager_in), strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    torch.testing.assert_close(inputs[6], eager_in[6], atol=0, rtol=0)  # the cache mutation survived tracing


def test_decode_step_replays_in_a_cuda_graph() -> None:
    static = _decode_step_inputs("graph")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        _decode_step(*static)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = _decode_step(*static)
    fresh = _decode_step_inputs("graph-replay")
    for dst, src in zip(static, fresh, strict=True):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(outs, _decode_step(*fresh), strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


# ---------------------------------------------------------------- programmatic dependent launch

def _dependent_chain(x: torch.Tensor, norm_w: torch.Tensor, layers: list[tuple[torch.Tensor, ...]],
                     cache: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """GPT-2 XL layers at one row, in which every kernel reads what the one before it wrote at once: norm -> qkv
    GEMV -> cache write -> decode attention over the column just written -> out GEMV (+ residual) -> norm -> up
    GEMV (+ gelu) -> down GEMV (long rows, sliced over warps; + residual) -> activation on every other layer."""
    k_cache, v_cache, slots, write, lengths, valid = cache
    eet = torch.ops.eet_pipe
    h = x
    for i, (w_qkv, w_out, w_up, w_down) in enumerate(layers):
        qkv = eet.gemv(eet.rms_norm(h, norm_w, 1e-6), w_qkv, None, None, None, "none")
        q = eet.qkv_rotary_cache(qkv.view(1, 1, -1), None, None, k_cache, v_cache, slots, write, 25, 25, 64, False,
                                 None)
        attn = eet.decode_attention(q, k_cache, v_cache, slots, lengths, valid, 0.125)
        h = eet.gemv(attn.reshape(1, -1), w_out, None, None, h, "none")
        up = eet.gemv(eet.rms_norm(h, norm_w, 1e-6), w_up, None, None, None, "gelu_new")
        h = eet.gemv(up, w_down, None, None, h, "none")
        h = eet.activation(h, "gelu") if i % 2 else h
    return h


@pytest.mark.parametrize("graphs", [False, True])
def test_dependent_launches_wait_for_their_inputs(graphs: bool) -> None:
    """With PDL every kernel starts before the previous one has finished; the result (and the cache the chain
    writes) must be bit-identical to fully serial launches: a kernel reading or writing before its wait would
    see stale or racing data."""
    shapes = [(4800, 1600), (1600, 1600), (6400, 1600), (1600, 6400)]  # qkv, out, up, down
    layers = [tuple(rand(n, k, dtype=F16, seed=("pdl", i, n, k), scale=k ** -0.5) for n, k in shapes)
              for i in range(3)]
    norm_w, x = rand(1600, dtype=F16, seed="pdl-n"), rand(1, 1600, dtype=F16, seed="pdl-x")
    _, k_cache, v_cache, slots, lengths, valid = _decode_inputs(1, 25, 25, 64, 96, F16, "pdl")
    write = (lengths - 1).view(-1, 1)  # the column the attention then reads (valid by construction)
    results = {}
    for pdl in (False, True):
        before = ops.set_pdl(pdl)
        try:
            assert ops.set_pdl(None) is pdl  # None reads the setting
            cache = (k_cache.clone(), v_cache.clone(), slots, write, lengths, valid)
            if graphs:
                static = x.clone()
                _dependent_chain(static, norm_w, layers, cache)  # warm-up outside the capture
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    out = _dependent_chain(static, norm_w, layers, cache)
                for _ in range(3):
                    graph.replay()
                got = out.clone()
            else:
                got = torch.stack([_dependent_chain(x, norm_w, layers, cache) for _ in range(8)])
            torch.cuda.synchronize()
            results[pdl] = (got, cache[0], cache[1])
        finally:
            ops.set_pdl(before)
    assert results[True][0].isfinite().all()
    for on, off in zip(results[True], results[False], strict=True):
        torch.testing.assert_close(on, off, atol=0, rtol=0)
    if not graphs:  # repeated runs agree with each other too
        out = results[True][0]
        torch.testing.assert_close(out, out[:1].expand_as(out), atol=0, rtol=0)


@pytest.mark.parametrize("name", ["rms_norm", "residual_layer_norm", "gated_activation", "qkv_rotary_cache",
                                  "decode_attention", "gemv"])
def test_fake_implementations_match_the_kernels(name: str) -> None:
    x, w = rand(3, 64, dtype=F16, seed="fx"), rand(64, dtype=F16, seed="fw")
    step = _decode_step_inputs("fake")
    qweight, scale = ops.quantize_int8(rand(40, 64, dtype=F16, seed="fq"))
    args = {
        "rms_norm": (x, w, 1e-6), "residual_layer_norm": (x, x, w, w, 1e-5), "gated_activation": (x, x, "silu_gated"),
        "qkv_rotary_cache": (step[3], step[4], step[5], step[6], step[7], step[8], step[9], 8, 2, 64, True, step[10]),
        "decode_attention": (rand(3, 8, 1, 64, dtype=F16, seed="fdq"), step[6], step[7], step[8], step[11], step[12],
                             0.125),
        "gemv": (x, qweight, scale, None, rand(3, 40, dtype=F16, seed="fr"), "gelu_new"),
    }[name]
    torch.library.opcheck(getattr(torch.ops.eet_pipe, name).default, args,
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.multigpu
def test_kernels_run_on_a_non_current_device() -> None:
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    x, w = rand(3, 1600, dtype=F16, seed="dev").to(device), rand(1600, dtype=F16, seed="devw").to(device)
    out = torch.ops.eet_pipe.rms_norm(x, w, 1e-6)
    assert out.device == device
    close(out, reference.rms_norm(x, w, 1e-6), "norm")
