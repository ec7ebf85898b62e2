"""Read tensors lazily from a local HF checkpoint directory.

Formats: ``model.safetensors``, sharded ``model.safetensors.index.json``, ``pytorch_model.bin``
(``torch.load(weights_only=True, mmap=True)``) and sharded ``pytorch_model.bin.index.json``.
Only the tensors asked for are read; `reads` records them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

__all__ = ["Checkpoint", "CheckpointError", "WEIGHT_FILES"]

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


class CheckpointError(ValueError):
    """The directory holds no readable checkpoint, or a file in it is corrupt."""


class Checkpoint:
    """Lazy access to the tensors of one checkpoint directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.reads: list[str] = []
        self._files: dict[str, Any] = {}
        self._map = self._weight_map()

    def _weight_map(self) -> dict[str, str]:
        for name in WEIGHT_FILES:
            file = self.path / name
            if not file.exists():
                continue
            if name.endswith(".index.json"):
                try:
                    return dict(json.loads(file.read_text())["weight_map"])
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise CheckpointError(f"{file}: not a valid sharded-checkpoint index ({err})") from err
            return {key: name for key in self._open(name).keys()}
        raise CheckpointError(f"{self.path}: no weights found; expected one of {', '.join(WEIGHT_FILES)}")

    def _open(self, name: str) -> Any:
        if name not in self._files:
            file = self.path / name
            if not file.exists():
                raise CheckpointError(f"{file}: shard named in the index does not exist")
            try:
                if name.endswith(".safetensors"):
                    self._files[name] = safe_open(str(file), framework="pt", device="cpu")
                else:
                    self._files[name] = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as err:  # noqa: BLE001 - any parse failure means a corrupt file; re-raised typed
                raise CheckpointError(f"{file}: cannot read weights ({type(err).__name__}: {err})") from err
        return self._files[name]

    def keys(self) -> set[str]:
        """Every tensor name in the checkpoint."""
        return set(self._map)

    def get(self, key: str) -> torch.Tensor:
        """Read one tensor (and record that it was read)."""
        if key not in self._map:
            raise CheckpointError(f"{self.path}: tensor {key!r} is not in the checkpoint")
        handle = self._open(self._map[key])
        self.reads.append(key)
        if isinstance(handle, dict):
            return handle[key]
        return handle.get_tensor(key)
