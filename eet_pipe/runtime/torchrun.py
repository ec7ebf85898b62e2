"""Torchrun launch mode: every rank is a stage; rank 0 also drives.

Rank 0 broadcasts each command over a gloo control group, runs its own stage in-process and
receives the result from the last rank. Other ranks run `serve_forever`. The stage code is the
same `Stage` the self-spawned workers run.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from eet_pipe.runtime.commands import Shutdown
from eet_pipe.runtime.context import StageContext, init_distributed

__all__ = ["under_torchrun", "DistTransport"]


def under_torchrun() -> bool:
    """True when started by torchrun (RANK / WORLD_SIZE / MASTER_ADDR are set)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


class DistTransport:
    """Commands over torch.distributed for a torchrun-launched pipeline."""

    def __init__(self, devices: list[str], spec, chunk_units: list[list[str]], dtype: torch.dtype) -> None:
        from eet_pipe.runtime.stage import Stage

        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if world != len(devices):
            raise ValueError(f"torchrun started {world} processes but the pipeline has {len(devices)} stages: "
                             f"use --nproc-per-node/--nnodes so that the world size equals --stages")
        self.rank, self.world = rank, world
        # no `devices`: under torchrun "cuda:0" of two ranks may be two hosts' GPUs, so links are never staged
        # through host memory here (as in the server's torchrun driver); one GPU per rank, as torchrun places them
        self.ctx: StageContext = init_distributed(rank, world, torch.device(devices[rank]), "env://")
        self.stage = Stage(self.ctx, spec, chunk_units, dtype)
        self.closed = False
        dist.barrier(group=self.ctx.control)

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def _bcast(self, obj: Any) -> Any:
        box = [obj]
        if self.world > 1:
            dist.broadcast_object_list(box, src=0, group=self.ctx.control)
        return box[0]

    def run(self, cmd: Any) -> tuple[Any, list[dict]]:
        """(rank 0) Run one command on every rank; returns the last stage's result and trace events."""
        self._bcast(cmd)
        out = self.stage.execute(cmd)
        events = self.stage.tracer.events() if getattr(cmd, "trace", False) else []
        if self.world == 1:
            return out, events
        box: list[Any] = [None]
        dist.recv_object_list(box, src=self.world - 1, group=self.ctx.control)
        gathered: list[Any] = [None] * self.world
        dist.gather_object(events, gathered if self.rank == 0 else None, dst=0, group=self.ctx.control)
        return box[0], [e for part in gathered for e in (part or [])]

    def serve_forever(self) -> None:
        """(ranks > 0) Execute broadcast commands until Shutdown."""
        while True:
            cmd = self._bcast(None)
            if isinstance(cmd, Shutdown):
                break
            out = self.stage.execute(cmd)
            events = self.stage.tracer.events() if getattr(cmd, "trace", False) else []
            if self.ctx.is_last:
                dist.send_object_list([out], dst=0, group=self.ctx.control)
            dist.gather_object(events, None, dst=0, group=self.ctx.control)
        self.shutdown()

    def shutdown(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.rank == 0 and self.world > 1:
            self._bcast(Shutdown())
        if dist.is_initialized():
            dist.destroy_process_group()
