"""Slot-based KV cache owned by one stage: one row per sequence slot for each of its layers."""

from __future__ import annotations

import torch

from eet_pipe.models.config import ArchConfig
from eet_pipe.models.meta import StepMeta

__all__ = ["KVCache"]


class KVCache:
    """Keys/values for the layers of one stage.

    k[layer], v[layer]: [slots, kv_heads, max_len, head_dim]; `valid`: [slots, max_len] bool marks
    the cache columns that hold real (non-padding) tokens. Columns are written at
    `StepMeta.write_index`; a slot is reused after `free`.
    """

    def __init__(self, cfg: ArchConfig, layers: list[int], num_slots: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        if num_slots <= 0 or max_len <= 0:
            raise ValueError(f"KVCache needs num_slots > 0 and max_len > 0, got {num_slots} and {max_len}")
        shape = (num_slots, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.num_slots, self.max_len = num_slots, max_len
        self.k = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layers}
        self.v = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layers}
        self.valid = torch.zeros(num_slots, max_len, dtype=torch.bool, device=device)

    def nbytes(self) -> int:
        """Bytes held by keys, values and the validity mask."""
        per = sum(t.numel() * t.element_size() for t in (*self.k.values(), *self.v.values()))
        return per + self.valid.numel()

    def commit(self, meta: StepMeta) -> None:
        """Mark the new tokens' columns valid (once per step, before the layers run)."""
        if meta.slots is None or meta.write_index is None:
            raise ValueError("KVCache.commit needs StepMeta.slots and write_index")
        if meta.kv_len > self.max_len:
            raise ValueError(f"sequence needs {meta.kv_len} cache positions but the cache holds {self.max_len}")
        rows = meta.slots.view(-1, 1).expand_as(meta.write_index)
        self.valid[rows, meta.write_index] = meta.valid

    def write(self, layer: int, meta: StepMeta, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new keys/values. k, v: [B, kv_heads, T, D]."""
        rows = meta.slots.view(-1, 1).expand_as(meta.write_index)
        self.k[layer][rows, :, meta.write_index] = k.transpose(1, 2).to(self.k[layer].dtype)
        self.v[layer][rows, :, meta.write_index] = v.transpose(1, 2).to(self.v[layer].dtype)

    def read(self, layer: int, meta: StepMeta) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of the batch's slots over the first kv_len columns: [B, kv_heads, K, D]."""
        return (self.k[layer][meta.slots, :, : meta.kv_len], self.v[layer][meta.slots, :, : meta.kv_len])

    def key_mask(self, meta: StepMeta) -> torch.Tensor:
        """[B, K] bool: which cache columns of each slot hold real tokens."""
        return self.valid[meta.slots, : meta.kv_len]

    def free(self, slots: torch.Tensor | list[int]) -> None:
        """Forget the sequences in `slots` so the rows can be reused."""
        # index_fill_ takes the value as a scalar argument: `valid[idx] = False` copies a host tensor to the
        # device, which waits for the stream
        self.valid.index_fill_(0, torch.as_tensor(slots, dtype=torch.long, device=self.valid.device), False)
