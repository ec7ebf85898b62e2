"""What-if scaling: balance and simulate a measured profile on pipelines of hypothetical GPUs.

Given one `Profile` (unit costs measured on one kind of GPU, e.g. by `eet-pipe plan`), predict for
P = 1, 2, 4, … identical GPUs — several to a node, nodes joined by a slower network — the optimal
partition, the slowest stage, the simulated makespan and bubble of the schedule, and the throughput
relative to one GPU. The same balancer and simulator as `plan="auto"`; only the devices and links
are given instead of discovered. Used to extrapolate a measured 2- or 4-GPU run to 8 or 16 GPUs.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from eet_pipe.partition.auto import DECODE_STEPS, _schedule, simulate_partition
from eet_pipe.partition.balance import balance
from eet_pipe.partition.costs import DeviceSpec, LinkMatrix, MemoryBudget
from eet_pipe.partition.profile import Profile

__all__ = ["Cluster", "ScalingPoint", "cluster_links", "predict_scaling", "PredictOptions", "run_predict"]

GB = 1e9


@dataclass
class Cluster:
    """Identical GPUs, `gpus_per_node` to a node; bandwidths one-way, in GB/s."""

    gpus_per_node: int = 8
    intra_gbps: float = 300.0
    """GPU-to-GPU bandwidth inside a node (NVLink)."""
    inter_gbps: float = 25.0
    """Between nodes (e.g. one InfiniBand NDR port per GPU pair ~ 25-50 GB/s)."""
    intra_latency_s: float = 10e-6
    inter_latency_s: float = 20e-6
    mem_bytes: int = 80 * 2**30
    """Memory each stage may use."""

    def __post_init__(self) -> None:
        checks = (("gpus_per_node", self.gpus_per_node >= 1), ("intra_gbps", self.intra_gbps > 0),
                  ("inter_gbps", self.inter_gbps > 0), ("intra_latency_s", self.intra_latency_s >= 0),
                  ("inter_latency_s", self.inter_latency_s >= 0), ("mem_bytes", self.mem_bytes > 0))
        for name, ok in checks:
            if not ok:
                raise ValueError(f"Cluster.{name}={getattr(self, name)!r} is invalid: must be positive "
                                 "(latencies may be 0; gpus_per_node an integer >= 1)")


def cluster_links(n: int, cluster: Cluster) -> LinkMatrix:
    """Links between GPUs 0..n-1 placed node by node (GPU i on node i // gpus_per_node)."""
    node = [i // cluster.gpus_per_node for i in range(n)]

    def pick(i: int, j: int, same: object, other: object, self_value: object) -> object:
        if i == j:
            return self_value
        return same if node[i] == node[j] else other

    return LinkMatrix(
        bandwidth=[[pick(i, j, cluster.intra_gbps * GB, cluster.inter_gbps * GB, math.inf) for j in range(n)]
                   for i in range(n)],
        latency=[[pick(i, j, cluster.intra_latency_s, cluster.inter_latency_s, 0.0) for j in range(n)]
                 for i in range(n)],
        kind=[[pick(i, j, "NVLINK", "NET", "SELF") for j in range(n)] for i in range(n)])


@dataclass
class ScalingPoint:
    """Prediction for one pipeline size."""

    stages: int
    nodes: int
    units_per_chunk: list[int]
    bottleneck_s: float
    """Slowest chunk's compute + outgoing transfer, per microbatch."""
    makespan_s: float
    """Simulated time of one batch (M microbatches; decode: per step)."""
    bubble: float
    speedup: float
    """Throughput relative to the same batch on one GPU (sum of unit times x M)."""
    efficiency: float
    """speedup / stages."""

    def to_dict(self) -> dict:
        return dict(vars(self))


def predict_scaling(profile: Profile, stages: list[int], schedule: str = "gpipe", microbatches: int = 32,
                    virtual: int = 1, cluster: Cluster | None = None,
                    budget: MemoryBudget | None = None) -> list[ScalingPoint]:
    """Balance and simulate `profile` on each pipeline size in `stages`.

    Raises ValueError for a size with more chunks than units, and InfeasibleError (a ValueError)
    naming the stage when the model does not fit the cluster's memory.
    """
    cluster = cluster or Cluster()
    if not stages or any(int(p) < 1 for p in stages):
        raise ValueError(f"stages={stages!r} is invalid: pipeline sizes must be integers >= 1")
    units = profile.units
    steps = 1
    one_gpu = sum(u.time_s for u in units)
    out = []
    for p in stages:
        v = virtual if schedule == "interleaved" and p > 1 else 1
        if p * v > len(units):
            raise ValueError(f"{p} stages x {v} chunks = {p * v} chunks but the profile has only {len(units)} "
                             "partition units")
        sched_name = "gpipe" if schedule == "interleaved" and v == 1 else schedule
        sched = _schedule(sched_name, p, microbatches, v)
        devices = [DeviceSpec(f"node{i // cluster.gpus_per_node}/gpu{i % cluster.gpus_per_node}",
                              mem_bytes=cluster.mem_bytes) for i in range(p)]
        links = cluster_links(p, cluster)
        part = balance(units, devices, links, p, v, budget or MemoryBudget(), order=list(range(p)))
        sim = simulate_partition(part, units, devices, links, sched)
        if schedule == "decode":
            steps = DECODE_STEPS
        work = one_gpu * (microbatches if schedule != "sequential" else 1) * steps
        speedup = work / sim.makespan if sim.makespan > 0 else float(p)
        out.append(ScalingPoint(stages=p, nodes=math.ceil(p / cluster.gpus_per_node),
                                units_per_chunk=[e - s for s, e in part.bounds], bottleneck_s=part.bottleneck,
                                makespan_s=sim.makespan / steps, bubble=sim.bubble, speedup=speedup,
                                efficiency=speedup / p))
    return out


@dataclass
class PredictOptions:
    """Options of `eet-pipe predict`: a measured profile on hypothetical pipelines of identical GPUs."""

    profile: str = ""
    """Profile JSON (as `eet-pipe plan` caches it under $EET_PIPE_CACHE/profiles) of the GPU to extrapolate."""
    stages: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    """Pipeline sizes to predict."""
    schedule: str = "gpipe"
    """gpipe, interleaved, decode or sequential."""
    microbatches: int = 32
    """Microbatches per batch (decode: groups in flight)."""
    virtual: int = 2
    """Chunks per device for the interleaved schedule."""
    gpus_per_node: int = 8
    """GPUs per node; pipelines longer than this cross the network."""
    intra_gbps: float = 300.0
    """One-way GPU-to-GPU bandwidth inside a node, GB/s."""
    inter_gbps: float = 25.0
    """One-way bandwidth between nodes, GB/s."""
    mem_gib: float = 80.0
    """Memory per GPU, GiB."""
    out: str | None = None
    """Write the predictions as JSON here."""

    def __post_init__(self) -> None:
        from eet_pipe.schedule import SCHEDULES

        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} is invalid; allowed: {', '.join(SCHEDULES)}")
        for name in ("microbatches", "virtual"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: must be an integer >= 1")

    def cluster(self) -> Cluster:
        return Cluster(gpus_per_node=self.gpus_per_node, intra_gbps=self.intra_gbps, inter_gbps=self.inter_gbps,
                       mem_bytes=int(self.mem_gib * 2**30))


def run_predict(opts: PredictOptions) -> str:
    """The predictions of `opts` as a table (and JSON at `opts.out`)."""
    if not opts.profile:
        raise ValueError("profile= is required: a profile JSON measured on the GPU to extrapolate "
                         "(eet-pipe plan writes them under $EET_PIPE_CACHE/profiles)")
    if not Path(opts.profile).is_file():
        raise FileNotFoundError(f"profile={opts.profile!r}: no such file")
    prof = Profile.from_json(opts.profile)
    points = predict_scaling(prof, opts.stages, opts.schedule, opts.microbatches, opts.virtual, opts.cluster())
    lines = [f"{prof.key}: {opts.schedule}, M={opts.microbatches}"
             + (f", v={opts.virtual}" if opts.schedule == "interleaved" else "")
             + f"; {opts.gpus_per_node} GPUs/node, {opts.intra_gbps:g} GB/s in a node, {opts.inter_gbps:g} GB/s between",
             f"{'P':>3} {'nodes':>5} {'slowest ms':>10} {'batch ms':>9} {'bubble':>7} {'speed-up':>8} {'efficiency':>10}"]
    for pt in points:
        lines.append(f"{pt.stages:>3} {pt.nodes:>5} {pt.bottleneck_s * 1e3:>10.3f} {pt.makespan_s * 1e3:>9.2f} "
                     f"{pt.bubble:>7.1%} {pt.speedup:>8.2f} {pt.efficiency:>10.1%}")
    if opts.out:
        Path(opts.out).write_text(json.dumps({"profile": prof.key, "options": vars(opts),
                                              "points": [p.to_dict() for p in points]}, indent=1))
        lines.append(f"wrote {opts.out}")
    return "\n".join(lines)
