"""`ArchConfig`: the one description of a transformer's structure.

GPT-2, BERT, LLaMA, Mistral and Qwen2/Qwen3 are the same classes (`eet_pipe.models.layers`) with different
values here; nothing in the model code branches on an architecture name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ArchConfig", "NORMS", "ACTIVATIONS", "POSITIONS", "ROPE_TYPES", "POSITION_IDS"]

NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("gelu", "gelu_new", "silu_gated", "gelu_gated", "relu")
POSITIONS = ("learned", "rotary")
ROPE_TYPES = ("default", "linear", "llama3")
POSITION_IDS = ("mask", "index")


def _require(cond: bool, name: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ValueError(f"ArchConfig.{name}={value!r} is invalid: {allowed}")


@dataclass
class ArchConfig:
    """Structure of a canonical transformer (encoder or decoder)."""

    model_type: str = "gpt2"
    """Architecture family of the checkpoint (HF model_type: 'gpt2', 'bert', 'llama', 'mistral', 'qwen2', 'qwen3');
    used for weight mapping only."""
    vocab_size: int = 50257
    """Number of token ids."""
    hidden_size: int = 768
    """Width of the residual stream."""
    num_layers: int = 12
    """Number of transformer layers."""
    num_heads: int = 12
    """Attention query heads."""
    num_kv_heads: int | None = None
    """Key/value heads (grouped-query attention); defaults to num_heads."""
    head_dim: int | None = None
    """Width of one head; defaults to hidden_size // num_heads."""
    intermediate_size: int | None = None
    """MLP inner width; defaults to 4 * hidden_size."""
    norm: str = "layernorm"
    """Normalisation kind: 'layernorm' or 'rmsnorm'."""
    norm_eps: float = 1e-5
    """Epsilon of every normalisation."""
    pre_norm: bool = True
    """True: norm before attention/MLP (GPT-2, LLaMA); False: after the residual add (BERT)."""
    activation: str = "gelu_new"
    """MLP activation: gelu, gelu_new (tanh), relu, silu_gated (SwiGLU), gelu_gated."""
    positions: str = "learned"
    """Position encoding: 'learned' (absolute table) or 'rotary'."""
    rope_theta: float = 10000.0
    """Rotary base frequency."""
    rope_type: str = "default"
    """Rotary frequency scaling: default, linear or llama3."""
    rope_factor: float = 1.0
    """Rotary scaling factor (linear, llama3)."""
    rope_low_freq_factor: float = 1.0
    """llama3 scaling: low frequency factor."""
    rope_high_freq_factor: float = 4.0
    """llama3 scaling: high frequency factor."""
    rope_original_max_positions: int = 8192
    """llama3 scaling: original context length."""
    position_ids: str | None = None
    """How a token's position is counted: 'mask' (its valid tokens before it, so a left-padded row starts at 0, as
    HF generate does for decoders) or 'index' (its column in the padded input, 0..T-1 whatever the padding, as HF's
    BERT does). None picks 'index' for bidirectional encoders with learned absolute positions, else 'mask'."""
    causal: bool = True
    """Causal (decoder) or bidirectional (encoder) attention."""
    sliding_window: int | None = None
    """Sliding-window attention (Mistral): a token attends to at most this many cache columns, ending at its own;
    None attends over the whole context."""
    sliding_window_layers: list[int] | None = None
    """Indices of the layers that use sliding_window (HF Qwen2/Qwen3 `layer_types`); None: every layer."""
    qk_norm: bool = False
    """RMSNorm over head_dim on every query and key head before rotary (Qwen3): `attn.q_norm`, `attn.k_norm`."""
    qkv_bias: bool = True
    """Bias on the fused q/k/v projection."""
    out_bias: bool = True
    """Bias on the attention output projection."""
    mlp_bias: bool = True
    """Bias on the MLP projections."""
    norm_bias: bool = True
    """LayerNorm has a bias (ignored for rmsnorm)."""
    tie_embeddings: bool = True
    """The LM head shares the token embedding matrix."""
    max_positions: int = 1024
    """Longest sequence the model accepts (learned table size / context length)."""
    type_vocab_size: int = 0
    """Token type ids (BERT segment embeddings); 0 = none."""
    embed_norm: bool = False
    """Normalise the embedding output (BERT)."""
    final_norm: bool = True
    """A norm after the last layer (pre-norm decoders)."""
    lm_head: bool = True
    """Produce vocabulary logits (decoders); encoders return hidden states."""
    pooler: bool = False
    """Add the BERT pooler (dense + tanh on the first token)."""
    pad_token_id: int | None = None
    """Padding token id, if the checkpoint has one."""
    bos_token_id: int | None = None
    """Beginning-of-sequence token id."""
    eos_token_id: int | list[int] | None = None
    """End-of-sequence token id(s) that stop generation."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Unused checkpoint fields kept for round-tripping."""

    def __post_init__(self) -> None:
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.head_dim is None:
            _require(self.num_heads > 0 and self.hidden_size % self.num_heads == 0, "num_heads",
                     self.num_heads, f"must divide hidden_size={self.hidden_size} when head_dim is unset")
            self.head_dim = self.hidden_size // self.num_heads
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        if self.position_ids is None:
            self.position_ids = "index" if not self.causal and self.positions == "learned" else "mask"
        if self.sliding_window_layers is not None:
            self.sliding_window_layers = sorted({int(i) for i in self.sliding_window_layers})
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "intermediate_size", "max_positions"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value > 0, name, value, "must be a positive integer")
        _require(self.num_heads % self.num_kv_heads == 0, "num_kv_heads", self.num_kv_heads,
                 f"must divide num_heads={self.num_heads}")
        _require(self.norm in NORMS, "norm", self.norm, f"allowed: {', '.join(NORMS)}")
        _require(self.activation in ACTIVATIONS, "activation", self.activation,
                 f"allowed: {', '.join(ACTIVATIONS)}")
        _require(self.positions in POSITIONS, "positions", self.positions, f"allowed: {', '.join(POSITIONS)}")
        _require(self.rope_type in ROPE_TYPES, "rope_type", self.rope_type, f"allowed: {', '.join(ROPE_TYPES)}")
        _require(self.norm_eps > 0, "norm_eps", self.norm_eps, "must be > 0")
        _require(self.type_vocab_size >= 0, "type_vocab_size", self.type_vocab_size, "must be >= 0")
        if self.positions == "rotary":
            _require(self.head_dim % 2 == 0, "head_dim", self.head_dim, "must be even for rotary positions")
        _require(self.position_ids in POSITION_IDS, "position_ids", self.position_ids,
                 f"allowed: {', '.join(POSITION_IDS)}")
        _require(self.sliding_window is None or isinstance(self.sliding_window, int) and self.sliding_window > 0,
                 "sliding_window", self.sliding_window, "must be a positive integer or None")
        layers = self.sliding_window_layers or []
        _require(all(0 <= i < self.num_layers for i in layers), "sliding_window_layers", self.sliding_window_layers,
                 f"must be layer indices 0..{self.num_layers - 1}")
        _require(self.sliding_window is not None or self.sliding_window_layers is None, "sliding_window_layers",
                 self.sliding_window_layers, "needs sliding_window to be set")
        _require(not self.qk_norm or self.norm == "rmsnorm", "qk_norm", self.qk_norm, "needs norm='rmsnorm'")

    def window(self, layer: int) -> int | None:
        """The sliding window of layer `layer` (cache columns a token may attend over), or None for full attention."""
        if self.sliding_window is None or self.sliding_window_layers is not None and layer not in self.sliding_window_layers:
            return None
        return self.sliding_window

    @property
    def gated(self) -> bool:
        """True when the MLP has a gate projection (SwiGLU / GeGLU)."""
        return self.activation.endswith("_gated")

    @property
    def is_decoder(self) -> bool:
        """Causal models that produce logits can generate."""
        return self.causal and self.lm_head

    @property
    def qkv_size(self) -> int:
        """Output width of the fused q/k/v projection."""
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

    @property
    def pad_id(self) -> int:
        """Token id used for left padding (the checkpoint's pad token, else 0; padded positions are masked)."""
        return self.pad_token_id if self.pad_token_id is not None else 0

    @property
    def eos_ids(self) -> list[int]:
        """End-of-sequence ids as a list (possibly empty)."""
        if self.eos_token_id is None:
            return []
        if isinstance(self.eos_token_id, int):
            return [self.eos_token_id]
        return list(self.eos_token_id)

    def unit_names(self) -> list[str]:
        """Partition units in pipeline order: embed, layers.0..N-1, head."""
        return ["embed", *[f"layers.{i}" for i in range(self.num_layers)], "head"]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ArchConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ArchConfig field(s): {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
        return cls(**data)

    def replace(self, **changes: Any) -> ArchConfig:
        return dataclasses.replace(self, **changes)
