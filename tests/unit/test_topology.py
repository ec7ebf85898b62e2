"""Topology: the nvidia-smi matrix parser on literal outputs, CPU discovery and measurement,
link defaults, serialisation, and the device-order helpers."""

from __future__ import annotations

import math
import re

import psutil
import pytest
import torch

from eet_pipe.partition import LinkMatrix, Topology, discover, measure_bandwidth, parse_topo_matrix
from eet_pipe.partition.topology import chain_orders, distinct_orders, link_defaults, symmetry_classes

# `nvidia-smi topo -m` as recorded on the lent 2 x H200 host (driver 580), escape codes included.
TWO_H200 = (
    "\t\x1b[4mGPU0\tGPU1\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID\x1b[0m\n"
    "GPU0\t X \tNV18\t0-31\t0\t\tN/A\n"
    "GPU1\tNV18\t X \t0-31\t0\t\tN/A\n"
    "\n"
    "Legend:\n"
    "\n"
    "  X    = Self\n"
    "  SYS  = Connection traversing PCIe as well as the SMP interconnect between NUMA nodes (e.g., QPI/UPI)\n"
    "  NV#  = Connection traversing a bonded set of # NVLinks\n"
)

# The same format for a 4 x H100 SXM host (every pair NV18) with two NICs (4-GPU hosts were not
# lent when this was written; the layout follows the recorded output above).
NV18_HOST = (
    "\t\x1b[4mGPU0\tGPU1\tGPU2\tGPU3\tNIC0\tNIC1\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID\x1b[0m\n"
    "GPU0\t X \tNV18\tNV18\tNV18\tPXB\tSYS\t0-47,96-143\t0\t\tN/A\n"
    "GPU1\tNV18\t X \tNV18\tNV18\tSYS\tSYS\t0-47,96-143\t0\t\tN/A\n"
    "GPU2\tNV18\tNV18\t X \tNV18\tSYS\tPXB\t48-95,144-191\t1\t\tN/A\n"
    "GPU3\tNV18\tNV18\tNV18\t X \tSYS\tSYS\t48-95,144-191\t1\t\tN/A\n"
    "NIC0\tPXB\tSYS\tSYS\tSYS\t X \tSYS\t\t\t\t\n"
    "NIC1\tSYS\tSYS\tPXB\tSYS\tSYS\t X \t\t\t\t\n"
    "\n"
    "Legend:\n"
    "\n"
    "  X    = Self\n"
    "  SYS  = Connection traversing PCIe as well as the SMP interconnect between NUMA nodes (e.g., QPI/UPI)\n"
    "  NODE = Connection traversing PCIe as well as the interconnect between PCIe Host Bridges within a NUMA node\n"
    "  PHB  = Connection traversing PCIe as well as a PCIe Host Bridge (typically the CPU)\n"
    "  PXB  = Connection traversing multiple PCIe bridges (without traversing the PCIe Host Bridge)\n"
    "  PIX  = Connection traversing at most a single PCIe bridge\n"
    "  NV#  = Connection traversing a bonded set of # NVLinks\n"
    "\n"
    "NIC Legend:\n"
    "\n"
    "  NIC0: mlx5_0\n"
    "  NIC1: mlx5_1\n"
)

# A PCIe-only host: GPU0/1 behind one switch, GPU2 behind a second switch level, GPU3 on the host
# bridge, GPU4 on another host bridge of NUMA node 0, GPU5 on NUMA node 1.
PCIE_HOST = """\
        GPU0    GPU1    GPU2    GPU3    GPU4    GPU5    CPU Affinity    NUMA Affinity
GPU0     X      PIX     PXB     PHB     NODE    SYS     0-15,32-47      0
GPU1    PIX      X      PXB     PHB     NODE    SYS     0-15,32-47      0
GPU2    PXB     PXB      X      PHB     NODE    SYS     0-15,32-47      0
GPU3    PHB     PHB     PHB      X      NODE    SYS     0-15,32-47      0
GPU4    NODE    NODE    NODE    NODE     X      SYS     0-15,32-47      0
GPU5    SYS     SYS     SYS     SYS     SYS      X      16-31,48-63     1

Legend:

  X    = Self
  SYS  = Connection traversing PCIe as well as the SMP interconnect between NUMA nodes (e.g., QPI/UPI)
  PIX  = Connection traversing at most a single PCIe bridge
"""


def test_parse_recorded_two_gpu_host() -> None:
    assert parse_topo_matrix(TWO_H200) == {(0, 0): "SELF", (0, 1): "NV18", (1, 0): "NV18", (1, 1): "SELF"}


def test_parse_nvlink_host() -> None:
    kinds = parse_topo_matrix(NV18_HOST)
    assert len(kinds) == 16
    for (i, j), kind in kinds.items():
        assert kind == ("SELF" if i == j else "NV18")
    assert link_defaults("NV18") == (18 * 25e9, 3e-6)


def test_parse_pcie_host() -> None:
    kinds = parse_topo_matrix(PCIE_HOST)
    assert len(kinds) == 36
    assert kinds[(0, 1)] == "PIX" and kinds[(1, 2)] == "PXB" and kinds[(2, 3)] == "PHB"
    assert kinds[(3, 4)] == "NODE" and kinds[(5, 0)] == "SYS" and kinds[(4, 4)] == "SELF"
    assert all(kinds[(i, j)] == kinds[(j, i)] for i in range(6) for j in range(6))


def test_parse_rejects_broken_output() -> None:
    with pytest.raises(ValueError, match="no header"):
        parse_topo_matrix("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.")
    with pytest.raises(ValueError, match="row 'GPU1.*PIX' has 1 cells"):
        parse_topo_matrix("\tGPU0\tGPU1\nGPU0\t X \tPIX\nGPU1\tPIX\n")
    with pytest.raises(ValueError, match="no row for GPU1"):
        parse_topo_matrix("\tGPU0\tGPU1\nGPU0\t X \tPIX\n")


def test_link_defaults() -> None:
    assert link_defaults("PIX") == (25e9, 5e-6) and link_defaults("PXB")[0] == 25e9
    assert link_defaults("PHB")[0] == link_defaults("NODE")[0] == 20e9
    assert link_defaults("SYS")[0] == 10e9 and link_defaults("unknown")[0] == 10e9
    assert link_defaults("NET", net_bandwidth=3e9, net_latency=1e-4) == (3e9, 1e-4)
    assert link_defaults("SELF") == (math.inf, 0.0)


def test_discover_two_cpus() -> None:
    topo = discover(["cpu", "cpu"])
    assert [d.kind for d in topo.devices] == ["cpu", "cpu"]
    assert topo.links.kind == [["SELF", "LOCAL"], ["LOCAL", "SELF"]]
    assert topo.links.transfer_time(0, 1, 10**9) == pytest.approx(20e-6 + 0.1)
    share = psutil.virtual_memory().total // 2  # two CPU stages share the host's RAM
    assert topo.devices[0].total_mem == share and 0 < topo.devices[0].free_mem <= share
    specs = topo.device_specs(reserve_bytes=1 << 20)
    assert [s.name for s in specs] == ["cpu", "cpu"] and specs[0].mem_bytes == topo.devices[0].free_mem - (1 << 20)


def test_discover_across_nodes() -> None:
    topo = discover(["cpu", "cpu", "cpu"], node_of=[0, 0, 1], net_bandwidth=5e9, net_latency=1e-4)
    assert topo.links.kind[0][2] == "NET" and topo.links.kind[0][1] == "LOCAL"
    assert topo.links.bandwidth[2][1] == 5e9 and topo.links.latency[1][2] == 1e-4
    with pytest.raises(ValueError, match="node_of has 2 entries for 3 devices"):
        discover(["cpu"] * 3, node_of=[0, 1])


def test_discover_rejects_unknown_devices() -> None:
    with pytest.raises(ValueError, match="type 'meta'"):
        discover(["meta"])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees 0 CUDA device"):
            discover(["cuda:0"])


def test_measure_bandwidth_on_cpu() -> None:
    topo = discover(["cpu", "cpu:1"])
    links = measure_bandwidth(topo, nbytes=1 << 20, repeats=2)
    assert links is topo.links
    for i, j in ((0, 1), (1, 0)):
        assert 0 < links.latency[i][j] < 0.1 and 1e6 < links.bandwidth[i][j] < math.inf
    assert links.bandwidth[0][0] == math.inf
    with pytest.raises(ValueError, match="pair \\(0, 0\\)"):
        measure_bandwidth(topo, pairs=[(0, 0)])


def test_serialisation_round_trips(tmp_path) -> None:
    topo = discover(["cpu", "cpu"], node_of=[0, 1])
    again = Topology.from_dict(topo.to_dict())
    assert again == topo
    path = tmp_path / "links.json"
    topo.links.to_json(path)
    assert "Infinity" not in path.read_text()  # strict JSON: the diagonal is null
    assert LinkMatrix.from_json(path) == topo.links


def test_order_helpers() -> None:
    uniform = LinkMatrix.uniform(4, 1e9)
    assert list(distinct_orders(symmetry_classes([1.0] * 4, uniform))) == [[0, 1, 2, 3]]
    two_kinds = symmetry_classes([1.0, 0.5, 1.0, 0.5], uniform)
    assert two_kinds == [0, 1, 0, 1] and len(list(distinct_orders(two_kinds))) == 6
    # a ring 0-1-2-3-0 of fast links: 0 and 2 are not interchangeable with 1 and 3's neighbours
    bw = [[math.inf if i == j else (100.0 if abs(i - j) in (1, 3) else 1.0) for j in range(4)] for i in range(4)]
    ring = LinkMatrix(bw, [[0.0] * 4 for _ in range(4)], [["X"] * 4 for _ in range(4)])
    assert symmetry_classes([1.0] * 4, ring) == [0, 1, 0, 1]
    assert chain_orders(ring)[:2] == [[0, 1, 2, 3], [1, 0, 3, 2]]


@pytest.mark.cuda
def test_discover_one_gpu() -> None:
    topo = discover(["cuda:0"])
    info = topo.devices[0]
    assert info.kind == "cuda" and info.capability is not None and 0 < info.free_mem <= info.total_mem


@pytest.mark.multigpu
def test_discover_and_measure_two_gpus() -> None:
    topo = discover(["cuda:0", "cuda:1"])
    assert re.fullmatch(r"NV\d+|PIX|PXB|PHB|NODE|SYS|unknown", topo.links.kind[0][1])
    measure_bandwidth(topo, nbytes=64 << 20)
    assert topo.links.bandwidth[0][1] > 1e9 and topo.links.latency[0][1] < 1e-3
