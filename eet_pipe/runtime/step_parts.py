"""What a serving step is made of, as the driver sends it and every stage reads it: the commands
(`ServeInit`, `SeqInit`, `StepPart`, `StepCommand`), the bucket rules that pad a part to a shape replayed
from a CUDA graph (`step_rows`, `prefill_width`, `pad_part`, `prefill_graph_tokens`), each part's
`StepMeta` (`part_meta`) and a traced forward's label (`span_label`). Executing them is
`eet_pipe.runtime.step`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from eet_pipe.generation.sequences import SamplingParams
from eet_pipe.models.meta import StepMeta
from eet_pipe.ops.cuda_graphs import DEFAULT_BUCKETS, bucket_for

__all__ = ["ServeInit", "SeqInit", "StepPart", "StepCommand", "SERVE_COMMANDS", "PAD_ENV", "PREFILL_WIDTHS",
           "LARGE_ROWS_STEP", "PREFILL_GRAPH_TOKENS", "PREFILL_GRAPH_ELEMENTS", "step_rows", "pad_part",
           "prefill_graph_tokens", "prefill_width", "span_label", "part_meta"]

PAD_ENV = "EET_PIPE_PAD_DECODE"
"""'1' pads step parts to their buckets on CPU stages too (GPU stages always do, for their CUDA graphs)."""

PREFILL_WIDTHS = tuple(sorted({16, 48} | {b for k in range(5, 18) for b in (1 << k, 3 << (k - 1))}))
"""Width buckets of prefill parts: 16, 32, 48, 64, 96, 128, 192, 256, ... (1.5 x or 4/3 x apart from 32 on)."""
LARGE_ROWS_STEP = 128
"""Past the largest of DEFAULT_BUCKETS a part's rows are padded to a multiple of this, so that a server with
many slots captures a graph per 128 rows, not one per batch size."""

PREFILL_GRAPH_TOKENS = 4096
"""Prefill parts whose padded size (rows x width) is at most this replay CUDA graphs; larger ones run
eagerly, unpadded (their kernels are long enough that launching them costs little)."""

PREFILL_GRAPH_ELEMENTS = 1 << 23
"""... and whose hidden states (padded tokens x hidden size) are at most this many elements, so that the
graphs' static inputs and outputs stay small on wide models (8192 wide: 1024 tokens)."""

@dataclass
class ServeInit:
    """Allocate the persistent serving state: a KV cache of `max_slots` rows of `max_len` columns per chunk."""

    max_slots: int
    max_len: int
    cuda_graphs: bool = True
    """Replay step parts from CUDA graphs (GPU stages): decode parts, and prompt parts up to PREFILL_GRAPH_TOKENS."""
    trace: bool = False
    """Time every chunk forward of every step and send the labelled spans with the stats reports."""


@dataclass
class SeqInit:
    """A sequence that starts in a step: what the last stage needs to sample and stop it."""

    params: SamplingParams
    eos_ids: list[int] = field(default_factory=list)
    logprobs: int | None = None
    """Return the sampled token's log-probability and this many alternatives (None = no logprobs)."""


@dataclass
class StepPart:
    """Rows of one step with the same number of new tokens (right padded)."""

    slots: torch.Tensor
    """[B] int64 cache rows."""
    tokens: torch.Tensor | None
    """[B, T] int64 new tokens, right padded; None for a decode part (T = 1) whose tokens stage 0 takes
    from its feedback buffer: the tokens the last stage sampled for those slots in their previous step."""
    lengths: torch.Tensor
    """[B] int64 valid new tokens per row (1..T)."""
    start: torch.Tensor
    """[B] int64 cache column (= position) of each row's first new token."""

    @property
    def width(self) -> int:
        """New tokens per row (T)."""
        return 1 if self.tokens is None else self.tokens.shape[1]

    @property
    def rows(self) -> int:
        return self.slots.numel()


@dataclass
class StepCommand:
    """One forward step of one group of slots, sent to every stage."""

    group: int
    parts: list[StepPart]
    """Usually a prefill part (new sequences) and a decode part (running sequences)."""
    new: dict[int, SeqInit] = field(default_factory=dict)
    """Sequences starting in this step, by slot (their rows are cleared first)."""
    free: list[int] = field(default_factory=list)
    """Slots to clear before this step (finished or cancelled sequences)."""
    step: int = 0
    """Serial number (for logs and error messages)."""


SERVE_COMMANDS = (ServeInit, StepCommand)


def step_rows(rows: int) -> int:
    """The padded row count of a step part of `rows` rows: its DEFAULT_BUCKETS bucket, else the next multiple
    of LARGE_ROWS_STEP."""
    return bucket_for(rows, DEFAULT_BUCKETS) or -(-rows // LARGE_ROWS_STEP) * LARGE_ROWS_STEP


def pad_part(part: StepPart, rows: int, spare_slot: int, width: int | None = None) -> StepPart:
    """`part` with rows appended up to `rows`: one token each, on `spare_slot` (a cache row no sequence
    uses), column 0; with `width`, a prompt part's rows are right padded to that many tokens (pads are
    invalid tokens on the row's own later columns). Padding outputs are dropped; they give steps a fixed
    shape per bucket."""
    extra = max(rows - part.slots.numel(), 0)
    tokens = part.tokens
    if tokens is not None and width is not None and width > tokens.shape[1]:
        tokens = torch.nn.functional.pad(tokens, (0, width - tokens.shape[1]))
    if extra == 0 and tokens is part.tokens:
        return part
    if extra:
        if tokens is not None:
            tokens = torch.cat([tokens, torch.zeros(extra, tokens.shape[1], dtype=torch.long)])
        return StepPart(slots=torch.cat([part.slots, torch.full((extra,), spare_slot, dtype=torch.long)]),
                        tokens=tokens, lengths=torch.cat([part.lengths, torch.ones(extra, dtype=torch.long)]),
                        start=torch.cat([part.start, torch.zeros(extra, dtype=torch.long)]))
    return StepPart(slots=part.slots, tokens=tokens, lengths=part.lengths, start=part.start)


def prefill_graph_tokens(hidden: int) -> int:
    """Most padded tokens (rows x width) of a prompt part that replays a CUDA graph on a model `hidden` wide."""
    return min(PREFILL_GRAPH_TOKENS, PREFILL_GRAPH_ELEMENTS // hidden)


def prefill_width(width: int, max_len: int) -> int:
    """The padded width of a prompt part `width` tokens wide: its `PREFILL_WIDTHS` bucket, at most `max_len`
    (the cache's columns)."""
    return max(width, min(bucket_for(width, PREFILL_WIDTHS) or width, max_len))


def span_label(cmd: StepCommand, part: StepPart, padded: StepPart, chunk: int, graphed: bool,
               captured: int) -> dict:
    """What a traced chunk forward ran: step, group, chunk, the part's rows and width before and after
    padding, whether it replayed (or captured) a CUDA graph."""
    return {"step": cmd.step, "group": cmd.group, "chunk": chunk, "kind": "decode" if part.width == 1 else "prompt",
            "rows": part.rows, "padded_rows": padded.rows, "width": part.width, "padded_width": padded.width,
            "tokens": int(part.lengths.sum()), "graphed": graphed, "captured": captured}


def part_meta(part: StepPart, kv_len: int | None = None, width: int | None = None) -> StepMeta:
    """Positions, validity and cache addressing of a part, built identically on every stage, on the device
    of the part's tensors. `kv_len` (max(start) + width) is computed from them when not given; pass it for
    a part on a GPU, so that nothing waits for the device. `width` defaults to the part's (give it for a
    prompt part whose tokens this stage does not have)."""
    batch, width = part.rows, width or part.width
    cols = torch.arange(width, dtype=torch.long, device=part.slots.device).expand(batch, width)
    valid = cols < part.lengths.view(-1, 1)  # [B, T]
    write = part.start.view(-1, 1) + cols  # [B, T]; pads of a prompt row land on its own unused columns
    if kv_len is None:
        kv_len = int(write.max()) + 1
    return StepMeta(positions=write.masked_fill(~valid, 0), valid=valid, slots=part.slots,
                    write_index=write, kv_len=kv_len)
