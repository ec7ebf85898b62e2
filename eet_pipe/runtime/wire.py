"""Serialisation of commands sent from the driver to the workers.

Commands carry small CPU tensors (token ids, masks, slots, positions). Plain pickle would serialise
each one through `torch.save` / `torch.load` (an archive per tensor: hundreds of microseconds, paid on
every decode step of a server); shared-memory pickling (multiprocessing's reducers) would pass file
descriptors and tie memory to worker lifetimes. Here a CPU tensor travels as its dtype, shape and raw
bytes, and comes back as an ordinary tensor owning its memory.
"""

from __future__ import annotations

import copyreg
import io
import pickle
from typing import Any

import torch

__all__ = ["dumps", "loads"]


def _tensor(dtype: torch.dtype, shape: tuple[int, ...], data: bytes) -> torch.Tensor:
    if not data:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype).view(shape)


def _reduce_tensor(obj: torch.Tensor) -> tuple:
    if obj.device.type != "cpu" or obj.layout != torch.strided or obj.requires_grad or obj.is_quantized:
        return obj.__reduce_ex__(pickle.HIGHEST_PROTOCOL)  # as plain pickle does
    if obj.is_contiguous() and not obj.is_conj() and not obj.is_neg() and obj.dtype in _NUMPY_DTYPES:
        data = obj.numpy().tobytes()  # the common case: one copy, no intermediate tensors
    else:
        data = obj.detach().resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return _tensor, (obj.dtype, tuple(obj.shape), data)


_NUMPY_DTYPES = frozenset({torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                           torch.float16, torch.float32, torch.float64})
"""Dtypes whose tensors `Tensor.numpy` takes as they are (bfloat16 and the float8 types it refuses)."""


class _Pickler(pickle.Pickler):
    # a dispatch table is looked up by exact type inside the C pickler: only tensors cost a Python call
    # (a `reducer_override` is called for every object pickled)
    dispatch_table = {**copyreg.dispatch_table, torch.Tensor: _reduce_tensor}


def dumps(obj: Any) -> bytes:
    """Pickle `obj` with CPU tensors as raw bytes (see the module docstring)."""
    buf = io.BytesIO()
    _Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buf.getvalue()


def loads(data: bytes) -> Any:
    """Inverse of `dumps`."""
    return pickle.loads(data)
