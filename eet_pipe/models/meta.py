"""`StepMeta`: what every stage needs to run one forward step besides the hidden states.

It is small (a few int/bool tensors of [B, T]) and travels with the activations between
pipeline stages, so each stage can rebuild its own attention mask from its own KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

__all__ = ["StepMeta", "prefill_meta", "decode_meta", "positions_from_mask", "index_positions", "to_device"]


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Copy `t` to `device` without stalling the host: a CPU tensor bound for a GPU is staged in pinned
    memory and copied asynchronously. (A copy from pageable memory makes the host wait until the stream
    has finished all earlier work.)

    Call it only where no point-to-point message is in flight on this GPU, e.g. at the start of a
    command: a new page-locked allocation can synchronise the device, and a device-wide wait behind an
    NCCL kernel that waits for a peer can deadlock a pipeline (docs/ARCHITECTURE.md, "NCCL links")."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@dataclass
class StepMeta:
    """Per-step metadata for a batch of B sequences and T new tokens each."""

    positions: torch.Tensor
    """[B, T] int64 position ids of the new tokens (pads get 0)."""
    valid: torch.Tensor
    """[B, T] bool, False for padding tokens."""
    slots: torch.Tensor | None = None
    """[B] int64 KV-cache rows of the sequences; None runs without a cache."""
    write_index: torch.Tensor | None = None
    """[B, T] int64 cache columns the new tokens are written to (with a cache)."""
    kv_len: int = 0
    """Number of cache columns attended over (max write index + 1)."""
    token_types: torch.Tensor | None = None
    """[B, T] int64 token type (segment) ids for models that have them."""
    dense: bool = False
    """Every token is valid (no padding) and positions are 0..T-1: a cache-free forward then needs no
    attention mask. Set by `prefill_meta`; False when unknown."""
    cache_lengths: torch.Tensor | None = None
    """[B] int64 cache columns each sequence attends over after a decode step's write (write index + 1).
    Derived once per forward by the model (`with_cache_lengths`) instead of once per layer."""

    def with_cache_lengths(self) -> StepMeta:
        """A copy with `cache_lengths` derived from `write_index` (a decode step); always recomputed, so
        a stale value can never be used."""
        if self.write_index is None:
            return self
        return replace(self, cache_lengths=self.write_index[:, -1] + 1)

    def lengths_after_write(self) -> torch.Tensor:
        """[B] cache columns attended over after a decode step's write: `cache_lengths` when the model
        derived it for this forward, else derived here."""
        return self.cache_lengths if self.cache_lengths is not None else self.with_cache_lengths().cache_lengths

    def to(self, device: torch.device | str, pin: bool = False) -> StepMeta:
        """Copy every tensor to `device`; with `pin`, through pinned memory (`to_device`, same caveat)."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = to_device(value, device) if pin else value.to(device, non_blocking=True)
            moved[f.name] = value
        return StepMeta(**moved)

    def select(self, rows: slice) -> StepMeta:
        """The metadata of a contiguous range of sequences (a microbatch)."""
        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[rows]
        write = pick(self.write_index)
        kv_len = int(write.max()) + 1 if write is not None and write.numel() else self.kv_len
        return StepMeta(positions=self.positions[rows], valid=self.valid[rows], slots=pick(self.slots),
                        write_index=write, kv_len=kv_len, token_types=pick(self.token_types), dense=self.dense,
                        cache_lengths=pick(self.cache_lengths))


def positions_from_mask(mask: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
    """Position ids counting only valid tokens: cumsum(mask) - 1, pads set to 0. mask: [B, T]."""
    pos = mask.long().cumsum(-1) - 1
    if start is not None:
        pos = pos + start.view(-1, 1)
    return pos.masked_fill(~mask.bool(), 0)


def index_positions(meta: StepMeta) -> StepMeta:
    """`meta` with each token's position its column in the padded input (0..T-1 per row, or its cache column
    with a cache) whatever the padding: the convention of HF's absolute-position encoders (BERT), against
    `positions_from_mask`, which HF generate uses for decoders (ArchConfig.position_ids)."""
    if meta.write_index is not None:
        return replace(meta, positions=meta.write_index)
    batch, seq = meta.valid.shape
    cols = torch.arange(seq, dtype=torch.long, device=meta.valid.device)
    return replace(meta, positions=cols.expand(batch, seq))


def prefill_meta(mask: torch.Tensor, slots: torch.Tensor | None = None,
                 token_types: torch.Tensor | None = None) -> StepMeta:
    """Metadata for the first forward of fresh sequences (left- or right-padded). mask: [B, T]."""
    mask = mask.bool()
    batch, seq = mask.shape
    write = None
    if slots is not None:
        write = torch.arange(seq, dtype=torch.long).expand(batch, seq).contiguous()
    return StepMeta(positions=positions_from_mask(mask), valid=mask, slots=slots,
                    write_index=write, kv_len=seq if slots is not None else 0, token_types=token_types,
                    dense=bool(mask.all()))


def decode_meta(slots: torch.Tensor, write_index: torch.Tensor, positions: torch.Tensor,
                valid: torch.Tensor | None = None, kv_len: int | None = None) -> StepMeta:
    """Metadata for one new token per sequence. slots, write_index, positions: [B] int64 (on any device).

    `kv_len` (max write index + 1) is computed from `write_index` when not given; callers that know it
    pass it, so device tensors need no copy to the host.
    """
    batch = slots.shape[0]
    if valid is None:
        valid = torch.ones(batch, 1, dtype=torch.bool, device=slots.device)
    if kv_len is None:
        kv_len = int(write_index.max()) + 1 if batch else 0
    return StepMeta(positions=positions.view(batch, 1), valid=valid.view(batch, 1), slots=slots,
                    write_index=write_index.view(batch, 1), kv_len=kv_len)
