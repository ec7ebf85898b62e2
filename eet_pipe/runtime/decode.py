"""Microbatched autoregressive decoding over the pipeline (the `decode` schedule).

G groups of sequences are in flight; each group's tokens are sampled on the last stage as soon as
its logits exist and fed back to stage 0 with a done flag. Every hidden-state message carries a
one-element control tensor; when a group is done, a marker without compute travels once through
the pipeline and every stage drops that group's remaining actions.
"""

from __future__ import annotations

import torch

from eet_pipe.generation import GenerationResult, Sampler, SequenceState, pad_prompts, results
from eet_pipe.models.kv_cache import KVCache
from eet_pipe.models.meta import StepMeta, prefill_meta
from eet_pipe.runtime.comm import P2P, Spec
from eet_pipe.runtime.commands import GenerateCommand, split_rows
from eet_pipe.schedule import Action, Op, build

__all__ = ["DecodeRun"]


class DecodeRun:
    """One generate command on one stage."""

    def __init__(self, stage, cmd: GenerateCommand) -> None:  # stage: eet_pipe.runtime.stage.Stage
        self.stage, self.cmd = stage, cmd
        ctx = stage.ctx
        self.device, self.world = ctx.device, ctx.world
        self.ids, self.mask = pad_prompts(cmd.prompts, cmd.pad_id)
        self.batch, self.width = self.ids.shape
        self.steps = max(p.max_new_tokens for p in cmd.params)
        self.rows = split_rows(self.batch, cmd.groups)
        self.lengths = self.mask.sum(-1)
        self.schedule = build("decode", self.world, len(self.rows), virtual=stage.num_chunks // self.world,
                              steps=self.steps)
        self.last_chunk = stage.num_chunks - 1
        self.caches: dict[int, KVCache] = stage.decode_caches(self.batch, self.width + self.steps)
        self.graphs = stage.graphs(cmd.cuda_graphs)
        self.done_at: dict[int, int] = {}
        self._metas: dict[int, tuple[int, StepMeta]] = {}
        self.local_feedback: dict[tuple[int, int], torch.Tensor] = {}
        self.flags = {v: torch.tensor([v], dtype=torch.long, device=self.device) for v in (0, 1)}
        self.is_last = ctx.is_last
        # decode-step metadata is built on the device from these (no host-to-device copy per step)
        self.lengths_d = self.lengths.to(self.device)
        self.slots_d = [torch.arange(r.start, r.stop, device=self.device) for r in self.rows]
        self.valid_d = torch.ones(self.batch, 1, dtype=torch.bool, device=self.device)
        if self.is_last:
            decode = stage.tokenizer.decode if stage.tokenizer is not None else None
            self.sampler = Sampler(cmd.params)
            self.states = [SequenceState(p, cmd.eos_ids, decode) for p in cmd.params]
            self.greedy = all(p.greedy for p in cmd.params)
            self.pending: dict[int, tuple[torch.Tensor, torch.cuda.Event | None]] = {}

    def meta(self, g: int, t: int) -> StepMeta:
        """Metadata of group g at step t, built once even when this stage holds several chunks."""
        cached = self._metas.get(g)
        if cached is not None and cached[0] == t:
            return cached[1]
        r = self.rows[g]
        if t == 0:
            meta = prefill_meta(self.mask[r], torch.arange(r.start, r.stop)).to(self.device)
        else:
            n = r.stop - r.start
            write = torch.full((n, 1), self.width + t - 1, dtype=torch.long, device=self.device)
            meta = StepMeta(positions=(self.lengths_d[r] + (t - 1)).view(n, 1), valid=self.valid_d[r],
                            slots=self.slots_d[g], write_index=write, kv_len=self.width + t)
        self._metas[g] = (t, meta)
        return meta

    def specs(self, a: Action) -> list[Spec]:
        size = self.rows[a.mb].stop - self.rows[a.mb].start
        if a.chunk == 0:
            return [((size + 1,), torch.long)]  # fed-back tokens + done flag
        seq = self.width if a.step == 0 else 1
        return [((size, seq, self.stage.hidden), self.stage.dtype), ((1,), torch.long)]

    def skipped(self, a: Action) -> bool:
        return a.mb in self.done_at and a.step > self.done_at[a.mb]

    def finish_group(self, g: int, t: int, comm: P2P) -> None:
        self.done_at[g] = t
        comm.drop(lambda a: not (a.mb == g and a.step > t))

    @torch.inference_mode()
    def run(self) -> list[GenerationResult] | None:
        actions = self.schedule.actions[self.stage.ctx.rank]
        comm = P2P(self.stage.ctx, self.specs)
        comm.expect([a for a in actions if a.op is Op.RECV])
        self.stage.tracer.reset(self.cmd.trace)
        inbox: dict[tuple[int, int, int], list[torch.Tensor]] = {}
        for a in actions:
            if self.skipped(a):
                continue
            if a.op is Op.RECV:
                with self.stage.tracer.span("recv", f"g{a.mb} t{a.step} from stage {a.peer}"):
                    msg = comm.recv(a, prefetch=False)
                if int(msg[-1][-1]) == 1:  # done marker / done flag (one tiny copy to the host)
                    self.finish_group(a.mb, a.step, comm)
                comm.prefetch()
                inbox[(a.mb, a.chunk, a.step)] = msg
            elif a.op is Op.SEND:
                comm.send(a, inbox.pop((a.mb, a.chunk, a.step)))
            else:
                self.forward(a, inbox)
            self.stage.tick()
        comm.flush()
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        if not self.is_last:
            return None
        for g in sorted(self.pending):
            self.record(g, *self.pending.pop(g))
        return results(self.cmd.prompts, self.states)

    def forward(self, a: Action, inbox: dict) -> None:
        g, t, c = a.mb, a.step, a.chunk
        key_in = (g, c, t)
        if c == 0 and t > 0 and key_in not in inbox:  # one stage: feedback stays local
            fb = self.local_feedback.pop((g, t))
            if int(fb[-1]) == 1:
                self.done_at[g] = t
            inbox[key_in] = [fb]
        msg = inbox.pop(key_in, None)
        done = self.done_at.get(g) == t
        out_key = (g, c + 1, t)
        if done:  # pass the done marker on without computing
            if c != self.last_chunk:
                size = self.rows[g].stop - self.rows[g].start
                dummy = torch.empty((size, self.width if t == 0 else 1, self.stage.hidden), dtype=self.stage.dtype,
                                    device=self.device)
                inbox[out_key] = [dummy, self.flags[1]]
            return
        x = self.input(g, t, c, msg)
        with self.stage.tracer.span("compute", f"g{g} t{t} {self.stage.label(c)}"):
            y = self.stage.run_chunk(c, x, self.meta(g, t), self.graphs, self.caches.get(c))
        if c == self.last_chunk:
            self.sample(g, t, y[:, -1], inbox)
        else:
            inbox[out_key] = [y, self.flags[0]]

    def input(self, g: int, t: int, c: int, msg: list[torch.Tensor] | None) -> torch.Tensor:
        if c > 0:
            return msg[0]
        if t == 0:
            return self.ids[self.rows[g]].to(self.device)
        return msg[0][:-1].view(-1, 1).to(self.device)

    def record(self, g: int, tokens: torch.Tensor, event: torch.cuda.Event | None) -> None:
        """Append one step's tokens (host tensor, ready once `event` has completed) to group g's states."""
        if event is not None:
            event.synchronize()
        for state, tok in zip(self.states[self.rows[g]], tokens.tolist(), strict=True):
            state.append(tok)

    def feed_back(self, g: int, t: int, fb: torch.Tensor, inbox: dict) -> None:
        """Tokens + done flag of group g for step t + 1, to stage 0 (or kept here with one stage)."""
        if self.world == 1:
            self.local_feedback[(g, t + 1)] = fb
        else:
            inbox[(g, 0, t + 1)] = [fb]

    def sample(self, g: int, t: int, logits: torch.Tensor, inbox: dict) -> None:
        if self.greedy:
            self.sample_greedy(g, t, logits, inbox)
            return
        r = self.rows[g]
        tokens = self.sampler(logits, range(r.start, r.stop))
        for state, tok in zip(self.states[r], tokens.tolist(), strict=True):
            state.append(tok)
        finished = all(s.finished for s in self.states[r]) or t == self.steps - 1
        if t == self.steps - 1:
            return
        self.feed_back(g, t, torch.cat([tokens, torch.tensor([int(finished)])]).to(self.device), inbox)

    def sample_greedy(self, g: int, t: int, logits: torch.Tensor, inbox: dict) -> None:
        """Greedy tokens picked on the device and fed back without waiting for the host.

        The host reads a group's tokens one step late (their copy has long finished by then), so the
        done flag sent with step t + 1 reflects the tokens up to step t - 1: a finished group runs
        one extra step, whose tokens its states ignore.
        """
        tokens = logits.argmax(dim=-1)
        host = tokens.to("cpu", non_blocking=self.device.type == "cuda")
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        previous = self.pending.pop(g, None)
        if previous is not None:
            self.record(g, *previous)
        if t == self.steps - 1:
            self.record(g, host, event)
            return
        self.pending[g] = (host, event)
        finished = all(s.finished for s in self.states[self.rows[g]])
        self.feed_back(g, t, torch.cat([tokens, self.flags[int(finished)]]), inbox)
