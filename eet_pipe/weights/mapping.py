"""Weight-mapping tables: HF checkpoint names <-> canonical names, with tensor transforms.

An architecture module (``weights/gpt2.py`` …) lists `Rule`s; the functions here apply them
in either direction. Names in rules use ``{i}`` for the layer index and are relative to the
checkpoint's base-model prefix (``transformer.``, ``bert.``, ``model.``) unless `top_level`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch

from eet_pipe.models.config import ArchConfig

__all__ = ["Transform", "COPY", "TRANSPOSE", "Concat", "Rule", "ArchMapping", "MappingError",
           "from_hf", "to_hf", "normalise_keys", "check_keys", "head_rule"]


class MappingError(ValueError):
    """A checkpoint does not fit the architecture's mapping table (missing/unexpected/misshapen keys)."""


@dataclass(frozen=True)
class Transform:
    """Converts the HF tensors of one rule to the canonical tensor and back."""

    name: str
    forward: Callable[[list[torch.Tensor], ArchConfig], torch.Tensor]
    backward: Callable[[torch.Tensor, ArchConfig], list[torch.Tensor]]


COPY = Transform("copy", lambda ts, cfg: ts[0], lambda t, cfg: [t])
TRANSPOSE = Transform("transpose", lambda ts, cfg: ts[0].t().contiguous(), lambda t, cfg: [t.t().contiguous()])


def Concat(sizes: Callable[[ArchConfig], list[int]]) -> Transform:  # noqa: N802 - reads like a constant
    """Several HF tensors concatenated along dim 0 (e.g. q, k, v -> qkv); split back by `sizes(cfg)`."""
    return Transform("concat", lambda ts, cfg: torch.cat(ts, dim=0),
                     lambda t, cfg: [p.contiguous() for p in t.split(sizes(cfg), dim=0)])


@dataclass(frozen=True)
class Rule:
    """canonical <- transform(hf names...)."""

    canonical: str
    hf: tuple[str, ...]
    transform: Transform = COPY
    top_level: bool = False

    def expand(self, i: int | None) -> tuple[str, tuple[str, ...]]:
        if "{i}" in self.canonical:
            return self.canonical.format(i=i), tuple(h.format(i=i) for h in self.hf)
        return self.canonical, self.hf


def head_rule(cfg: ArchConfig, token_embedding: str) -> Rule:
    """The LM head: the token embedding when the config ties them, else the top-level ``lm_head``."""
    if cfg.tie_embeddings:
        return Rule("head.weight", (token_embedding,))
    return Rule("head.weight", ("lm_head.weight",), top_level=True)


@dataclass(frozen=True)
class ArchMapping:
    """Everything eet_pipe knows about one HF architecture family."""

    model_type: str
    prefix: str
    rules: Callable[[ArchConfig], list[Rule]]
    config_from_hf: Callable[[dict], ArchConfig]
    ignore: Callable[[ArchConfig], tuple[str, ...]] = field(default=lambda cfg: ())
    """Regexes of checkpoint keys that are not weights (buffers, training-only heads)."""
    adjust_config: Callable[[ArchConfig, set[str]], ArchConfig] = field(default=lambda cfg, keys: cfg)

    def expanded(self, cfg: ArchConfig) -> dict[str, tuple[tuple[str, ...], Rule]]:
        """canonical name -> (full HF names, rule) for every tensor of the whole model."""
        out: dict[str, tuple[tuple[str, ...], Rule]] = {}
        for rule in self.rules(cfg):
            indices: Iterable[int | None] = range(cfg.num_layers) if "{i}" in rule.canonical else [None]
            for i in indices:
                canon, hf = rule.expand(i)
                out[canon] = (tuple(h if rule.top_level else self.prefix + h for h in hf), rule)
        return out

    def is_ignored(self, key: str, cfg: ArchConfig) -> bool:
        return any(re.fullmatch(p, key) for p in self.ignore(cfg))


def normalise_keys(keys: Iterable[str], mapping: ArchMapping, cfg: ArchConfig) -> dict[str, str]:
    """{normalised name: checkpoint name}. Checkpoints of the bare base model lack the prefix
    (``h.0.ln_1.weight`` instead of ``transformer.h.0.ln_1.weight``); both load."""
    keys = list(keys)
    if any(k.startswith(mapping.prefix) for k in keys):
        return {k: k for k in keys}
    top = {h for r in mapping.rules(cfg) if r.top_level for h in r.hf}
    return {(k if k in top else mapping.prefix + k): k for k in keys}


def check_keys(available: set[str], mapping: ArchMapping, cfg: ArchConfig) -> None:
    """Raise MappingError naming missing and unexpected checkpoint keys (names only; nothing is read)."""
    table = mapping.expanded(cfg)
    needed = {h for hf, _ in table.values() for h in hf}
    missing = sorted(needed - available)
    unexpected = sorted(k for k in available - needed if not mapping.is_ignored(k, cfg))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:10])}" + (" …" if len(missing) > 10 else ""))
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:10])}"
                         + (" …" if len(unexpected) > 10 else ""))
        raise MappingError(f"checkpoint does not match the {mapping.model_type} mapping: " + "; ".join(parts))


def from_hf(get: Callable[[str], torch.Tensor], mapping: ArchMapping, cfg: ArchConfig,
            wanted: Iterable[str]) -> dict[str, torch.Tensor]:
    """Canonical tensors for the `wanted` canonical names, reading HF tensors through `get`."""
    table = mapping.expanded(cfg)
    out = {}
    for canon in wanted:
        if canon not in table:
            raise MappingError(f"no {mapping.model_type} mapping rule produces canonical tensor {canon!r}")
        hf, rule = table[canon]
        out[canon] = rule.transform.forward([get(h) for h in hf], cfg)
    return out


def to_hf(state: Mapping[str, torch.Tensor], mapping: ArchMapping, cfg: ArchConfig) -> dict[str, torch.Tensor]:
    """HF tensors (with the base prefix) for every canonical tensor in `state` that a rule covers."""
    table = mapping.expanded(cfg)
    out: dict[str, torch.Tensor] = {}
    for canon, tensor in state.items():
        if canon not in table:
            raise MappingError(f"canonical tensor {canon!r} has no {mapping.model_type} mapping rule")
        hf, rule = table[canon]
        for name, part in zip(hf, rule.transform.backward(tensor, cfg), strict=True):
            out[name] = part
    return out
