"""Rotary position tables (default, linear and llama3 frequency scaling)."""

from __future__ import annotations

import math

import torch

from eet_pipe.models.config import ArchConfig

__all__ = ["inv_frequencies", "rotary_table"]


def inv_frequencies(cfg: ArchConfig) -> torch.Tensor:
    """Inverse frequencies [D/2] in fp32, scaled as the config says."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if cfg.rope_type == "linear":
        return inv / cfg.rope_factor
    if cfg.rope_type == "llama3":
        return _llama3(inv, cfg)
    return inv


def _llama3(inv: torch.Tensor, cfg: ArchConfig) -> torch.Tensor:
    low_wavelen = cfg.rope_original_max_positions / cfg.rope_low_freq_factor
    high_wavelen = cfg.rope_original_max_positions / cfg.rope_high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / cfg.rope_factor, inv)
    smooth = (cfg.rope_original_max_positions / wavelen - cfg.rope_low_freq_factor) / (
        cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
    smoothed = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rotary_table(cfg: ArchConfig, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [max_positions, D] in fp32 (rotate-half layout)."""
    inv = inv_frequencies(cfg)
    pos = torch.arange(cfg.max_positions, dtype=torch.float32)
    freqs = torch.outer(pos, inv)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(device), emb.sin().to(device)
