"""Partitioning: unit costs, device topology, the exact balancer and the serialisable Plan.

Typical use::

    plan = auto_plan(resolve_model("gpt2-xl", "random"), ["cuda:0", "cuda:1"], "fp16", "gpipe", 1, 8)

or, step by step (the profiler supplies the UnitCosts)::

    prof = profile_units(spec, "cuda:0", "fp16", Workload("prefill", 1, 512))
    topo = discover(["cuda:0", "cuda:1", "cuda:2", "cuda:3"])
    part = balance(prof.units, topo.device_specs(), topo.links, num_stages=4)
    plan = Plan.from_partition(part, prof.units, topo.device_specs(), model="gpt2-xl", dtype="float16")

The profiler and `auto_plan` (which build models with torch) are imported on first use, so importing
this package stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from .balance import InfeasibleError, Partition, balance
from .costs import DeviceSpec, LinkMatrix, MemoryBudget, MemoryNeed, UnitCost
from .plan import Plan, StagePlan
from .topology import DeviceInfo, Topology, discover, measure_bandwidth, parse_topo_matrix

__all__ = [
    "DeviceInfo",
    "DeviceSpec",
    "InfeasibleError",
    "LinkMatrix",
    "MemoryBudget",
    "MemoryNeed",
    "Partition",
    "Plan",
    "PlanInputs",
    "PlanOptions",
    "Profile",
    "StagePlan",
    "Topology",
    "UnitCost",
    "Workload",
    "auto_plan",
    "balance",
    "discover",
    "measure_bandwidth",
    "measure_inputs",
    "parse_topo_matrix",
    "plan_from_inputs",
    "profile_units",
]

_LAZY = {"Profile": "profile", "Workload": "profile", "profile_units": "profile", "PlanInputs": "auto",
         "auto_plan": "auto", "measure_inputs": "auto", "plan_from_inputs": "auto", "PlanOptions": "options"}


def __getattr__(name: str) -> Any:
    """Import the profiler / auto-planner names on first access."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value
