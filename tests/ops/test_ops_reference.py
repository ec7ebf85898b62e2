"""The pure-PyTorch references behave (CPU), the dispatch point routes CPU tensors to them, and the
fused decode path (qkv_rotary_cache + decode_attention) equals the model's attention step."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eet_pipe import ops
from eet_pipe.models.config import ArchConfig
from eet_pipe.models.kv_cache import KVCache
from eet_pipe.models.layers import Attention, attention_mask
from eet_pipe.models.meta import decode_meta, prefill_meta
from eet_pipe.models.rotary import rotary_table
from eet_pipe.ops import reference

ROOT = Path(__file__).resolve().parents[2]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed)).to(dtype)


# ---------------------------------------------------------------- norms


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_norms_return_the_sum(dtype: torch.dtype) -> None:
    x, r = _randn(3, 5, 100, seed=1, dtype=dtype), _randn(3, 5, 100, seed=2, dtype=dtype)
    w, b = _randn(100, seed=3, dtype=dtype), _randn(100, seed=4, dtype=dtype)
    normed, summed = reference.residual_layer_norm(x, r, w, b, 1e-5)
    assert torch.equal(summed, x + r)
    assert torch.equal(normed, reference.layer_norm(x + r, w, b, 1e-5))
    normed, summed = reference.residual_rms_norm(x, r, w, 1e-6)
    assert torch.equal(summed, x + r)
    assert torch.equal(normed, reference.rms_norm(x + r, w, 1e-6))


def test_rms_norm_equals_fp64_formula() -> None:
    x, w = _randn(4, 1600, seed=5), _randn(1600, seed=6)
    x64 = x.double()
    expected = w.double() * x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(reference.rms_norm(x, w, 1e-6).double(), expected, atol=1e-5, rtol=1e-5)


def test_rms_norm_casts_before_the_weight() -> None:
    x, w = _randn(2, 64, seed=7, dtype=torch.bfloat16), _randn(64, seed=8, dtype=torch.bfloat16)
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    out = reference.rms_norm(x, w, 1e-6)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, w * normed)


def test_layer_norm_equals_fp64_formula() -> None:
    x, w, b = _randn(4, 100, seed=9) * 3 + 1, _randn(100, seed=10), _randn(100, seed=11)
    x64 = x.double()
    mean, var = x64.mean(-1, keepdim=True), x64.var(-1, unbiased=False, keepdim=True)
    expected = (x64 - mean) / torch.sqrt(var + 1e-5) * w.double() + b.double()
    torch.testing.assert_close(reference.layer_norm(x, w, b, 1e-5).double(), expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- activations


def _gelu_tanh64(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


@pytest.mark.parametrize("kind", ["gelu", "gelu_new", "relu"])
def test_activation_formulas(kind: str) -> None:
    x = _randn(7, 33, seed=12) * 3
    x64 = x.double()
    expected = {"gelu": 0.5 * x64 * (1 + torch.special.erf(x64 / math.sqrt(2))),
                "gelu_new": _gelu_tanh64(x64), "relu": x64.clamp_min(0)}[kind]
    torch.testing.assert_close(reference.activation(x, kind).double(), expected, atol=1e-6, rtol=1e-6)
    bias = _randn(33, seed=13)
    torch.testing.assert_close(reference.bias_activation(x, bias, kind), reference.activation(x + bias, kind))


@pytest.mark.parametrize("kind", ["silu_gated", "gelu_gated"])
def test_gated_activation_formulas(kind: str) -> None:
    gate, up = _randn(5, 40, seed=14) * 3, _randn(5, 40, seed=15)
    g64 = gate.double()
    act = g64 * torch.sigmoid(g64) if kind == "silu_gated" else _gelu_tanh64(g64)
    torch.testing.assert_close(reference.gated_activation(gate, up, kind).double(), act * up.double(),
                               atol=1e-6, rtol=1e-6)


def test_unknown_activation_kinds_raise_value_error() -> None:
    x = torch.zeros(2, 8)
    with pytest.raises(ValueError, match="allowed: gelu, gelu_new, relu"):
        ops.activation(x, "swish")
    with pytest.raises(ValueError, match="allowed: gelu, gelu_new, relu"):
        ops.bias_activation(x, torch.zeros(8), "silu_gated")
    with pytest.raises(ValueError, match="allowed: silu_gated, gelu_gated"):
        ops.gated_activation(x, x, "gelu")


# ---------------------------------------------------------------- rotary, qkv + cache


def _cos_sin(positions: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    freqs = torch.outer(torch.arange(positions).float(), inv)
    emb = torch.cat((freqs, freqs), -1)
    return emb.cos(), emb.sin()  # [P, D]


def test_rotary_preserves_norms_and_depends_on_relative_position() -> None:
    cos, sin = _cos_sin(32, 16)
    q, k = _randn(1, 1, 1, 16, seed=16).double(), _randn(1, 1, 1, 16, seed=17).double()
    rot = lambda x, p: reference.rotary(x, cos[p].double().view(1, 1, 16), sin[p].double().view(1, 1, 16))
    torch.testing.assert_close(rot(q, 9).norm(), q.norm())
    torch.testing.assert_close(rot(q, 0), q)
    dot = lambda m, n: (rot(q, m) * rot(k, n)).sum()
    torch.testing.assert_close(dot(7, 3), dot(14, 10))


def _qkv_case(b: int = 3, t: int = 5, hq: int = 6, hkv: int = 2, d: int = 8, slots: int = 4, length: int = 11):
    qkv = _randn(b, t, (hq + 2 * hkv) * d, seed=18)
    k_cache, v_cache = _randn(slots, hkv, length, d, seed=19), _randn(slots, hkv, length, d, seed=20)
    slot_ids = torch.tensor([2, 0, 3])[:b]
    write = torch.stack([torch.randperm(length, generator=_gen(21 + i))[:t] for i in range(b)])  # [B, T]
    positions = torch.randint(0, 30, (b, t), generator=_gen(25))
    return qkv, k_cache, v_cache, slot_ids, write, positions


def test_qkv_rotary_cache_splits_rotates_and_writes() -> None:
    qkv, k_cache, v_cache, slots, write, positions = _qkv_case()
    cos_t, sin_t = _cos_sin(30, 8)
    kc, vc = k_cache.clone(), v_cache.clone()
    q = reference.qkv_rotary_cache(qkv, cos_t, sin_t, kc, vc, slots, write, 6, 2, 8, True, positions)
    qs, ks, vs = qkv.split([48, 16, 16], -1)
    heads = lambda x, h: x.view(3, 5, h, 8).transpose(1, 2)
    cos, sin = cos_t[positions], sin_t[positions]
    assert q.is_contiguous()
    torch.testing.assert_close(q, reference.rotary(heads(qs, 6), cos, sin))
    k_rot = reference.rotary(heads(ks, 2), cos, sin)  # [B, Hkv, T, D]
    written = torch.zeros(4, 11, dtype=torch.bool)
    for b in range(3):
        for t in range(5):
            s, c = int(slots[b]), int(write[b, t])
            written[s, c] = True
            torch.testing.assert_close(kc[s, :, c], k_rot[b, :, t])
            torch.testing.assert_close(vc[s, :, c], heads(vs, 2)[b, :, t])
    assert torch.equal(kc.permute(0, 2, 1, 3)[~written], k_cache.permute(0, 2, 1, 3)[~written])
    assert torch.equal(vc.permute(0, 2, 1, 3)[~written], v_cache.permute(0, 2, 1, 3)[~written])
    kc2, vc2 = k_cache.clone(), v_cache.clone()  # per-token cos/sin give the same as the tables
    q2 = reference.qkv_rotary_cache(qkv, cos, sin, kc2, vc2, slots, write, 6, 2, 8, True)
    assert torch.equal(q2, q) and torch.equal(kc2, kc) and torch.equal(vc2, vc)


def test_qkv_rotary_cache_without_rotary_is_a_split() -> None:
    qkv, k_cache, v_cache, slots, write, _ = _qkv_case()
    q = reference.qkv_rotary_cache(qkv, None, None, k_cache, v_cache, slots, write, 6, 2, 8, rotary=False)
    torch.testing.assert_close(q, qkv[..., :48].reshape(3, 5, 6, 8).transpose(1, 2))
    torch.testing.assert_close(k_cache[2, :, write[0, 1]], qkv[0, 1, 48:64].view(2, 8))
    with pytest.raises(ValueError, match="needs cos and sin"):
        reference.qkv_rotary_cache(qkv, None, None, k_cache, v_cache, slots, write, 6, 2, 8, rotary=True)


# ---------------------------------------------------------------- decode attention


def _decode_case(b: int, hq: int, hkv: int, d: int, length: int, seed: int = 30):
    slots_total = b + 2
    q = _randn(b, hq, 1, d, seed=seed)
    k_cache, v_cache = _randn(slots_total, hkv, length, d, seed=seed + 1), _randn(slots_total, hkv, length, d,
                                                                                 seed=seed + 2)
    slots = torch.randperm(slots_total, generator=_gen(seed + 3))[:b]
    lengths = torch.randint(1, length + 1, (b,), generator=_gen(seed + 4))
    valid = torch.rand(slots_total, length, generator=_gen(seed + 5)) < 0.8
    valid[slots, lengths - 1] = True  # the newest column is the query's own token
    return q, k_cache, v_cache, slots, lengths, valid


@pytest.mark.parametrize(("hq", "hkv"), [(5, 5), (8, 2), (8, 1)])
def test_decode_attention_equals_masked_full_attention(hq: int, hkv: int) -> None:
    q, k_cache, v_cache, slots, lengths, valid = _decode_case(3, hq, hkv, 16, 19)
    cols = torch.arange(19)
    mask = (valid[slots] & (cols < lengths.view(-1, 1))).view(3, 1, 1, 19)
    expected = reference.attention(q, k_cache[slots], v_cache[slots], mask)
    got = reference.decode_attention(q, k_cache, v_cache, slots, lengths, valid)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ops.decode_attention(q, k_cache, v_cache, slots, lengths, valid, 0.25), expected)


def test_decode_attention_only_itself_and_nothing() -> None:
    q, k_cache, v_cache, slots, _, valid = _decode_case(2, 4, 2, 8, 9)
    valid[slots] = False
    valid[slots[0], 4] = True  # sequence 0 sees only its own token at column 4
    lengths = torch.tensor([5, 9])  # sequence 1 has no valid column at all
    out = reference.decode_attention(q, k_cache, v_cache, slots, lengths, valid)
    torch.testing.assert_close(out[0, :, 0], v_cache[slots[0], :, 4].repeat_interleave(2, dim=0))
    assert torch.equal(out[1], torch.zeros_like(out[1]))


def test_fused_decode_path_equals_model_attention() -> None:
    """The wiring the model's decode path should use: same output and cache as Attention.forward."""
    cfg = ArchConfig(model_type="llama", vocab_size=32, hidden_size=64, num_layers=1, num_heads=8,
                     num_kv_heads=2, head_dim=16, norm="rmsnorm", activation="silu_gated", positions="rotary",
                     qkv_bias=False, out_bias=False, max_positions=64)
    torch.manual_seed(0)
    attn = Attention(cfg, 0).eval()
    rope = rotary_table(cfg)
    cache = KVCache(cfg, [0], num_slots=4, max_len=12, dtype=torch.float32, device="cpu")
    slots = torch.tensor([2, 0])
    pre = prefill_meta(torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]]), slots)
    cache.commit(pre)
    with torch.no_grad():
        attn(_randn(2, 7, 64, seed=40), pre, attention_mask(pre, True, cache), cache, rope)
        step = decode_meta(slots, write_index=torch.tensor([7, 7]), positions=torch.tensor([5, 7]))
        cache.commit(step)
        ref_cache = copy.deepcopy(cache)
        x = _randn(2, 1, 64, seed=41)
        expected = attn(x, step, None, ref_cache, rope)  # a decode step reads the cache's validity (no window)
        q = ops.qkv_rotary_cache(attn.qkv(x), rope[0], rope[1], cache.k[0], cache.v[0], step.slots,
                                 step.write_index, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                 rotary=True, positions=step.positions)
        o = ops.decode_attention(q, cache.k[0], cache.v[0], step.slots, step.write_index[:, -1] + 1, cache.valid)
        got = attn.out(o.transpose(1, 2).reshape(2, 1, -1))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.k[0], ref_cache.k[0])
    torch.testing.assert_close(cache.v[0], ref_cache.v[0])


# ---------------------------------------------------------------- int8 weight-only


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantize_int8_error_is_bounded(dtype: torch.dtype) -> None:
    w = (_randn(48, 100, seed=50) * torch.logspace(-3, 0, 48).view(-1, 1)).to(dtype)
    w[3] = 0
    qweight, scale = ops.quantize_int8(w)
    assert qweight.dtype == torch.int8 and qweight.shape == (48, 100)
    assert scale.dtype == dtype and scale.shape == (48,)
    assert int(qweight.abs().max()) <= 127 and torch.equal(qweight[3], torch.zeros_like(qweight[3]))
    err = (w.float() - ops.dequantize_int8(qweight, scale, torch.float32)).abs()
    step = scale.float().view(-1, 1)
    eps = torch.finfo(dtype).eps
    assert bool((err <= step * (0.5 + 127 * eps) + 1e-12).all()), float((err / step).max())


def test_int8_linear_reference_is_dequantised_matmul() -> None:
    w, bias = _randn(40, 100, seed=51) * 0.05, _randn(40, seed=52)
    qweight, scale = ops.quantize_int8(w)
    x = _randn(2, 3, 100, seed=53)
    expected = x @ (qweight.float() * scale.view(-1, 1)).T + bias
    torch.testing.assert_close(reference.int8_linear(x, qweight, scale, bias), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reference.int8_linear(x, qweight, scale, bias), x @ w.T + bias, atol=0.05, rtol=0.05)
    with pytest.raises(ValueError, match="qweight must be int8"):
        reference.int8_linear(x, w, scale)


# ---------------------------------------------------------------- dispatch point


def test_cpu_tensors_take_the_reference() -> None:
    x, r, w, b = _randn(3, 24, seed=60), _randn(3, 24, seed=61), _randn(24, seed=62), _randn(24, seed=63)
    assert torch.equal(ops.layer_norm(x, w, b, 1e-5), reference.layer_norm(x, w, b, 1e-5))
    assert torch.equal(ops.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6))
    pairs = [*zip(ops.residual_layer_norm(x, r, w, b, 1e-5), reference.residual_layer_norm(x, r, w, b, 1e-5),
                  strict=True),
             *zip(ops.residual_rms_norm(x, r, w, 1e-6), reference.residual_rms_norm(x, r, w, 1e-6), strict=True)]
    for got, want in pairs:
        assert torch.equal(got, want)
    assert torch.equal(ops.activation(x, "gelu"), reference.activation(x, "gelu"))
    assert torch.equal(ops.bias_activation(x, b, "relu"), reference.bias_activation(x, b, "relu"))
    assert torch.equal(ops.gated_activation(x, r, "silu_gated"), reference.gated_activation(x, r, "silu_gated"))
    qweight, scale = ops.quantize_int8(_randn(40, 24, seed=64))
    for rows in (1, 16, 17):
        xi = _randn(rows, 24, seed=65)
        assert torch.equal(ops.int8_linear(xi, qweight, scale, b[:1].expand(40).contiguous()),
                           reference.int8_linear(xi, qweight, scale, b[:1].expand(40).contiguous()))


def test_extension_detection_is_quiet() -> None:
    assert isinstance(ops.HAVE_EXT, bool)
    assert isinstance(ops.EXT_REASON, str) and ops.EXT_REASON
    env = {k: v for k, v in os.environ.items() if k != "EET_PIPE_JIT"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", "import eet_pipe.ops"], env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == "", done.stderr


# ---------------------------------------------------------------- linear


def test_linear_layer_is_a_drop_in_for_nn_linear() -> None:
    """The model's Linear has nn.Linear's parameters (checkpoints load unchanged) and, on CPU, its output."""
    from eet_pipe.models.layers import Linear

    ref = torch.nn.Linear(24, 10)
    ours = Linear(24, 10)
    ours.load_state_dict(ref.state_dict())
    assert list(ours.state_dict()) == ["weight", "bias"] and isinstance(ours, torch.nn.Linear)
    x = _randn(2, 3, 24, seed=4)
    assert torch.equal(ours(x), ref(x))
    assert torch.equal(ops.linear(x, ref.weight, None), torch.nn.functional.linear(x, ref.weight))


def test_gated_linear_off_the_kernels_is_the_two_projections_and_the_gated_activation() -> None:
    gen = torch.Generator().manual_seed(7)
    x, gate, up = (torch.randn(*s, generator=gen) for s in ((2, 3, 16), (24, 16), (24, 16)))
    gate_bias, up_bias = torch.randn(24, generator=gen), torch.randn(24, generator=gen)
    (qg, sg), (qu, su) = ops.quantize_int8(gate), ops.quantize_int8(up)
    for kind in reference.GATED_ACTIVATIONS:
        want = reference.gated_activation(torch.nn.functional.linear(x, gate, gate_bias),
                                          torch.nn.functional.linear(x, up, up_bias), kind)
        assert torch.equal(ops.gated_linear(x, gate, up, kind, gate_bias, up_bias), want)
        want8 = reference.gated_activation(ops.int8_linear(x, qg, sg), ops.int8_linear(x, qu, su), kind)
        assert torch.equal(ops.gated_linear(x, qg, qu, kind, gate_scale=sg, up_scale=su), want8)
        assert not torch.equal(want8, reference.gated_activation(ops.int8_linear(x, qg, sg), ops.int8_linear(x, qu, su),
                                                                 "gelu_gated" if kind == "silu_gated" else "silu_gated"))
    with pytest.raises(ValueError, match="unknown gated activation 'swish'; allowed: silu_gated, gelu_gated"):
        ops.gated_linear(x, gate, up, "swish")
    with pytest.raises(ValueError, match="gate_scale and up_scale are given together"):
        ops.gated_linear(x, qg, qu, "silu_gated", up_scale=su)
