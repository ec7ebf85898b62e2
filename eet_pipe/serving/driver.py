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
from eet_pipe.runtime.step import SeqInit, ServeInit, StepCommand, StepPart
from eet_pipe.runtime.supervisor import Supervisor, WorkerDiedError, WorkerError, free_port
from eet_pipe.runtime.worker import WorkerArgs

__all__ = ["PipelineSetup", "StepDriver", "ServingEngine", "resolve_setup", "stage_devices"]

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
                         groups=max(1, min(groups, opts.max_slots)), cuda_graphs=opts.cuda_graphs)


class StepDriver:
    """What the scheduler needs of a pipeline; subclasses move the commands (spawned workers, torchrun)."""

    setup: PipelineSetup

    def __init__(self) -> None:
        self.stage_busy: dict[int, float] = {}
        """Busy fraction of each stage over its last report interval (when the stage reports it)."""

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

    def init_serving(self) -> None:
        """Allocate every stage's KV caches, then run one prefill + decode step as a warm-up."""
        s = self.setup
        self.send(ServeInit(max_slots=s.max_slots, max_len=s.max_len, cuda_graphs=s.cuda_graphs))
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
            self._sup.shutdown()
