"""Parsing of dtype and device names given on the command line or in the API."""

from __future__ import annotations

import torch

__all__ = ["parse_dtype", "dtype_name", "parse_device"]

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
           "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
           "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def parse_dtype(value: str | torch.dtype | None, default: torch.dtype = torch.float32) -> torch.dtype:
    """'fp16' / 'bf16' / 'fp32' (or a torch.dtype) -> torch.dtype."""
    if value is None:
        return default
    if isinstance(value, torch.dtype):
        if value not in _DTYPES.values():
            raise ValueError(f"dtype {value} is not supported; allowed: fp32, fp16, bf16")
        return value
    key = str(value).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"dtype={value!r} is not supported; allowed: fp32, fp16, bf16")
    return _DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.float16 -> 'fp16'."""
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


def parse_device(value: str | torch.device) -> torch.device:
    """Validate a device name ('cpu', 'cuda:1') and check that it exists here."""
    try:
        device = torch.device(value)
    except RuntimeError as err:
        raise ValueError(f"device {value!r} is not a valid device name (e.g. cpu, cuda:0)") from err
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = 0 if device.index is None else device.index
        if index >= count:
            raise ValueError(f"device {value!r} is not visible: this machine has {count} CUDA device(s)")
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise ValueError(f"device type {device.type!r} is not supported; allowed: cpu, cuda:N")
    return device
