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
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from eet_pipe.models.kv_cache import KVCache
from eet_pipe.models.meta import StepMeta
from eet_pipe.runtime.comm import P2P
from eet_pipe.runtime.slot_sampler import PendingTokens, SlotSampler, new_payload
from eet_pipe.runtime.step_parts import (
    PAD_ENV,
    ServeInit,
    StepCommand,
    StepPart,
    pad_part,
    part_meta,
    prefill_graph_tokens,
    prefill_width,
    span_label,
    step_rows,
)
from eet_pipe.runtime.trace import BusyClock
from eet_pipe.runtime.upload import Uploader
from eet_pipe.schedule import Action, Op

__all__ = ["ServeState", "serve_command", "next_command"]

log = logging.getLogger("eet_pipe.runtime")

STATS_INTERVAL_S = 1.0
"""How often a worker reports its busy time (a ("stats", rank, {...}) message)."""

RESULT_POLL_S = 1e-4
"""How often a last stage with steps in flight checks whether the oldest one's tokens reached the host
(between checks it waits for a command)."""

MAX_PENDING_SENDS = 8
"""Asynchronous sends kept in flight before the oldest is waited for."""

UPLOAD_BYTES = 1 << 20
"""Largest packed inputs of one step copied through the page-locked upload buffers (`Uploader`)."""


@dataclass
class _Feedback:
    """Stage 0's receive of one step's sampled tokens (posted when the step ends, read at the group's next)."""

    work: dist.Work | None
    tokens: torch.Tensor
    """[R] int64 tokens of the step's sampled rows."""
    slots: torch.Tensor
    """[R] int64 their slots (on the device)."""


class ServeState:
    """Persistent serving state of one stage: KV caches, pending sends, the token feedback buffer
    (stage 0) and the sampler with the steps whose tokens the host has not read yet (last stage)."""

    def __init__(self, stage: Any, init: ServeInit) -> None:  # stage: eet_pipe.runtime.stage.Stage
        self.stage, self.ctx = stage, stage.ctx
        self.rank, self.world = stage.ctx.rank, stage.ctx.world
        self.device = stage.ctx.device
        self.order = sorted(stage.chunks)
        self.last_chunk = stage.num_chunks - 1
        # parts are padded to buckets (rows on a spare cache row; prompts to a bucket width) so that each
        # bucket replays one CUDA graph per chunk; prompt parts above PREFILL_GRAPH_TOKENS run eagerly
        self.graphs = stage.graphs(init.cuda_graphs)
        if self.graphs is not None:
            self.graphs.clear()  # graphs of an earlier serving state address its (freed) caches
        self.prefill_tokens = prefill_graph_tokens(stage.hidden)
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
        # page-locked buffers allocated now, before any step's message moves (see `Uploader`)
        self.uploader = Uploader(self.device, UPLOAD_BYTES, depth=8)
        self.sampler = SlotSampler(stage.tokenizer.decode if stage.tokenizer is not None else None, self.device,
                                   rows, self.uploader.upload) if self.is_last else None
        self.pending: deque[tuple[int, int, PendingTokens]] = deque()
        self.sends: deque[tuple[dist.Work, torch.Tensor]] = deque()
        self.clock = BusyClock(self.device, STATS_INTERVAL_S, spans=init.trace)
        log.info("stage %d: serving state with %d slots x %d positions (%.1f MB of KV cache)", self.rank,
                 init.max_slots, init.max_len, sum(c.nbytes() for c in self.caches.values()) / 1e6)

    def _check(self, cmd: StepCommand) -> None:
        for part in cmd.parts:
            if part.slots.numel() and (int(part.slots.max()) >= self.max_slots or int(part.slots.min()) < 0):
                raise ValueError(f"step {cmd.step}: slots {part.slots.tolist()} outside 0..{self.max_slots - 1}")
            if part.slots.numel() and int((part.start + part.lengths).max()) > self.max_len:
                raise ValueError(f"step {cmd.step}: a sequence needs more than the {self.max_len} cache positions")

    def _free(self, slots: list[int], on_device: torch.Tensor) -> None:
        if slots:
            for cache in self.caches.values():
                cache.free(on_device)
        if self.sampler is not None:
            self.sampler.drop(slots)

    def _upload(self, cmd: StepCommand, parts: list[StepPart]) -> tuple[list[StepPart], list, torch.Tensor]:
        """The parts on the device in one copy (prompt tokens on stage 0 only), each part's last-token
        columns (prompt parts on the last stage, else None) and the slots to clear."""
        none = torch.empty(0, dtype=torch.long)
        host = []
        for p in parts:
            host += [p.slots, p.lengths, p.start, p.tokens if self.is_first and p.tokens is not None else none,
                     p.lengths - 1 if self.is_last and p.width > 1 else none]
        host.append(torch.tensor([*cmd.free, *cmd.new], dtype=torch.long))
        moved = self.uploader.upload(host)
        out, last = [], []
        for i, p in enumerate(parts):
            slots, lengths, start, tokens, cols = moved[5 * i: 5 * i + 5]
            out.append(StepPart(slots=slots, tokens=tokens if p.tokens is not None and self.is_first else None,
                                lengths=lengths, start=start))
            last.append(cols if self.is_last and p.width > 1 else None)
        return out, last, moved[-1]

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
        """Stage 0's input of a part (on the device): its prompt tokens, or the fed-back tokens of its slots."""
        if part.tokens is None:
            return self.fed[meta.slots].view(-1, 1)
        return part.tokens

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
        sizes = [p.rows for p in cmd.parts]
        parts, graphed = zip(*(self._padded(p) for p in cmd.parts), strict=True)
        moved, lasts, free = self._upload(cmd, parts)
        self._free([*cmd.free, *cmd.new], free)
        if self.sampler is not None:
            self.sampler.start(cmd.new)
        if self.is_first:
            self._take_feedback(cmd.group)
        # built on the device from the host's sizes: only stage 0 has a prompt part's tokens
        metas = [part_meta(d, int(p.start.max()) + p.width, p.width) for d, p in zip(moved, parts, strict=True)]
        comm, recvs = self._comm(parts)
        local: dict[tuple[int, int], torch.Tensor] = {}
        logits: list[torch.Tensor] = []
        for c in self.order:
            for i in range(len(parts)):
                if c == 0:
                    x = self._input(moved[i], metas[i])
                elif (c, i) in recvs:
                    x = comm.recv(recvs.pop((c, i)))[0]
                else:
                    x = local.pop((c, i))
                began = self.clock.begin()
                captures = self._captures()
                # a prompt part's last chunk computes the logits of each row's last token only
                y = self.stage.run_chunk(c, x, metas[i], self.graphs if graphed[i] else None, self.caches.get(c),
                                         last=lasts[i] if c == self.last_chunk else None, graph_prefill=True)
                if c == self.last_chunk:
                    logits.append(y[: sizes[i], 0])  # rows past sizes[i] are bucket padding
                self.clock.end(began, self.clock.keep_spans and span_label(
                    cmd, cmd.parts[i], parts[i], c, graphed[i], self._captures() - captures))
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

    def _captures(self) -> int:
        """CUDA graphs this stage has captured so far (a traced forward that captured one says so)."""
        return self.graphs.captures if self.graphs is not None else 0

    def _padded(self, part: StepPart) -> tuple[StepPart, bool]:
        """The part padded to its bucket when padding is on, and whether it replays CUDA graphs: a decode
        part (one token per row) gets its batch bucket; a prompt part its batch bucket and
        `prefill_width`, unless that holds more than PREFILL_GRAPH_TOKENS tokens (fewer on wide models, see
        PREFILL_GRAPH_ELEMENTS; then it runs as it is, eagerly)."""
        if not self.pad:
            return part, False
        rows = step_rows(part.rows)
        if part.width == 1:
            return pad_part(part, rows, self.spare_slot), True
        width = prefill_width(part.width, self.max_len)
        if rows * width > self.prefill_tokens or bool(part.start.any()):
            return part, False  # (prompts start at column 0; a part that does not runs as it is)
        return pad_part(part, rows, self.spare_slot, width), True

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
    ("result", rank, payload, []) from the last stage for every step whose tokens reached the host (on GPU
    the later ones are sent by `next_command` as they arrive), ("stats", rank, {"busy", "elapsed"}) now
    and then."""
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


def _flush_spans(state: ServeState, emit: Callable[[tuple], None]) -> None:
    """A tracing stage that fell idle: its spans so far (waits for its device)."""
    if state.device.type == "cuda":
        torch.cuda.current_stream(state.device).synchronize()
    emit(("stats", state.rank, state.clock.report(force=True)))


def next_command(get: Callable[..., Any], get_nowait: Callable[[], Any], state: ServeState | None,
                 emit: Callable[[tuple], None]) -> Any:
    """The next command of a worker's queue. While steps whose tokens the host has not read are in flight
    (the last stage on a GPU), each step's result is emitted as soon as its tokens reach the host (checked
    every RESULT_POLL_S) and a command is returned as soon as one arrives: the scheduler issues a group's
    next step when that group's oldest step ends, while the device still works on the steps queued behind
    it (a result held back until the queue ran dry left the device idle while the next command was
    built and sent). A tracing stage that falls idle sends its spans before it waits."""
    while state is not None and state.pending:
        for p in state.results(block=False):
            emit(("result", state.rank, p, []))
        if not state.pending:
            break
        try:
            return get_nowait()
        except queue.Empty:
            pass
        try:
            return get(timeout=RESULT_POLL_S)
        except queue.Empty:
            continue
    if state is not None and state.clock.unreported():
        try:
            return get_nowait()
        except queue.Empty:
            _flush_spans(state, emit)
    return get()
