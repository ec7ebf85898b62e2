"""`StageContext`: everything a stage needs about where it runs; passed down, never global."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["StageContext", "init_distributed", "NCCL_SAFE_ENV"]

NCCL_SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
"""NVLink multicast stays off in every process eet_pipe starts."""


@dataclass
class StageContext:
    """Rank, device and communication groups of one pipeline stage."""

    rank: int
    world: int
    device: torch.device
    backend: str
    links: dict[tuple[int, int], dist.ProcessGroup | None] = field(default_factory=dict)
    """One 2-rank group per directed link (s -> (s+1) % P), so the two directions never share a stream."""
    control: dist.ProcessGroup | None = None
    """A gloo group over all ranks for commands and results (torchrun mode)."""
    staged: frozenset[tuple[int, int]] = frozenset()
    """Links whose two stages share one GPU. NCCL refuses two ranks on one device, so these links are
    gloo groups and their GPU tensors travel through host memory (`comm.P2P` stages them)."""

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.world - 1

    def link(self, src: int, dst: int) -> dist.ProcessGroup | None:
        """The group carrying messages from stage `src` to stage `dst`."""
        if (src, dst) not in self.links:
            raise ValueError(f"no link from stage {src} to stage {dst}: links go from s to (s+1) % {self.world}")
        return self.links[(src, dst)]

    def is_staged(self, src: int, dst: int) -> bool:
        """True when the link from `src` to `dst` joins two stages on one GPU (see `staged`)."""
        return (src, dst) in self.staged


def _connect_links(links: dict[tuple[int, int], dist.ProcessGroup | None], rank: int, device: torch.device,
                   staged: frozenset[tuple[int, int]]) -> None:
    """Create every link's communicator now, in the same order on all ranks.

    NCCL creates a group's communicator lazily at its first operation, and creation blocks until
    both members join. Left lazy, stage 0 could block creating the (1 -> 0) link for an early
    receive while stage 1 blocks creating (0 -> 1): a deadlock as soon as a schedule uses both
    directions (interleaved, decode). One tiny all-reduce per link, in a fixed order, avoids it.
    """
    for (src, dst), group in links.items():
        if rank in (src, dst):
            probe = torch.zeros(1, device="cpu" if (src, dst) in staged else device)
            dist.all_reduce(probe, group=group)
            # and one message along the link, so its point-to-point connection exists before any schedule runs
            if rank == src:
                dist.send(probe, dst=dst, group=group)
            else:
                dist.recv(probe, src=src, group=group)
            if device.type == "cuda":
                torch.cuda.synchronize(device)


def shared_gpu_links(devices: list[str]) -> frozenset[tuple[int, int]]:
    """The directed links s -> (s+1) % P whose two stages are on the same GPU."""
    world = len(devices)
    return frozenset((s, (s + 1) % world) for s in range(world) if world > 1
                     and devices[s] == devices[(s + 1) % world] and torch.device(devices[s]).type == "cuda")


def init_distributed(rank: int, world: int, device: torch.device, init_method: str | None = None,
                     timeout_s: float = 600.0, devices: list[str] | None = None) -> StageContext:
    """Join (or create) the process group and build the per-link groups.

    `devices` (every stage's device, when the caller knows them) lets stages share a GPU: NCCL refuses
    two ranks on one device, so the default group is then gloo and each link between stages on one GPU
    is a gloo group whose tensors `comm.P2P` stages through host memory. Other links stay NCCL."""
    for key, value in NCCL_SAFE_ENV.items():
        os.environ.setdefault(key, value)
    # each direction of each link has its own group, so per-group serialisation of p2p is what we want
    os.environ.setdefault("TORCH_NCCL_SHOW_EAGER_INIT_P2P_SERIALIZATION_WARNING", "false")
    backend = "nccl" if device.type == "cuda" else "gloo"
    staged = shared_gpu_links(devices) if devices else frozenset()
    gpus = [d for d in devices or [] if torch.device(d).type == "cuda"]
    shared = len(set(gpus)) < len(gpus)  # some GPU holds several stages
    if device.type == "cuda":
        # load kernels eagerly (before the context exists): see comm.py on spinning NCCL kernels
        os.environ.setdefault("CUDA_MODULE_LOADING", "EAGER")
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # eager NCCL set-up of the default group binds this rank's GPU, which a shared GPU forbids
        default = "gloo" if shared else backend
        kwargs = {"device_id": device} if default == "nccl" else {}
        dist.init_process_group(default, init_method=init_method, rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s), **kwargs)
    links: dict[tuple[int, int], dist.ProcessGroup | None] = {}
    if world > 1:
        for src in range(world):  # every rank creates every group, in the same order
            dst = (src + 1) % world  # with two stages, (0, 1) and (1, 0) are two groups over the same ranks
            link_backend = "gloo" if (src, dst) in staged else backend
            links[(src, dst)] = dist.new_group(sorted({src, dst}), backend=link_backend)
        _connect_links(links, rank, device, staged)
    control = dist.new_group(list(range(world)), backend="gloo") if world > 1 else None
    return StageContext(rank=rank, world=world, device=device, backend=backend, links=links, control=control,
                        staged=staged)
