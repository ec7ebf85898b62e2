"""Mistral: HF ``MistralForCausalLM`` names -> canonical names.

The LLaMA-shaped decoder table (``weights/llama.py``); what differs is the config: ``head_dim`` may be set
apart from ``hidden_size / num_attention_heads``, and ``sliding_window`` (when not null) restricts every layer's
attention to that many cache columns, as HF's Mistral applies it to all layers.
"""

from __future__ import annotations

from eet_pipe.models.config import ArchConfig
from eet_pipe.weights.llama import decoder_config, decoder_ignore, decoder_rules
from eet_pipe.weights.mapping import ArchMapping

__all__ = ["MISTRAL"]


def _config(hf: dict) -> ArchConfig:
    return decoder_config(hf, qkv_bias=False, out_bias=False, mlp_bias=False,
                          sliding_window=hf.get("sliding_window"), sliding_window_layers=None)


MISTRAL = ArchMapping(model_type="mistral", prefix="model.", rules=decoder_rules, config_from_hf=_config,
                      ignore=decoder_ignore)
