"""The presets of today's models: their shapes, and parameter counts / bytes computed from the config."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from eet_pipe.loading.presets import list_presets, resolve_model
from eet_pipe.models.config import ArchConfig
from eet_pipe.models.quant import quantize_model
from eet_pipe.partition.sizes import PRECISIONS, param_count, unit_bytes, weight_bytes
from eet_pipe.weights.loader import init_random

NEW = ("llama-3-8b", "llama-3-70b", "qwen2.5-7b", "qwen2.5-72b", "mistral-7b")
PUBLISHED = {  # parameter counts of the released checkpoints (safetensors metadata / model cards)
    "llama-3-8b": 8_030_261_248, "llama-3-70b": 70_553_706_496, "qwen2.5-7b": 7_615_616_512,
    "qwen2.5-72b": 72_706_203_648, "mistral-7b": 7_248_023_552, "gpt2": 124_439_808,
}


def _formula(cfg: ArchConfig) -> int:
    """Closed form for the pre-norm rotary decoders (no position table, RMSNorm, gated MLP)."""
    h, d, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
    attn = h * (q + 2 * kv) + q * h + ((q + 2 * kv) if cfg.qkv_bias else 0) + (h if cfg.out_bias else 0)
    mlp = 3 * h * i + ((2 * i + h) if cfg.mlp_bias else 0)
    layer = attn + mlp + 2 * h
    embed = cfg.vocab_size * h
    return embed + cfg.num_layers * layer + h + (0 if cfg.tie_embeddings else embed)


@pytest.mark.parametrize("name", NEW)
def test_new_presets_are_listed_and_resolve(name):
    assert name in list_presets()
    spec = resolve_model(name, "random")
    assert spec.source == "random" and spec.cfg.is_decoder and spec.cfg.head_dim == 128
    assert spec.cfg.num_kv_heads < spec.cfg.num_heads  # grouped-query attention
    assert not spec.cfg.tie_embeddings  # none of these checkpoints ties its head


def test_preset_shapes():
    l70, l8 = resolve_model("llama-3-70b", "random").cfg, resolve_model("llama-3-8b", "random").cfg
    for cfg in (l70, l8):
        assert (cfg.rope_type, cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
                cfg.rope_original_max_positions, cfg.rope_theta) == ("llama3", 8.0, 1.0, 4.0, 8192, 500000.0)
        assert cfg.vocab_size == 128256 and cfg.max_positions == 131072 and not cfg.qkv_bias
    assert (l70.num_layers, l70.hidden_size, l70.num_heads, l70.num_kv_heads, l70.intermediate_size) == \
        (80, 8192, 64, 8, 28672)
    q7, q72 = resolve_model("qwen2.5-7b", "random").cfg, resolve_model("qwen2.5-72b", "random").cfg
    for cfg in (q7, q72):
        assert cfg.model_type == "qwen2" and cfg.qkv_bias and not cfg.out_bias and not cfg.mlp_bias
        assert cfg.vocab_size == 152064 and cfg.rope_theta == 1e6
    assert (q7.num_layers, q7.hidden_size, q7.num_heads, q7.num_kv_heads, q7.norm_eps) == (28, 3584, 28, 4, 1e-6)
    mistral = resolve_model("mistral-7b", "random").cfg
    assert (mistral.model_type, mistral.vocab_size, mistral.max_positions, mistral.rope_theta) == \
        ("mistral", 32768, 32768, 1e6)


@pytest.mark.parametrize("name", [*NEW, "llama-7b", "tinyllama-1.1b"])
def test_param_count_matches_the_formula(name):
    cfg = resolve_model(name, "random").cfg
    assert param_count(cfg) == _formula(cfg)
    if name in PUBLISHED:
        assert param_count(cfg) == PUBLISHED[name]
    for precision, elem in (("fp32", 4), ("fp16", 2), ("bf16", 2)):
        assert weight_bytes(cfg, precision) == elem * param_count(cfg)


TINY = {
    "llama-gqa": dict(model_type="llama", vocab_size=97, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                      intermediate_size=48, norm="rmsnorm", activation="silu_gated", positions="rotary",
                      qkv_bias=False, out_bias=False, mlp_bias=False, tie_embeddings=False, max_positions=64),
    "qwen2-tied": dict(model_type="qwen2", vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                       intermediate_size=40, norm="rmsnorm", activation="silu_gated", positions="rotary",
                       qkv_bias=True, out_bias=False, mlp_bias=False, tie_embeddings=True, max_positions=64),
    "gpt2-tied": dict(model_type="gpt2", vocab_size=101, hidden_size=32, num_layers=2, num_heads=4, max_positions=40),
}


@pytest.mark.parametrize("kind", TINY)
def test_counts_equal_a_real_tiny_model(kind):
    cfg = ArchConfig(**TINY[kind])
    model = init_random(cfg)
    unique = {id(p): p for p in model.parameters()}.values()  # a tied head is one tensor
    assert param_count(cfg) == sum(p.numel() for p in unique)
    assert weight_bytes(cfg, "fp32") == sum(p.numel() * p.element_size() for p in unique)
    if kind.startswith("llama"):
        assert param_count(cfg) == _formula(cfg)
    for unit in cfg.unit_names():  # each unit alone, as a pipeline stage holds it
        alone = init_random(cfg, [unit], dtype=torch.bfloat16)
        assert unit_bytes(cfg, unit, "bf16") == sum(t.numel() * t.element_size() for t in alone.state_dict().values())


def test_int8_bytes_equal_the_quantised_model():
    cfg = ArchConfig(**TINY["llama-gqa"])
    model = quantize_model(init_random(cfg, dtype=torch.float16))
    held = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert weight_bytes(cfg, "int8") == held
    with pytest.raises(ValueError, match="precision='int4' is not supported; allowed: fp32, fp16, bf16, int8"):
        weight_bytes(cfg, "int4")


def test_models_command_lists_counts_and_bytes():
    proc = subprocess.run([sys.executable, "-m", "eet_pipe.cli", "models"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:10] == ["preset", "params", "fp32", "GB", "fp16", "GB", "bf16", "GB", "int8", "GB"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["llama-3-70b"][1:6] == ["70.55B", "282.21", "141.11", "141.11", "72.67"]
    assert rows["llama-3-8b"][1:4] == ["8.03B", "32.12", "16.06"]
    assert rows["qwen2.5-72b"][1] == "72.71B" and rows["mistral-7b"][1] == "7.25B"
    assert set(NEW) <= set(rows) and rows["tiny"][2] == "<0.01" and list(PRECISIONS) == ["fp32", "fp16", "bf16", "int8"]
