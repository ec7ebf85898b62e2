"""What the partitioner produces: `Partition` (the balancer's result, by unit and device index)
and `Plan` (which units run on which device, by name; JSON; checkable against a model).

A plan has P stages (one per device) and `virtual` = v chunks per stage. Global chunk c lives on
stage c % P as that stage's chunk c // P, so walking c = 0 .. P·v-1 visits the units in model order.
Stage s runs on `stages[s].device`; a plan from `from_partition` may order devices differently from
the list it was given (the balancer searches the order), so place stage s on that device.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .costs import GIB, DeviceSpec, UnitCost

__all__ = ["PLAN_FORMAT", "Partition", "Plan", "StagePlan", "unit_range"]

PLAN_FORMAT = 1
"""Version written into plan JSON files."""
_LAYER = re.compile(r"^layers\.(\d+)$")


def unit_range(units: list[str]) -> str:
    """A chunk's canonical unit range as traces and tables show it, e.g. 'embed..layers.5' or 'head'."""
    return units[0] if len(units) == 1 else f"{units[0]}..{units[-1]}"


def _name(x: str | DeviceSpec | UnitCost) -> str:
    return x if isinstance(x, str) else x.name


@dataclass
class Partition:
    """Result of `balance`. Chunk c runs on pipeline position c % P, i.e. device order[c % P]."""

    order: list[int]
    """Device indices (into the `devices` argument) along the pipeline."""
    bounds: list[tuple[int, int]]
    """Per chunk: unit index range [start, end)."""
    chunk_times: list[float]
    """Per chunk: compute / speed + outgoing transfer, seconds per microbatch."""
    stage_times: list[float]
    """Per pipeline position: sum of its chunk times."""
    stage_memory: list[int]
    """Per pipeline position: bytes needed (see costs.py for the memory model)."""
    bottleneck: float
    """max(stage_times)."""
    virtual: int = 1
    """Chunks per device."""
    exact: bool = True
    """False when the search budget ran out or only candidate device orders were tried."""
    stage_memory_parts: list[dict[str, int]] = field(default_factory=list)
    """Per pipeline position: `MemoryNeed.to_dict()` (params, kv, act, temp, graphs, workspace, total)."""

    @property
    def num_stages(self) -> int:
        """Number of pipeline positions (devices)."""
        return len(self.order)

    def chunks_of(self, position: int) -> list[int]:
        """Chunk indices run by pipeline position `position`, in execution order."""
        return list(range(position, len(self.bounds), self.num_stages))


@dataclass
class StagePlan:
    """One stage: its device and its chunks."""

    device: str
    """Device name, e.g. 'cuda:0'."""
    chunks: list[tuple[str, str]]
    """(first, last) unit name of each chunk on this stage, in execution order."""
    units: list[str]
    """All unit names of this stage, chunk after chunk."""
    predicted_time_s: float | None = None
    """Predicted busy time per microbatch (sum over its chunks), None without a profile."""
    predicted_mem_bytes: int | None = None
    """Predicted memory need, None without a profile."""
    predicted_mem: dict[str, int] | None = None
    """The need by component (params, kv, act, temp, graphs, workspace, total), bytes."""
    mem_cap_bytes: int | None = None
    """Memory the device offered this stage when planned (free or declared), bytes."""

    def __post_init__(self) -> None:
        self.chunks = [tuple(c) for c in self.chunks]  # JSON gives lists
        self.chunk_units()  # validates that `units` matches `chunks`

    def chunk_units(self) -> list[list[str]]:
        """`units` cut into this stage's chunks."""
        out, pos = [], 0
        for first, last in self.chunks:
            if pos >= len(self.units) or self.units[pos] != first or last not in self.units[pos:]:
                raise ValueError(f"stage on {self.device!r}: units {self.units} do not match chunks {self.chunks}")
            end = self.units.index(last, pos) + 1
            out.append(self.units[pos:end])
            pos = end
        if pos != len(self.units):
            raise ValueError(f"stage on {self.device!r}: units {self.units[pos:]} belong to no chunk of {self.chunks}")
        return out


@dataclass
class Plan:
    """Placement of a model's units on pipeline stages (see module docstring)."""

    model: str
    """Model name the plan was made for ('' = unknown)."""
    dtype: str
    """Weight dtype the plan was made for, e.g. 'float16' ('' = unknown)."""
    schedule: str
    """Schedule name, e.g. 'gpipe', 'interleaved', 'decode'."""
    microbatches: int
    """Microbatches per batch the plan was made for."""
    virtual: int
    """Chunks per stage."""
    stages: list[StagePlan]
    """One entry per device, in pipeline order."""
    predicted_bottleneck_s: float | None = None
    """Largest predicted stage time per microbatch."""
    predicted_bubble: float | None = None
    """Predicted idle fraction of the schedule (from the simulator)."""
    predicted_makespan_s: float | None = None
    """Predicted time of one batch (from the simulator)."""
    profile_key: str | None = None
    """Which profile the predictions come from (model, device, dtype, shape)."""

    def __post_init__(self) -> None:
        if self.virtual < 1 or self.microbatches < 1:
            raise ValueError(f"Plan: virtual={self.virtual}, microbatches={self.microbatches}; both must be >= 1")
        if not self.stages:
            raise ValueError("Plan: no stages; a plan needs at least one stage")
        for s, sp in enumerate(self.stages):
            if len(sp.chunks) != self.virtual:
                raise ValueError(f"Plan: stage {s} has {len(sp.chunks)} chunks but virtual={self.virtual}")

    @property
    def devices(self) -> list[str]:
        """Device of every stage, in pipeline order."""
        return [s.device for s in self.stages]

    def chunks(self) -> list[list[str]]:
        """Units of every global chunk c (on stage c % P), i.e. in model order."""
        per_stage = [s.chunk_units() for s in self.stages]
        p = len(self.stages)
        return [per_stage[c % p][c // p] for c in range(p * self.virtual)]

    def chunk_labels(self) -> list[str]:
        """`unit_range` of every global chunk, in model order (the labels of trace spans)."""
        return [unit_range(units) for units in self.chunks()]

    # ---- construction ----

    @classmethod
    def even(cls, unit_names: list[str], devices: Sequence[str | DeviceSpec], virtual: int = 1, *,
             model: str = "", dtype: str = "", schedule: str | None = None, microbatches: int = 1) -> Plan:
        """Split the `layers.*` units as evenly as possible over P·v chunks (earlier chunks take the
        extra layer); units before the first layer (embed) join chunk 0, those after the last (head)
        the last chunk. Used when no profile is available."""
        layers = [i for i, u in enumerate(unit_names) if _LAYER.match(u)]
        k = len(devices) * virtual
        if not layers or layers != list(range(layers[0], layers[-1] + 1)):
            raise ValueError(f"Plan.even: the model's layers.* units must be one contiguous run; got {unit_names}")
        if len(layers) < k:
            raise ValueError(f"Plan.even: {k} chunks ({len(devices)} devices x virtual={virtual}) but only "
                             f"{len(layers)} layers; each chunk needs at least one layer")
        q, extra = divmod(len(layers), k)
        ends = [layers[0] + (c + 1) * q + min(c + 1, extra) for c in range(k)]
        bounds = [(0 if c == 0 else ends[c - 1], len(unit_names) if c == k - 1 else ends[c]) for c in range(k)]
        stages = [cls._stage(_name(d), [bounds[c] for c in range(s, k, len(devices))], unit_names)
                  for s, d in enumerate(devices)]
        return cls(model, dtype, schedule or ("gpipe" if virtual == 1 else "interleaved"), microbatches, virtual,
                   stages)

    @classmethod
    def from_partition(cls, partition: Partition, units: Sequence[str | UnitCost],
                       devices: Sequence[str | DeviceSpec], *, model: str = "", dtype: str = "",
                       schedule: str | None = None, microbatches: int = 1, profile_key: str | None = None,
                       predicted_bubble: float | None = None, predicted_makespan_s: float | None = None) -> Plan:
        """Plan of a `balance` result; `units` and `devices` are the lists given to `balance`."""
        names = [_name(u) for u in units]
        stages = []
        for pos, dev in enumerate(partition.order):
            st = cls._stage(_name(devices[dev]), [partition.bounds[c] for c in partition.chunks_of(pos)], names)
            st.predicted_time_s = partition.stage_times[pos]
            st.predicted_mem_bytes = partition.stage_memory[pos]
            if partition.stage_memory_parts:
                st.predicted_mem = dict(partition.stage_memory_parts[pos])
            if isinstance(devices[dev], DeviceSpec):
                st.mem_cap_bytes = devices[dev].mem_bytes
            stages.append(st)
        return cls(model, dtype, schedule or ("gpipe" if partition.virtual == 1 else "interleaved"), microbatches,
                   partition.virtual, stages, partition.bottleneck, predicted_bubble, predicted_makespan_s,
                   profile_key)

    @staticmethod
    def _stage(device: str, bounds: list[tuple[int, int]], names: list[str]) -> StagePlan:
        chunks = [(names[s], names[e - 1]) for s, e in bounds]
        return StagePlan(device, chunks, [u for s, e in bounds for u in names[s:e]])

    # ---- (de)serialisation ----

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict, with a 'format' version."""
        data = asdict(self)
        for st in data["stages"]:
            st["chunks"] = [list(c) for c in st["chunks"]]
        return {"format": PLAN_FORMAT, **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        """Inverse of `to_dict`; raises ValueError on a wrong format or unknown/missing keys."""
        data = dict(data)
        version = data.pop("format", PLAN_FORMAT)
        if version != PLAN_FORMAT:
            raise ValueError(f"plan format {version!r} is not supported; this version reads format {PLAN_FORMAT}")
        known = set(cls.__dataclass_fields__)
        unknown, missing = sorted(set(data) - known), sorted({"model", "stages", "virtual"} - set(data))
        if unknown or missing:
            raise ValueError(f"plan dict: unknown keys {unknown}, missing keys {missing}")
        stages = [StagePlan(**s) for s in data.pop("stages")]
        data.setdefault("dtype", "")
        data.setdefault("schedule", "gpipe")
        data.setdefault("microbatches", 1)
        return cls(stages=stages, **data)

    def to_json(self, path: str | Path) -> None:
        """Write the plan as indented JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> Plan:
        """Read a plan written by `to_json`."""
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"plan file {path}: not valid JSON ({err})") from err
        return cls.from_dict(data)

    # ---- queries and checks ----

    def stage_of_unit(self, name: str) -> int:
        """Index of the stage that holds unit `name`."""
        for s, st in enumerate(self.stages):
            if name in st.units:
                return s
        raise ValueError(f"unit {name!r} is in no stage of this plan")

    def layer_range(self, stage: int) -> list[int]:
        """Global layer indices held by `stage` (all of its chunks), in execution order."""
        if not 0 <= stage < len(self.stages):
            raise ValueError(f"stage {stage} out of range; the plan has stages 0..{len(self.stages) - 1}")
        return [int(m.group(1)) for u in self.stages[stage].units if (m := _LAYER.match(u))]

    def check(self, unit_names: list[str], devices: Sequence[str | DeviceSpec] | None = None,
              model: str | None = None) -> None:
        """Raise ValueError unless the plan fits this model (every unit exactly once, chunks
        contiguous and in model order) and these devices (same names, in any order)."""
        if model is not None and self.model and model != self.model:
            raise ValueError(f"plan was made for model {self.model!r} but the model is {model!r}")
        if devices is not None:
            self._check_devices([_name(d) for d in devices])
        where: dict[str, list[int]] = {}
        for s, st in enumerate(self.stages):
            for u in st.units:
                where.setdefault(u, []).append(s)
        for u, stages in where.items():
            if u not in unit_names:
                raise ValueError(f"stage {stages[0]} lists unit {u!r} which the model does not have")
            if len(stages) > 1:
                raise ValueError(f"unit {u} appears {len(stages)} times, in stages {stages}")
        for u in unit_names:
            if u not in where:
                raise ValueError(f"unit {u} appears in no stage")
        pos, p = 0, len(self.stages)
        for c, chunk in enumerate(self.chunks()):
            if chunk != unit_names[pos:pos + len(chunk)]:
                raise ValueError(f"chunk {c} (stage {c % p}) holds {chunk[0]}..{chunk[-1]} but units must follow "
                                 f"model order: it should start at {unit_names[pos]} and be contiguous")
            pos += len(chunk)

    def _check_devices(self, names: list[str]) -> None:
        if len(names) != len(self.stages):
            raise ValueError(f"plan has {len(self.stages)} stages but {len(names)} devices were given")
        for d in self.devices:
            if self.devices.count(d) != names.count(d):
                raise ValueError(f"plan places {self.devices.count(d)} stage(s) on {d!r} but the devices given "
                                 f"are {names}")

    def table(self) -> str:
        """Fixed-width table: stage, device, units, predicted ms, GiB and the device's GiB, plus a totals line."""
        rows = [(str(s), st.device, " + ".join(a if a == b else f"{a}..{b}" for a, b in st.chunks)
                 + f" ({len(st.units)})",
                 "-" if st.predicted_time_s is None else f"{st.predicted_time_s * 1e3:.3f}",
                 "-" if st.predicted_mem_bytes is None else f"{st.predicted_mem_bytes / GIB:.2f}",
                 "-" if st.mem_cap_bytes is None else f"{st.mem_cap_bytes / GIB:.2f}")
                for s, st in enumerate(self.stages)]
        head = ("stage", "device", "units", "pred ms", "pred GiB", "of GiB")
        w = [max(len(r[i]) for r in [head, *rows]) for i in range(6)]
        fmt = f"{{:<{w[0]}}}  {{:<{w[1]}}}  {{:<{w[2]}}}  {{:>{w[3]}}}  {{:>{w[4]}}}  {{:>{w[5]}}}"
        lines = [f"plan: {self.model or '?'} {self.dtype or '?'}, schedule {self.schedule}, "
                 f"{self.microbatches} microbatch(es), {self.virtual} chunk(s) per stage",
                 fmt.format(*head), *(fmt.format(*r) for r in rows)]
        total = [f"total: {len(self.stages)} stages, {sum(len(s.units) for s in self.stages)} units"]
        for label, value, scale, unit in (("bottleneck", self.predicted_bottleneck_s, 1e3, " ms"),
                                          ("makespan", self.predicted_makespan_s, 1e3, " ms"),
                                          ("bubble", self.predicted_bubble, 100, "%")):
            if value is not None:
                total.append(f"{label} {value * scale:.3f}{unit}")
        mem = [s.predicted_mem_bytes for s in self.stages if s.predicted_mem_bytes is not None]
        if mem:
            total.append(f"memory {sum(mem) / GIB:.2f} GiB")
        return "\n".join([*lines, ", ".join(total)])

    def memory_lines(self) -> list[str]:
        """One line per stage: its memory need by component against what its device offers."""
        out = []
        for s, st in enumerate(self.stages):
            if st.predicted_mem is None:
                continue
            parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in st.predicted_mem.items() if k != "total")
            cap = "" if st.mem_cap_bytes is None else (f" of {st.mem_cap_bytes / GIB:.2f} GiB "
                                                       f"({st.mem_cap_bytes - st.predicted_mem['total']:,} bytes spare)")
            out.append(f"  stage {s} {st.device}: {parts} GiB = {st.predicted_mem['total'] / GIB:.2f} GiB{cap}")
        return out
