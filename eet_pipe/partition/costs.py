"""Cost model of the partitioner: what a unit costs, what a device offers, what a link costs.

Everything here is plain data plus the arithmetic the balancer needs:

* `UnitCost`   — one partition unit (`embed`, `layers.{i}`, `head`) as the profiler measured it.
* `DeviceSpec` — one pipeline device: relative speed and usable memory.
* `LinkMatrix` — bandwidth / latency / kind of every device pair (i → j).
* `MemoryBudget` — what besides parameters a stage must hold (KV cache, buffers, workspace).
* `MemoryNeed` / `CostTable` — the memory of a set of chunks and the per-range sums the balancer uses.

Memory model of a device holding chunks `[s, e)` (unit index ranges, end exclusive):

    params + kv_bytes_per_token * kv_tokens      summed over its units
  + act_buffers * largest activation it holds    its units' outputs and each chunk's input
  + largest temp_bytes of its units              temporaries are freed between units
  + graph_pools * (largest activation + largest temp)   CUDA graphs' private pools keep a captured
                                                 step's intermediates and static output
  + workspace_bytes                              once per device

docs/PARTITIONER.md explains each term and where its numbers come from.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "GIB",
    "CostTable",
    "DeviceSpec",
    "LinkMatrix",
    "MemoryBudget",
    "MemoryNeed",
    "PipelineCosts",
    "UnitCost",
    "gib",
]

GIB = 1 << 30
MIB = 1 << 20


def gib(nbytes: float) -> str:
    """Format a byte count as GiB with two decimals, e.g. ``'3.25 GiB'``."""
    return f"{nbytes / GIB:.2f} GiB"


def _check_nonneg(owner: str, **values: float) -> None:
    """Raise ValueError naming the first negative (or NaN) field of `owner`."""
    for key, value in values.items():
        if not value >= 0:
            raise ValueError(f"{owner}.{key} = {value!r}; must be >= 0")


@dataclass
class UnitCost:
    """Measured cost of one partition unit on the reference device."""

    name: str
    """Canonical unit name: 'embed', 'layers.{i}' or 'head'."""
    time_s: float
    """Forward time of one microbatch on the reference device (speed 1.0), seconds."""
    param_bytes: int
    """Bytes of parameters (and buffers) the unit holds."""
    act_bytes: int
    """Bytes of the activation this unit sends to the next unit, per microbatch."""
    kv_bytes_per_token: int = 0
    """KV-cache bytes per cached token (0 for embed/head)."""
    temp_bytes: int = 0
    """Peak temporary bytes while the unit runs (freed afterwards)."""
    shared_bytes: int = 0
    """Bytes of `param_bytes` that are the embedding's own tensor (a head tied to it): a chunk that
    also holds `embed` shares them and does not hold them twice."""

    def __post_init__(self) -> None:
        _check_nonneg(
            f"UnitCost({self.name!r})", time_s=self.time_s, param_bytes=self.param_bytes,
            act_bytes=self.act_bytes, kv_bytes_per_token=self.kv_bytes_per_token,
            temp_bytes=self.temp_bytes, shared_bytes=self.shared_bytes,
        )
        if self.shared_bytes > self.param_bytes:
            raise ValueError(f"UnitCost({self.name!r}).shared_bytes = {self.shared_bytes} exceeds its "
                             f"param_bytes = {self.param_bytes}")


@dataclass
class DeviceSpec:
    """One pipeline device as the balancer sees it. `mem_bytes` is keyword-only."""

    name: str
    """Device name, e.g. 'cuda:0' or 'node1/cuda:3'."""
    speed: float = 1.0
    """Relative speed: time of a unit on this device = UnitCost.time_s / speed."""
    kind: str = ""
    """Free-form device kind, e.g. 'H100', 'cpu' (informational)."""
    mem_bytes: int = field(kw_only=True)
    """Memory the stage may use on this device, bytes."""

    def __post_init__(self) -> None:
        if not self.speed > 0 or math.isinf(self.speed):
            raise ValueError(f"DeviceSpec({self.name!r}).speed = {self.speed!r}; must be finite and > 0")
        _check_nonneg(f"DeviceSpec({self.name!r})", mem_bytes=self.mem_bytes)


@dataclass
class MemoryBudget:
    """What a stage holds besides parameters."""

    kv_tokens: int = 0
    """Max tokens of KV cache held per stage (slots x max_seq)."""
    workspace_bytes: int = 256 * MIB
    """Fixed per-device workspace (allocator slack, cuBLAS workspace, CUDA graphs)."""
    act_buffers: int = 2
    """Number of activation buffers of the largest activation size a device holds."""
    graph_pools: int = 1
    """CUDA-graph memory pools per device, each holding one captured step's temporaries and output
    (0 when CUDA graphs are off)."""

    def __post_init__(self) -> None:
        _check_nonneg("MemoryBudget", kv_tokens=self.kv_tokens, workspace_bytes=self.workspace_bytes,
                      act_buffers=self.act_buffers, graph_pools=self.graph_pools)


@dataclass
class MemoryNeed:
    """Memory one device needs, by component (bytes)."""

    params: int
    kv: int
    act: int
    temp: int
    workspace: int
    graphs: int = 0

    PARTS = ("params", "kv", "act", "temp", "graphs", "workspace")

    @property
    def total(self) -> int:
        """Sum of all components."""
        return self.params + self.kv + self.act + self.temp + self.graphs + self.workspace

    def to_dict(self) -> dict[str, int]:
        """Component -> bytes, plus 'total'."""
        return {**{p: int(getattr(self, p)) for p in self.PARTS}, "total": int(self.total)}

    def describe(self) -> str:
        """Human readable breakdown in GiB."""
        parts = self.PARTS
        return ", ".join(f"{p} {getattr(self, p) / GIB:.2f}" for p in parts) + " GiB"


@dataclass
class LinkMatrix:
    """Point-to-point links between devices; index i, j = position in the device list.

    `bandwidth[i][j]` is one-way bytes/s from i to j, `latency[i][j]` seconds per message,
    `kind[i][j]` a label such as 'NV18', 'PIX', 'SYS', 'NET', 'LOCAL', 'SELF'.
    The diagonal is 'SELF' with infinite bandwidth (serialised as null).
    """

    bandwidth: list[list[float]]
    latency: list[list[float]]
    kind: list[list[str]]

    def __post_init__(self) -> None:
        n = len(self.bandwidth)
        for label, mat in (("bandwidth", self.bandwidth), ("latency", self.latency), ("kind", self.kind)):
            if len(mat) != n or any(len(row) != n for row in mat):
                raise ValueError(f"LinkMatrix.{label} must be {n}x{n} like bandwidth; got rows "
                                 f"of lengths {[len(r) for r in mat]}")
        for i in range(n):
            for j in range(n):
                if not self.bandwidth[i][j] > 0:
                    raise ValueError(f"LinkMatrix.bandwidth[{i}][{j}] = {self.bandwidth[i][j]!r}; must be > 0")
                _check_nonneg(f"LinkMatrix.latency[{i}]", **{str(j): self.latency[i][j]})

    @property
    def size(self) -> int:
        """Number of devices."""
        return len(self.bandwidth)

    @classmethod
    def uniform(cls, n: int, bandwidth: float, latency: float = 0.0, kind: str = "") -> LinkMatrix:
        """All off-diagonal pairs share one bandwidth/latency/kind; diagonal is SELF."""
        return cls(
            bandwidth=[[math.inf if i == j else bandwidth for j in range(n)] for i in range(n)],
            latency=[[0.0 if i == j else latency for j in range(n)] for i in range(n)],
            kind=[["SELF" if i == j else kind for j in range(n)] for i in range(n)],
        )

    def transfer_time(self, i: int, j: int, nbytes: float) -> float:
        """Seconds to send `nbytes` from device i to device j (0 for i == j or nothing to send)."""
        if i == j or nbytes <= 0:
            return 0.0
        return self.latency[i][j] + nbytes / self.bandwidth[i][j]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (infinite bandwidth becomes null)."""
        bw = [[None if math.isinf(b) else b for b in row] for row in self.bandwidth]
        return {"bandwidth": bw, "latency": [list(r) for r in self.latency],
                "kind": [list(r) for r in self.kind]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LinkMatrix:
        """Inverse of `to_dict`."""
        missing = {"bandwidth", "latency", "kind"} - set(data)
        if missing:
            raise ValueError(f"LinkMatrix dict lacks keys {sorted(missing)}")
        bw = [[math.inf if b is None else float(b) for b in row] for row in data["bandwidth"]]
        return cls(bandwidth=bw, latency=[[float(x) for x in r] for r in data["latency"]],
                   kind=[[str(k) for k in r] for r in data["kind"]])

    def to_json(self, path: str | Path) -> None:
        """Write `to_dict()` as JSON to `path`."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def from_json(cls, path: str | Path) -> LinkMatrix:
        """Read a matrix written by `to_json`."""
        return cls.from_dict(json.loads(Path(path).read_text()))


def _range_maxima(act: np.ndarray, temp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[s, e] -> largest activation a chunk [s, e) holds (its units' outputs and, for s > 0, its
    input act[s-1]) and its largest temp; zero where e <= s."""
    n = len(act)
    act_max, temp_max = np.zeros((n + 1, n + 1)), np.zeros((n + 1, n + 1))
    for s in range(n):
        lo = max(s - 1, 0)
        act_max[s, s + 1:] = np.maximum.accumulate(act[lo:])[s - lo:]
        temp_max[s, s + 1:] = np.maximum.accumulate(temp[s:])
    return act_max, temp_max


class CostTable:
    """Range sums and maxima over a unit list, for chunks `[s, e)` with 0 <= s < e <= n.

    Built once per `balance` call. Attributes are numpy arrays of shape (n+1, n+1)
    (entries with e <= s are +inf for `comp` and unused elsewhere) plus the same data as
    nested lists for fast scalar access in the search.
    """

    def __init__(self, units: list[UnitCost], budget: MemoryBudget) -> None:
        self.units = units
        self.budget = budget
        n = self.n = len(units)
        times = np.array([u.time_s for u in units], dtype=np.float64)
        self.act = np.array([u.act_bytes for u in units], dtype=np.float64)
        self.time_prefix = np.concatenate([[0.0], np.cumsum(times)])
        held = [u.param_bytes + u.kv_bytes_per_token * budget.kv_tokens for u in units]
        self.held_prefix = np.concatenate([[0.0], np.cumsum(np.array(held, dtype=np.float64))])
        idx = np.arange(n + 1)
        self.comp = self.time_prefix[None, :] - self.time_prefix[:, None]
        self.comp[idx[None, :] <= idx[:, None]] = math.inf
        temps = np.array([u.temp_bytes for u in units], dtype=np.float64)
        self.act_max, self.temp_max = _range_maxima(self.act, temps)
        held_sum = self.held_prefix[None, :] - self.held_prefix[:, None]
        # a chunk that starts with the embedding holds a tied head's weight once
        self._shared_prefix = [0, *itertools.accumulate(u.shared_bytes for u in units)]
        held_sum[0, :] -= np.array([self.shared(0, e) for e in range(n + 1)], dtype=np.float64)
        # memory a device needs when it holds only chunk [s, e)
        self.single_mem = (held_sum + budget.act_buffers * self.act_max + self.temp_max
                           + budget.graph_pools * (self.act_max + self.temp_max) + budget.workspace_bytes)
        # search bounds over units[e:]: cheapest[e][k] = sum of the k smallest times;
        # typical[e] = their median time; lighter[e] = how many are below it
        suffixes = [sorted(times[e:].tolist()) for e in range(n + 1)]
        self.cheapest = [list(itertools.accumulate(x, initial=0.0)) for x in suffixes]
        self.typical = [x[len(x) // 2] if x else 0.0 for x in suffixes]
        self.lighter = [bisect.bisect_left(x, m) for x, m in zip(suffixes, self.typical, strict=True)]
        self.time_list = self.time_prefix.tolist()
        self.held_list = self.held_prefix.tolist()
        self.act_max_list = self.act_max.tolist()
        self.temp_max_list = self.temp_max.tolist()

    def shared(self, s: int, e: int) -> int:
        """Bytes chunk [s, e) holds once although two of its units count them (a head tied to the
        embedding, both in the chunk)."""
        return self._shared_prefix[e] if s == 0 and self.units and self.units[0].name == "embed" else 0

    def need(self, chunks: list[tuple[int, int]]) -> MemoryNeed:
        """Memory breakdown of a device holding `chunks` (list of [s, e) ranges)."""
        us = [u for s, e in chunks for u in self.units[s:e]]
        act = max((self.act_max_list[s][e] for s, e in chunks), default=0.0)
        temp = max((u.temp_bytes for u in us), default=0)
        return MemoryNeed(
            params=sum(u.param_bytes for u in us) - sum(self.shared(s, e) for s, e in chunks),
            kv=sum(u.kv_bytes_per_token for u in us) * self.budget.kv_tokens,
            act=int(self.budget.act_buffers * act),
            temp=temp,
            workspace=self.budget.workspace_bytes,
            graphs=int(self.budget.graph_pools * (act + temp)),
        )


@dataclass
class PipelineCosts:
    """Prices of any chunk on any device of one balancing problem (cached numpy matrices).

    `caps` are the memory caps per device (the balancer's diagnostics scale them)."""

    table: CostTable
    devices: list[DeviceSpec]
    links: LinkMatrix
    virtual: int
    caps: list[float]
    _cmat: dict[tuple[float, float], np.ndarray] = field(default_factory=dict)
    _suffix: dict[tuple, np.ndarray] = field(default_factory=dict)
    _xfer: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    def cmat(self, d: int) -> np.ndarray:
        """[s, e] -> compute time of chunk [s, e) on device d, +inf where it does not fit memory."""
        return self._matrix(self.devices[d].speed, self.caps[d])

    def _matrix(self, speed: float, cap: float) -> np.ndarray:
        if (speed, cap) not in self._cmat:
            t = self.table
            self._cmat[(speed, cap)] = np.where(t.single_mem <= cap, t.comp / speed, math.inf)
        return self._cmat[(speed, cap)]

    def suffix_bound(self, left: list[int]) -> np.ndarray:
        """[e] -> lower bound on the bottleneck of units [e, n) on the devices `left`: the DP with
        every device as fast and as large as the best of them, sending over their best link."""
        links = self.links
        pairs = [(i, j) for i in left for j in left if i != j] or [(left[0], left[0])]
        key = (len(left), max(self.devices[d].speed for d in left), max(self.caps[d] for d in left),
               min(links.latency[i][j] for i, j in pairs), max(links.bandwidth[i][j] for i, j in pairs))
        if key not in self._suffix:
            m = self._matrix(key[1], key[2])
            send = np.concatenate([[0.0], np.where(self.table.act > 0, key[3] + self.table.act / key[4], 0.0)])
            bound = m[:, -1]
            for _ in range(key[0] - 1):
                bound = np.maximum(m + send[None, :], bound[None, :]).min(axis=1)
            self._suffix[key] = bound
        return self._suffix[key]

    def xfer(self, i: int, j: int) -> np.ndarray:
        """[e] -> seconds to send the output of unit e-1 from device i to device j."""
        if (i, j) not in self._xfer:
            sent = [self.links.transfer_time(i, j, a) for a in self.table.act.tolist()]
            self._xfer[(i, j)] = np.array([0.0, *sent])
        return self._xfer[(i, j)]

    def scaled(self, factor: float) -> PipelineCosts:
        """Same problem with every memory cap multiplied by `factor`."""
        caps = [float(d.mem_bytes) * factor for d in self.devices]
        return PipelineCosts(self.table, self.devices, self.links, self.virtual, caps)

    def lower_bound(self) -> float:
        """Order-independent lower bound on the bottleneck (ignores links and memory)."""
        t = self.table
        total_speed = sum(d.speed for d in self.devices)
        heaviest = max(u.time_s for u in t.units)
        return max(t.time_list[-1] / total_speed, heaviest / max(d.speed for d in self.devices))
