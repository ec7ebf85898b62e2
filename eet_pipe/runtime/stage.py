"""`Stage`: the chunks of one device and the executor of forward schedules."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
import torch.distributed as dist

from eet_pipe.compare.points import CaptureHooks
from eet_pipe.loading.presets import ModelSpec
from eet_pipe.loading.units import load_units, tokenizer_for
from eet_pipe.models.kv_cache import KVCache
from eet_pipe.models.meta import StepMeta, prefill_meta, to_device
from eet_pipe.models.model import CanonicalModel
from eet_pipe.ops.cuda_graphs import GraphCache, cache_length
from eet_pipe.partition.plan import unit_range
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
        self._graphs: GraphCache | None = None
        self._caches: dict[int, KVCache] = {}
        self._cache_room = (0, 0)  # (sequences, tokens) the held caches can take

    def graphs(self, wanted: bool) -> GraphCache | None:
        """This stage's CUDA graphs when `wanted` and the stage is on a GPU, else None (eager)."""
        if not wanted or self.ctx.device.type != "cuda":
            return None
        if self._graphs is None:
            self._graphs = GraphCache(self.ctx.device)
        return self._graphs

    def decode_caches(self, batch: int, max_len: int) -> dict[int, KVCache]:
        """KV caches of this stage's chunks for `batch` sequences of up to `max_len` tokens, kept across
        generate commands (so their CUDA graphs stay valid) while they are large enough; cleared."""
        length = cache_length(max_len, self.spec.cfg.max_positions)
        if self._cache_room[0] >= batch and self._cache_room[1] >= max_len:
            for cache in self._caches.values():
                cache.valid.zero_()
            return self._caches
        self._caches = {}
        if self._graphs is not None:
            self._graphs.clear()  # their graphs address the old caches
        if self.ctx.device.type == "cuda":
            torch.cuda.empty_cache()
        self._caches = {c: m.new_cache(batch, length) for c, m in self.chunks.items() if m.layer_ids}
        self._cache_room = (batch, length)
        return self._caches

    def run_chunk(self, chunk: int, x: torch.Tensor, meta: StepMeta, graphs: GraphCache | None,
                  cache: KVCache | None = None, copy: bool = True, last: torch.Tensor | None = None,
                  graph_prefill: bool = False) -> torch.Tensor:
        """One chunk's forward, replayed from a CUDA graph when `graphs` is given.

        With a cache, decode steps (one token per sequence) are graphed; they attend over the whole cache
        (``kv_len = cache.max_len``, bounded per sequence inside the op) so one graph serves every step.
        Prompt steps with a cache are graphed only with `graph_prefill` (the caller pads them to a few
        shapes); their graph is keyed by ``meta.kv_len`` too. `last` ([B] columns, see
        `CanonicalModel.forward`) keeps only those positions' logits. The result is the caller's own
        tensor (graph outputs are copied out), unless `copy` is False: then a graphed forward returns the
        graph's static output, valid only until the next forward of this chunk (for a caller that keeps a
        slice or nothing of it, such as the logits of a command that returns the last position's only).
        """
        model = self.chunks[chunk]
        prompt = cache is not None and x.shape[1] != 1
        if graphs is None or (prompt and not graph_prefill):
            return model(x, meta, cache, last)
        if cache is None:  # a cache-free forward, or a chunk without layers (no cache) in a server step
            extra = tuple(t for t in (meta.token_types, last) if t is not None)
            has_types, has_last = meta.token_types is not None, last is not None

            def fn(x, positions, valid, *extra):
                types = extra[0] if has_types else None
                return model(x, StepMeta(positions=positions, valid=valid, dense=meta.dense, token_types=types),
                             None, extra[-1] if has_last else None)

            key = ("forward", chunk, tuple(x.shape), x.dtype, has_types, meta.dense, has_last)
            out = graphs.run(key, fn, (x, meta.positions, meta.valid, *extra))
            return out.clone() if copy else out
        kv_len = meta.kv_len if prompt else cache.max_len

        def step(x, positions, valid, slots, write_index, *cols):
            return model(x, StepMeta(positions=positions, valid=valid, slots=slots, write_index=write_index,
                                     kv_len=kv_len), cache, cols[0] if cols else None)

        key = ("prefill" if prompt else "decode", chunk, tuple(x.shape), x.dtype, id(cache), kv_len, last is not None)
        cols = () if last is None else (last,)
        return graphs.run(key, step, (x, meta.positions, meta.valid, meta.slots, meta.write_index, *cols)).clone()

    def execute(self, cmd: ForwardCommand | GenerateCommand) -> object:
        """Run one command; the last stage returns its result."""
        if isinstance(cmd, GenerateCommand):
            return DecodeRun(self, cmd).run()
        return self.forward(cmd)

    def label(self, chunk: int) -> str:
        """Canonical unit range of a chunk, e.g. 'embed..layers.5'."""
        return unit_range(self.chunk_units[chunk])

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
        # one host-to-device copy per metadata tensor for the whole command; microbatches are row views
        # (pinned copies are safe here: the previous command has finished and no message has moved yet)
        full = prefill_meta(cmd.mask, token_types=cmd.token_types).to(self.ctx.device, pin=True)
        metas = [replace(full.select(r), dense=bool(cmd.mask[r].all())) for r in rows]

        def specs(a: Action) -> list[Spec]:
            return [((rows[a.mb].stop - rows[a.mb].start, seq, self.hidden), self.dtype)]

        graphs = self.graphs(cmd.cuda_graphs and cmd.capture is None)
        # one copy of the ids for the whole command: a copy per microbatch from pageable memory would
        # wait for the GPU each time and leave it idle while the next microbatch's kernels are launched
        ids = to_device(cmd.ids, self.ctx.device) if 0 in self.chunks else None
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
                x = ids[rows[a.mb]] if a.chunk == 0 else inbox.pop((a.mb, a.chunk))
                hooks.microbatch = a.mb
                # the last chunk's full output (the logits) is copied out of its graph only when returned whole
                keep_all = a.chunk != last or cmd.output == "all"
                with self.tracer.span("compute", f"mb{a.mb} {self.label(a.chunk)}"):
                    y = self.run_chunk(a.chunk, x, metas[a.mb], graphs, copy=keep_all)
                    if a.chunk == last and cmd.output == "last":
                        y = y[:, -1].clone()
                if a.chunk == last:
                    if cmd.output != "none":
                        outputs[a.mb] = y
                else:
                    inbox[(a.mb, a.chunk + 1)] = y
            self.tick()
        comm.flush()
        if self.ctx.device.type == "cuda":
            torch.cuda.current_stream(self.ctx.device).synchronize()
        if not outputs:
            return None
        return torch.cat([outputs[m].cpu() for m in sorted(outputs)])
