"""Worker-side execution of serving steps (continuous batching).

The serving driver sends every worker the same `StepCommand`: which cache slots run, their new
tokens (prompts of sequences that start now, the last sampled token of running ones), and where in
the cache those tokens go. Every stage rebuilds the `StepMeta` from the command, so only hidden
states travel between stages, with shapes every receiver knows in advance. Each stage keeps one
persistent `KVCache` per chunk with `max_slots` rows (`ServeState`); the last stage keeps a sampler
and a `SequenceState` per slot across steps and returns the sampled tokens.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from eet_pipe.cuda_graphs import DEFAULT_BUCKETS, bucket_for
from eet_pipe.generation import Sampler, SamplingParams, SequenceState
from eet_pipe.models.kv_cache import KVCache
from eet_pipe.models.meta import StepMeta
from eet_pipe.runtime.comm import P2P
from eet_pipe.schedule import Action, Op

__all__ = ["ServeInit", "SeqInit", "StepPart", "StepCommand", "ServeState", "SlotSampler", "part_meta",
           "pad_part", "serve_command", "SERVE_COMMANDS", "PAD_ENV"]

log = logging.getLogger("eet_pipe.runtime")

STATS_INTERVAL_S = 1.0
"""How often a worker reports its busy time (a ("stats", rank, {...}) message)."""

MAX_PENDING_SENDS = 8
"""Asynchronous sends kept in flight before the oldest is waited for."""

PAD_ENV = "EET_PIPE_PAD_DECODE"
"""'1' pads decode parts to batch buckets on CPU stages too (GPU stages always do, for their CUDA graphs)."""


@dataclass
class ServeInit:
    """Allocate the persistent serving state: a KV cache of `max_slots` rows of `max_len` columns per chunk."""

    max_slots: int
    max_len: int
    cuda_graphs: bool = True
    """Replay decode steps from CUDA graphs (GPU stages)."""


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
    tokens: torch.Tensor
    """[B, T] int64 new tokens, right padded."""
    lengths: torch.Tensor
    """[B] int64 valid new tokens per row (1..T)."""
    start: torch.Tensor
    """[B] int64 cache column (= position) of each row's first new token."""


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


def pad_part(part: StepPart, rows: int, spare_slot: int) -> StepPart:
    """`part` with rows appended up to `rows`: one token each, on `spare_slot` (a cache row no sequence
    uses), column 0. Their outputs are dropped; they give decode steps a fixed batch per bucket."""
    extra = rows - part.slots.numel()
    if extra <= 0:
        return part
    width = part.tokens.shape[1]
    return StepPart(slots=torch.cat([part.slots, torch.full((extra,), spare_slot, dtype=torch.long)]),
                    tokens=torch.cat([part.tokens, torch.zeros(extra, width, dtype=torch.long)]),
                    lengths=torch.cat([part.lengths, torch.ones(extra, dtype=torch.long)]),
                    start=torch.cat([part.start, torch.zeros(extra, dtype=torch.long)]))


def part_meta(part: StepPart) -> StepMeta:
    """Positions, validity and cache addressing of a part, built identically on every stage."""
    batch, width = part.tokens.shape
    cols = torch.arange(width, dtype=torch.long).expand(batch, width)
    valid = cols < part.lengths.view(-1, 1)  # [B, T]
    write = part.start.view(-1, 1) + cols  # [B, T]; pads of a prompt row land on its own unused columns
    return StepMeta(positions=write.masked_fill(~valid, 0), valid=valid, slots=part.slots,
                    write_index=write, kv_len=int(write.max()) + 1)


@dataclass
class _Slot:
    state: SequenceState
    generator: torch.Generator | None
    logprobs: int | None


class SlotSampler:
    """Per-slot sampling and stopping on the last stage; slots outlive steps."""

    def __init__(self, decode: Any) -> None:
        self.decode = decode
        self.slots: dict[int, _Slot] = {}

    def start(self, new: dict[int, SeqInit]) -> None:
        """Begin the sequences of `new` (replacing whatever held those slots)."""
        for slot, init in new.items():
            p = init.params
            gen = None if p.greedy else torch.Generator().manual_seed(p.seed if p.seed is not None else torch.seed())
            self.slots[slot] = _Slot(SequenceState(p, list(init.eos_ids), self.decode), gen, init.logprobs)

    def drop(self, slots: list[int]) -> None:
        for s in slots:
            self.slots.pop(s, None)

    def sample(self, logits: torch.Tensor, slots: list[int], out: dict[str, dict]) -> None:
        """logits [B, V] of `slots` -> next tokens; records tokens / finish reasons / logprobs in `out`."""
        picks = logits.argmax(dim=-1).cpu().tolist()
        logp = None
        if any(self.slots[s].logprobs is not None for s in slots if s in self.slots):
            logp = torch.log_softmax(logits.float(), dim=-1).cpu()
        for i, slot in enumerate(slots):
            seq = self.slots.get(slot)
            if seq is None:  # cancelled while this step was queued
                continue
            p = seq.state.params
            tok = picks[i] if p.greedy else Sampler._sample(logits[i].float().cpu(), p, seq.generator)
            before = len(seq.state.tokens)
            seq.state.append(tok)
            if len(seq.state.tokens) > before:
                out["tokens"][slot] = tok
                if logp is not None and seq.logprobs is not None:
                    out["logprobs"][slot] = _logprobs(logp[i], tok, seq.logprobs)
            if seq.state.finished:
                out["finished"][slot] = seq.state.finish_reason
                if seq.state.text is not None:
                    out["text"][slot] = seq.state.text
                del self.slots[slot]


def _logprobs(logp: torch.Tensor, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """(log-probability of `token`, the k most likely (token, log-probability) pairs). logp: [V]."""
    top = torch.topk(logp, min(k, logp.numel())) if k else None
    alts = [] if top is None else list(zip(top.indices.tolist(), top.values.tolist(), strict=True))
    return float(logp[token]), alts


class ServeState:
    """Persistent serving state of one stage: KV caches, pending sends, and (last stage) the sampler."""

    def __init__(self, stage: Any, init: ServeInit) -> None:  # stage: eet_pipe.runtime.stage.Stage
        self.stage, self.ctx = stage, stage.ctx
        self.rank, self.world = stage.ctx.rank, stage.ctx.world
        self.order = sorted(stage.chunks)
        self.last_chunk = stage.num_chunks - 1
        # decode parts are padded to batch buckets (rows on a spare cache row) so each bucket replays one
        # CUDA graph per chunk; prefill parts run eagerly
        self.graphs = stage.graphs(init.cuda_graphs)
        self.pad = self.graphs is not None or os.environ.get(PAD_ENV) == "1"
        self.spare_slot = init.max_slots
        rows = init.max_slots + (1 if self.pad else 0)
        self.caches: dict[int, KVCache] = {c: m.new_cache(rows, init.max_len)
                                           for c, m in stage.chunks.items() if m.layer_ids}
        self.max_slots, self.max_len = init.max_slots, init.max_len
        self.sampler = SlotSampler(stage.tokenizer.decode if stage.tokenizer is not None else None) \
            if self.last_chunk in stage.chunks else None
        self.sends: deque[tuple[dist.Work, torch.Tensor]] = deque()
        self.busy, self.reported = 0.0, time.monotonic()
        log.info("stage %d: serving state with %d slots x %d positions (%.1f MB of KV cache)", self.rank,
                 init.max_slots, init.max_len, sum(c.nbytes() for c in self.caches.values()) / 1e6)

    def _check(self, cmd: StepCommand) -> None:
        for part in cmd.parts:
            if part.slots.numel() and (int(part.slots.max()) >= self.max_slots or int(part.slots.min()) < 0):
                raise ValueError(f"step {cmd.step}: slots {part.slots.tolist()} outside 0..{self.max_slots - 1}")
            if part.slots.numel() and int((part.start + part.lengths).max()) > self.max_len:
                raise ValueError(f"step {cmd.step}: a sequence needs more than the {self.max_len} cache positions")

    def _free(self, slots: list[int]) -> None:
        if slots:
            for cache in self.caches.values():
                cache.free(slots)
        if self.sampler is not None:
            self.sampler.drop(slots)

    def _comm(self, parts: list[StepPart]) -> tuple[P2P, dict[tuple[int, int], Action]]:
        """This step's receives, in execution order, through the shared point-to-point layer
        (shapes come from the command)."""
        hidden, dtype = self.stage.hidden, self.stage.dtype
        comm = P2P(self.ctx, lambda a: [((*parts[a.mb].tokens.shape, hidden), dtype)])
        recvs = {}
        for c in self.order:
            src = (c - 1) % self.world
            if c == 0 or src == self.rank:
                continue
            for i in range(len(parts)):
                recvs[(c, i)] = Action(Op.RECV, i, c, peer=src)
        comm.expect(list(recvs.values()))
        return comm, recvs

    def _retire(self, comm: P2P) -> None:
        """Keep this step's sends in flight (at most MAX_PENDING_SENDS across steps)."""
        self.sends.extend(comm.release_sends())
        while len(self.sends) > MAX_PENDING_SENDS:
            self.sends.popleft()[0].wait()

    @torch.inference_mode()
    def step(self, cmd: StepCommand) -> dict | None:
        """Run this stage's chunks for every part of `cmd`; the last stage returns the sampled tokens."""
        began = time.perf_counter()
        self._check(cmd)
        self._free([*cmd.free, *cmd.new])
        if self.sampler is not None:
            self.sampler.start(cmd.new)
        sizes = [p.slots.numel() for p in cmd.parts]
        parts = [self._padded(p) for p in cmd.parts]
        metas = [part_meta(p).to(self.ctx.device) for p in parts]
        comm, recvs = self._comm(parts)
        local: dict[tuple[int, int], torch.Tensor] = {}
        out: dict[str, Any] = {"group": cmd.group, "step": cmd.step, "tokens": {}, "finished": {}, "text": {},
                               "logprobs": {}}
        for c in self.order:
            for i, part in enumerate(parts):
                if c == 0:
                    x = part.tokens.to(self.ctx.device)
                elif (c, i) in recvs:
                    x = comm.recv(recvs.pop((c, i)))[0]
                else:
                    x = local.pop((c, i))
                # decode parts only: prefill shapes vary with every admitted batch
                graphs = self.graphs if part.tokens.shape[1] == 1 else None
                y = self.stage.run_chunk(c, x, metas[i], graphs, self.caches.get(c))
                self.stage.tick()
                if c == self.last_chunk:
                    n = sizes[i]  # rows past n are bucket padding
                    rows = torch.arange(n, device=y.device)
                    last = y[rows, (part.lengths[:n] - 1).to(y.device)]
                    self.sampler.sample(last, part.slots[:n].tolist(), out)
                elif (c + 1) % self.world == self.rank:
                    local[(c + 1, i)] = y
                else:
                    comm.send(Action(Op.SEND, i, c + 1, peer=(c + 1) % self.world), [y])
        self._retire(comm)
        self.busy += time.perf_counter() - began
        return out if self.sampler is not None else None

    def _padded(self, part: StepPart) -> StepPart:
        """A decode part (one token per row) padded to its batch bucket when padding is on."""
        if not self.pad or part.tokens.shape[1] != 1:
            return part
        rows = bucket_for(part.slots.numel(), DEFAULT_BUCKETS)
        return part if rows is None else pad_part(part, rows, self.spare_slot)

    def stats(self) -> dict | None:
        """Busy seconds since the last report, at most every STATS_INTERVAL_S (else None)."""
        now = time.monotonic()
        if now - self.reported < STATS_INTERVAL_S:
            return None
        report = {"busy": self.busy, "elapsed": now - self.reported}
        self.busy, self.reported = 0.0, now
        return report


def serve_command(stage: Any, state: ServeState | None, cmd: ServeInit | StepCommand) -> tuple[ServeState, list[tuple]]:
    """Execute a serving command on a worker; returns the (new) state and messages for the driver:
    ("result", rank, payload, []) from the last stage, ("stats", rank, {"busy", "elapsed"}) now and then."""
    rank = stage.ctx.rank
    if isinstance(cmd, ServeInit):
        return ServeState(stage, cmd), []
    if state is None:
        raise RuntimeError(f"stage {rank}: StepCommand {cmd.step} arrived before ServeInit")
    payload = state.step(cmd)
    messages: list[tuple] = [] if payload is None else [("result", rank, payload, [])]
    stats = state.stats()
    if stats is not None:
        messages.append(("stats", rank, stats))
    return state, messages
