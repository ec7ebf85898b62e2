"""Model resolution: ``model=`` is a checkpoint directory, a name in the local HF cache, or a preset
from ``configs/``. Presets have no weights on disk: ``weights=random`` builds seeded random ones;
the ``tiny`` preset carries built-in weights and tokenizer so it needs nothing at all.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import yaml

from eet_pipe.models.config import ArchConfig
from eet_pipe.weights.checkpoint import WEIGHT_FILES
from eet_pipe.weights.loader import config_from_hf, mapping_for, read_hf_config

__all__ = ["ModelSpec", "resolve_model", "legacy_weights_seed", "SEED_RENAMED", "list_presets", "load_preset", "CONFIG_DIR",
           "ModelNotFoundError"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
WEIGHT_CHOICES = ("checkpoint", "random")


class ModelNotFoundError(ValueError):
    """`model=` names nothing that can be loaded."""


SEED_RENAMED = "seed= is the weights' seed here for one more release; use weights_seed="
"""The warning for the old spelling of `weights_seed` (`seed` is the sampling seed in `SamplingParams`)."""


def legacy_weights_seed(weights_seed: int, seed: int | None) -> int:
    """The weights' seed of a call that may still pass the old `seed=` keyword (a FutureWarning, for one release)."""
    if seed is None:
        return weights_seed
    warnings.warn(SEED_RENAMED, FutureWarning, stacklevel=3)
    if weights_seed not in (0, seed):
        raise ValueError(f"weights_seed={weights_seed} and seed={seed} disagree: pass weights_seed= only")
    return seed


@dataclass
class ModelSpec:
    """A resolved model: where its config and weights come from."""

    name: str
    cfg: ArchConfig
    source: str
    """'dir' (HF checkpoint directory), 'random' (seeded random weights), 'builtin' or 'state' (in memory)."""
    path: Path | None = None
    weights_seed: int = 0
    """Seed of random weights (source 'random') or of the built-in training ('builtin')."""
    tokenizer: str = "byte"
    """'byte' (built in), 'dir' (from `path`) or 'none'."""
    state: dict | None = None
    """Canonical tensors of an in-memory model (source 'state')."""


def list_presets() -> list[str]:
    """Names of the presets in configs/."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_preset(name: str) -> dict:
    """The parsed YAML of a preset."""
    file = CONFIG_DIR / f"{name}.yaml"
    if not file.exists():
        raise ModelNotFoundError(f"unknown preset {name!r}; presets: {', '.join(list_presets())}")
    return yaml.safe_load(file.read_text()) or {}


def _hf_cache_dirs(name: str) -> list[Path]:
    root = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache" /
                                                                   "huggingface")) / "hub")
    repo = root / ("models--" + name.replace("/", "--")) / "snapshots"
    return sorted(repo.glob("*"), key=lambda p: p.stat().st_mtime, reverse=True) if repo.is_dir() else []


def _is_checkpoint(path: Path) -> bool:
    return (path / "config.json").exists() and any((path / f).exists() for f in WEIGHT_FILES)


def _from_dir(path: Path, name: str) -> ModelSpec:
    hf = read_hf_config(path)
    mapping_for(hf["model_type"])
    return ModelSpec(name=name, cfg=config_from_hf(hf), source="dir", path=path, tokenizer="dir")


def _from_preset(name: str, weights: str | None, weights_seed: int) -> ModelSpec:
    data = load_preset(name)
    cfg = ArchConfig.from_dict(data["arch"])
    if data.get("weights") == "builtin" and weights in (None, "builtin"):
        return ModelSpec(name=name, cfg=cfg, source="builtin", weights_seed=int(data.get("seed", 0)),
                         tokenizer=data.get("tokenizer", "byte"))
    if weights != "random":
        raise ModelNotFoundError(
            f"preset {name!r} has no weights on this machine: pass weights=random to build seeded random "
            f"weights (for benchmarks), or model=<checkpoint directory> for real ones")
    return ModelSpec(name=name, cfg=cfg, source="random", weights_seed=weights_seed, tokenizer=data.get("tokenizer", "byte"))


def resolve_model(model: str, weights: str | None = None, weights_seed: int = 0) -> ModelSpec:
    """Resolve ``model=`` (directory, HF-cache name, or preset) into a `ModelSpec`.

    Raises ModelNotFoundError listing everything that was tried.
    """
    if weights not in (None, "builtin", *WEIGHT_CHOICES):
        raise ValueError(f"weights={weights!r} is invalid; allowed: random (seeded random weights) or "
                         "checkpoint (read from the model directory)")
    path = Path(model).expanduser()
    if path.is_dir():
        if not _is_checkpoint(path):
            raise ModelNotFoundError(f"{path} is a directory but not an HF checkpoint: it needs config.json and "
                                     f"one of {', '.join(WEIGHT_FILES)}")
        if weights == "random":
            return ModelSpec(name=path.name, cfg=config_from_hf(read_hf_config(path)), source="random",
                             path=path, weights_seed=weights_seed, tokenizer="dir")
        return _from_dir(path, path.name)
    for snap in _hf_cache_dirs(model):
        if _is_checkpoint(snap):
            return _from_dir(snap, model)
    if (CONFIG_DIR / f"{model}.yaml").exists():
        return _from_preset(model, weights, weights_seed)
    tried = [f"directory {path} (does not exist)", f"local HF cache entry for {model!r} (not found)",
             f"preset {model!r} (presets: {', '.join(list_presets())})"]
    raise ModelNotFoundError(f"model={model!r} not found; tried: " + "; ".join(tried))
