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
import queue
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from eet_pipe.generation.sequences import SamplingParams
from eet_pipe.models.kv_cache import KVCache
from eet_pipe.models.meta import StepMeta
from eet_pipe.ops.cuda_graphs import DEFAULT_BUCKETS, bucket_for
from eet_pipe.runtime.comm import P2P
from eet_pipe.runtime.slot_sampler import PendingTokens, SlotSampler, new_payload
from eet_pipe.schedule import Action, Op

__all__ = ["ServeInit", "SeqInit", "StepPart", "StepCommand", "ServeState", "SlotSampler", "part_meta",
           "pad_part", "serve_command", "serve_idle", "next_command", "SERVE_COMMANDS", "PAD_ENV"]

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


def pad_part(part: StepPart, rows: int, spare_slot: int) -> StepPart:
    """`part` with rows appended up to `rows`: one token each, on `spare_slot` (a cache row no sequence
    uses), column 0. Their outputs are dropped; they give decode steps a fixed batch per bucket."""
    extra = rows - part.slots.numel()
    if extra <= 0:
        return part
    tokens = None if part.tokens is None else torch.cat([part.tokens, torch.zeros(extra, part.width, dtype=torch.long)])
    return StepPart(slots=torch.cat([part.slots, torch.full((extra,), spare_slot, dtype=torch.long)]), tokens=tokens,
                    lengths=torch.cat([part.lengths, torch.ones(extra, dtype=torch.long)]),
                    start=torch.cat([part.start, torch.zeros(extra, dtype=torch.long)]))


def part_meta(part: StepPart) -> StepMeta:
    """Positions, validity and cache addressing of a part, built identically on every stage."""
    batch, width = part.rows, part.width
    cols = torch.arange(width, dtype=torch.long).expand(batch, width)
    valid = cols < part.lengths.view(-1, 1)  # [B, T]
    write = part.start.view(-1, 1) + cols  # [B, T]; pads of a prompt row land on its own unused columns
    return StepMeta(positions=write.masked_fill(~valid, 0), valid=valid, slots=part.slots,
                    write_index=write, kv_len=int(write.max()) + 1)




@dataclass
class _Feedback:
    """Stage 0's receive of one step's sampled tokens (posted when the step ends, read at the group's next)."""

    work: dist.Work | None
    tokens: torch.Tensor
    """[R] int64 tokens of the step's sampled rows."""
    slots: torch.Tensor
    """[R] int64 their slots (on the device)."""


class _BusyClock:
    """Time a stage spends computing: CUDA events around each chunk's forward (so waits for messages
    are not counted), host time on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.spans: deque[tuple[Any, Any]] = deque()
        self.busy, self.reported = 0.0, time.monotonic()

    def begin(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    def end(self, began: Any) -> None:
        if not self.cuda:
            self.busy += time.perf_counter() - began
            return
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(torch.cuda.current_stream(self.device))
        self.spans.append((began, ev))

    def report(self) -> dict | None:
        """Busy seconds since the last report, at most every STATS_INTERVAL_S (else None)."""
        while self.spans and self.spans[0][1].query():
            a, b = self.spans.popleft()
            self.busy += a.elapsed_time(b) / 1e3
        now = time.monotonic()
        if now - self.reported < STATS_INTERVAL_S:
            return None
        report = {"busy": self.busy, "elapsed": now - self.reported}
        self.busy, self.reported = 0.0, now
        return report


class ServeState:
    """Persistent serving state of one stage: KV caches, pending sends, the token feedback buffer
    (stage 0) and the sampler with the steps whose tokens the host has not read yet (last stage)."""

    def __init__(self, stage: Any, init: ServeInit) -> None:  # stage: eet_pipe.runtime.stage.Stage
        self.stage, self.ctx = stage, stage.ctx
        self.rank, self.world = stage.ctx.rank, stage.ctx.world
        self.device = stage.ctx.device
        self.order = sorted(stage.chunks)
        self.last_chunk = stage.num_chunks - 1
        # decode parts are padded to batch buckets (rows on a spare cache row) so each bucket replays one
        # CUDA graph per chunk; prefill parts run eagerly
        self.graphs = stage.graphs(init.cuda_graphs)
        self.pad = self.graphs is not None or os.environ.get(PAD_ENV) == "1"
        self.spare_slot = init.max_slots
        rows = init.max_slots + 1  # + the spare row
        self.caches: dict[int, KVCache] = {c: m.new_cache(rows if self.pad else init.max_slots, init.max_len)
                                           for c, m in stage.chunks.items() if m.layer_ids}
        self.max_slots, self.max_len = init.max_slots, init.max_len
        self.is_first, self.is_last = 0 in stage.chunks, self.last_chunk in stage.chunks
        # stage 0: the last token sampled for each slot, written by the feedback of the slot's previous step
        self.fed = torch.zeros(rows, dtype=torch.long, device=self.device) if self.is_first else None
        self.feedback: dict[int, _Feedback] = {}
        self.sampler = SlotSampler(stage.tokenizer.decode if stage.tokenizer is not None else None, self.device,
                                   rows) if self.is_last else None
        self.pending: deque[tuple[int, int, PendingTokens]] = deque()
        self.sends: deque[tuple[dist.Work, torch.Tensor]] = deque()
        self.clock = _BusyClock(self.device)
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
        comm = P2P(self.ctx, lambda a: [((parts[a.mb].rows, parts[a.mb].width, hidden), dtype)])
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
        self._bound_sends()

    def _bound_sends(self) -> None:
        while len(self.sends) > MAX_PENDING_SENDS:
            self.sends.popleft()[0].wait()

    def _take_feedback(self, group: int) -> None:
        """Stage 0: write the tokens of the group's previous step into the feedback buffer."""
        fb = self.feedback.pop(group, None)
        if fb is not None:
            if fb.work is not None:
                fb.work.wait()
            self.fed[fb.slots] = fb.tokens

    def _input(self, part: StepPart, meta: StepMeta) -> torch.Tensor:
        """Stage 0's input of a part: its prompt tokens, or the fed-back tokens of its slots."""
        if part.tokens is None:
            return self.fed[meta.slots].view(-1, 1)
        return part.tokens.to(self.device, non_blocking=True)

    def _feed_back(self, group: int, tokens: torch.Tensor, slots: torch.Tensor) -> None:
        """Send a step's sampled tokens to stage 0 (the last stage) / post their receive (stage 0)."""
        if self.is_first and self.is_last:
            self.fed[slots] = tokens
        elif self.is_last:
            link = self.ctx.link(self.rank, 0)
            self.sends.append((dist.isend(tokens, dst=0, group=link), tokens))
            self._bound_sends()
        else:  # stage 0 of several: the receive is posted now, in the link's message order
            buf = torch.empty(slots.numel(), dtype=torch.long, device=self.device)
            work = dist.irecv(buf, src=self.world - 1, group=self.ctx.link(self.world - 1, 0))
            self.feedback[group] = _Feedback(work, buf, slots)

    @torch.inference_mode()
    def step(self, cmd: StepCommand) -> None:
        """Run this stage's chunks for every part of `cmd`; the last stage samples (its tokens go back to
        stage 0 on the device and to the host one step later, see `results`)."""
        self._check(cmd)
        self._free([*cmd.free, *cmd.new])
        if self.sampler is not None:
            self.sampler.start(cmd.new)
        if self.is_first:
            self._take_feedback(cmd.group)
        sizes = [p.rows for p in cmd.parts]
        parts = [self._padded(p) for p in cmd.parts]
        metas = [part_meta(p).to(self.device) for p in parts]
        comm, recvs = self._comm(parts)
        local: dict[tuple[int, int], torch.Tensor] = {}
        logits: list[torch.Tensor] = []
        for c in self.order:
            for i, part in enumerate(parts):
                if c == 0:
                    x = self._input(part, metas[i])
                elif (c, i) in recvs:
                    x = comm.recv(recvs.pop((c, i)))[0]
                else:
                    x = local.pop((c, i))
                # decode parts only: prefill shapes vary with every admitted batch
                graphs = self.graphs if part.width == 1 else None
                began = self.clock.begin()
                y = self.stage.run_chunk(c, x, metas[i], graphs, self.caches.get(c))
                if c == self.last_chunk:
                    logits.append(self._last_position(y, part, sizes[i]))
                self.clock.end(began)
                self.stage.tick()
                if c == self.last_chunk:
                    continue
                if (c + 1) % self.world == self.rank:
                    local[(c + 1, i)] = y
                else:
                    comm.send(Action(Op.SEND, i, c + 1, peer=(c + 1) % self.world), [y])
        self._retire(comm)
        if not (self.is_first or self.is_last):
            return
        real = torch.cat([m.slots[:n] for m, n in zip(metas, sizes, strict=True)])  # [R] on the device
        if self.is_last:
            slots = [s for p in cmd.parts for s in p.slots.tolist()]
            tokens, pending = self.sampler.sample_async(torch.cat(logits) if len(logits) > 1 else logits[0],
                                                        slots, real)
            self.pending.append((cmd.group, cmd.step, pending))
            self._feed_back(cmd.group, tokens, real)
        elif self.is_first:
            self._feed_back(cmd.group, torch.empty(0), real)

    @staticmethod
    def _last_position(y: torch.Tensor, part: StepPart, n: int) -> torch.Tensor:
        """Logits [n, V] of each real row's last new token (rows past n are bucket padding)."""
        if part.width == 1:
            return y[:n, 0]
        cols = (part.lengths[:n] - 1).to(y.device, non_blocking=True)
        return y[torch.arange(n, device=y.device), cols]

    def _padded(self, part: StepPart) -> StepPart:
        """A decode part (one token per row) padded to its batch bucket when padding is on."""
        if not self.pad or part.width != 1:
            return part
        rows = bucket_for(part.rows, DEFAULT_BUCKETS)
        return part if rows is None else pad_part(part, rows, self.spare_slot)

    def results(self, block: bool) -> list[dict]:
        """Payloads of the steps whose tokens reached the host, oldest first; with `block`, of every
        step run so far (waiting for their copies)."""
        out = []
        while self.pending and (block or self.pending[0][2].ready()):
            group, step, pending = self.pending.popleft()
            payload = new_payload(group, step)
            self.sampler.resolve(pending, payload)
            out.append(payload)
        return out


def serve_command(stage: Any, state: ServeState | None, cmd: ServeInit | StepCommand) -> tuple[ServeState, list[tuple]]:
    """Execute a serving command on a worker; returns the (new) state and messages for the driver:
    ("result", rank, payload, []) from the last stage for every step whose tokens reached the host
    (one step late on GPU: call `serve_idle` when no command is waiting), ("stats", rank, {"busy",
    "elapsed"}) now and then."""
    rank = stage.ctx.rank
    if isinstance(cmd, ServeInit):
        return ServeState(stage, cmd), []
    if state is None:
        raise RuntimeError(f"stage {rank}: StepCommand {cmd.step} arrived before ServeInit")
    state.step(cmd)
    messages: list[tuple] = [("result", rank, p, []) for p in state.results(block=False)]
    stats = state.clock.report()
    if stats is not None:
        messages.append(("stats", rank, stats))
    return state, messages


def serve_idle(state: ServeState | None) -> list[tuple]:
    """Messages of every step whose tokens the host has not read yet (waits for their copies)."""
    if state is None or not state.pending:
        return []
    return [("result", state.rank, p, []) for p in state.results(block=True)]


def next_command(get: Callable[..., Any], get_nowait: Callable[[], Any], state: ServeState | None,
                 emit: Callable[[tuple], None]) -> Any:
    """The next command of a worker's queue; while none is waiting, the results of steps already run
    are read (waiting for the device) and emitted first, so a result never waits for a later command."""
    if state is not None and state.pending:
        try:
            return get_nowait()
        except queue.Empty:
            for msg in serve_idle(state):
                emit(msg)
    return get()
