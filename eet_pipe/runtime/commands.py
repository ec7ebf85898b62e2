"""Commands the driver sends to every stage, and how a batch is cut into microbatches."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from eet_pipe.generation.sequences import SamplingParams

__all__ = ["ForwardCommand", "GenerateCommand", "Shutdown", "split_rows", "OUTPUTS"]

OUTPUTS = ("all", "last", "none")


def split_rows(batch: int, parts: int) -> list[slice]:
    """Contiguous row ranges of `parts` microbatches whose sizes differ by at most one."""
    if batch < 1 or parts < 1:
        raise ValueError(f"cannot split a batch of {batch} into {parts} microbatches")
    parts = min(parts, batch)
    base, extra = divmod(batch, parts)
    out, start = [], 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        out.append(slice(start, start + size))
        start += size
    return out


@dataclass
class ForwardCommand:
    """One forward pass of a padded batch through the pipeline."""

    ids: torch.Tensor
    """[B, T] int64 token ids."""
    mask: torch.Tensor
    """[B, T] bool validity mask."""
    schedule: str
    microbatches: int
    virtual: int = 1
    token_types: torch.Tensor | None = None
    output: str = "all"
    """'all' positions, 'last' position only, or 'none' (timing runs)."""
    trace: bool = False
    cuda_graphs: bool = True
    """Replay each chunk's forward from a CUDA graph per microbatch shape (CUDA stages; ignored on CPU
    and while capturing)."""
    capture: list[str] | None = None
    """Canonical capture keys (``eet_pipe.compare.points``: module output, or ``name:in`` for its input)
    to record with forward hooks; the last stage then returns ``(output, {key: tensor})`` gathered from
    every stage. None (the default) records nothing."""


@dataclass
class GenerateCommand:
    """Autoregressive generation of a batch of prompts with the decode schedule."""

    prompts: list[list[int]]
    params: list[SamplingParams]
    groups: int
    """Sequence groups in flight (decode microbatches)."""
    eos_ids: list[int] = field(default_factory=list)
    pad_id: int = 0
    trace: bool = False
    cuda_graphs: bool = True
    """Replay decode steps (one token per sequence) from CUDA graphs, one per chunk and group size."""


@dataclass
class Shutdown:
    """Stop the worker loop."""
