"""GPT-2: HF ``GPT2Model`` / ``GPT2LMHeadModel`` names -> canonical names."""

from __future__ import annotations

from eet_pipe.models.config import ArchConfig
from eet_pipe.weights.mapping import COPY, TRANSPOSE, ArchMapping, Rule, head_rule

__all__ = ["GPT2"]

_ACTIVATIONS = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}


def _rules(cfg: ArchConfig) -> list[Rule]:
    rules = [Rule("embed.tok.weight", ("wte.weight",)), Rule("embed.pos.weight", ("wpe.weight",))]
    for canon, hf, conv in (("attn.norm", "ln_1", False), ("attn.qkv", "attn.c_attn", True),
                            ("attn.out", "attn.c_proj", True), ("mlp.norm", "ln_2", False),
                            ("mlp.up", "mlp.c_fc", True), ("mlp.down", "mlp.c_proj", True)):
        rules.append(Rule(f"layers.{{i}}.{canon}.weight", (f"h.{{i}}.{hf}.weight",), TRANSPOSE if conv else COPY))
        rules.append(Rule(f"layers.{{i}}.{canon}.bias", (f"h.{{i}}.{hf}.bias",)))
    rules += [Rule("final_norm.weight", ("ln_f.weight",)), Rule("final_norm.bias", ("ln_f.bias",))]
    rules.append(head_rule(cfg, "wte.weight"))
    return rules


def _config(hf: dict) -> ArchConfig:
    if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx", False):
        raise ValueError("GPT-2 checkpoints with scale_attn_weights=False or scale_attn_by_inverse_layer_idx=True "
                         "are not supported")
    if hf.get("add_cross_attention", False):
        raise ValueError("GPT-2 with add_cross_attention=True (encoder-decoder) is not supported")
    act = hf.get("activation_function", "gelu_new")
    if act not in _ACTIVATIONS:
        raise ValueError(f"GPT-2 activation_function={act!r} is not supported; allowed: {', '.join(_ACTIVATIONS)}")
    return ArchConfig(
        model_type="gpt2", vocab_size=hf["vocab_size"], hidden_size=hf["n_embd"], num_layers=hf["n_layer"],
        num_heads=hf["n_head"], intermediate_size=hf.get("n_inner") or 4 * hf["n_embd"], norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), pre_norm=True, activation=_ACTIVATIONS[act],
        positions="learned", causal=True, tie_embeddings=hf.get("tie_word_embeddings", True),
        max_positions=hf.get("n_positions", 1024), final_norm=True, lm_head=True,
        pad_token_id=hf.get("pad_token_id"), bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"))


GPT2 = ArchMapping(
    model_type="gpt2", prefix="transformer.", rules=_rules, config_from_hf=_config,
    ignore=lambda cfg: (r"transformer\.h\.\d+\.attn\.(masked_)?bias",)
    + ((r"lm_head\.weight",) if cfg.tie_embeddings else ()),
)
