"""Build the canonical model (or a slice) and the tokenizer that a `ModelSpec` describes."""

from __future__ import annotations

import torch

from eet_pipe.models.model import CanonicalModel
from eet_pipe.presets import ModelSpec
from eet_pipe.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer
from eet_pipe.weights.loader import init_random, load_checkpoint

__all__ = ["load_units", "tokenizer_for"]


def load_units(spec: ModelSpec, units: list[str] | None, dtype: torch.dtype,
               device: torch.device | str) -> CanonicalModel:
    """The slice `units` (None = whole model) with weights from the spec's source, on `device`."""
    if spec.source == "dir":
        return load_checkpoint(spec.path, units, dtype=dtype, device=device)
    model = init_random(spec.cfg, units, seed=spec.seed, dtype=dtype, device=device)
    return model


def tokenizer_for(spec: ModelSpec) -> Tokenizer | None:
    """The model's tokenizer: from its directory, or the built-in byte tokenizer for presets."""
    if spec.tokenizer == "dir":
        tok = load_tokenizer(spec.path)
        if tok is not None:
            return tok
        return ByteTokenizer() if spec.cfg.vocab_size >= ByteTokenizer.vocab_size else None
    if spec.tokenizer == "byte":
        return ByteTokenizer()
    return None
