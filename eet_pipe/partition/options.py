"""`PlanOptions`: the typed options of `eet-pipe plan` (key=value on the command line)."""

from __future__ import annotations

from dataclasses import dataclass, field

from eet_pipe.dtypes import parse_device, parse_dtype
from eet_pipe.models.config import ArchConfig
from eet_pipe.options import ModelOptions
from eet_pipe.partition.costs import MemoryBudget
from eet_pipe.partition.profile import WORKLOAD_KINDS, Workload
from eet_pipe.schedule import SCHEDULES

__all__ = ["PlanOptions"]


@dataclass
class PlanOptions(ModelOptions):
    """Options of `eet-pipe plan`: what to profile, on which devices, for which schedule
    (`schedule` may also be decode; the profiler always times random weights)."""

    microbatches: int = 1
    """Microbatches per batch (decode: sequence groups in flight)."""
    virtual: int = 2
    """Chunks per device for the interleaved schedule (other schedules use 1)."""
    workload: str = "prefill"
    """What one microbatch is: prefill (batch x seq tokens) or decode (batch x 1 token over a KV cache)."""
    batch: int = 1
    """Sequences per microbatch."""
    seq: int | None = None
    """Prefill tokens per sequence (default: min(512, the model's max positions))."""
    context: int | None = None
    """Decode: tokens already cached per sequence (default: min(512, max positions - 1))."""
    kv_tokens: int | None = None
    """KV-cache tokens each stage must hold (default: decode batch x microbatches x (context + 1); prefill 0)."""
    measure_links: bool = True
    """Measure the bandwidth of adjacent GPU links (CPU links keep their defaults)."""
    profile: list[str] = field(default_factory=list)
    """Profile JSON files to use instead of measuring (their keys must match this model/device/dtype/workload)."""
    cache_dir: str | None = None
    """Profile cache folder (default $EET_PIPE_CACHE/profiles or ~/.cache/eet_pipe/profiles)."""
    refresh: bool = False
    """Measure again even when a cached profile exists."""
    out: str | None = None
    """Write the plan JSON here (same as --out); use it with plan=<file> in generate or PipelineEngine."""

    def __post_init__(self) -> None:
        parse_dtype(self.dtype)
        checks = (("schedule", self.schedule in SCHEDULES, ", ".join(SCHEDULES)),
                  ("workload", self.workload in WORKLOAD_KINDS, ", ".join(WORKLOAD_KINDS)),
                  ("stages", self.stages >= 1, "an integer >= 1"),
                  ("microbatches", self.microbatches >= 1, "an integer >= 1"),
                  ("virtual", self.virtual >= 1 if self.schedule != "interleaved" else self.virtual >= 2,
                   "an integer >= 2 for interleaved, >= 1 otherwise"),
                  ("batch", self.batch >= 1, "an integer >= 1"),
                  ("seq", self.seq is None or self.seq >= 1, "an integer >= 1 (or none for the default)"),
                  ("context", self.context is None or self.context >= 0, "an integer >= 0 (or none)"),
                  ("kv_tokens", self.kv_tokens is None or self.kv_tokens >= 0, "an integer >= 0 (or none)"))
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid; allowed: {allowed}")
        if self.devices and self.stages not in (1, len(self.devices)):
            raise ValueError(f"stages={self.stages} but {len(self.devices)} devices were given "
                             f"({', '.join(self.devices)})")

    @property
    def chunks_per_device(self) -> int:
        """`virtual` for the interleaved schedule, else 1 (as PipelineEngine does)."""
        return self.virtual if self.schedule == "interleaved" else 1

    def device_list(self) -> list[str]:
        """`devices` validated, or `stages` GPUs when there are that many, else `stages` CPUs."""
        if not self.devices:
            import torch

            gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
            return [f"cuda:{i}" for i in range(self.stages)] if gpus >= self.stages else ["cpu"] * self.stages
        return [str(parse_device(d)) for d in self.devices]

    def make_workload(self, cfg: ArchConfig) -> Workload:
        """The Workload these options describe for a model with `cfg`."""
        seq = self.seq if self.seq is not None else min(512, cfg.max_positions)
        context = self.context if self.context is not None else min(512, cfg.max_positions - 1)
        workload = Workload(self.workload, self.batch, seq, context)
        workload.check(cfg)
        return workload

    def budget(self) -> MemoryBudget | None:
        """MemoryBudget with `kv_tokens` when given, else None (auto_plan's default for the workload)."""
        return None if self.kv_tokens is None else MemoryBudget(kv_tokens=self.kv_tokens)
