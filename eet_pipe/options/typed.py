"""Option dataclasses shared by the command-line entry points (generate, plan, serve, benchmarks)."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field, fields, make_dataclass
from typing import Any, ClassVar

from eet_pipe.generation.sequences import SamplingParams
from eet_pipe.loading.presets import SEED_RENAMED
from eet_pipe.options.parse import field_docs

__all__ = ["ModelOptions", "EngineOptions", "SamplingOptions", "GenerateOptions", "SAMPLING_NAMES"]


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
    weights_seed: int = 0
    """Seed of random weights (weights=random)."""
    max_seq: int = 0
    """KV-cache length per sequence (0 = the model's max positions)."""
    trace: str | None = None
    """Write a Chrome/Perfetto trace JSON to this path: of each call (and a PNG timeline beside it); from
    the server, of every step on every stage and the scheduler's decisions while it runs."""
    timeout: float = 60.0
    """Seconds to wait for a worker before declaring it dead."""
    allow_duplicate_devices: bool = False
    """Allow a GPU to appear twice in `devices`: several stages on one GPU, joined through host memory."""
    cuda_graphs: bool = True
    """Replay GPU stages' forwards and decode steps from CUDA graphs."""

    RENAMED: ClassVar[dict[str, tuple[str, str]]] = {"seed": ("weights_seed", SEED_RENAMED)}
    """Old key -> (new key, warning), accepted for one release by `build_config`."""


SAMPLING_NAMES = {"seed": "sample_seed"}
"""`SamplingParams` fields spelt otherwise on the command line (there, `seed=` is still the weights' seed)."""


def _sampling_fields() -> list[tuple[str, Any, Any]]:
    """`SamplingParams`' fields with their defaults and docstrings, under their command-line names."""
    hints, docs = typing.get_type_hints(SamplingParams), field_docs(SamplingParams)
    return [(SAMPLING_NAMES.get(f.name, f.name), hints[f.name],
             field(default=f.default, default_factory=f.default_factory, metadata={"doc": docs.get(f.name, "")}))
            for f in fields(SamplingParams)]


SamplingOptions = make_dataclass("SamplingOptions", _sampling_fields())
SamplingOptions.__doc__ = "The fields of `SamplingParams`, declared there once, as command-line options."
SamplingOptions.__module__ = __name__


@dataclass
class GenerateOptions(SamplingOptions, EngineOptions):
    """Options of `eet-pipe generate`."""

    prompt: list[str] = field(default_factory=lambda: ["Hello"])
    """Prompt text; several prompts separated by commas form one batch."""

    def sampling(self) -> SamplingParams:
        """The `SamplingParams` these options name (ValueError naming a bad field)."""
        return SamplingParams(**{f.name: getattr(self, SAMPLING_NAMES.get(f.name, f.name)) for f in fields(SamplingParams)})
