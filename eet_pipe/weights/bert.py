"""BERT: HF ``BertModel`` (and the encoder of ``BertFor*``) names -> canonical names."""

from __future__ import annotations

from eet_pipe.models.config import ArchConfig
from eet_pipe.weights.mapping import COPY, ArchMapping, Concat, Rule

__all__ = ["BERT"]

_LAYER = "encoder.layer.{i}."
_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_new", "relu": "relu"}


def _rules(cfg: ArchConfig) -> list[Rule]:
    qkv = Concat(lambda c: [c.num_heads * c.head_dim] * 3)
    rules = [Rule("embed.tok.weight", ("embeddings.word_embeddings.weight",)),
             Rule("embed.pos.weight", ("embeddings.position_embeddings.weight",)),
             Rule("embed.type.weight", ("embeddings.token_type_embeddings.weight",)),
             Rule("embed.norm.weight", ("embeddings.LayerNorm.weight",)),
             Rule("embed.norm.bias", ("embeddings.LayerNorm.bias",))]
    for part in ("weight", "bias"):
        rules.append(Rule(f"layers.{{i}}.attn.qkv.{part}",
                          tuple(_LAYER + f"attention.self.{n}.{part}" for n in ("query", "key", "value")), qkv))
        for canon, hf in (("attn.out", "attention.output.dense"), ("attn.norm", "attention.output.LayerNorm"),
                          ("mlp.up", "intermediate.dense"), ("mlp.down", "output.dense"),
                          ("mlp.norm", "output.LayerNorm")):
            rules.append(Rule(f"layers.{{i}}.{canon}.{part}", (_LAYER + f"{hf}.{part}",), COPY))
        if cfg.pooler:
            rules.append(Rule(f"pooler.{part}", (f"pooler.dense.{part}",)))
    return rules


def _config(hf: dict) -> ArchConfig:
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"BERT position_embedding_type={hf['position_embedding_type']!r} is not supported; "
                         "allowed: absolute")
    act = hf.get("hidden_act", "gelu")
    if act not in _ACTIVATIONS:
        raise ValueError(f"BERT hidden_act={act!r} is not supported; allowed: {', '.join(_ACTIVATIONS)}")
    return ArchConfig(
        model_type="bert", vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"], norm="layernorm", norm_eps=hf.get("layer_norm_eps", 1e-12),
        pre_norm=False, activation=_ACTIVATIONS[act], positions="learned", causal=False, tie_embeddings=False,
        max_positions=hf.get("max_position_embeddings", 512), type_vocab_size=hf.get("type_vocab_size", 2),
        embed_norm=True, final_norm=False, lm_head=False, pooler=True, pad_token_id=hf.get("pad_token_id"))


def _adjust(cfg: ArchConfig, keys: set[str]) -> ArchConfig:
    """Checkpoints saved without the pooler (e.g. BertForMaskedLM) load without one."""
    return cfg if any(k.endswith("pooler.dense.weight") for k in keys) else cfg.replace(pooler=False)


BERT = ArchMapping(
    model_type="bert", prefix="bert.", rules=_rules, config_from_hf=_config, adjust_config=_adjust,
    ignore=lambda cfg: (r"(bert\.)?embeddings\.position_ids", r"(bert\.)?embeddings\.token_type_ids", r"cls\..*"),
)
