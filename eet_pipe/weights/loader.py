"""Build canonical models (or slices of them) from HF checkpoints, in memory or on disk."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch

from eet_pipe.models.config import ArchConfig
from eet_pipe.models.model import CanonicalModel
from eet_pipe.weights.checkpoint import Checkpoint
from eet_pipe.weights.mapping import ArchMapping, MappingError, check_keys, from_hf, normalise_keys
from eet_pipe.weights.registry import ARCHS

__all__ = ["ARCHS", "RANDOM_BLOCK", "mapping_for", "read_hf_config", "load_checkpoint", "from_torch", "init_random",
           "config_from_hf"]


def mapping_for(model_type: str) -> ArchMapping:
    """The mapping table of an HF ``model_type``."""
    if model_type not in ARCHS:
        raise ValueError(f"unsupported architecture model_type={model_type!r}; supported: {', '.join(sorted(ARCHS))}")
    return ARCHS[model_type]


def read_hf_config(path: str | Path) -> dict:
    """The parsed ``config.json`` of a checkpoint directory."""
    file = Path(path) / "config.json"
    if not file.exists():
        raise FileNotFoundError(f"{file} does not exist: a checkpoint directory needs config.json")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from err
    if "model_type" not in data:
        raise ValueError(f"{file} has no 'model_type'; supported: {', '.join(sorted(ARCHS))}")
    return data


def config_from_hf(hf: dict) -> ArchConfig:
    """ArchConfig from an HF config dict."""
    return mapping_for(hf["model_type"]).config_from_hf(hf)


def _build(cfg: ArchConfig, mapping: ArchMapping, units: list[str] | None, get: Callable[[str], torch.Tensor],
           dtype: torch.dtype | None, device: torch.device | str) -> CanonicalModel:
    with torch.device("meta"):
        model = CanonicalModel(cfg, units)
    expected = model.state_dict()
    memo: dict[str, torch.Tensor] = {}

    def cached(name: str) -> torch.Tensor:
        if name not in memo:
            memo[name] = get(name)
        return memo[name]

    tensors = from_hf(cached, mapping, cfg, expected.keys())
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise MappingError(f"shape mismatch for {name}: checkpoint gives {tuple(tensor.shape)}, "
                               f"the config expects {tuple(expected[name].shape)}")
        target = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        tensors[name] = tensor.to(device=device, dtype=target)
    model.load_state_dict(tensors, strict=True, assign=True)
    model.tie_weights()
    return model.eval().requires_grad_(False)


def load_checkpoint(path: str | Path, units: list[str] | None = None, dtype: torch.dtype | None = None,
                    device: torch.device | str = "cpu") -> CanonicalModel:
    """Load a canonical model (or the slice `units`) from a local HF directory, reading only its tensors."""
    hf = read_hf_config(path)
    mapping = mapping_for(hf["model_type"])
    ckpt = Checkpoint(path)
    names = normalise_keys(ckpt.keys(), mapping, mapping.config_from_hf(hf))
    cfg = mapping.adjust_config(mapping.config_from_hf(hf), set(names))
    check_keys(set(names), mapping, cfg)
    model = _build(cfg, mapping, units, lambda n: ckpt.get(names[n]), dtype, device)
    model.checkpoint = ckpt  # exposes what was read (ckpt.reads)
    return model


def from_torch(hf_model: torch.nn.Module, units: list[str] | None = None, dtype: torch.dtype | None = None,
               device: torch.device | str = "cpu") -> CanonicalModel:
    """Convert an in-memory HF transformers model to a canonical model (or slice)."""
    hf = hf_model.config.to_dict()
    mapping = mapping_for(hf.get("model_type", ""))
    state = {k: v.detach() for k, v in hf_model.state_dict().items()}
    names = normalise_keys(state.keys(), mapping, mapping.config_from_hf(hf))
    cfg = mapping.adjust_config(mapping.config_from_hf(hf), set(names))
    check_keys(set(names), mapping, cfg)
    return _build(cfg, mapping, units, lambda n: state[names[n]], dtype, device)


RANDOM_BLOCK = 1 << 22
"""Elements drawn at a time when filling a CPU tensor of another dtype (16 MiB of fp32); a multiple of 16,
so the blocks draw exactly the numbers one draw of the whole tensor would."""


def init_random(cfg: ArchConfig, units: list[str] | None = None, seed: int = 0, dtype: torch.dtype | None = None,
                device: torch.device | str = "cpu", std: float = 0.02) -> CanonicalModel:
    """A model (or the slice `units`) with deterministic random weights, created directly on `device`.

    The slice is built on the meta device; each of its tensors is then allocated on `device` in `dtype` and
    filled from a generator seeded by the seed and the tensor's canonical name (which starts with its
    unit's name), so the weights of unit ``layers.17`` are the same whatever the split and whichever
    stage builds them, and no process ever holds more than its own units. On CPU a tensor of a dtype
    other than fp32 is filled block by block (`RANDOM_BLOCK`), so no fp32 copy of it is held either; bf16
    and fp16 weights are the fp32 ones rounded. A head tied to the embedding reads the embedding's numbers.
    """
    with torch.device("meta"):
        model = CanonicalModel(cfg, units)
    dtype, device = dtype or torch.float32, torch.device(device)
    block = torch.empty(RANDOM_BLOCK) if device.type == "cpu" and dtype != torch.float32 else None  # reused
    tensors: dict[str, torch.Tensor] = {}
    for name, meta in model.state_dict().items():
        tied = name == "head.weight" and cfg.tie_embeddings
        if tied and "embed.tok.weight" in tensors:
            tensors[name] = tensors["embed.tok.weight"]
            continue
        source = "embed.tok.weight" if tied else name
        tensors[name] = _random_tensor(source, tuple(meta.shape), seed, std, dtype, device, block)
    del block
    model.load_state_dict(tensors, strict=True, assign=True)
    model.tie_weights()
    return model.eval().requires_grad_(False)


def _random_tensor(name: str, shape: tuple[int, ...], seed: int, std: float, dtype: torch.dtype,
                   device: torch.device, block: torch.Tensor | None = None) -> torch.Tensor:
    """Norm weights 1, norm biases 0, everything else N(0, std) from a generator seeded by the name."""
    if ".norm." in f".{name}" and name.endswith(".weight") or name == "final_norm.weight":
        return torch.ones(shape, dtype=dtype, device=device)
    if "norm" in name and name.endswith(".bias"):
        return torch.zeros(shape, dtype=dtype, device=device)
    gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + _stable_hash(name))
    numel = math.prod(shape)
    if device.type != "cpu" or numel < 16:  # on a GPU the fp32 draw lives on the GPU, not on the host
        return torch.randn(shape, generator=gen, device=device).mul_(std).to(dtype)
    out = torch.empty(shape, dtype=dtype, device=device)
    flat = out.view(-1)
    if dtype == torch.float32:
        flat.normal_(0.0, std, generator=gen)
        return out
    block = torch.empty(RANDOM_BLOCK) if block is None else block
    for start, size in _blocks(numel):
        draws = block[:size] if size <= len(block) else torch.empty(size)  # a last block may be 15 longer
        flat[start:start + size].copy_(draws.normal_(0.0, std, generator=gen))
    return out


def _blocks(numel: int) -> list[tuple[int, int]]:
    """(start, size) of the draws filling `numel` elements: RANDOM_BLOCK each, the last one taking a
    remainder under 16 (CPU draws of fewer than 16 numbers follow another algorithm)."""
    out, start = [], 0
    while start < numel:
        size = min(RANDOM_BLOCK, numel - start)
        if 0 < numel - start - size < 16:
            size = numel - start
        out.append((start, size))
        start += size
    return out


def _stable_hash(name: str) -> int:
    value = 0
    for ch in name.encode():
        value = (value * 131 + ch) % 2_147_483_647
    return value
