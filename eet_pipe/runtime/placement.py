"""Which units run where: turning the `plan=` argument into a `Plan` and per-chunk unit lists."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from eet_pipe.loading.presets import ModelSpec
from eet_pipe.models.dtypes import parse_device
from eet_pipe.partition.plan import Plan

__all__ = ["FORWARD_SCHEDULES", "make_plan", "pipeline_devices"]

log = logging.getLogger("eet_pipe.runtime")

FORWARD_SCHEDULES = ("sequential", "gpipe", "interleaved")


def pipeline_devices(devices: Sequence[str] | None, stages: int | None, allow_duplicates: bool) -> list[str]:
    """The devices along the pipeline: as given, else the first `stages` GPUs, else `stages` CPU processes.

    Raises ValueError when `stages` disagrees with the devices, a device is not visible, or a GPU is
    listed twice without `allow_duplicates` (several CPU stages are always fine)."""
    if not devices:
        count = stages or 1
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        devices = [f"cuda:{i}" for i in range(count)] if gpus >= count else ["cpu"] * count
    elif stages is not None and stages != len(devices):
        raise ValueError(f"stages={stages} but {len(devices)} devices were given ({', '.join(devices)})")
    parsed = [str(parse_device(d)) for d in devices]
    dupes = sorted({d for d in parsed if parsed.count(d) > 1 and d != "cpu"})
    if dupes and not allow_duplicates:
        raise ValueError(f"device(s) {', '.join(dupes)} listed more than once; pass allow_duplicate_devices=True "
                         "to put several stages on one GPU")
    return parsed


def make_plan(plan: str | Plan | None, spec: ModelSpec, devices: list[str], dtype: torch.dtype, schedule: str,
              virtual: int, microbatches: int) -> Plan:
    """Resolve `plan` ('auto', 'even', a JSON path or a Plan) and check it against the model and devices."""
    units = spec.cfg.unit_names()
    chunks = len(devices) * virtual
    if chunks > len(units):
        raise ValueError(f"{len(devices)} stages x {virtual} chunks = {chunks} chunks but the model has only "
                         f"{len(units)} partition units (embed, {spec.cfg.num_layers} layers, head)")
    if isinstance(plan, Plan):
        result = plan
    elif plan in (None, "even"):
        result = Plan.even(units, devices, virtual=virtual)
    elif plan == "auto":
        from eet_pipe.partition.auto import auto_plan

        result = auto_plan(spec, devices, dtype, schedule, virtual, microbatches)
    else:
        path = Path(plan)
        if not path.exists():
            raise ValueError(f"plan={plan!r} is neither 'auto', 'even' nor an existing plan JSON file")
        result = Plan.from_json(path)
    result.check(units, devices)
    if result.virtual != virtual:
        raise ValueError(f"the plan has {result.virtual} chunk(s) per device but the schedule needs {virtual}")
    return result


