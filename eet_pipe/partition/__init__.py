"""Partitioning: unit costs, device topology, the exact balancer and the serialisable Plan.

Typical use (the profiler supplies the UnitCosts)::

    topo = discover(["cuda:0", "cuda:1", "cuda:2", "cuda:3"])
    part = balance(costs, topo.device_specs(), topo.links, num_stages=4)
    plan = Plan.from_partition(part, costs, topo.device_specs(), model="gpt2-xl", dtype="float16")
"""

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
    "StagePlan",
    "Topology",
    "UnitCost",
    "balance",
    "discover",
    "measure_bandwidth",
    "parse_topo_matrix",
]
