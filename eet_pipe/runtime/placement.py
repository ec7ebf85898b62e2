"""Which units run where: turning the `plan=` argument into a `Plan` and per-chunk unit lists."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from eet_pipe.partition.plan import Plan
from eet_pipe.presets import ModelSpec

__all__ = ["FORWARD_SCHEDULES", "make_plan"]

log = logging.getLogger("eet_pipe.runtime")

FORWARD_SCHEDULES = ("sequential", "gpipe", "interleaved")


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


