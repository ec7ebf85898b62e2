"""Serialisation of commands sent from the driver to the workers.

Commands carry small CPU tensors (token ids, masks, slots, positions). Plain pickle would serialise
each one through `torch.save` / `torch.load` (an archive per tensor: hundreds of microseconds, paid on
every decode step of a server); shared-memory pickling (multiprocessing's reducers) would pass file
descriptors and tie memory to worker lifetimes. Here a CPU tensor travels as its dtype, shape and raw
bytes, and comes back as an ordinary tensor owning its memory.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch

__all__ = ["dumps", "loads"]


def _tensor(dtype: torch.dtype, shape: tuple[int, ...], data: bytes) -> torch.Tensor:
    if not data:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype).view(shape)


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is torch.Tensor and obj.device.type == "cpu" and obj.layout == torch.strided \
                and not obj.requires_grad and not obj.is_quantized:
            flat = obj.detach().resolve_conj().resolve_neg().contiguous().reshape(-1)
            return _tensor, (obj.dtype, tuple(obj.shape), flat.view(torch.uint8).numpy().tobytes())
        return NotImplemented


def dumps(obj: Any) -> bytes:
    """Pickle `obj` with CPU tensors as raw bytes (see the module docstring)."""
    buf = io.BytesIO()
    _Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buf.getvalue()


def loads(data: bytes) -> Any:
    """Inverse of `dumps`."""
    return pickle.loads(data)
