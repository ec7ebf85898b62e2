"""Driver side of a serving pipeline: workers with persistent KV caches, fed one step command at a time.

`ServingEngine` spawns one worker per device through the same `Supervisor` as `PipelineEngine`,
allocates the serving state (`ServeInit`) and runs a warm-up step. After that the scheduler calls
`send` (a `StepCommand` to every worker; commands of different groups queue up behind each other,
so with G >= P groups in flight every stage stays busy) and `collect` (the next result of the last
stage). A worker that raises, dies or stalls makes `collect` / `check_alive` raise a `WorkerError`
after every worker has been stopped.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from eet_pipe.generation.sequences import SamplingParams
from eet_pipe.loading.presets import ModelSpec, resolve_model
from eet_pipe.loading.tokenizer import Tokenizer
from eet_pipe.models.config import ArchConfig
from eet_pipe.models.dtypes import parse_dtype
from eet_pipe.partition.plan import Plan
from eet_pipe.runtime.placement import make_plan, pipeline_devices
from eet_pipe.runtime.step_parts import (
    PAD_ENV,
    SeqInit,
    ServeInit,
    StepCommand,
    StepPart,
    prefill_graph_tokens,
    prefill_width,
    step_rows,
)
from eet_pipe.runtime.supervisor import Supervisor, WorkerDiedError, WorkerError, free_port
from eet_pipe.runtime.worker import WorkerArgs
from eet_pipe.serving.step_trace import StepTrace

__all__ = ["PipelineSetup", "StepDriver", "ServingEngine", "all_gpus", "prompt_padding", "resolve_setup", "stage_devices",
           "warmup_shapes"]

log = logging.getLogger("eet_pipe.serve")


@dataclass
class PipelineSetup:
    """What a serving pipeline runs: model, plan, dtype, tokenizer and the cache geometry."""

    spec: ModelSpec
    plan: Plan
    dtype: torch.dtype
    tokenizer: Tokenizer
    max_len: int
    """KV-cache positions per sequence = the server's context length."""
    max_slots: int
    groups: int
    cuda_graphs: bool = True
    """Replay GPU stages' step parts from CUDA graphs (decode parts; prompt parts up to a size)."""
    warmup: bool = False
    """Capture every step shape's CUDA graphs before serving (`warmup_shapes`); set where graphs are replayed."""
    max_prefill_tokens: int = 4096
    """The scheduler's prompt-token budget per step (bounds the prompt parts it builds)."""

    @property
    def cfg(self) -> ArchConfig:
        return self.spec.cfg

    @property
    def num_stages(self) -> int:
        return len(self.plan.stages)

    @property
    def eos_ids(self) -> list[int]:
        return list(self.cfg.eos_ids)


def stage_devices(devices: list[str], stages: int, allow_duplicates: bool = False) -> list[str]:
    """The server's devices (`pipeline_devices`); its options' default stages=1 means "as many as the
    devices given"; a GPU listed twice needs `allow_duplicates`."""
    return pipeline_devices(devices, None if devices and stages == 1 else stages, allow_duplicates=allow_duplicates)


def resolve_setup(opts: Any, devices: list[str], plan: Plan | None = None) -> PipelineSetup:
    """Resolve `ServeOptions` into a `PipelineSetup` (no process is started); `plan` overrides `opts.plan`.

    Raises ValueError naming the option for an encoder model, a missing tokenizer or a bad plan."""
    from eet_pipe.loading.units import tokenizer_for

    spec = resolve_model(opts.model, opts.weights, opts.weights_seed)
    if not spec.cfg.is_decoder:
        raise ValueError(f"model={opts.model!r} is an encoder ({spec.cfg.model_type}): the server needs a causal LM")
    tokenizer = tokenizer_for(spec)
    if tokenizer is None:
        raise ValueError(f"model={opts.model!r} has no tokenizer (no tokenizer files and a vocabulary too small "
                         "for the byte tokenizer): the server needs one to turn text into tokens")
    if opts.max_seq > spec.cfg.max_positions:
        raise ValueError(f"max_seq={opts.max_seq} exceeds the model's max positions {spec.cfg.max_positions}")
    dtype = parse_dtype(opts.dtype)
    virtual = opts.virtual if opts.schedule == "interleaved" else 1
    groups = opts.microbatches or 2 * len(devices)
    resolved = make_plan(opts.plan if plan is None else plan, spec, devices, dtype, opts.schedule, virtual, groups)
    return PipelineSetup(spec=spec, plan=resolved, dtype=dtype, tokenizer=tokenizer,
                         max_len=opts.max_seq or spec.cfg.max_positions, max_slots=opts.max_slots,
                         groups=max(1, min(groups, opts.max_slots)), cuda_graphs=opts.cuda_graphs,
                         warmup=opts.warmup and opts.cuda_graphs and any(d.startswith("cuda") for d in devices),
                         max_prefill_tokens=opts.max_prefill_tokens)


WARMUP_GRAPHS = 96
"""Most graphs the warm-up leaves on a stage (shapes x the stage's chunks): below the 128 a stage's graph cache
keeps, which drops the least recently used beyond that, so traffic's own shapes still have room."""


def warmup_shapes(setup: PipelineSetup) -> tuple[list[int], list[tuple[int, int]]]:
    """The step shapes a server with `setup` replays from CUDA graphs, as real (unpadded) sizes: one row count
    per `step_rows` bucket of a group's slots (decode parts), and (rows, prompt width) per pair of that and a
    `prefill_width` bucket whose padded size a stage graphs and the scheduler can build (at most
    `max_prefill_tokens` prompt tokens, or a single prompt; room for two decode tokens after the prompt).
    Each is the smallest size of its bucket, so that every bucket the scheduler can reach is there. With more
    than `WARMUP_GRAPHS` graphs per stage, the prompt shapes of fewest padded tokens are kept (a large part's
    kernels are long enough that running it eagerly costs little)."""
    per_group = -(-setup.max_slots // setup.groups)
    graphed = prefill_graph_tokens(setup.cfg.hidden_size)
    rows: dict[int, int] = {}  # padded rows -> the fewest rows padded to it
    for r in range(1, per_group + 1):
        rows.setdefault(step_rows(r), r)
    widths: dict[int, int] = {}  # padded width -> the narrowest prompt padded to it
    for w in range(2, setup.max_len - 1):  # a one-token prompt is a decode-shaped part
        widths.setdefault(prefill_width(w, setup.max_len), w)
    shapes = [(padded * target, r, w) for padded, r in sorted(rows.items()) for target, w in sorted(widths.items())
              if padded * target <= graphed and (r == 1 or r * w <= setup.max_prefill_tokens)]
    chunks = max(len(stage.chunks) for stage in setup.plan.stages)
    room = max(WARMUP_GRAPHS // chunks - len(rows), 0)
    kept = sorted(sorted(shapes)[:room], key=lambda s: (s[1], s[2]))
    return sorted(rows.values()), [(r, w) for _, r, w in kept]


def all_gpus(devices: Sequence[object]) -> bool:
    """Whether every device of a plan (or a `devices` option) is a GPU."""
    return all(str(d).startswith("cuda") for d in devices)


def prompt_padding(setup: PipelineSetup) -> Callable[[int, int], tuple[int, int]] | None:
    """The shape (rows, width) the stages run a prompt part of (rows, width) prompt tokens in, as their step
    pads it (`eet_pipe.runtime.step`): where a stage replays CUDA graphs (a GPU with `cuda_graphs`, or PAD_ENV
    set), a part of one-token prompts runs as a decode part (its row bucket), and a part whose padded size a
    stage graphs (`prefill_graph_tokens`) as its `step_rows` x `prefill_width` bucket; any other part as it is.
    None unless every stage pads (a CPU stage runs parts as they are: cutting them would only cost it passes)."""
    on_gpu = setup.cuda_graphs and all_gpus(setup.plan.devices)
    if not on_gpu and os.environ.get(PAD_ENV) != "1":
        return None
    graphed = prefill_graph_tokens(setup.cfg.hidden_size)

    def padded(rows: int, width: int) -> tuple[int, int]:
        if width == 1:
            return step_rows(rows), 1
        shape = step_rows(rows), prefill_width(width, setup.max_len)
        return shape if shape[0] * shape[1] <= graphed else (rows, width)

    return padded


class StepDriver:
    """What the scheduler needs of a pipeline; subclasses move the commands (spawned workers, torchrun)."""

    setup: PipelineSetup

    def __init__(self) -> None:
        self.stage_busy: dict[int, float] = {}
        """Busy fraction of each stage over its last report interval (when the stage reports it)."""
        self.trace: StepTrace | None = None
        """Where the stages' step spans go (the server's `trace=`); set before `start`."""

    def on_gpus(self) -> bool:
        """Whether every stage runs on a GPU (known before `start`)."""
        return all_gpus(self.setup.plan.devices)

    def spawn(self) -> None:
        """Start worker processes, if this driver has any (called on the main thread, before `start`)."""

    def start(self) -> None:
        """Load the model on every stage, allocate the serving state and warm up (slow)."""
        raise NotImplementedError

    def send(self, cmd: StepCommand | ServeInit) -> None:
        """Queue `cmd` on every stage."""
        raise NotImplementedError

    def collect(self) -> dict:
        """The next result payload of the last stage (raises WorkerError on failure)."""
        raise NotImplementedError

    def check_alive(self) -> None:
        """Raise WorkerError if a stage died (called while no step is in flight)."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop every stage (idempotent)."""
        raise NotImplementedError

    def _on_stats(self, rank: int, info: dict) -> None:
        self.stage_busy[rank] = info["busy"] / max(info["elapsed"], 1e-9)
        if info.get("spans") and self.trace is not None:
            self.trace.stage_spans(rank, info["spans"])

    def init_serving(self) -> None:
        """Allocate every stage's KV caches, then run one prefill + decode step as a warm-up."""
        s = self.setup
        self.send(ServeInit(max_slots=s.max_slots, max_len=s.max_len, cuda_graphs=s.cuda_graphs,
                            trace=self.trace is not None))
        began = time.perf_counter()
        prompt = torch.arange(1, 5, dtype=torch.long) % s.cfg.vocab_size
        one = torch.zeros(1, dtype=torch.long)
        params = SamplingParams(max_new_tokens=2, ignore_eos=True)
        self.send(StepCommand(group=0, step=-2, new={0: SeqInit(params)},
                              parts=[StepPart(one, prompt.view(1, -1), one + len(prompt), one)]))
        first = self.collect()["tokens"][0]
        self.send(StepCommand(group=0, step=-1, parts=[StepPart(one, torch.tensor([[first]]), one + 1,
                                                                one + len(prompt))]))
        self.collect()
        log.info("serving state ready: %d slots x %d positions, %d groups; warm-up step %.2f s",
                 s.max_slots, s.max_len, s.groups, time.perf_counter() - began)
        if s.warmup:
            self.warm_up_graphs()

    def warm_up_graphs(self) -> int:
        """Run every shape of `warmup_shapes` twice, so that each stage captures its CUDA graph now rather
        than under load (a stage runs a new shape eagerly once and captures it the second time, stalling
        every step behind it). Steps use group 0's slots, which admission clears before reuse; returns the
        number of steps run."""
        s, began = self.setup, time.perf_counter()
        rows, prompts = warmup_shapes(s)
        params = SamplingParams(max_new_tokens=4, ignore_eos=True)
        step, ran = -3, 0

        def run(cmd: StepCommand) -> list[int]:
            nonlocal step, ran
            self.send(cmd)
            payload = self.collect()
            step, ran = step - 1, ran + 1
            return [payload["tokens"][slot] for slot in cmd.parts[0].slots.tolist()]

        for r in rows:
            slots = torch.arange(r) * s.groups
            ones = torch.ones(r, dtype=torch.long)
            first = None
            for width in [w for n, w in prompts if n == r]:
                tokens = torch.arange(1, width + 1, dtype=torch.long).remainder(s.cfg.vocab_size).repeat(r, 1)
                part = StepPart(slots, tokens, ones * width, torch.zeros(r, dtype=torch.long))
                for _ in range(2):
                    first = run(StepCommand(group=0, step=step, new={i: SeqInit(params) for i in slots.tolist()},
                                            parts=[part]))
                last = width
            if first is None:  # no prompt shape at these rows: a one-token prompt starts the sequences
                first = run(StepCommand(group=0, step=step, new={i: SeqInit(params) for i in slots.tolist()},
                                        parts=[StepPart(slots, ones.view(-1, 1), ones, ones * 0)]))
                last = 1
            for n in range(2):
                first = run(StepCommand(group=0, step=step, parts=[StepPart(slots, torch.tensor(first).view(-1, 1),
                                                                             ones, ones * (last + n))]))
        log.info("CUDA graphs warmed up: %d decode and %d prompt shapes, %d steps in %.1f s", len(rows),
                 len(prompts), ran, time.perf_counter() - began)
        return ran


class ServingEngine(StepDriver):
    """Spawned workers (one per device) serving step commands; see the module docstring."""

    def __init__(self, setup: PipelineSetup, timeout: float = 60.0, startup_timeout: float = 900.0,
                 threads: int = 0) -> None:
        super().__init__()
        self.setup, self.timeout, self.startup_timeout = setup, timeout, startup_timeout
        self.threads = threads or max(1, (os.cpu_count() or 1) // setup.num_stages)
        self._sup: Supervisor | None = None
        self._closed = False

    @property
    def pids(self) -> list[int]:
        """Process ids of the workers (empty before `start`)."""
        return [] if self._sup is None else [p.pid for p in self._sup.procs]

    def spawn(self) -> None:
        """Start the worker processes (returns at once; `start` waits for them)."""
        if self._sup is not None:
            return
        if self._closed:
            raise WorkerError("the serving engine was closed before it started")
        s = self.setup
        init = f"tcp://127.0.0.1:{free_port()}"
        args = [WorkerArgs(rank=r, world=s.num_stages, device=d, init_method=init, spec=s.spec,
                           chunk_units=s.plan.chunks(), dtype=s.dtype, parent_pid=os.getpid(),
                           threads=self.threads, devices=tuple(s.plan.devices))
                for r, d in enumerate(s.plan.devices)]
        self._sup = Supervisor(args, self.timeout)

    def start(self) -> None:
        """Spawn the workers (unless `spawn` did), wait until they loaded their stages, allocate caches, warm up."""
        self.spawn()
        self._supervisor().collect(self.setup.num_stages, "loading the model", kinds=("ready",),
                                   timeout=self.startup_timeout)
        self.init_serving()

    def _supervisor(self) -> Supervisor:
        if self._sup is None or self._sup.closed:
            raise WorkerError("the pipeline is not running (not started, failed or closed)")
        return self._sup

    def send(self, cmd: StepCommand | ServeInit) -> None:
        self._supervisor().broadcast(cmd)

    def collect(self) -> dict:
        sup = self._supervisor()
        while True:
            msg = sup.collect(1, "serving", kinds=("result", "stats"))[0]
            if msg[0] == "stats":
                self._on_stats(msg[1], msg[2])
            else:
                return msg[2]

    def check_alive(self) -> None:
        sup = self._supervisor()
        if all(p.is_alive() for p in sup.procs):
            return
        # a stage is gone: let the supervisor find its error message (or name the death) and stop the rest
        sup.collect(1, "idle", kinds=(), timeout=self.timeout)
        raise WorkerDiedError("a stage exited while idle")  # not reached: collect raises first

    def close(self) -> None:
        self._closed = True
        if self._sup is not None:
            if self.trace is not None and not self._sup.closed:
                self._drain_stats()
            self._sup.shutdown()

    def _drain_stats(self, quiet_s: float = 0.2, limit_s: float = 2.0) -> None:
        """Read the busy-time reports (with their trace spans) that idle stages sent after the last result,
        until none came for `quiet_s` or `limit_s` passed; anything else read here is dropped (the
        pipeline is closing)."""
        deadline = time.monotonic() + limit_s
        results = self._supervisor().results
        while time.monotonic() < deadline:
            try:
                msg = results.get(timeout=quiet_s)
            except Exception:  # noqa: BLE001 - empty, or closed under us: nothing more to read
                return
            if msg[0] == "stats":
                self._on_stats(msg[1], msg[2])
