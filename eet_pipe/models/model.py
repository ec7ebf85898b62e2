"""`CanonicalModel`: any contiguous slice of a canonical transformer.

A whole model holds ``embed``, every ``layers.{i}``, ``final_norm`` and ``head``; a pipeline
stage is the same class holding only its units, with layers keyed by their global index.
"""

from __future__ import annotations

import torch
from torch import nn

from eet_pipe.models.config import ArchConfig
from eet_pipe.models.kv_cache import KVCache
from eet_pipe.models.layers import Embedding, LMHead, Norm, TransformerLayer, attention_mask, window_valid
from eet_pipe.models.meta import StepMeta, index_positions
from eet_pipe.models.rotary import rotary_table

__all__ = ["CanonicalModel", "parse_units"]


def parse_units(cfg: ArchConfig, units: list[str]) -> tuple[bool, list[int], bool]:
    """Validate a contiguous run of unit names; returns (has_embed, layer indices, has_head)."""
    order = cfg.unit_names()
    unknown = [u for u in units if u not in order]
    if unknown:
        raise ValueError(f"unknown partition unit(s) {unknown}; "
                         f"units are embed, layers.0..layers.{cfg.num_layers - 1}, head")
    if not units:
        raise ValueError("a model slice needs at least one unit")
    first = order.index(units[0])
    if order[first:first + len(units)] != list(units):
        raise ValueError(f"units {units} are not a contiguous run of {order[0]}..{order[-1]}")
    layers = [int(u.split(".")[1]) for u in units if u.startswith("layers.")]
    return units[0] == "embed", layers, units[-1] == "head"


class CanonicalModel(nn.Module):
    """A canonical transformer, or a contiguous slice of one (a pipeline stage or chunk)."""

    def __init__(self, cfg: ArchConfig, units: list[str] | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.units = list(units) if units is not None else cfg.unit_names()
        has_embed, layers, has_head = parse_units(cfg, self.units)
        self.layer_ids = layers
        self.embed = Embedding(cfg) if has_embed else None
        self.layers = nn.ModuleDict({str(i): TransformerLayer(cfg, i) for i in layers})
        self.final_norm = Norm(cfg) if has_head and cfg.final_norm else None
        self.head = LMHead(cfg.hidden_size, cfg.vocab_size) if has_head and cfg.lm_head else None
        self.pooler = nn.Linear(cfg.hidden_size, cfg.hidden_size) if has_head and cfg.pooler else None
        self.has_head = has_head
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self.tie_weights()

    @property
    def has_embed(self) -> bool:
        return self.embed is not None

    def tie_weights(self) -> None:
        """Share the token embedding with the LM head when both live here and the config ties them."""
        if self.cfg.tie_embeddings and self.embed is not None and self.head is not None:
            self.head.weight = self.embed.tok.weight

    def pad_vocab(self, multiple: int = 64) -> None:
        """Pad the LM head's rows to a multiple of `multiple` (see `LMHead.pad`); the tied embedding
        keeps sharing the weight. Call after the weights are loaded, on their final device."""
        if self.head is None:
            return
        tied = self.embed is not None and self.embed.tok.weight is self.head.weight
        self.head.pad(multiple)
        if tied:
            self.embed.tok.weight = self.head.weight

    def rope(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Rotary cos/sin tables on `device` (built once)."""
        if self.cfg.positions != "rotary" or not self.layer_ids:
            return None
        if self._rope is None or self._rope[0].device != device:
            self._rope = rotary_table(self.cfg, device)
        return self._rope

    def forward(self, x: torch.Tensor, meta: StepMeta, cache: KVCache | None = None,
                last: torch.Tensor | None = None) -> torch.Tensor:
        """Run the held units.

        Args:
            x: token ids [B, T] when this slice holds ``embed``, else hidden states [B, T, H].
            meta: positions / validity / cache addressing of the new tokens.
            cache: this slice's KV cache, or None for a cache-free forward.
            last: [B] int64 column of each row whose output is wanted, on x's device. A slice with an LM
                head then runs its final norm and head on those columns only (a prompt's next token needs
                its last position's logits alone); other slices ignore it.
        Returns:
            logits [B, T, V] ([B, 1, V] with `last`) if this slice ends with an LM head, else hidden states
            [B, T, H].
        """
        if self.cfg.position_ids == "index":
            meta = index_positions(meta)
        if self.embed is not None:
            x = self.embed(x, meta)
        if self.layer_ids:
            if cache is not None:
                cache.commit(meta)
            if cache is not None and x.shape[1] == 1:
                meta = meta.with_cache_lengths()  # one add per step, not one per layer
            masks = self._masks(meta, cache, x.shape[1])
            rope = self.rope(x.device)
            for layer in self.layers.values():
                x = layer(x, meta, masks[layer.attn.window], cache, rope)
        if last is not None and self.head is not None:
            x = x[torch.arange(x.shape[0], device=x.device), last].unsqueeze(1)
        if self.final_norm is not None:
            x = self.final_norm(x)
        if self.head is not None:
            x = self.head(x)
        return x

    def _masks(self, meta: StepMeta, cache: KVCache | None, tokens: int) -> dict[int | None, torch.Tensor | None]:
        """The attention mask of each sliding window the held layers use (None: full attention), built once per
        forward. A decode step with a cache needs no dense mask (the decode-attention op reads the cache's
        validity; a window restricts it, `window_valid`); an unpadded batch without a cache needs none either
        (causal or full attention on the flash path) unless a window is shorter than the sequence."""
        masks: dict[int | None, torch.Tensor | None] = {}
        for window in {layer.attn.window for layer in self.layers.values()}:
            if cache is not None and tokens == 1:
                masks[window] = None if window is None else window_valid(meta, cache, window)
            elif cache is None and meta.dense and (window is None or tokens <= window):
                masks[window] = None
            else:
                masks[window] = attention_mask(meta, self.cfg.causal, cache, window)
        return masks

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """BERT pooler: tanh(dense(first token)). hidden: [B, T, H] -> [B, H]."""
        if self.pooler is None:
            raise ValueError("this model has no pooler (ArchConfig.pooler is False or the slice lacks 'head')")
        return torch.tanh(self.pooler(hidden[:, 0]))

    def new_cache(self, num_slots: int, max_len: int, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> KVCache:
        """A KV cache for this slice's layers."""
        param = next(self.parameters())
        return KVCache(self.cfg, self.layer_ids, num_slots, max_len, dtype or param.dtype, device or param.device)
