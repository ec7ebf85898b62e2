"""Comparison points of the precision tool: their names and order, and how each side records them.

A *point* is what the report shows (``layers.3.attn.q``). A *capture key* is what a forward hook
records: a canonical module name (its output) or ``name:in`` (its first input). Points map to keys:
``attn.q/k/v`` split the ``attn.qkv`` output, ``attn.context`` is the input of ``attn.out``,
``mlp.act`` the input of ``mlp.down``, ``attn.probs`` is recomputed from ``attn.qkv`` (with the per-head
``attn.q_norm`` / ``attn.k_norm`` outputs where the model has them; or read from HF's
``output_attentions``); every other point is the output of the module of the same name.

`CaptureHooks` records keys on canonical models (whole models, and pipeline chunks in the workers)
without changing model code: forward hooks / pre-hooks, and for norms that a layer calls through
``Norm.residual`` (the fused residual-add + norm) an instance-level wrapper of that method.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from eet_pipe import ops
from eet_pipe.models.config import ArchConfig
from eet_pipe.models.layers import Norm, attention_mask
from eet_pipe.models.meta import index_positions, prefill_meta
from eet_pipe.models.rotary import rotary_table
from eet_pipe.ops import reference
from eet_pipe.weights.loader import mapping_for
from eet_pipe.weights.mapping import ArchMapping, normalise_keys

__all__ = ["LAYER_POINTS", "CaptureHooks", "HFCapture", "MissingPointError", "attention_probs", "capture_key",
           "capture_keys", "derive_points", "hf_module_table", "input_positions", "point_names", "reference_ops",
           "select_points", "split_qkv", "valid_elements"]

LAYER_POINTS = ("attn.norm", "attn.q", "attn.k", "attn.v", "attn.q_norm", "attn.k_norm", "attn.probs", "attn.context",
                "attn.out", "mlp.norm", "mlp.up", "mlp.gate", "mlp.act", "mlp.down")
"""Points inside one layer, in pre-norm order (post-norm moves each norm after its block's output)."""

_OPTIONAL = {"mlp.gate": lambda cfg: cfg.gated, "attn.q_norm": lambda cfg: cfg.qk_norm,
             "attn.k_norm": lambda cfg: cfg.qk_norm}
"""Points that only some configs have."""

_QKV_PARTS = {"attn.q": 0, "attn.k": 1, "attn.v": 2}
_INPUT_OF = {"attn.context": "attn.out", "mlp.act": "mlp.down"}
_LAYER_POINT = re.compile(r"layers\.(\d+)\.(.+)")


class MissingPointError(ValueError):
    """A side cannot produce a requested point."""


def _layer_order(cfg: ArchConfig) -> list[str]:
    names = [p for p in LAYER_POINTS if p not in _OPTIONAL or _OPTIONAL[p](cfg)]
    if not cfg.pre_norm:  # post-norm: the norm runs after the residual add of its block
        for norm, after in (("attn.norm", "attn.out"), ("mlp.norm", "mlp.down")):
            names.remove(norm)
            names.insert(names.index(after) + 1, norm)
    return names


def point_names(cfg: ArchConfig) -> list[str]:
    """Every point of a model, in tree (= data-flow) order."""
    names = ["embed"]
    for i in range(cfg.num_layers):
        names += [f"layers.{i}.{p}" for p in _layer_order(cfg)] + [f"layers.{i}"]
    names += [n for n, on in (("final_norm", cfg.final_norm), ("head", cfg.lm_head), ("pooler", cfg.pooler)) if on]
    return names


def _known(name: str, cfg: ArchConfig) -> bool:
    """A point name of the architecture family (whether or not this config has it)."""
    match = _LAYER_POINT.fullmatch(name) or re.fullmatch(r"layers\.(\d+)()", name)
    if match is not None:
        return int(match.group(1)) < cfg.num_layers and match.group(2) in ("", *LAYER_POINTS)
    return name in ("embed", "final_norm", "head", "pooler")


def select_points(cfg: ArchConfig, patterns: Sequence[str] | None = None) -> list[str]:
    """All points, or those named by `patterns` (a point, or a prefix such as ``layers.3`` / ``layers.3.attn``).

    A name that is valid for the architecture family but absent from this config (``mlp.gate`` of a
    non-gated MLP, ``attn.q_norm`` of a model without q/k norms) is kept, so the side that lacks it is named in the error.
    """
    every = point_names(cfg)
    if not patterns:
        return every
    out: list[str] = []
    for pat in patterns:
        hits = [n for n in every if n == pat or n.startswith(pat + ".")]
        if not hits and _known(pat, cfg):
            hits = [pat]
        if not hits:
            raise ValueError(f"points: {pat!r} names no comparison point of this {cfg.model_type} model; points are "
                             f"embed, layers.0..layers.{cfg.num_layers - 1}[.{'|'.join(LAYER_POINTS)}], "
                             "final_norm, head, pooler")
        out += [h for h in hits if h not in out]
    return out


def capture_key(point: str) -> str:
    """The capture key a point is derived from on a canonical model."""
    leaf = _leaf(point)
    prefix = point.removesuffix(leaf)
    if leaf in _QKV_PARTS or leaf == "attn.probs":
        return prefix + "attn.qkv"
    if leaf in _INPUT_OF:
        return prefix + _INPUT_OF[leaf] + ":in"
    return point


def capture_keys(point: str, cfg: ArchConfig) -> tuple[str, ...]:
    """Every capture key a point needs on a canonical model: `capture_key`'s, and for ``attn.probs`` of a model
    with per-head q/k norms also those norms' outputs (the probabilities are computed from normalised q and k)."""
    key = capture_key(point)
    if _leaf(point) == "attn.probs" and cfg.qk_norm:
        prefix = key.removesuffix("attn.qkv")
        return key, prefix + "attn.q_norm", prefix + "attn.k_norm"
    return (key,)


def input_positions(mask: torch.Tensor, cfg: ArchConfig) -> torch.Tensor:
    """[B, T] position ids of a padded input as the model numbers them (ArchConfig.position_ids): counted over
    valid tokens, or the column index (0..T-1) whatever the padding."""
    meta = prefill_meta(mask.cpu())
    return (index_positions(meta) if cfg.position_ids == "index" else meta).positions


def split_qkv(qkv: torch.Tensor, cfg: ArchConfig) -> tuple[torch.Tensor, ...]:
    """[B, T, (Hq + 2 Hkv) D] -> q [B, T, Hq D], k and v [B, T, Hkv D] (no rotary)."""
    kv = cfg.num_kv_heads * cfg.head_dim
    return qkv.split([cfg.num_heads * cfg.head_dim, kv, kv], dim=-1)


def attention_probs(qkv: torch.Tensor, cfg: ArchConfig, mask: torch.Tensor, layer: int = 0,
                    normed: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Softmax attention probabilities [B, Hq, T, T] in fp32 from a qkv projection [B, T, (Hq + 2 Hkv) D].

    `normed`: the outputs of the per-head q and k norms ([B, T, H, D]) for a model that has them, used instead
    of q and k of the projection. Rotary (when the config has it), positions and the mask (with layer
    `layer`'s sliding window) are the model's own (`rotary_table`, `attention_mask`).
    """
    b, t, _ = qkv.shape
    q, k, _ = split_qkv(qkv.float(), cfg)
    if normed is not None:
        q, k = (n.float() for n in normed)
    q = q.reshape(b, t, cfg.num_heads, cfg.head_dim).transpose(1, 2)  # [B, Hq, T, D]
    k = k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
    meta = prefill_meta(mask.cpu())
    meta = (index_positions(meta) if cfg.position_ids == "index" else meta).to(qkv.device)
    if cfg.positions == "rotary":
        cos, sin = rotary_table(cfg, qkv.device)
        cos, sin = cos[meta.positions], sin[meta.positions]  # [B, T, D]
        q, k = reference.rotary(q, cos, sin), reference.rotary(k, cos, sin)
    k = k.repeat_interleave(cfg.num_heads // cfg.num_kv_heads, dim=1)
    scores = (q @ k.transpose(-1, -2)) * cfg.head_dim ** -0.5  # [B, Hq, T, T]
    allowed = attention_mask(meta, cfg.causal, None, cfg.window(layer))  # [B, 1, T, T]
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1)


def derive_points(points: Iterable[str], raw: dict[str, torch.Tensor], cfg: ArchConfig, mask: torch.Tensor,
                  side: str) -> dict[str, torch.Tensor]:
    """Point tensors from captured keys; a point captured directly (HF ``attn.probs``) is taken as is.

    Raises:
        MissingPointError: naming the side, the point and the capture key it lacks.
    """
    out = {}
    for point in points:
        key, leaf = capture_key(point), _leaf(point)
        if point in raw:
            out[point] = raw[point]
        elif key not in raw:
            raise MissingPointError(f"side {side} has no point {point!r}: nothing was captured for {key!r}")
        elif leaf in _QKV_PARTS:
            out[point] = split_qkv(raw[key], cfg)[_QKV_PARTS[leaf]]
        elif leaf == "attn.probs":
            out[point] = _probs(point, key, raw, cfg, mask, side)
        else:
            out[point] = raw[key]
    return out


def _probs(point: str, key: str, raw: dict[str, torch.Tensor], cfg: ArchConfig, mask: torch.Tensor,
           side: str) -> torch.Tensor:
    """``attn.probs`` recomputed from the captured qkv (and q/k norm outputs, `capture_keys`)."""
    extra = capture_keys(point, cfg)[1:]
    lacking = [k for k in extra if k not in raw]
    if lacking:
        raise MissingPointError(f"side {side} has no point {point!r}: nothing was captured for {lacking[0]!r}")
    layer = int(_LAYER_POINT.fullmatch(point).group(1))
    normed = (raw[extra[0]], raw[extra[1]]) if extra else None
    return attention_probs(raw[key], cfg, mask, layer, normed)


def _leaf(point: str) -> str:
    """'layers.3.attn.q' -> 'attn.q'; points outside layers are their own leaf."""
    match = _LAYER_POINT.fullmatch(point)
    return point if match is None else match.group(2)


def valid_elements(point: str, shape: torch.Size, mask: torch.Tensor) -> torch.Tensor:
    """Bool [shape]: the elements that belong to real tokens (padding differs between implementations).

    Token tensors are [B, T, ...]; ``attn.probs`` is [B, H, T, K] (valid query rows); ``pooler`` is [B, H]
    (rows whose first token, the one pooled, is real).
    """
    b, t = mask.shape
    if point == "pooler":
        return mask[:, :1].expand(shape)
    if point.endswith("attn.probs"):
        return mask.view(b, 1, t, 1).expand(shape)
    return mask.view(b, t, *([1] * (len(shape) - 2))).expand(shape)


def _first(value: object) -> torch.Tensor:
    """A module's output tensor (the first element of a tuple output)."""
    return value[0] if isinstance(value, (tuple, list)) else value


def _find(model: nn.Module, name: str) -> nn.Module | None:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return None
    return module if isinstance(module, nn.Module) else None


class CaptureHooks:
    """Records capture keys on canonical models while entered; a no-op for ``keys=None``.

    Args:
        models: whole models or pipeline chunks (keys whose module a chunk lacks are skipped there).
        keys: capture keys: ``name`` records the module's output, ``name:in`` its first input.
    Set `microbatch` before each forward of a microbatch; `tensors()` concatenates them in order.
    """

    def __init__(self, models: Iterable[nn.Module], keys: Iterable[str] | None) -> None:
        self.models, self.keys = list(models), list(keys or [])
        self.microbatch = 0
        self._store: dict[str, dict[int, torch.Tensor]] = {}
        self._undo: list[Callable[[], None]] = []

    def __enter__(self) -> CaptureHooks:
        for model in self.models:
            for key in self.keys:
                self._install(model, key)
        return self

    def __exit__(self, *exc: object) -> None:
        while self._undo:
            self._undo.pop()()

    def _record(self, key: str, tensor: torch.Tensor) -> None:
        self._store.setdefault(key, {})[self.microbatch] = tensor.detach().clone()

    def _install(self, model: nn.Module, key: str) -> None:
        name, _, where = key.partition(":")
        module = _find(model, name)
        if module is None:
            return
        if where == "in":
            handle = module.register_forward_pre_hook(lambda m, args: self._record(key, args[0]))
        else:
            handle = module.register_forward_hook(lambda m, args, out: self._record(key, _first(out)))
        self._undo.append(handle.remove)
        if isinstance(module, Norm) and where != "in":
            self._wrap_residual(module, key)
        if name == "pooler" and hasattr(model, "pool"):  # the forward never runs the pooler: run it here
            pool = model.register_forward_hook(lambda m, args, out: m.pool(out))
            self._undo.append(pool.remove)

    def _wrap_residual(self, norm: Norm, key: str) -> None:
        """Layers call post-residual norms through ``Norm.residual``, which no forward hook sees."""
        original = norm.residual

        def residual(x: torch.Tensor, res: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            normed, summed = original(x, res)
            self._record(key, normed)
            return normed, summed

        norm.residual = residual  # instance attribute shadows the method until __exit__
        self._undo.append(lambda: delattr(norm, "residual"))

    def tensors(self) -> dict[str, torch.Tensor]:
        """{key: tensor on CPU}, microbatches concatenated along the batch dimension."""
        return {key: torch.cat([parts[m].cpu() for m in sorted(parts)]) for key, parts in self._store.items()}


def hf_module_table(mapping: ArchMapping, cfg: ArchConfig) -> dict[str, tuple[str, ...]]:
    """canonical module -> HF module name(s), read from the weight-mapping table: the HF tensor names of
    the rule of ``<module>.weight`` minus ``.weight`` (several for fused rules such as q, k, v -> qkv)."""
    table = {}
    for canon, (hf_names, _) in mapping.expanded(cfg).items():
        if canon.endswith(".weight"):
            table[canon.removesuffix(".weight")] = tuple(h.removesuffix(".weight") for h in hf_names)
    return table


class HFCapture:
    """Records points on an HF transformers model whose module names come from the weight-mapping table.

    Four points have no weight of their own, so no table row names their module: ``embed`` is the input
    of HF layer 0, ``layers.{i}`` the output of HF layer i (the common prefix of the HF names of that
    layer's rows), ``head`` the model's ``logits`` (a tied head's row names the embedding module) and
    ``layers.{i}.attn.probs`` is ``output_attentions`` (the model must use eager attention). Outputs
    of the several modules of a fused rule are concatenated, so they equal the canonical fused output.
    """

    def __init__(self, model: nn.Module) -> None:
        hf = model.config.to_dict()
        self.model, self.mapping = model, mapping_for(hf.get("model_type", ""))
        base = self.mapping.config_from_hf(hf)
        self.cfg = self.mapping.adjust_config(base, set(normalise_keys(model.state_dict().keys(), self.mapping, base)))
        self.table = hf_module_table(self.mapping, self.cfg)
        self.modules = dict(model.named_modules())

    @classmethod
    def load(cls, path: str | os.PathLike, is_decoder: bool, dtype: torch.dtype, device: str) -> HFCapture:
        """AutoModelForCausalLM (decoders) or AutoModel (encoders) from `path`, with eager attention."""
        from transformers import AutoModel, AutoModelForCausalLM

        auto = AutoModelForCausalLM if is_decoder else AutoModel
        return cls(auto.from_pretrained(path, attn_implementation="eager", dtype=dtype).to(device).eval())

    def _module(self, name: str) -> nn.Module | None:
        """An HF module by its table name (with the base prefix) or without it (a bare base model)."""
        return self.modules.get(name, self.modules.get(name.removeprefix(self.mapping.prefix)))

    def _layer(self, i: int) -> str:
        parts = [n.split(".") for c, hf in self.table.items() if c.startswith(f"layers.{i}.") for n in hf]
        return ".".join(os.path.commonprefix(parts)) if parts else f"<no layers.{i} rows>"

    def _targets(self, key: str) -> tuple[list[str], str]:
        """HF module names and direction ('out' / 'in') that record a capture key."""
        name, _, where = key.partition(":")
        if name == "embed":
            return [self._layer(0)], "in"
        if re.fullmatch(r"layers\.\d+", name):
            return [self._layer(int(name.split(".")[1]))], "out"
        return list(self.table.get(name, ())), where or "out"

    def capture(self, points: Sequence[str], ids: torch.Tensor, mask: torch.Tensor, side: str) -> dict[str, torch.Tensor]:
        """Run the HF model on (ids, mask) and return the tensors of `points`."""
        direct = {p for p in points if p == "head" or p.endswith("attn.probs")}
        keys = {capture_key(p): p for p in reversed(points) if p not in direct}  # key -> first point using it
        store: dict[str, list[torch.Tensor | None]] = {}
        handles: list = []
        try:
            for key, point in sorted(keys.items()):
                handles += self._hook(key, point, store, side)
            out = self._forward(ids, mask, any(p.endswith("attn.probs") for p in direct), side)
        finally:
            for h in handles:
                h.remove()
        raw = {k: torch.cat([t.cpu() for t in parts], dim=-1) for k, parts in store.items() if None not in parts}
        if "head" in direct and getattr(out, "logits", None) is not None:
            raw["head"] = out.logits.cpu()
        for i, probs in enumerate(getattr(out, "attentions", None) or ()):
            raw[f"layers.{i}.attn.probs"] = probs.cpu()
        return derive_points(points, raw, self.cfg, mask, side)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, probs: bool, side: str) -> Any:
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            out = self.model(input_ids=ids.to(device), attention_mask=mask.long().to(device),
                             position_ids=input_positions(mask, self.cfg).to(device), output_attentions=probs)
        if probs and not getattr(out, "attentions", None):
            raise MissingPointError(f"side {side} returned no attention probabilities: load the HF model with "
                                    "attn_implementation='eager' (output_attentions needs it)")
        return out

    def _hook(self, key: str, point: str, store: dict, side: str) -> list:
        names, where = self._targets(key)
        modules = [self._module(n) for n in names]
        if not modules or None in modules:
            found = f"HF module(s) {names} not in the model" if names else "no HF module in its weight table"
            raise MissingPointError(f"side {side} has no point {point!r}: {found} for canonical "
                                    f"{key.partition(':')[0]!r} ({self.mapping.model_type})")
        store[key] = [None] * len(modules)

        def recorder(j: int) -> Callable:
            def put(tensor: torch.Tensor) -> None:
                store[key][j] = tensor.detach().clone()
            if where == "in":
                return lambda m, args, kwargs: put(args[0] if args else kwargs["hidden_states"])
            return lambda m, args, out: put(_first(out))

        return [m.register_forward_pre_hook(recorder(j), with_kwargs=True) if where == "in"
                else m.register_forward_hook(recorder(j)) for j, m in enumerate(modules)]


@contextmanager
def reference_ops() -> Iterator[None]:
    """Run every fused op as its pure-PyTorch reference in this process while entered.

    ``eet_pipe.ops`` has no runtime switch: each op asks the one predicate ``ops._kernel(x)`` whether
    to call its kernel, so that predicate is patched to always answer False (and restored after).
    """
    saved = ops._kernel
    ops._kernel = lambda x: False
    try:
        yield
    finally:
        ops._kernel = saved
