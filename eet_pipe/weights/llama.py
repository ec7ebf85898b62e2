"""LLaMA: HF ``LlamaForCausalLM`` names -> canonical names, and the LLaMA-shaped decoder table that Mistral and
Qwen2/Qwen3 (``weights/mistral.py``, ``weights/qwen.py``) share.

HF stores q/k in the rotate-half layout that eet_pipe's rotary uses, so q/k/v are only
concatenated into ``attn.qkv``; no permutation is needed.
"""

from __future__ import annotations

from eet_pipe.models.config import ArchConfig
from eet_pipe.weights.mapping import COPY, ArchMapping, Concat, Rule, head_rule

__all__ = ["LLAMA", "decoder_rules", "decoder_config", "decoder_ignore"]

_ACTIVATIONS = {"silu": "silu_gated", "gelu": "gelu_gated", "gelu_pytorch_tanh": "gelu_gated"}


def _qkv_sizes(cfg: ArchConfig) -> list[int]:
    return [cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim]


def decoder_rules(cfg: ArchConfig) -> list[Rule]:
    """The rules of a LLaMA-shaped decoder (``model.layers.{i}.self_attn.q_proj`` …); biases and the per-head
    q/k norms (``self_attn.q_norm`` / ``k_norm``) as the config says."""
    layer = "layers.{i}."
    qkv = Concat(_qkv_sizes)
    parts = ["weight"] + (["bias"] if cfg.qkv_bias else [])
    rules = [Rule("embed.tok.weight", ("embed_tokens.weight",))]
    for part in parts:
        rules.append(Rule(f"layers.{{i}}.attn.qkv.{part}",
                          tuple(layer + f"self_attn.{n}_proj.{part}" for n in "qkv"), qkv))
    rules += [Rule("layers.{i}.attn.norm.weight", (layer + "input_layernorm.weight",)),
              Rule("layers.{i}.attn.out.weight", (layer + "self_attn.o_proj.weight",)),
              Rule("layers.{i}.mlp.norm.weight", (layer + "post_attention_layernorm.weight",))]
    if cfg.out_bias:
        rules.append(Rule("layers.{i}.attn.out.bias", (layer + "self_attn.o_proj.bias",)))
    if cfg.qk_norm:
        rules += [Rule(f"layers.{{i}}.attn.{n}_norm.weight", (layer + f"self_attn.{n}_norm.weight",)) for n in "qk"]
    for name in ("gate", "up", "down"):
        for part in ["weight"] + (["bias"] if cfg.mlp_bias else []):
            rules.append(Rule(f"layers.{{i}}.mlp.{name}.{part}", (layer + f"mlp.{name}_proj.{part}",), COPY))
    rules.append(Rule("final_norm.weight", ("norm.weight",)))
    rules.append(head_rule(cfg, "embed_tokens.weight"))
    return rules


def _rope(hf: dict) -> dict:
    """Rotary fields from transformers 5.x ``rope_parameters`` or the older ``rope_theta`` + ``rope_scaling``."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    src = params if "factor" in params else scaling
    if rope_type not in ("default", "linear", "llama3"):
        raise ValueError(f"{hf.get('model_type', 'llama')} rope_type={rope_type!r} is not supported; "
                         "allowed: default, linear, llama3")
    out = {"rope_theta": float(theta), "rope_type": rope_type, "rope_factor": float(src.get("factor", 1.0))}
    if rope_type == "llama3":
        out.update(rope_low_freq_factor=float(src["low_freq_factor"]), rope_high_freq_factor=float(src["high_freq_factor"]),
                   rope_original_max_positions=int(src["original_max_position_embeddings"]))
    return out


def decoder_config(hf: dict, **fields: object) -> ArchConfig:
    """ArchConfig of a LLaMA-shaped HF config dict; `fields` (biases, sliding window, q/k norm …) override."""
    act = hf.get("hidden_act", "silu")
    if act not in _ACTIVATIONS:
        raise ValueError(f"{hf.get('model_type', 'llama')} hidden_act={act!r} is not supported; "
                         f"allowed: {', '.join(_ACTIVATIONS)}")
    bias = bool(hf.get("attention_bias", False))
    base = dict(
        model_type=hf.get("model_type", "llama"), vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"], head_dim=hf.get("head_dim"),
        intermediate_size=hf["intermediate_size"], norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6),
        pre_norm=True, activation=_ACTIVATIONS[act], positions="rotary", **_rope(hf), causal=True,
        qkv_bias=bias, out_bias=bias, mlp_bias=bool(hf.get("mlp_bias", False)), norm_bias=False,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_positions=hf.get("max_position_embeddings", 2048), final_norm=True, lm_head=True,
        pad_token_id=hf.get("pad_token_id"), bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"))
    return ArchConfig(**{**base, **fields})


def decoder_ignore(cfg: ArchConfig) -> tuple[str, ...]:
    """Checkpoint keys of a LLaMA-shaped decoder that are not weights: rotary buffers, a tied head's copy."""
    rotary = r"model\.(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq"
    return (rotary, r"lm_head\.weight") if cfg.tie_embeddings else (rotary,)


def _config(hf: dict) -> ArchConfig:
    return decoder_config(hf)


LLAMA = ArchMapping(model_type="llama", prefix="model.", rules=decoder_rules, config_from_hf=_config,
                    ignore=decoder_ignore)
