"""Point-to-point activation transfer between neighbouring stages.

Messages follow the schedule: the receiver knows every message's shapes from the command, so
no shape metadata travels. Receives land in a small pool of preallocated buffers; sends are
asynchronous; on GPU, NCCL runs them on its own streams, ordered after the compute that produced
the data. On CPU (gloo) receives are posted one message ahead (prefetch). On GPU a receive is posted
only when the schedule reaches it: an NCCL receive kernel spins until its data arrives, and a
spinning kernel on one communicator while the same GPU starts work on another communicator is not
guaranteed to make progress (NCCL's rule for concurrent communicators).

Two stages on one GPU are joined by a gloo link (NCCL refuses two ranks on one device): their
messages are staged through host memory, a copy to the host before the send and one to the GPU after
the receive. That is slower than NCCL but exact, so pipelines can be run and tested on one GPU.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from eet_pipe.runtime.context import StageContext
from eet_pipe.schedule import Action

__all__ = ["Spec", "P2P"]

Spec = tuple[tuple[int, ...], torch.dtype]
"""Shape and dtype of one tensor of a message."""


class _BufferPool:
    """Two preallocated buffers per (shape, dtype), handed out in turn."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._pool: dict[Spec, tuple[list[torch.Tensor], int]] = {}

    def reserve(self, spec: Spec) -> None:
        """Allocate both buffers of `spec` now (no allocation later, while messages are in flight)."""
        bufs, turn = self._pool.get(spec, ([], 0))
        while len(bufs) < 2:
            bufs.append(torch.empty(spec[0], dtype=spec[1], device=self.device))
        self._pool[spec] = (bufs, turn)

    def take(self, spec: Spec) -> torch.Tensor:
        bufs, turn = self._pool.get(spec, ([], 0))
        if len(bufs) < 2:
            bufs.append(torch.empty(spec[0], dtype=spec[1], device=self.device))
            self._pool[spec] = (bufs, turn)
            return bufs[-1]
        self._pool[spec] = (bufs, turn + 1)
        return bufs[turn % 2]


class P2P:
    """Sends and prefetched receives of one stage for one command."""

    def __init__(self, ctx: StageContext, specs: Callable[[Action], Sequence[Spec]], early: bool | None = None) -> None:
        self.ctx, self.specs = ctx, specs
        # post receives ahead of time: gloo only by default (see the module doc); a caller that decides
        # late which receives remain (decode) turns it off
        self.early = ctx.device.type != "cuda" if early is None else early
        self.pool = _BufferPool(ctx.device)
        self.host_pool = _BufferPool(torch.device("cpu"))  # receive staging of links within one GPU
        self._sends: list[tuple[dist.Work, torch.Tensor]] = []
        self._upcoming: deque[Action] = deque()
        self._posted: dict[Action, tuple[list[dist.Work], list[torch.Tensor], list[torch.Tensor]]] = {}

    def expect(self, recvs: Sequence[Action]) -> None:
        """The receives of this command, in schedule order; the first one is posted at once."""
        self._upcoming = deque(recvs)
        for spec in {spec for action in recvs for spec in self.specs(action)}:
            self.pool.reserve(spec)
        if self.early:
            self._post_next()

    def _post_next(self) -> None:
        if not self._upcoming:
            return
        action = self._upcoming.popleft()
        group = self.ctx.link(action.peer, self.ctx.rank)
        tensors = [self.pool.take(spec) for spec in self.specs(action)]
        staged = self.ctx.is_staged(action.peer, self.ctx.rank)
        landing = [self.host_pool.take(spec) for spec in self.specs(action)] if staged else tensors
        works = [dist.irecv(t, src=action.peer, group=group) for t in landing]
        self._posted[action] = (works, tensors, landing)

    def recv(self, action: Action, prefetch: bool = True) -> list[torch.Tensor]:
        """Wait for the message of `action`; then post the next receive unless `prefetch` is False
        (the caller first decides, e.g. from a control flag, which receives remain, and calls `prefetch`)."""
        if action not in self._posted:
            self._post_next()
        if action not in self._posted:
            raise RuntimeError(f"stage {self.ctx.rank}: receive {action} was not expected by the schedule")
        works, tensors, landing = self._posted.pop(action)
        for w in works:
            w.wait()
        for t, host in zip(tensors, landing, strict=True):
            if t is not host:
                t.copy_(host)  # a link within one GPU: from host memory onto the device
        if prefetch:
            self.prefetch()
        return tensors

    def prefetch(self) -> None:
        """Post the next expected receive if none is outstanding (gloo only; see the module doc)."""
        if self.early and not self._posted:
            self._post_next()

    def drop(self, keep: Callable[[Action], bool]) -> None:
        """Forget expected (not yet posted) receives for which `keep` is False."""
        self._upcoming = deque(a for a in self._upcoming if keep(a))

    def send(self, action: Action, tensors: Sequence[torch.Tensor]) -> None:
        """Start sending `tensors` to `action.peer` (returns at once)."""
        group = self.ctx.link(self.ctx.rank, action.peer)
        staged = self.ctx.is_staged(self.ctx.rank, action.peer)
        for t in tensors:
            t = t.contiguous().cpu() if staged else t.contiguous()  # within one GPU: through host memory (waits for t)
            self._sends.append((dist.isend(t, dst=action.peer, group=group), t))

    def release_sends(self) -> list[tuple[dist.Work, torch.Tensor]]:
        """Hand over the sends still in flight (the caller waits on them later), after checking that
        every expected receive was consumed."""
        if self._posted or self._upcoming:
            raise RuntimeError(f"stage {self.ctx.rank}: {len(self._posted) + len(self._upcoming)} receive(s) "
                               "posted but never consumed")
        sends, self._sends = self._sends, []
        return sends

    def flush(self) -> None:
        """Wait for every send of this command to complete."""
        for work, _ in self.release_sends():
            work.wait()
