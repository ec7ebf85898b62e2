"""Devices and the links between them: discovery, `nvidia-smi topo -m` parsing, bandwidth
measurement, and the link-graph helpers the balancer uses to enumerate device orders.

Link kinds and their default one-way bandwidth / per-message latency (used until
`measure_bandwidth` replaces them with measured numbers):

| kind              | meaning                                        | bandwidth          | latency |
|-------------------|------------------------------------------------|--------------------|---------|
| NV#               | # bonded NVLinks (NV18 on H100 SXM)            | 25 GB/s x #        | 3 us    |
| PIX, PXB          | through one / several PCIe switches            | 25 GB/s            | 5 us    |
| PHB, NODE         | through the host bridge / between bridges      | 20 GB/s            | 8 us    |
| SYS               | across NUMA nodes (QPI/UPI)                    | 10 GB/s            | 10 us   |
| HOST              | between a CPU device and a GPU (PCIe)          | 20 GB/s            | 10 us   |
| LOCAL             | between two CPU devices of one host (memcpy)   | 10 GB/s            | 20 us   |
| NET               | between nodes (`net_bandwidth`, `net_latency`) | 12.5 GB/s (100 Gb) | 20 us   |
| unknown           | nvidia-smi missing or silent                   | 10 GB/s            | 10 us   |
| SELF              | same device                                    | inf                | 0       |
"""

from __future__ import annotations

import logging
import math
import re
import subprocess
import time
from collections.abc import Hashable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from .costs import MIB, DeviceSpec, LinkMatrix

__all__ = [
    "DeviceInfo",
    "Topology",
    "chain_orders",
    "discover",
    "distinct_orders",
    "link_defaults",
    "may_place",
    "measure_bandwidth",
    "parse_topo_matrix",
    "symmetry_classes",
]

log = logging.getLogger(__name__)

_DEFAULTS: dict[str, tuple[float, float]] = {  # kind -> (bytes/s one way, seconds per message)
    "PIX": (25e9, 5e-6), "PXB": (25e9, 5e-6), "PHB": (20e9, 8e-6), "NODE": (20e9, 8e-6),
    "SYS": (10e9, 10e-6), "HOST": (20e9, 10e-6), "LOCAL": (10e9, 20e-6), "unknown": (10e9, 10e-6),
}
_NVLINK_BW, _NVLINK_LAT = 25e9, 3e-6
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def link_defaults(kind: str, net_bandwidth: float = 12.5e9, net_latency: float = 20e-6) -> tuple[float, float]:
    """Default (bandwidth bytes/s, latency s) of a link kind (see the module table)."""
    if kind == "SELF":
        return math.inf, 0.0
    if kind == "NET":
        return net_bandwidth, net_latency
    nv = re.fullmatch(r"NV(\d+)", kind)
    if nv:
        return _NVLINK_BW * int(nv.group(1)), _NVLINK_LAT
    return _DEFAULTS.get(kind, _DEFAULTS["unknown"])


@dataclass
class DeviceInfo:
    """One discovered device."""

    name: str
    """Torch device string, e.g. 'cuda:1' or 'cpu'."""
    total_mem: int
    """Total memory, bytes (CPU: this device's share of host RAM)."""
    free_mem: int
    """Free memory at discovery, bytes (CPU: this device's share of available RAM)."""
    capability: tuple[int, int] | None
    """CUDA compute capability, None for CPU."""
    kind: str
    """'cuda' or 'cpu'."""
    node: int = 0
    """Host the device sits on (from `node_of`)."""


@dataclass
class Topology:
    """Devices in the order given to `discover`, and the link matrix indexed the same way."""

    devices: list[DeviceInfo]
    links: LinkMatrix

    def device_specs(self, speeds: list[float] | None = None, reserve_bytes: int = 0) -> list[DeviceSpec]:
        """DeviceSpecs for `balance`: memory = free memory minus `reserve_bytes`."""
        speeds = speeds or [1.0] * len(self.devices)
        if len(speeds) != len(self.devices):
            raise ValueError(f"Topology.device_specs: {len(speeds)} speeds for {len(self.devices)} devices")
        return [DeviceSpec(d.name, s, d.kind, mem_bytes=max(d.free_mem - reserve_bytes, 0))
                for d, s in zip(self.devices, speeds, strict=True)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict."""
        return {"devices": [asdict(d) for d in self.devices], "links": self.links.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Topology:
        """Inverse of `to_dict`."""
        devices = [DeviceInfo(**{**d, "capability": tuple(d["capability"]) if d["capability"] else None})
                   for d in data["devices"]]
        return cls(devices, LinkMatrix.from_dict(data["links"]))


def parse_topo_matrix(text: str) -> dict[tuple[int, int], str]:
    """Parse `nvidia-smi topo -m` output into {(gpu_i, gpu_j): kind}; the diagonal is 'SELF'.

    Only the GPU x GPU block is read (NIC columns, affinities and the legend are ignored).
    Raises ValueError when there is no GPU header or a GPU row is short or missing.
    """
    lines = [_ANSI.sub("", line).rstrip() for line in text.splitlines()]
    header = next((line for line in lines if re.match(r"^\s+GPU0\b", line)), None)
    if header is None:
        raise ValueError("parse_topo_matrix: no header line with GPU0 .. in the nvidia-smi topo -m output")
    count = len(re.findall(r"\bGPU\d+\b", header))
    kinds: dict[tuple[int, int], str] = {}
    for line in lines:
        row = re.match(r"^GPU(\d+)\s+(.*)$", line)
        if not row:
            continue
        cells = row.group(2).split()
        if len(cells) < count:
            raise ValueError(f"parse_topo_matrix: row {line!r} has {len(cells)} cells, expected {count} GPU columns")
        i = int(row.group(1))
        for j, cell in enumerate(cells[:count]):
            kinds[(i, j)] = {"X": "SELF", "SOC": "SYS"}.get(cell, cell)
    missing = sorted(set(range(count)) - {i for i, _ in kinds})
    if missing:
        raise ValueError(f"parse_topo_matrix: no row for GPU{missing[0]} in the nvidia-smi topo -m output")
    return kinds


def _run_smi(*args: str) -> str | None:
    """stdout of nvidia-smi, or None when it is missing or fails."""
    try:
        done = subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError) as err:
        log.warning("nvidia-smi %s failed (%s)", " ".join(args), err)
        return None
    return done.stdout


def _smi_indices(torch_indices: list[int]) -> dict[int, int]:
    """torch CUDA index -> nvidia-smi index, matched by PCI address (they differ under
    CUDA_VISIBLE_DEVICES or CUDA_DEVICE_ORDER); an index that cannot be matched maps to itself."""
    import torch

    smi: dict[tuple[int, ...], int] = {}
    for line in (_run_smi("--query-gpu=index,pci.bus_id", "--format=csv,noheader") or "").splitlines():
        index, _, bus = line.partition(",")
        parts = re.match(r"\s*([0-9A-Fa-f]+):([0-9A-Fa-f]+):([0-9A-Fa-f]+)\.", bus)
        if parts:
            smi[tuple(int(x, 16) for x in parts.groups())] = int(index)
    out = {}
    for i in torch_indices:
        props = torch.cuda.get_device_properties(i)
        out[i] = smi.get(tuple(getattr(props, f"pci_{k}_id", -1) for k in ("domain", "bus", "device")), i)
    return out


def _gpu_kinds(infos: list[DeviceInfo], topo_text: str | None) -> dict[tuple[int, int], str]:
    """(torch index, torch index) -> link kind of the CUDA devices, from nvidia-smi topo -m."""
    import torch

    gpus = sorted({torch.device(d.name).index or 0 for d in infos if d.kind == "cuda"})
    if len(gpus) < 2:
        return {}
    if topo_text is not None:
        kinds = parse_topo_matrix(topo_text)
    else:
        try:
            kinds = parse_topo_matrix(_run_smi("topo", "-m") or "")
        except ValueError as err:
            log.warning("cannot read nvidia-smi topo -m (%s); GPU links are 'unknown'", err)
            return {}
    smi = _smi_indices(gpus)
    return {(i, j): kinds.get((smi[i], smi[j]), "unknown") for i in gpus for j in gpus}


def _device_info(name: str, node: int, cpu_share: int) -> DeviceInfo:
    import psutil
    import torch

    dev = torch.device(name)
    if dev.type == "cpu":
        vm = psutil.virtual_memory()
        return DeviceInfo(name, vm.total // cpu_share, vm.available // cpu_share, None, "cpu", node)
    if dev.type != "cuda":
        raise ValueError(f"discover: device {name!r} has type {dev.type!r}; supported types are 'cuda' and 'cpu'")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = dev.index or 0
    if index >= count:
        raise ValueError(f"discover: device {name!r} requested but torch sees {count} CUDA device(s)")
    free, total = torch.cuda.mem_get_info(index)
    return DeviceInfo(name, total, free, torch.cuda.get_device_capability(index), "cuda", node)


def _link_kind(a: DeviceInfo, b: DeviceInfo, gpu_kinds: dict[tuple[int, int], str]) -> str:
    import torch

    if a.node != b.node:
        return "NET"
    if a.kind == "cpu" or b.kind == "cpu":
        return "LOCAL" if a.kind == b.kind else "HOST"
    ia, ib = (torch.device(x.name).index or 0 for x in (a, b))
    return "SELF" if ia == ib else gpu_kinds.get((ia, ib), "unknown")


def discover(device_names: list[str], *, node_of: list[int] | None = None, net_bandwidth: float = 12.5e9,
             net_latency: float = 20e-6, topo_text: str | None = None) -> Topology:
    """Memory of each device and the kind/default speed of each link between them.

    Args:
        device_names: torch device strings in pipeline candidate order ('cuda:0', 'cpu', ...).
        node_of: host index per device (default all on host 0); pairs on different hosts are 'NET'.
        net_bandwidth / net_latency: what a 'NET' link offers (bytes/s one way, seconds).
        topo_text: `nvidia-smi topo -m` output to use instead of running nvidia-smi (tests, remote hosts).
    Returns:
        Topology with default link numbers; call `measure_bandwidth` to replace them.
    """
    node_of = node_of or [0] * len(device_names)
    if len(node_of) != len(device_names):
        raise ValueError(f"discover: node_of has {len(node_of)} entries for {len(device_names)} devices")
    import torch

    types = [torch.device(x).type for x in device_names]
    cpus = {n: sum(1 for t, m in zip(types, node_of, strict=True) if t == "cpu" and m == n) for n in set(node_of)}
    infos = [_device_info(x, n, max(cpus[n], 1)) for x, n in zip(device_names, node_of, strict=True)]
    gpu_kinds = _gpu_kinds(infos, topo_text)
    n = len(infos)
    kind = [["SELF" if i == j else _link_kind(infos[i], infos[j], gpu_kinds) for j in range(n)] for i in range(n)]
    speed = [[link_defaults(k, net_bandwidth, net_latency) for k in row] for row in kind]
    links = LinkMatrix([[s[0] for s in row] for row in speed], [[s[1] for s in row] for row in speed], kind)
    return Topology(infos, links)


def _time_copy(src_name: str, dst_name: str, nbytes: int, repeats: int) -> float:
    """Seconds per copy of `nbytes` from one device to another (CUDA events where a GPU is involved)."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device=src_name)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=dst_name)
    dst.copy_(src)  # warm-up (peer access, allocator)
    gpu = next((torch.device(x) for x in (src_name, dst_name) if torch.device(x).type == "cuda"), None)
    if gpu is None:
        start = time.perf_counter()
        for _ in range(repeats):
            dst.copy_(src)
        return (time.perf_counter() - start) / repeats
    # a copy between devices runs on the current stream of the source GPU (or the only GPU)
    with torch.cuda.device(src.device if src.device.type == "cuda" else gpu):
        torch.cuda.synchronize()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(repeats):
            dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3 / repeats


def measure_bandwidth(topology: Topology, pairs: list[tuple[int, int]] | None = None, nbytes: int = 64 * MIB,
                      repeats: int = 5) -> LinkMatrix:
    """Measure bandwidth and small-message latency of device pairs and write them into
    `topology.links` (in place; also returned). Default pairs: every ordered pair on one host.

    Bandwidth = nbytes / (time of an nbytes copy - latency); latency = time of an 8-byte copy.
    CPU pairs measure a memcpy, which is faster than the gloo transfer between CPU processes.
    """
    devs, links = topology.devices, topology.links
    n = len(devs)
    pairs = pairs if pairs is not None else [(i, j) for i in range(n) for j in range(n)
                                             if i != j and links.kind[i][j] not in ("NET", "SELF")]
    for i, j in pairs:
        if not (0 <= i < n and 0 <= j < n) or i == j:
            raise ValueError(f"measure_bandwidth: pair ({i}, {j}) must be two different indices below {n}")
        latency = _time_copy(devs[i].name, devs[j].name, 8, 20 * repeats)
        big = _time_copy(devs[i].name, devs[j].name, nbytes, repeats)
        links.latency[i][j] = latency
        links.bandwidth[i][j] = nbytes / (big - latency if big > 2 * latency else big)
        log.info("link %s -> %s (%s): %.1f GB/s, %.1f us", devs[i].name, devs[j].name, links.kind[i][j],
                 links.bandwidth[i][j] / 1e9, latency * 1e6)
    return links


# ---- device orders over the link graph (used by the balancer) ----

def symmetry_classes(keys: list[Hashable], links: LinkMatrix) -> list[int]:
    """cls[j] = smallest device index interchangeable with j: same `keys[j]` (e.g. speed and
    memory) and the same bandwidth/latency to and from every other device."""
    bw, lat = links.bandwidth, links.latency

    def same(i: int, j: int) -> bool:
        if keys[i] != keys[j] or (bw[i][j], lat[i][j]) != (bw[j][i], lat[j][i]):
            return False
        return all((bw[i][k], bw[k][i], lat[i][k], lat[k][i]) == (bw[j][k], bw[k][j], lat[j][k], lat[k][j])
                   for k in range(len(keys)) if k not in (i, j))

    return [next(i for i in range(j + 1) if i == j or same(i, j)) for j in range(len(keys))]


def may_place(j: int, used: set[int], classes: list[int]) -> bool:
    """Whether device j may come next: unused, and every interchangeable lower-index device is
    already placed (so each class of equivalent orders is visited once, lexicographically first)."""
    return j not in used and all(i in used for i in range(j) if classes[i] == classes[j])


def distinct_orders(classes: list[int], prefix: list[int] | None = None) -> Iterator[list[int]]:
    """All device orders in lexicographic order, one per class of equivalent orders."""
    prefix = prefix or []
    if len(prefix) == len(classes):
        yield list(prefix)
        return
    used = set(prefix)
    for j in range(len(classes)):
        if may_place(j, used, classes):
            yield from distinct_orders(classes, [*prefix, j])


def chain_orders(links: LinkMatrix) -> list[list[int]]:
    """Identity plus, from every start, the chain that always moves to the highest-bandwidth unused device."""
    bw, p = links.bandwidth, links.size
    found = [list(range(p))]
    for start in range(p):
        chain = [start]
        while len(chain) < p:
            cur = chain[-1]
            chain.append(max((j for j in range(p) if j not in chain), key=lambda j: (bw[cur][j], -j)))
        if chain not in found:
            found.append(chain)
    return found
