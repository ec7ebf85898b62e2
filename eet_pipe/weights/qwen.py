"""Qwen2 / Qwen2.5 and Qwen3: HF ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM`` names -> canonical names.

Both use the LLaMA-shaped decoder table (``weights/llama.py``). Qwen2 has a bias on q, k and v (so on the
fused ``attn.qkv``) but none on ``o_proj``; Qwen3 has none unless ``attention_bias``, and normalises every
query and key head (``self_attn.q_norm`` / ``k_norm`` -> ``attn.q_norm`` / ``attn.k_norm``) before rotary.
Sliding-window attention follows what HF applies: the layers that ``layer_types`` marks
``sliding_attention``, or, in a config without ``layer_types``, layers ``max_window_layers`` and up when
``use_sliding_window`` is true (HF drops ``sliding_window`` otherwise).
"""

from __future__ import annotations

from eet_pipe.models.config import ArchConfig
from eet_pipe.weights.llama import decoder_config, decoder_ignore, decoder_rules
from eet_pipe.weights.mapping import ArchMapping

__all__ = ["QWEN2", "QWEN3"]

_LAYER_TYPES = ("full_attention", "sliding_attention")


def _window(hf: dict) -> dict:
    """sliding_window / sliding_window_layers as HF's Qwen2/Qwen3 config resolves them."""
    window = hf.get("sliding_window") if hf.get("use_sliding_window", False) else None
    layers = hf["num_hidden_layers"]
    types = hf.get("layer_types")
    if types is None:
        types = ["sliding_attention" if window is not None and i >= hf.get("max_window_layers", layers) else
                 "full_attention" for i in range(layers)]
    bad = sorted({t for t in types if t not in _LAYER_TYPES})
    if bad or len(types) != layers:
        raise ValueError(f"{hf['model_type']} layer_types={types!r} is not supported: needs {layers} entries "
                         f"from {', '.join(_LAYER_TYPES)}")
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    if window is None or not sliding:
        return {"sliding_window": None, "sliding_window_layers": None}
    return {"sliding_window": int(window), "sliding_window_layers": None if len(sliding) == layers else sliding}


def _qwen2(hf: dict) -> ArchConfig:
    return decoder_config(hf, qkv_bias=True, out_bias=False, mlp_bias=False, **_window(hf))


def _qwen3(hf: dict) -> ArchConfig:
    bias = bool(hf.get("attention_bias", False))
    return decoder_config(hf, head_dim=hf.get("head_dim") or 128, qkv_bias=bias, out_bias=bias, mlp_bias=False,
                          qk_norm=True, **_window(hf))


QWEN2 = ArchMapping(model_type="qwen2", prefix="model.", rules=decoder_rules, config_from_hf=_qwen2,
                    ignore=decoder_ignore)
QWEN3 = ArchMapping(model_type="qwen3", prefix="model.", rules=decoder_rules, config_from_hf=_qwen3,
                    ignore=decoder_ignore)
