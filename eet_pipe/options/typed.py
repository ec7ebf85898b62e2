"""Option dataclasses shared by the command-line entry points (generate, plan, serve, benchmarks)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ModelOptions", "EngineOptions", "GenerateOptions"]


@dataclass
class ModelOptions:
    """Which model, on which devices, in which precision."""

    model: str = "tiny"
    """Checkpoint directory, name in the local HF cache, or preset (see `eet-pipe models`)."""
    weights: str | None = None
    """'random' builds seeded random weights for a preset; default: the model's own weights."""
    dtype: str = "fp32"
    """Weights and activations: fp32, fp16 or bf16."""
    devices: list[str] = field(default_factory=list)
    """Devices along the pipeline (cuda:0,cuda:1 or cpu,cpu); default: the first `stages` GPUs, else CPU."""
    stages: int = 1
    """Pipeline stages (one worker process each); with `devices` given, 1 means one stage per device."""
    schedule: str = "gpipe"
    """Schedule for forward passes: sequential, gpipe or interleaved (generation always uses decode)."""


@dataclass
class EngineOptions(ModelOptions):
    """What to load and how to run it."""

    microbatches: int = 0
    """Microbatches per forward / sequence groups in flight for decode (0 = automatic)."""
    virtual: int = 2
    """Chunks per device for the interleaved schedule."""
    plan: str = "auto"
    """'auto' (profile and balance), 'even' (split layers evenly) or a plan.json path."""
    seed: int = 0
    """Seed for random weights."""
    max_seq: int = 0
    """KV-cache length per sequence (0 = the model's max positions)."""
    trace: str | None = None
    """Write a Chrome/Perfetto trace JSON (and a PNG timeline beside it) to this path."""
    timeout: float = 60.0
    """Seconds to wait for a worker before declaring it dead."""
    allow_duplicate_devices: bool = False
    """Allow a GPU to appear twice in `devices`: several stages on one GPU, joined through host memory."""
    cuda_graphs: bool = True
    """Replay GPU stages' forwards and decode steps from CUDA graphs."""


@dataclass
class GenerateOptions(EngineOptions):
    """Options of `eet-pipe generate`."""

    prompt: list[str] = field(default_factory=lambda: ["Hello"])
    """Prompt text; several prompts separated by commas form one batch."""
    max_new_tokens: int = 32
    """Tokens to generate per prompt."""
    temperature: float = 0.0
    """0 = greedy; > 0 samples."""
    top_k: int = 0
    """Sample among the k most likely tokens (0 = all)."""
    top_p: float = 1.0
    """Nucleus sampling threshold in (0, 1]."""
    sample_seed: int | None = None
    """Seed of the sampler (sampling only)."""
    stop: list[str] = field(default_factory=list)
    """Stop strings (comma separated)."""
