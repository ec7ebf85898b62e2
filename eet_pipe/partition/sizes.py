"""Parameter counts and weight bytes of a model, from its `ArchConfig` alone.

Each distinct unit (`embed`, one layer, `head`) is built on the meta device, which allocates nothing, so
the counts are exact for whatever the model classes hold (every layer has the same shapes) and a 70B
model costs microseconds. `eet-pipe models` and the config-derived partition costs (`estimate.py`) use
them.

Precisions: fp32 / fp16 / bf16 store every tensor in that dtype; `int8` is the runtime's int8
weight-only mode (`models.quant`): each layer's projection weights as int8 plus one fp16 scale per
output row, every other tensor (embeddings, head, norms, biases) in fp16.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache

import torch

from eet_pipe.models.config import ArchConfig
from eet_pipe.models.model import CanonicalModel
from eet_pipe.models.quant import QUANTIZED_LINEARS

__all__ = ["PRECISIONS", "UnitSize", "param_count", "tied_elements", "unit_bytes", "unit_size", "weight_bytes"]

PRECISIONS = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}
"""Precision name -> bytes of one (projection) weight element."""
_INT8_REST = 2  # int8 mode keeps everything else, and the scales, in fp16


@dataclass(frozen=True)
class UnitSize:
    """The tensors of one unit, counted in elements."""

    params: int
    """Parameters and buffers held by the unit (a head tied to the embedding still holds its own copy
    when it lives on another stage, so it is counted here)."""
    quantizable: int = 0
    """Elements of the projection weights that int8 weight-only mode stores as int8."""
    scales: int = 0
    """Output rows of those projections (one scale each in int8 mode)."""

    def nbytes(self, precision: str) -> int:
        """Bytes of the unit's tensors in `precision` (see the module docstring)."""
        elem = _elem(precision)
        if precision != "int8":
            return self.params * elem
        return self.quantizable + (self.params - self.quantizable + self.scales) * _INT8_REST


def _elem(precision: str) -> int:
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not supported; allowed: {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


def _kind(cfg: ArchConfig, unit: str) -> str:
    if unit in ("embed", "head"):
        return unit
    if unit.startswith("layers.") and unit.removeprefix("layers.").isdigit():
        if int(unit.removeprefix("layers.")) < cfg.num_layers:
            return "layers.0"  # every layer has the same shapes
    raise ValueError(f"unknown unit {unit!r}; units are embed, layers.0..layers.{cfg.num_layers - 1}, head")


@cache
def _measure(cfg_json: str, kind: str) -> UnitSize:
    cfg = ArchConfig.from_dict(json.loads(cfg_json))
    with torch.device("meta"):
        model = CanonicalModel(cfg, [kind])
    params = sum(t.numel() for t in (*model.parameters(), *model.buffers()))
    quantizable = scales = 0
    for layer in model.layers.values():
        for path in QUANTIZED_LINEARS:
            linear = getattr(layer.get_submodule(path.rpartition(".")[0]), path.rpartition(".")[2], None)
            if isinstance(linear, torch.nn.Linear):
                quantizable += linear.weight.numel()
                scales += linear.weight.shape[0]
    return UnitSize(params, quantizable, scales)


def unit_size(cfg: ArchConfig, unit: str) -> UnitSize:
    """Elements held by `unit` ('embed', 'layers.{i}' or 'head') of a model with `cfg`."""
    return _measure(json.dumps(cfg.to_dict(), sort_keys=True, default=str), _kind(cfg, unit))


def unit_bytes(cfg: ArchConfig, unit: str, precision: str) -> int:
    """Bytes of `unit`'s tensors in `precision` ('fp32', 'fp16', 'bf16' or 'int8')."""
    return unit_size(cfg, unit).nbytes(precision)


def tied_elements(cfg: ArchConfig, unit: str) -> int:
    """Elements of `unit` that are the embedding's own tensor: the weight of a head tied to it, else 0."""
    return cfg.vocab_size * cfg.hidden_size if unit == "head" and cfg.tie_embeddings and cfg.lm_head else 0


def _tied_head(cfg: ArchConfig) -> UnitSize:
    """What the head adds to a whole model: nothing of its weight when tied to the embedding."""
    head = unit_size(cfg, "head")
    return UnitSize(head.params - tied_elements(cfg, "head"), head.quantizable, head.scales)


def param_count(cfg: ArchConfig) -> int:
    """Parameters of the whole model, a tied head counted once (the figure model cards quote)."""
    return (unit_size(cfg, "embed").params + cfg.num_layers * unit_size(cfg, "layers.0").params
            + _tied_head(cfg).params)


def weight_bytes(cfg: ArchConfig, precision: str) -> int:
    """Bytes of the whole model's weights in `precision`, a tied head counted once."""
    _elem(precision)
    return (unit_size(cfg, "embed").nbytes(precision) + cfg.num_layers * unit_size(cfg, "layers.0").nbytes(precision)
            + _tied_head(cfg).nbytes(precision))
