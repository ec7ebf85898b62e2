"""`auto_plan`: profile the model on the devices, read the topology, balance, predict the schedule.

Steps (each one a function here, so the CLI can print what it used):

1. `measure_inputs`: one `Profile` per distinct hardware name (devices with the same name share it; the
   first device with that name is measured), or with ``costs="config"`` one profile derived from the
   config for all of them (`estimate.config_profile`: nothing is built, so a 70B model plans on any
   machine); relative speeds (total model time on the first device / total on this one),
   `topology.discover` (+ `measure_bandwidth` of the ring of adjacent pairs on CUDA), one `DeviceSpec`
   per device with its free memory, or the capacity declared for it (`mem_caps`).
2. `plan_from_inputs`: `balance` the units, simulate the schedule on the balanced chunk times and link
   transfer times, and return `Plan.from_partition` with predicted stage times, memory, bubble and makespan.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from eet_pipe.loading.presets import ModelSpec
from eet_pipe.models.dtypes import dtype_name, parse_dtype
from eet_pipe.partition.balance import Partition, balance
from eet_pipe.partition.costs import GIB, DeviceSpec, LinkMatrix, MemoryBudget, UnitCost
from eet_pipe.partition.plan import Plan
from eet_pipe.partition.profile import Profile, Workload, device_name, profile_key, profile_units
from eet_pipe.partition.topology import Topology, discover, measure_bandwidth
from eet_pipe.schedule import Schedule, SimResult, build, simulate

__all__ = ["COST_SOURCES", "DECODE_STEPS", "PlanInputs", "auto_plan", "default_workload", "describe_inputs",
           "measure_inputs", "plan_from_inputs", "simulate_partition"]

log = logging.getLogger(__name__)

DEFAULT_SEQ = 512
"""Default prefill workload: 1 x min(DEFAULT_SEQ, max positions) tokens per microbatch."""
COST_SOURCES = ("measure", "config")
"""Where unit costs come from: measured on the devices (`profile_units`) or derived from the config."""
DECODE_STEPS = 8
"""Decode steps simulated for schedule 'decode'; the predicted makespan is per step."""


@dataclass
class PlanInputs:
    """Everything the balancer is given, kept so callers can show it."""

    units: list[UnitCost]
    """Unit costs on the reference device (the first one)."""
    devices: list[DeviceSpec]
    """One per device, in the order given; speed relative to the first device."""
    topology: Topology
    """Devices and links (measured where `measured_links` says so)."""
    profiles: dict[str, Profile]
    """Hardware name -> its profile."""
    measured_links: list[tuple[int, int]] = field(default_factory=list)
    """Device index pairs whose bandwidth was measured."""
    declared: bool = False
    """True when the devices' memory was declared (`mem_caps`) rather than read from the devices."""

    @property
    def profile_key(self) -> str:
        """The profile keys, '; '-joined in device order."""
        return "; ".join(p.key for p in self.profiles.values())


def default_workload(spec: ModelSpec) -> Workload:
    """Prefill of 1 x 512 tokens per microbatch (or the model's max positions if smaller)."""
    return Workload("prefill", 1, min(DEFAULT_SEQ, spec.cfg.max_positions))


def _given_profiles(given: Sequence[Profile | str | Path], expected: dict[str, str]) -> dict[str, Profile]:
    """Hardware name -> given profile; ValueError naming both keys when a given profile matches no device."""
    out: dict[str, Profile] = {}
    by_key = {key: hw for hw, key in expected.items()}
    for item in given:
        prof = item if isinstance(item, Profile) else Profile.from_json(item)
        if prof.key not in by_key:
            source = "profile" if isinstance(item, Profile) else f"profile file {item}"
            if len(expected) == 1:
                prof.check_key(next(iter(expected.values())), source)
            raise ValueError(f"{source} has key {prof.key!r} but this plan needs one of {sorted(by_key)}")
        out[by_key[prof.key]] = prof
    return out


def _profiles(spec: ModelSpec, devices: list[str], dtype: torch.dtype, workload: Workload,
              given: Sequence[Profile | str | Path], cache_dir: str | Path | None, refresh: bool,
              costs: str = "measure") -> dict[str, Profile]:
    """One profile per distinct hardware name, measured on the first device with that name (or derived
    from the config, the same for every device)."""
    first: dict[str, str] = {}
    for d in devices:
        first.setdefault(device_name(d), d)
    if costs == "config":
        from eet_pipe.partition.estimate import config_profile

        derived = config_profile(spec, dtype, workload)
        return {hw: derived for hw in first}
    expected = {hw: profile_key(spec, hw, dtype, workload) for hw in first}
    out = _given_profiles(given, expected)
    for hw, dev in first.items():
        if hw not in out:
            out[hw] = profile_units(spec, dev, dtype, workload, cache_dir=cache_dir, refresh=refresh)
    return {hw: out[hw] for hw in first}


def _measure_links(topo: Topology) -> list[tuple[int, int]]:
    """Measure the ring of adjacent pairs (i -> i+1, last -> first) that involve a GPU, then give every
    unmeasured pair of a measured link kind the median of that kind (keeps equivalent pairs equal)."""
    n, links = len(topo.devices), topo.links
    pairs = sorted({(i, (i + 1) % n) for i in range(n) if n > 1})
    pairs = [(i, j) for i, j in pairs if links.kind[i][j] not in ("SELF", "NET")
             and "cuda" in (topo.devices[i].kind, topo.devices[j].kind)]
    if not pairs:
        return []
    measure_bandwidth(topo, pairs)
    for kind in {links.kind[i][j] for i, j in pairs}:
        bw = statistics.median(links.bandwidth[i][j] for i, j in pairs if links.kind[i][j] == kind)
        lat = statistics.median(links.latency[i][j] for i, j in pairs if links.kind[i][j] == kind)
        for i in range(n):
            for j in range(n):
                if links.kind[i][j] == kind and (i, j) not in pairs:
                    links.bandwidth[i][j], links.latency[i][j] = bw, lat
    torch.cuda.empty_cache()
    return pairs


def _device_specs(topo: Topology, profiles: dict[str, Profile], mem_caps: Sequence[int] = ()) -> list[DeviceSpec]:
    """DeviceSpec per device: speed = first device's model time / this device's; free memory (a GPU
    listed k times gives each of its stages 1/k of it; CPU shares are split by `discover` already), or
    the capacity declared in `mem_caps` (one value for every device, or one per device)."""
    names = [device_name(d.name) for d in topo.devices]
    caps = _caps(mem_caps, len(names))
    ref = profiles[names[0]].total_time_s
    specs = []
    for i, (info, hw) in enumerate(zip(topo.devices, names, strict=True)):
        share = 1 if info.kind == "cpu" else sum(1 for d in topo.devices if d.name == info.name)
        speed = ref / profiles[hw].total_time_s if profiles[hw].total_time_s > 0 else 1.0
        specs.append(DeviceSpec(info.name, speed, hw, mem_bytes=caps[i] if caps else info.free_mem // share))
    return specs


def _caps(mem_caps: Sequence[int], n: int) -> list[int]:
    if len(mem_caps) not in (0, 1, n):
        raise ValueError(f"mem_caps gives {len(mem_caps)} capacities for {n} devices; give one for all, or one each")
    if any(c <= 0 for c in mem_caps):
        raise ValueError(f"mem_caps={list(mem_caps)} is invalid: every capacity must be > 0 bytes")
    return list(mem_caps) * n if len(mem_caps) == 1 else list(mem_caps)


def measure_inputs(spec: ModelSpec, devices: list[str], dtype: torch.dtype | str, workload: Workload | None = None, *,
                   measure_links: bool = True, profiles: Sequence[Profile | str | Path] = (),
                   cache_dir: str | Path | None = None, refresh: bool = False, costs: str = "measure",
                   mem_caps: Sequence[int] = ()) -> PlanInputs:
    """Profiles, topology and device specs for balancing `spec` over `devices` (see module docstring).

    Args:
        spec: the model.
        devices: torch device names in candidate pipeline order.
        dtype: weights and activations.
        workload: one microbatch (default: `default_workload`).
        measure_links: measure the adjacent GPU pairs (CPU links keep their defaults).
        profiles: ready profiles (objects or JSON paths) to use instead of measuring; each must carry the
            key this model, dtype, workload and one of the devices' hardware names give (ValueError otherwise).
        cache_dir / refresh: passed to `profile_units`.
        costs: 'measure' (profile on the devices) or 'config' (derive every cost from the config; nothing
            is built, so any model plans on any machine).
        mem_caps: declared memory per device in bytes (one for all, or one each) instead of the free memory.
    """
    if costs not in COST_SOURCES:
        raise ValueError(f"costs={costs!r} is invalid; allowed: {', '.join(COST_SOURCES)}")
    if not devices:
        raise ValueError("auto_plan: no devices given; pass e.g. ['cuda:0', 'cuda:1'] or ['cpu', 'cpu']")
    dtype = parse_dtype(dtype)
    workload = workload or default_workload(spec)
    _caps(mem_caps, len(devices))  # fail before measuring anything
    profs = _profiles(spec, list(devices), dtype, workload, profiles, cache_dir, refresh, costs)
    topo = discover(list(devices))
    measured = _measure_links(topo) if measure_links else []
    units = profs[device_name(devices[0])].units
    return PlanInputs(units, _device_specs(topo, profs, mem_caps), topo, profs, measured, declared=bool(mem_caps))


def _schedule(schedule: str, stages: int, microbatches: int, virtual: int) -> Schedule:
    """The schedule to simulate (sequential runs one microbatch; decode runs DECODE_STEPS steps)."""
    if schedule == "sequential":
        return build(schedule, stages, 1, virtual)
    if schedule == "decode":
        return build(schedule, stages, microbatches, virtual, DECODE_STEPS)
    return build(schedule, stages, microbatches, virtual)


def simulate_partition(part: Partition, units: list[UnitCost], devices: list[DeviceSpec], links: LinkMatrix,
                       schedule: Schedule) -> SimResult:
    """Replay `schedule` with each chunk's compute time (units / device speed) and link transfer times.

    A message from stage a to stage b carries the largest activation any chunk of a sends onward.
    """
    p, k = part.num_stages, len(part.bounds)
    dev = [part.order[c % p] for c in range(k)]
    compute = [sum(u.time_s for u in units[s:e]) / devices[dev[c]].speed for c, (s, e) in enumerate(part.bounds)]
    sent = [0] * p
    for c, (_, e) in enumerate(part.bounds[:-1]):
        sent[c % p] = max(sent[c % p], units[e - 1].act_bytes)
    if schedule.name == "decode":  # sampled tokens travel back: int64 per sequence, negligible next to hidden
        sent[(k - 1) % p] = max(sent[(k - 1) % p], 8)

    def transfer(src: int, dst: int) -> float:
        return links.transfer_time(part.order[src], part.order[dst], sent[src])

    return simulate(schedule, compute, transfer)


def _default_budget(workload: Workload, microbatches: int) -> MemoryBudget:
    """KV cache for every decode sequence in flight (context + 1 tokens each); none for prefill."""
    if workload.kind == "decode":
        return MemoryBudget(kv_tokens=workload.batch * microbatches * (workload.context + 1))
    return MemoryBudget()


def plan_from_inputs(inputs: PlanInputs, spec: ModelSpec, dtype: torch.dtype | str, schedule: str, virtual: int,
                     microbatches: int, *, budget: MemoryBudget | None = None) -> Plan:
    """Balance `inputs` and build the Plan with predicted stage times, memory, bubble and makespan."""
    sched = _schedule(schedule, len(inputs.devices), microbatches, virtual)  # validates the arguments first
    workload = next(iter(inputs.profiles.values())).workload
    budget = budget or _default_budget(workload, microbatches)
    part = balance(inputs.units, inputs.devices, inputs.topology.links, len(inputs.devices), virtual, budget,
                   allow_duplicates=True)
    sim = simulate_partition(part, inputs.units, inputs.devices, inputs.topology.links, sched)
    steps = DECODE_STEPS if schedule == "decode" else 1
    plan = Plan.from_partition(part, inputs.units, inputs.devices, model=spec.name, dtype=dtype_name(parse_dtype(dtype)),
                               schedule=schedule, microbatches=microbatches, profile_key=inputs.profile_key,
                               predicted_bubble=sim.bubble, predicted_makespan_s=sim.makespan / steps)
    log.info("auto plan for %s on %s: %s, bottleneck %.3f ms, bubble %.1f%%", spec.name,
             ",".join(d.name for d in inputs.devices), " | ".join(",".join(s.units) for s in plan.stages),
             part.bottleneck * 1e3, sim.bubble * 100)
    return plan


def auto_plan(spec: ModelSpec, devices: list[str], dtype: torch.dtype | str, schedule: str, virtual: int,
              microbatches: int, *, workload: Workload | None = None, measure_links: bool = True,
              budget: MemoryBudget | None = None, profiles: Sequence[Profile | str | Path] = (),
              cache_dir: str | Path | None = None, refresh: bool = False, costs: str = "measure",
              mem_caps: Sequence[int] = ()) -> Plan:
    """Profile `spec` on `devices`, balance it and predict the schedule (what `plan="auto"` does).

    Args:
        spec: the model (`presets.resolve_model`).
        devices: torch device names along the pipeline; the plan may order them differently.
        dtype: weights and activations.
        schedule: 'sequential', 'gpipe', 'interleaved' or 'decode'.
        virtual: chunks per device (>= 2 for interleaved, 1 for sequential / gpipe).
        microbatches: microbatches per batch (decode: groups in flight).
        workload: one microbatch (default: prefill 1 x min(512, max positions) tokens).
        measure_links: measure adjacent GPU links (else the link kind's defaults are used).
        budget: memory besides parameters (default: no KV cache for prefill; every decode sequence's
            context for decode).
        profiles: ready profiles (or JSON paths) to use instead of measuring (keys must match).
        cache_dir / refresh: where profiles are cached, and whether to re-measure.
        costs / mem_caps: see `measure_inputs`.
    Returns:
        The Plan, with predicted per-stage time and memory, bottleneck, bubble and makespan.
    Raises:
        ValueError: bad arguments or a profile made for another model / dtype / device / workload.
        InfeasibleError: the model does not fit the devices' memory.
    """
    _schedule(schedule, len(devices), microbatches, virtual)  # fail before measuring anything
    inputs = measure_inputs(spec, devices, dtype, workload, measure_links=measure_links, profiles=profiles,
                            cache_dir=cache_dir, refresh=refresh, costs=costs, mem_caps=mem_caps)
    return plan_from_inputs(inputs, spec, dtype, schedule, virtual, microbatches, budget=budget)


# ---- text for `eet-pipe plan` ----

def _profile_lines(inputs: PlanInputs) -> list[str]:
    lines = []
    for hw, prof in inputs.profiles.items():
        by_name = {u.name: u for u in prof.units}
        layers = [u for u in prof.units if u.name.startswith("layers.")]
        how = "measured now" if prof.measured else ("from the config" if prof.device_name == "config"
                                                    else "from cache/file")
        lines.append(f"  {hw}: {prof.key} ({how})")
        lines.append(f"    embed {by_name['embed'].time_s * 1e3:.3f} ms, layer {layers[0].time_s * 1e3:.3f} ms "
                     f"x {len(layers)}, head {by_name['head'].time_s * 1e3:.3f} ms; model {prof.total_time_s * 1e3:.3f} "
                     f"ms per microbatch; activation {layers[0].act_bytes / 2**20:.2f} MiB")
    return lines


def _device_lines(inputs: PlanInputs) -> list[str]:
    rows = [("#", "device", "hardware", "speed", "declared GiB" if inputs.declared else "free GiB", "total GiB")]
    for i, (spec, info) in enumerate(zip(inputs.devices, inputs.topology.devices, strict=True)):
        rows.append((str(i), spec.name, spec.kind, f"{spec.speed:.2f}", f"{spec.mem_bytes / GIB:.2f}",
                     f"{info.total_mem / GIB:.2f}"))
    widths = [max(len(r[c]) for r in rows) for c in range(6)]
    return ["  " + "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def _positions(names: list[str], plan: Plan) -> list[int]:
    """Index into `names` of each plan stage's device (repeated names are taken in order)."""
    free, out = list(range(len(names))), []
    for dev in plan.devices:
        i = next(k for k in free if names[k] == dev)
        free.remove(i)
        out.append(i)
    return out


def _link_lines(inputs: PlanInputs, plan: Plan) -> list[str]:
    links = inputs.topology.links
    index = _positions([d.name for d in inputs.devices], plan)
    p = len(index)
    hops = [(s, s + 1) for s in range(p - 1)]
    if p > 1 and (plan.virtual > 1 or plan.schedule == "decode"):
        hops.append((p - 1, 0))  # interleaved chunks and decode feedback go around the ring
    lines = []
    for a, b in hops:
        i, j = index[a], index[b]
        src = "measured" if (i, j) in inputs.measured_links else "default"
        lines.append(f"  stage {a} {plan.devices[a]} -> stage {b} {plan.devices[b]}: {links.kind[i][j]}, "
                     f"{links.bandwidth[i][j] / 1e9:.1f} GB/s, {links.latency[i][j] * 1e6:.1f} us ({src})")
    kinds = [[str(i), *row] for i, row in enumerate(links.kind)]
    width = max(len(k) for row in kinds for k in row)
    head = " " * width + "".join(f"  {j:>{width}}" for j in range(len(kinds)))
    matrix = [head, *("".join(f"{k:>{width}}  " for k in row).rstrip() for row in kinds)]
    return [*(lines or ["  (one stage: no links)"]), "link kinds (device # as above):", *("  " + m for m in matrix)]


def describe_inputs(inputs: PlanInputs, plan: Plan) -> str:
    """What a plan was made from: profiles, devices (speed, memory) and the links along its pipeline."""
    workload = next(iter(inputs.profiles.values())).workload
    return "\n".join([f"profile (one microbatch: {workload.shape}):", *_profile_lines(inputs),
                      "devices:", *_device_lines(inputs), "memory per stage (bytes in GiB):", *plan.memory_lines(),
                      "links along the pipeline (one way):", *_link_lines(inputs, plan)])
