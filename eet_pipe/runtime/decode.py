"""Microbatched autoregressive decoding over the pipeline (the `decode` schedule).

G groups of sequences are in flight; each group's tokens are sampled on the last stage's device as
soon as its logits exist and fed back to stage 0 with a done flag. Every hidden-state message carries a
one-element control tensor. When the last stage finds a group done, the next step of that group
is its marker step: it travels once through the pipeline (stages that already know skip its
compute) and every stage drops the group's later actions. Flags are read on the host one step
late, so no stage waits for its GPU between steps.
"""

from __future__ import annotations

import torch

from eet_pipe.generation.sequences import GenerationResult, HostCopy, Sampler, SequenceState, pad_prompts, results
from eet_pipe.models.kv_cache import KVCache
from eet_pipe.models.meta import StepMeta, decode_meta, prefill_meta
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
        self.flags_in: dict[int, list[tuple[int, HostCopy]]] = {}
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
            self.pending: dict[int, HostCopy] = {}

    def meta(self, g: int, t: int) -> StepMeta:
        """Metadata of group g at step t, built once even when this stage holds several chunks."""
        cached = self._metas.get(g)
        if cached is not None and cached[0] == t:
            return cached[1]
        r = self.rows[g]
        if t == 0:
            meta = prefill_meta(self.mask[r], torch.arange(r.start, r.stop)).to(self.device)
        else:
            write = torch.full((r.stop - r.start,), self.width + t - 1, dtype=torch.long, device=self.device)
            meta = decode_meta(self.slots_d[g], write, self.lengths_d[r] + (t - 1), self.valid_d[r],
                               kv_len=self.width + t)
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

    def finish_group(self, g: int, t: int) -> None:
        """Group g ends with step t: its later actions are dropped on this stage."""
        if g in self.done_at:
            return
        self.done_at[g] = t
        self.comm.drop(lambda a: not (a.mb == g and a.step > t))

    def note_flag(self, a: Action, flag: torch.Tensor) -> None:
        """Start copying a received done flag to the host; it is read only before group a.mb's next step."""
        self.flags_in.setdefault(a.mb, []).append((a.step, HostCopy(flag)))

    def resolve_flags(self, g: int, step: int) -> None:
        """Read group g's done flags of steps before `step` (their copies finished a step ago)."""
        waiting = self.flags_in.get(g, [])
        while waiting and waiting[0][0] < step:
            t, flag = waiting.pop(0)
            if flag.tolist()[-1] == 1:
                self.finish_group(g, t)

    @torch.inference_mode()
    def run(self) -> list[GenerationResult] | None:
        """Execute this stage's decode actions.

        Done flags travel with every message and are read one step late, so no stage waits for its
        GPU before launching the next step: a stage that learns late that a group ended computes that
        group's marker step on whatever it received (harmless, the group's results are final) and
        drops its later steps; the last stage, which decides, drops them at once.
        """
        actions = self.schedule.actions[self.stage.ctx.rank]
        self.comm = comm = P2P(self.stage.ctx, self.specs, early=False)
        comm.expect([a for a in actions if a.op is Op.RECV])
        self.stage.tracer.reset(self.cmd.trace)
        inbox: dict[tuple[int, int, int], list[torch.Tensor]] = {}
        for a in actions:
            self.resolve_flags(a.mb, a.step)
            if self.skipped(a):
                continue
            if a.op is Op.RECV:
                with self.stage.tracer.span("recv", f"g{a.mb} t{a.step} from stage {a.peer}"):
                    msg = comm.recv(a)
                self.note_flag(a, msg[-1][-1:])
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
            self.record(g, self.pending.pop(g))
        return results(self.cmd.prompts, self.states)

    def forward(self, a: Action, inbox: dict) -> None:
        g, t, c = a.mb, a.step, a.chunk
        key_in = (g, c, t)
        if c == 0 and t > 0 and key_in not in inbox:  # one stage: feedback stays local
            inbox[key_in] = [self.local_feedback.pop((g, t))]
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
        else:  # pass on the flag that came in (still on the device: it is read a step later)
            flag = self.flags[0] if msg is None else msg[-1][-1:].clone()  # its buffer is reused by later receives
            inbox[out_key] = [y, flag]

    def input(self, g: int, t: int, c: int, msg: list[torch.Tensor] | None) -> torch.Tensor:
        if c > 0:
            return msg[0]
        if t == 0:
            return self.ids[self.rows[g]].to(self.device)
        return msg[0][:-1].view(-1, 1).to(self.device)

    def record(self, g: int, tokens: HostCopy) -> None:
        """Append one step's tokens to group g's states."""
        for state, tok in zip(self.states[self.rows[g]], tokens.tolist(), strict=True):
            state.append(tok)

    def feed_back(self, g: int, t: int, fb: torch.Tensor, inbox: dict) -> None:
        """Tokens + done flag of group g for step t + 1, to stage 0 (or kept here with one stage)."""
        if self.world == 1:
            self.local_feedback[(g, t + 1)] = fb
        else:
            inbox[(g, 0, t + 1)] = [fb]

    def sample(self, g: int, t: int, logits: torch.Tensor, inbox: dict) -> None:
        """Tokens picked on the device (greedy, or `Sampler` for every parameter) and fed back without
        waiting for the host.

        The host reads a group's tokens one step late (their copy has long finished by then), so the
        done flag sent with step t + 1 reflects the tokens up to step t - 1: a finished group runs one
        extra step, whose tokens its states ignore.
        """
        r = self.rows[g]
        tokens = logits.argmax(dim=-1) if self.greedy else self.sampler(logits, range(r.start, r.stop))
        host = HostCopy(tokens)
        previous = self.pending.pop(g, None)
        if previous is not None:
            self.record(g, previous)
        if t == self.steps - 1:
            self.record(g, host)
            return
        self.pending[g] = host
        finished = all(s.finished for s in self.states[r])
        self.feed_back(g, t, torch.cat([tokens, self.flags[int(finished)]]), inbox)
        if finished:  # this stage decides: the marker step t + 1 is the group's last
            self.finish_group(g, t + 1)
