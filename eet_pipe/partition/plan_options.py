"""`PlanOptions`: the typed options of `eet-pipe plan` (key=value on the command line)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from eet_pipe.models.config import ArchConfig
from eet_pipe.models.dtypes import parse_device, parse_dtype
from eet_pipe.options.typed import ModelOptions
from eet_pipe.partition.costs import MemoryBudget
from eet_pipe.partition.profile import WORKLOAD_KINDS, Workload
from eet_pipe.schedule import SCHEDULES

__all__ = ["PlanOptions", "parse_bytes"]

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$")


def parse_bytes(text: str | int) -> int:
    """'80GB' -> 80 * 10**9, '80GiB' -> 80 * 2**30, '1.5TB', '512MiB' or a plain byte count."""
    match = _SIZE.match(str(text).lower())
    if not match or match.group(2) not in _UNITS:
        raise ValueError(f"memory size {text!r} is invalid; write a number with an optional unit: "
                         f"{', '.join(u for u in ('B', 'KB', 'MB', 'GB', 'TB', 'KiB', 'MiB', 'GiB', 'TiB'))} "
                         "(e.g. 80GB, 80GiB)")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


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
    """KV-cache tokens each stage must hold (default: max_slots x max_seq when max_slots is set, else decode
    batch x microbatches x (context + 1); prefill 0)."""
    max_slots: int = 0
    """Sequences whose KV cache every stage must hold, as the server's max_slots (0 = from the workload)."""
    max_seq: int = 0
    """KV-cache length per sequence with max_slots (0 = the model's max positions)."""
    costs: str = "measure"
    """Unit costs: measure (profile on the devices) or config (derived from the config; builds nothing)."""
    mem: list[str] = field(default_factory=list)
    """Declared memory per device instead of its free memory: one size for all or one each (80GB, 80GiB)."""
    cuda_graphs: bool = True
    """Reserve the CUDA-graph pools (a captured step's temporaries and output) in each stage's memory."""
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
                  ("kv_tokens", self.kv_tokens is None or self.kv_tokens >= 0, "an integer >= 0 (or none)"),
                  ("max_slots", self.max_slots >= 0, "an integer >= 0 (0 = from the workload)"),
                  ("max_seq", self.max_seq >= 0, "an integer >= 0 (0 = the model's max positions)"),
                  ("costs", self.costs in ("measure", "config"), "measure, config"),
                  ("mem", len(self.mem) in (0, 1, max(len(self.devices), self.stages)),
                   "one size for every device or one per device"))
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid; allowed: {allowed}")
        if self.kv_tokens is not None and self.max_slots:
            raise ValueError(f"kv_tokens={self.kv_tokens} and max_slots={self.max_slots} both size the KV cache; "
                             "give one of them")
        self.mem_caps()  # validates the sizes
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

    def mem_caps(self) -> list[int]:
        """`mem` in bytes (empty: use each device's free memory)."""
        return [parse_bytes(m) for m in self.mem]

    def budget(self, cfg: ArchConfig | None = None) -> MemoryBudget | None:
        """MemoryBudget of these options, or None for auto_plan's default for the workload (no KV-cache size
        given and CUDA graphs on). max_slots needs the model's `cfg` when max_seq is 0."""
        if self.max_slots:
            seq = self.max_seq or (cfg.max_positions if cfg is not None else 0)
            if not seq:
                raise ValueError("max_slots without max_seq needs the model's config (max positions)")
            if cfg is not None and seq > cfg.max_positions:
                raise ValueError(f"max_seq={seq} exceeds the model's max positions {cfg.max_positions}")
            return MemoryBudget(kv_tokens=self.max_slots * seq, graph_pools=int(self.cuda_graphs))
        if self.kv_tokens is not None:
            return MemoryBudget(kv_tokens=self.kv_tokens, graph_pools=int(self.cuda_graphs))
        if self.cuda_graphs:
            return None
        workload = self.make_workload(cfg) if cfg is not None else None
        decode = workload is not None and workload.kind == "decode"
        kv = workload.batch * self.microbatches * (workload.context + 1) if decode else 0
        return MemoryBudget(kv_tokens=kv, graph_pools=0)  # auto_plan's default KV cache, no graph pools
