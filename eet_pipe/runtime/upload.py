"""`Uploader`: a serving step's small host tensors on the device in one copy, without stalling the host.

A copy from pageable host memory makes the host wait until the stream has run all earlier work, so a
step that copied its metadata that way could not be launched while the previous one was still on the
GPU. The uploader packs a step's tensors into one of a ring of page-locked buffers, allocated once when
serving starts (a page-locked allocation later could wait for the whole device, behind an NCCL
operation that waits for a peer stage), and moves them with one asynchronous copy. A buffer is reused
only after the copy that last read it has finished (an event per buffer).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

__all__ = ["Uploader", "ALIGN"]

log = logging.getLogger("eet_pipe.runtime")

ALIGN = 16
"""Byte alignment of each tensor inside a packed buffer (any dtype can be viewed at such an offset)."""


def _packed(tensors: Sequence[torch.Tensor]) -> tuple[list[int], int]:
    """Byte offset of each tensor in a packed buffer, and the buffer's size."""
    offsets, total = [], 0
    for t in tensors:
        offsets.append(total)
        total += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
    return offsets, total


class Uploader:
    """Host-to-device copies of small CPU tensors through `depth` page-locked buffers of `capacity` bytes.

    ``upload([a, b, ...])`` returns the tensors on `device` (same shapes and dtypes), copied in stream
    order on the current stream. Tensors larger than a buffer are copied directly (from pageable memory,
    which waits for the stream). On CPU the tensors are returned as they are, unless `packed` is set: then
    they take the packed path through ordinary buffers and come back as copies.
    """

    def __init__(self, device: torch.device | str, capacity: int, depth: int = 16, packed: bool | None = None) -> None:
        if capacity <= 0 or depth <= 0:
            raise ValueError(f"Uploader needs capacity > 0 and depth > 0, got {capacity} and {depth}")
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.packed = self.cuda if packed is None else packed
        self.capacity, self.depth = capacity, depth
        self.buffers = [torch.empty(capacity, dtype=torch.uint8, pin_memory=self.cuda) for _ in range(depth)] \
            if self.packed else []
        self.events: list[torch.cuda.Event | None] = [None] * depth
        self.next = 0
        self.direct = 0
        """Uploads too large for a buffer, copied from pageable memory."""

    def upload(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if not self.packed:
            return [t.to(self.device) for t in tensors]
        offsets, total = _packed(tensors)
        if total > self.capacity:
            if not self.direct:
                log.warning("a step's inputs (%d bytes) exceed the %d-byte upload buffers: copied from pageable "
                            "memory, which waits for the GPU", total, self.capacity)
            self.direct += 1
            return [t.to(self.device, non_blocking=True) for t in tensors]
        i = self.next
        self.next = (i + 1) % self.depth
        if self.events[i] is not None:
            self.events[i].synchronize()  # the copy that last read this buffer (depth uploads ago)
        host = self.buffers[i]
        for t, off in zip(tensors, offsets, strict=True):
            n = t.numel() * t.element_size()
            if n:
                host[off:off + n].copy_(t.detach().contiguous().view(-1).view(torch.uint8))
        if self.cuda:
            moved = host[:total].to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self.events[i] = event
        else:
            moved = host[:total].clone()
        return [moved[off:off + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
                for t, off in zip(tensors, offsets, strict=True)]
