"""`PipelineEngine`: a model cut into stages, one worker process per device."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from eet_pipe.generation.lm import LanguageModel, check_forward_inputs, prepare_generation
from eet_pipe.generation.sequences import GenerationResult
from eet_pipe.loading.presets import ModelSpec, legacy_weights_seed, resolve_model
from eet_pipe.loading.units import prepare, spec_from_model, tokenizer_for
from eet_pipe.models.dtypes import dtype_name, parse_dtype
from eet_pipe.models.model import CanonicalModel
from eet_pipe.partition.plan import Plan
from eet_pipe.runtime.commands import OUTPUTS, ForwardCommand, GenerateCommand
from eet_pipe.runtime.placement import FORWARD_SCHEDULES, make_plan, pipeline_devices
from eet_pipe.runtime.supervisor import Supervisor, free_port
from eet_pipe.runtime.torchrun import DistTransport, under_torchrun
from eet_pipe.runtime.trace import plot_timeline, write_chrome_trace
from eet_pipe.runtime.worker import WorkerArgs
from eet_pipe.schedule import check_args

__all__ = ["PipelineEngine"]

log = logging.getLogger("eet_pipe.runtime")


def _spec(model: str | CanonicalModel | LanguageModel | ModelSpec, weights: str | None, weights_seed: int) -> ModelSpec:
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, LanguageModel):
        spec = spec_from_model(model.model)
        if model.spec is not None:
            spec.tokenizer, spec.path = model.spec.tokenizer, model.spec.path
        return spec
    if isinstance(model, CanonicalModel):
        return spec_from_model(model)
    if isinstance(model, (str, Path)):
        return resolve_model(str(model), weights, weights_seed)
    raise TypeError(f"model must be a path, preset name, LanguageModel or CanonicalModel, not {type(model).__name__}")


class PipelineEngine:
    """Run a model as a pipeline over `devices`, one worker process per device.

    Args:
        model: checkpoint directory, HF-cache name or preset; or an already loaded model.
        devices: e.g. ["cuda:0", "cuda:1"] or ["cpu", "cpu"] (gloo); default: `stages` GPUs, else CPUs.
        schedule: forward schedule: sequential, gpipe or interleaved (generation always uses decode).
        microbatches: microbatches per forward / sequence groups in flight (None = automatic).
        plan: "auto" (profile and balance), "even", a plan.json path or a `Plan`.
        dtype: fp32 / fp16 / bf16 (default fp32).
        virtual: chunks per device for the interleaved schedule.
        weights, weights_seed: what to load for a named model (see `resolve_model`); `seed=` is the old
            spelling of `weights_seed`, accepted with a FutureWarning for one release.
        timeout: seconds without progress from any worker before the call fails.
        trace: path of a Chrome trace JSON written after each call (a PNG timeline beside it).
        cuda_graphs: replay GPU stages' chunk forwards (per microbatch shape) and decode steps (per
            group size) from CUDA graphs, removing per-kernel launch cost; no effect on CPU stages.
        cpu_threads: intra-op threads of each CPU stage (default: the caller's count, so results are
            bit-identical to the caller's; fewer threads avoid oversubscribing the cores).
    """

    def __init__(self, model: Any, devices: Sequence[str] | None = None, schedule: str = "gpipe",
                 microbatches: int | None = None, plan: str | Plan | None = "auto", dtype: str | torch.dtype | None = None,
                 virtual: int = 2, weights: str | None = None, weights_seed: int = 0, timeout: float = 60.0,
                 trace: str | None = None, stages: int | None = None, allow_duplicate_devices: bool = False,
                 startup_timeout: float = 900.0, cpu_threads: int | None = None, cuda_graphs: bool = True,
                 seed: int | None = None) -> None:
        if schedule not in FORWARD_SCHEDULES:
            raise ValueError(f"schedule={schedule!r} is not a forward schedule; allowed: {', '.join(FORWARD_SCHEDULES)} "
                             "(generate() always uses the decode schedule)")
        if microbatches is not None and microbatches < 1:
            raise ValueError(f"microbatches={microbatches} is invalid: must be >= 1 (or None for automatic)")
        if timeout <= 0:
            raise ValueError(f"timeout={timeout} is invalid: must be > 0 seconds")
        self.spec = _spec(model, weights, legacy_weights_seed(weights_seed, seed))
        self.cfg = self.spec.cfg
        self.devices = pipeline_devices(devices, stages, allow_duplicate_devices)
        self.schedule, self.microbatches = schedule, microbatches
        self.virtual = virtual if schedule == "interleaved" else 1
        # every schedule / microbatches / virtual combination is checked here, before any process starts
        check_args(schedule, len(self.devices), microbatches or 1, self.virtual)
        self.dtype = parse_dtype(dtype)
        self.trace_path = trace
        self.cpu_threads = cpu_threads
        self.cuda_graphs = bool(cuda_graphs)
        self.plan = make_plan(plan, self.spec, self.devices, self.dtype, self.schedule, self.virtual,
                              microbatches or 1)
        self.tokenizer = tokenizer_for(self.spec)
        prepare(self.spec)
        self.last_trace: list[dict] = []
        self._sup: Supervisor | None = None
        self._dist: DistTransport | None = None
        self._start(timeout, startup_timeout)

    @classmethod
    def from_options(cls, opts: Any) -> PipelineEngine:
        """Build from `eet_pipe.options.typed.EngineOptions`."""
        # as for the server and `eet-pipe plan`: with devices given, the default stages=1 means "one per device"
        stages = None if opts.devices and opts.stages == 1 else opts.stages
        return cls(opts.model, devices=opts.devices or None, stages=stages, schedule=opts.schedule,
                   microbatches=opts.microbatches or None, plan=opts.plan, dtype=opts.dtype, virtual=opts.virtual,
                   weights=opts.weights, weights_seed=opts.weights_seed, timeout=opts.timeout, trace=opts.trace,
                   allow_duplicate_devices=opts.allow_duplicate_devices, cuda_graphs=opts.cuda_graphs)

    @property
    def num_stages(self) -> int:
        return len(self.devices)

    @property
    def is_driver(self) -> bool:
        """False on torchrun ranks > 0, which only serve commands (`serve_forever`)."""
        return self._dist is None or self._dist.is_driver

    def serve_forever(self) -> None:
        """Torchrun ranks > 0: execute the driver's commands until it shuts the pipeline down."""
        if self._dist is None or self._dist.is_driver:
            raise RuntimeError("serve_forever() is for torchrun ranks > 0 only")
        self._dist.serve_forever()

    def _start(self, timeout: float, startup_timeout: float) -> None:
        units = self.plan.chunks()
        self.devices = self.plan.devices  # the balancer may reorder devices along the pipeline
        self._dist = None
        if under_torchrun():
            self._dist = DistTransport(self.devices, self.spec, units, self.dtype)
            return
        init = f"tcp://127.0.0.1:{free_port()}"
        args = [WorkerArgs(rank=r, world=self.num_stages, device=d, init_method=init, spec=self.spec,
                           chunk_units=units, dtype=self.dtype, parent_pid=os.getpid(),
                           threads=self._threads(d), devices=tuple(self.devices))
                for r, d in enumerate(self.devices)]
        self._sup = Supervisor(args, timeout)
        self._sup.collect(self.num_stages, "loading the model", kinds=("ready",), timeout=startup_timeout)
        log.info("pipeline ready: %s", self.summary())

    def _threads(self, device: str) -> int:
        """CPU stages use the caller's thread count (bit-identical results; set `cpu_threads` to trade that
        for speed); GPU stages need few CPU threads."""
        if device == "cpu":
            return self.cpu_threads or torch.get_num_threads()
        return max(1, min(4, (os.cpu_count() or 1) // self.num_stages))

    def _run(self, cmd: ForwardCommand | GenerateCommand, what: str) -> Any:
        if self._dist is not None:
            out, events = self._dist.run(cmd)
            if cmd.trace:
                self._write_trace(events, what)
            return out
        if self._sup is None:
            raise RuntimeError("engine is closed: create a new PipelineEngine")
        self._sup.broadcast(cmd)
        count = self.num_stages if cmd.trace else 1
        msgs = self._sup.collect(count, what)
        if cmd.trace:
            self._write_trace([e for m in msgs for e in m[3]], what)
        payloads = [m[2] for m in msgs if m[2] is not None]
        return payloads[0] if payloads else None

    def _write_trace(self, events: list[dict], what: str) -> None:
        self.last_trace = events
        path = Path(self.trace_path)
        meta = {"schedule": self.schedule, "devices": self.devices, "what": what}
        self.last_bubble = write_chrome_trace(events, path, self.num_stages, meta)
        plot_timeline(events, path.with_suffix(".png"), self.num_stages, title=what)

    def _microbatches(self, batch: int, requested: int | None) -> int:
        """Microbatches of one forward: requested, else the engine's, else up to 4 per stage (1 for the
        sequential schedule, which takes the batch whole). Checked here, before the command is sent."""
        automatic = 1 if self.schedule == "sequential" else min(batch, 4 * self.num_stages)
        count = min(requested or self.microbatches or automatic, batch)
        check_args(self.schedule, self.num_stages, count, self.virtual)
        return count

    def _forward_command(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                         token_type_ids: torch.Tensor | None, microbatches: int | None, **fields: Any) -> ForwardCommand:
        """A validated forward command for this engine's schedule (`fields`: output, trace, capture)."""
        mask = check_forward_inputs(self.cfg, input_ids, attention_mask)
        return ForwardCommand(ids=input_ids.cpu().long(), mask=mask, schedule=self.schedule,
                              microbatches=self._microbatches(input_ids.shape[0], microbatches), virtual=self.virtual,
                              token_types=None if token_type_ids is None else token_type_ids.cpu(),
                              cuda_graphs=self.cuda_graphs, **fields)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, output: str = "all",
                microbatches: int | None = None) -> torch.Tensor | None:
        """Logits [B, T, V] (decoders) or hidden states [B, T, H] (encoders); output='last' gives [B, V]."""
        if output not in OUTPUTS:
            raise ValueError(f"output={output!r} is invalid; allowed: {', '.join(OUTPUTS)}")
        cmd = self._forward_command(input_ids, attention_mask, token_type_ids, microbatches, output=output,
                                    trace=self.trace_path is not None)
        return self._run(cmd, f"forward ({self.schedule}, {cmd.microbatches} microbatches)")

    __call__ = forward

    def forward_capture(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                        points: Sequence[str] = (), token_type_ids: torch.Tensor | None = None,
                        microbatches: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`forward` that also records canonical capture keys on every stage (see `eet_pipe.compare.points`).

        Args:
            points: capture keys: a canonical module name (its output) or ``name:in`` (its first input).
        Returns:
            (output as `forward` gives it, {key: tensor [B, ...] on CPU}); microbatches are concatenated.
        """
        cmd = self._forward_command(input_ids, attention_mask, token_type_ids, microbatches, capture=list(points))
        return self._run(cmd, f"forward with capture ({self.schedule}, {cmd.microbatches} microbatches)")

    def generate(self, prompts: Any, microbatches: int | None = None, **sampling: Any) -> list[GenerationResult]:
        """Generate for each prompt with the decode schedule; keyword arguments are `SamplingParams` fields."""
        ids, per_seq = prepare_generation(self.cfg, self.tokenizer, prompts, sampling)
        groups = min(len(ids), microbatches or self.microbatches or self.num_stages)
        cmd = GenerateCommand(prompts=ids, params=per_seq, groups=groups, eos_ids=self.cfg.eos_ids, pad_id=self.cfg.pad_id,
                              trace=self.trace_path is not None, cuda_graphs=self.cuda_graphs)
        return self._run(cmd, f"generate ({groups} groups in flight)")

    def summary(self) -> str:
        """One line per stage: device and units."""
        lines = [f"pipeline: {self.spec.name} {dtype_name(self.dtype)}, {self.num_stages} stage(s), "
                 f"schedule {self.schedule}"]
        for s in self.plan.stages:
            chunks = ", ".join(f"{a}..{b}" if a != b else a for a, b in s.chunks)
            lines.append(f"  stage on {s.device}: {chunks}")
        return "\n".join(lines)

    def close(self) -> None:
        """Stop every worker (idempotent)."""
        if self._sup is not None:
            self._sup.shutdown()
            self._sup = None
        if getattr(self, "_dist", None) is not None and self._dist.is_driver:
            self._dist.shutdown()

    def __enter__(self) -> PipelineEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
