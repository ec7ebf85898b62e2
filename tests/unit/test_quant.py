"""Int8 weight-only quantisation on CPU: module, model swap, loading options and error messages."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import eet_pipe
from eet_pipe import ops
from eet_pipe.generation.lm import LanguageModel
from eet_pipe.loading.presets import resolve_model
from eet_pipe.loading.units import load_units
from eet_pipe.models.quant import Int8Linear, check_quantize, quantize_model, resolve_precision
from eet_pipe.weights.loader import from_torch
from tests.hf_models import make_gpt2

PROMPTS = [[5, 17, 33, 9, 41, 3, 77, 12, 5, 6, 90], [8, 13], [100, 3, 4, 5, 6, 44, 23]]
# Bound of the int8 GPT-2-shaped model (6 layers, hidden 500, weights N(0, 0.08)) against fp32:
# max |logit error| <= 5 % of max |logit| (measured 3.2 %), relative Frobenius error <= 5 % (measured 3.0 %).
MAX_REL_ERR, FRO_REL_ERR = 0.05, 0.05


@pytest.fixture(scope="module")
def gpt2_pair():
    model = from_torch(make_gpt2())
    return LanguageModel(model), LanguageModel(quantize_model(copy.deepcopy(model)))


def test_int8_linear_matches_dequantised_weight():
    lin = nn.Linear(37, 23)
    q = Int8Linear.from_linear(lin)
    x = torch.randn(4, 5, 37)
    want = nn.functional.linear(x, ops.dequantize_int8(q.qweight, q.scale), lin.bias)
    torch.testing.assert_close(q(x), want, atol=1e-5, rtol=1e-5)
    step = q.scale.unsqueeze(1)  # per-element error at most half a quantisation step
    assert ((ops.dequantize_int8(q.qweight, q.scale) - lin.weight).abs() <= step / 2 + 1e-7).all()
    assert q.qweight.dtype == torch.int8 and q.qweight.shape == (23, 37) and q.scale.shape == (23,)


def test_quantize_model_keeps_canonical_names(gpt2_pair):
    _, quant = gpt2_pair
    keys = set(quant.model.state_dict())
    for name in ("attn.qkv", "attn.out", "mlp.up", "mlp.down"):
        assert {f"layers.0.{name}.qweight", f"layers.0.{name}.scale", f"layers.0.{name}.bias"} <= keys
        assert f"layers.0.{name}.weight" not in keys
        assert isinstance(quant.model.layers["5"].get_submodule(name), Int8Linear)
    assert isinstance(quant.model.head, nn.Linear) and quant.model.head.weight.dtype == torch.float32
    assert isinstance(quant.model.embed.tok, nn.Embedding)
    assert quantize_model(quant.model) is quant.model  # already quantised modules are left alone


def test_quantized_logits_close_to_fp32(gpt2_pair):
    ref, quant = gpt2_pair
    ids = torch.randint(0, 211, (3, 20), generator=torch.Generator().manual_seed(0))
    a, b = ref(ids), quant(ids)
    assert (a - b).abs().max() <= MAX_REL_ERR * a.abs().max()
    assert torch.linalg.norm(a - b) <= FRO_REL_ERR * torch.linalg.norm(a)


def test_quantized_greedy_generation_runs(gpt2_pair):
    ref, quant = gpt2_pair
    want = ref.generate(PROMPTS, max_new_tokens=16, ignore_eos=True)
    got = quant.generate(PROMPTS, max_new_tokens=16, ignore_eos=True)
    assert all(len(r.token_ids) == 16 and all(0 <= t < 211 for t in r.token_ids) for r in got)
    same = sum(x == y for r, s in zip(got, want, strict=True) for x, y in zip(r.token_ids, s.token_ids, strict=True))
    assert same >= 0.5 * 16 * len(PROMPTS)


def test_llama_gate_is_quantized():
    spec = resolve_model("tinyllama-1.1b", "random")
    spec.cfg = type(spec.cfg)(**{**vars(spec.cfg), "hidden_size": 64, "num_layers": 2, "num_heads": 4,
                                 "num_kv_heads": 2, "head_dim": 16, "intermediate_size": 96, "vocab_size": 97})
    model = load_units(spec, None, torch.float32, "cpu", quantize="int8-weight")
    assert isinstance(model.layers["1"].mlp.gate, Int8Linear)
    assert "layers.1.mlp.gate.qweight" in model.state_dict()


def test_from_pretrained_int8_dtype_on_cpu():
    lm = eet_pipe.from_pretrained("tiny", dtype="int8")
    assert lm.dtype == torch.float32  # fp32 activations on CPU
    assert lm.model.layers["0"].attn.qkv.qweight.dtype == torch.int8
    same = eet_pipe.from_pretrained("tiny", quantize="int8-weight")
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(lm(ids), same(ids))
    assert lm.generate("Hello", max_new_tokens=4)[0].finish_reason in ("length", "stop")


def test_error_messages():
    with pytest.raises(ValueError, match="quantize='int4' is not supported; allowed: int8-weight"):
        eet_pipe.from_pretrained("tiny", quantize="int4")
    with pytest.raises(ValueError, match="quantize='int4' is not supported"):
        check_quantize("int4")
    with pytest.raises(ValueError, match="dtype='int4' is not supported"):
        eet_pipe.from_pretrained("tiny", dtype="int4")
    with pytest.raises(ValueError, match="quantize='fp8'"):
        resolve_precision("int8", "fp8", torch.device("cpu"))
    with pytest.raises(ValueError, match="qweight must be an int8"):
        Int8Linear(torch.zeros(3, 4), torch.ones(3))
    with pytest.raises(ValueError, match="scale shape"):
        Int8Linear(torch.zeros(3, 4, dtype=torch.int8), torch.ones(4))


def test_resolve_precision():
    assert resolve_precision("int8", None, torch.device("cpu")) == ("fp32", "int8-weight")
    assert resolve_precision("INT8", "int8-weight", torch.device("cuda", 0)) == ("fp16", "int8-weight")
    assert resolve_precision("bf16", None, torch.device("cpu")) == ("bf16", None)


# ---------------------------------------------------------------- fused epilogue (project)

def _hooked_and_plain(linear: torch.nn.Module, x: torch.Tensor, residual: torch.Tensor, act: str) -> None:
    from eet_pipe.models.layers import project

    plain = project(linear, x, act, residual)
    seen = []
    handle = linear.register_forward_hook(lambda m, args, out: seen.append(out.clone()))
    try:
        hooked = project(linear, x, act, residual)
    finally:
        handle.remove()
    assert torch.equal(hooked, plain)  # same values with or without the fusion
    assert len(seen) == 1 and torch.equal(seen[0], linear(x))  # the hook saw the plain projection
    assert torch.equal(plain, ops.activation(linear(x), act) + residual)


def test_project_epilogue_is_exact_on_cpu_and_hooks_see_the_plain_projection():
    from eet_pipe.models.layers import Linear

    torch.manual_seed(0)
    linear = Linear(24, 40)
    x, residual = torch.randn(3, 5, 24), torch.randn(3, 5, 40)
    for act in ("gelu", "gelu_new", "relu"):
        _hooked_and_plain(linear, x, residual, act)
    q = Int8Linear.from_linear(linear)
    _hooked_and_plain(q, x, residual, "gelu_new")
    assert torch.equal(linear(x, None, residual), residual + linear(x))
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        ops.linear(x, linear.weight, linear.bias, "swish")


def test_a_stale_extension_build_is_told_apart_from_a_current_one():
    """A `_C` built from older sources (other op signatures) must not count as the kernels."""
    from eet_pipe.ops import _ext

    lib = torch.library.Library("eet_pipe_stale_check", "DEF")  # noqa: F841 - kept alive for the check
    lib.define("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor")
    lib.define("gemv(Tensor x, Tensor weight, Tensor? bias) -> Tensor")  # the three-argument form of old builds
    reason = _ext._stale(torch.ops.eet_pipe_stale_check)
    assert reason == "op gemv has 3 arguments, the sources define 6"
    lib2 = torch.library.Library("eet_pipe_current_check", "DEF")  # noqa: F841
    lib2.define("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor")
    lib2.define("gemv(Tensor x, Tensor weight, Tensor? scale, Tensor? bias, Tensor? residual, str activation) -> Tensor")
    assert _ext._stale(torch.ops.eet_pipe_current_check) == "op set_pdl is missing"
    lib2.define("set_pdl(bool? enabled) -> bool")  # a build before it lacks the launch setting
    assert _ext._stale(torch.ops.eet_pipe_current_check) == "op gemm_lt is missing"
    lib2.define("gemm_lt(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, str activation, Tensor? algo, "
                "int workspace) -> Tensor")  # a build before the selected cuBLASLt GEMM
    assert _ext._stale(torch.ops.eet_pipe_current_check) == "op dequantize_int8 is missing"
    lib2.define("dequantize_int8(Tensor qweight, Tensor scale) -> Tensor")
    assert _ext._stale(torch.ops.eet_pipe_current_check) == "op cublaslt_version is missing"
    lib2.define("cublaslt_version() -> int")
    assert _ext._stale(torch.ops.eet_pipe_current_check) == "op decode_attention_qkv is missing"
    lib2.define("decode_attention_qkv(Tensor qkv, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slots, "
                "Tensor write_index, Tensor lengths, Tensor valid, int num_heads, float scale) -> Tensor")
    assert _ext._stale(torch.ops.eet_pipe_current_check) == "op gemv_gated is missing"
    lib2.define("gemv_gated(Tensor x, Tensor gate, Tensor up, Tensor? gate_scale, Tensor? up_scale, "
                "Tensor? gate_bias, Tensor? up_bias, str kind) -> Tensor")  # a build before the fused gated MLP
    assert _ext._stale(torch.ops.eet_pipe_current_check) is None


@pytest.mark.skipif(ops.HAVE_EXT, reason="checks the behaviour without the CUDA extension")
def test_launch_setting_without_the_extension_reports_off():
    assert ops.set_pdl(True) is False
    assert ops.set_pdl(None) is False
