"""`Stage`: the chunks of one device and the executor of forward schedules."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from eet_pipe.compare_points import CaptureHooks
from eet_pipe.loading import load_units, tokenizer_for
from eet_pipe.models.meta import prefill_meta
from eet_pipe.models.model import CanonicalModel
from eet_pipe.presets import ModelSpec
from eet_pipe.runtime.comm import P2P, Spec
from eet_pipe.runtime.commands import ForwardCommand, GenerateCommand, split_rows
from eet_pipe.runtime.context import StageContext
from eet_pipe.runtime.decode import DecodeRun
from eet_pipe.runtime.trace import Tracer
from eet_pipe.schedule import Action, Op, build

__all__ = ["Stage"]


class Stage:
    """One pipeline stage: its chunks (virtual stages) on one device."""

    def __init__(self, ctx: StageContext, spec: ModelSpec, chunk_units: list[list[str]], dtype: torch.dtype,
                 tick: Callable[[], None] = lambda: None) -> None:
        self.ctx, self.spec, self.dtype, self.tick = ctx, spec, dtype, tick
        self.num_chunks = len(chunk_units)
        self.chunk_units = chunk_units
        self.chunks: dict[int, CanonicalModel] = {}
        for c in range(ctx.rank, self.num_chunks, ctx.world):
            self.chunks[c] = load_units(spec, chunk_units[c], dtype, ctx.device)
            tick()
        self.hidden = spec.cfg.hidden_size
        self.tracer = Tracer(ctx.device, ctx.rank)
        self.tokenizer = tokenizer_for(spec) if ctx.is_last else None

    def execute(self, cmd: ForwardCommand | GenerateCommand) -> object:
        """Run one command; the last stage returns its result."""
        if isinstance(cmd, GenerateCommand):
            return DecodeRun(self, cmd).run()
        return self.forward(cmd)

    def label(self, chunk: int) -> str:
        """Canonical unit range of a chunk, e.g. 'embed..layers.5'."""
        units = self.chunk_units[chunk]
        return units[0] if len(units) == 1 else f"{units[0]}..{units[-1]}"

    @torch.inference_mode()
    def forward(self, cmd: ForwardCommand) -> torch.Tensor | tuple | None:
        """Run this stage's part of a forward schedule; the last stage returns the outputs (on CPU).

        With ``cmd.capture`` set, forward hooks record those canonical points on this stage's chunks,
        every stage sends its records to the last one (control group) and the last stage returns
        ``(outputs, {key: tensor})``; the other stages return None.
        """
        with CaptureHooks(self.chunks.values(), cmd.capture) as hooks:
            out = self._forward(cmd, hooks)
        if cmd.capture is None:
            return out
        return self._gather_captures(out, hooks.tensors())

    def _gather_captures(self, out: torch.Tensor | None,
                         captured: dict[str, torch.Tensor]) -> tuple | None:
        """Collect every stage's captured tensors on the last stage (stages hold disjoint keys)."""
        if self.ctx.world == 1:
            return out, captured
        parts: list[dict | None] = [None] * self.ctx.world
        dist.gather_object(captured, parts if self.ctx.is_last else None, dst=self.ctx.world - 1,
                           group=self.ctx.control)
        if not self.ctx.is_last:
            return None
        return out, {k: v for part in parts for k, v in (part or {}).items()}

    def _forward(self, cmd: ForwardCommand, hooks: CaptureHooks) -> torch.Tensor | None:
        """Execute this stage's actions; tells `hooks` which microbatch each compute step runs."""
        sched = build(cmd.schedule, self.ctx.world, cmd.microbatches, cmd.virtual)
        actions = sched.actions[self.ctx.rank]
        rows = split_rows(cmd.ids.shape[0], cmd.microbatches)
        seq = cmd.ids.shape[1]
        metas = [prefill_meta(cmd.mask[r], token_types=None if cmd.token_types is None else cmd.token_types[r])
                 .to(self.ctx.device) for r in rows]

        def specs(a: Action) -> list[Spec]:
            return [((rows[a.mb].stop - rows[a.mb].start, seq, self.hidden), self.dtype)]

        comm = P2P(self.ctx, specs)
        comm.expect([a for a in actions if a.op is Op.RECV])
        self.tracer.reset(cmd.trace)
        inbox: dict[tuple[int, int], torch.Tensor] = {}
        outputs: dict[int, torch.Tensor] = {}
        last = self.num_chunks - 1
        for a in actions:
            if a.op is Op.RECV:
                with self.tracer.span("recv", f"mb{a.mb} from stage {a.peer}"):
                    inbox[(a.mb, a.chunk)] = comm.recv(a)[0]
            elif a.op is Op.SEND:
                with self.tracer.span("send", f"mb{a.mb} to stage {a.peer}"):
                    comm.send(a, [inbox.pop((a.mb, a.chunk))])
            else:
                x = cmd.ids[rows[a.mb]].to(self.ctx.device) if a.chunk == 0 else inbox.pop((a.mb, a.chunk))
                hooks.microbatch = a.mb
                with self.tracer.span("compute", f"mb{a.mb} {self.label(a.chunk)}"):
                    y = self.chunks[a.chunk](x, metas[a.mb])
                if a.chunk == last:
                    if cmd.output != "none":
                        outputs[a.mb] = y[:, -1] if cmd.output == "last" else y
                else:
                    inbox[(a.mb, a.chunk + 1)] = y
            self.tick()
        comm.flush()
        if self.ctx.device.type == "cuda":
            torch.cuda.current_stream(self.ctx.device).synchronize()
        if not outputs:
            return None
        return torch.cat([outputs[m].cpu() for m in sorted(outputs)])
