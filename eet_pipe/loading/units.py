"""Build the canonical model (or a slice) and the tokenizer that a `ModelSpec` describes."""

from __future__ import annotations

import torch

from eet_pipe.loading.presets import ModelSpec
from eet_pipe.loading.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer
from eet_pipe.models.model import CanonicalModel
from eet_pipe.models.quant import check_quantize, quantize_model
from eet_pipe.weights.loader import init_random, load_checkpoint

__all__ = ["load_units", "tokenizer_for", "spec_from_model", "prepare"]


def load_units(spec: ModelSpec, units: list[str] | None, dtype: torch.dtype,
               device: torch.device | str, quantize: str | None = None) -> CanonicalModel:
    """The slice `units` (None = whole model) with weights from the spec's source, on `device`.

    `quantize` ("int8-weight" or None) quantises the layers' projections after loading
    (``eet_pipe.models.quant.quantize_model``); `dtype` stays the activation dtype.
    """
    check_quantize(quantize)
    model = _load(spec, units, dtype, device)
    if torch.device(device).type == "cuda":
        model.pad_vocab()
    return quantize_model(model) if quantize is not None else model


def _load(spec: ModelSpec, units: list[str] | None, dtype: torch.dtype,
          device: torch.device | str) -> CanonicalModel:
    if spec.source == "dir":
        return load_checkpoint(spec.path, units, dtype=dtype, device=device)
    if spec.source == "state":
        return _from_state(spec, units, dtype, device)
    if spec.source == "builtin":
        from eet_pipe.loading.builtin import builtin_model

        return builtin_model(spec.cfg, units, spec.weights_seed, dtype, device)
    return init_random(spec.cfg, units, seed=spec.weights_seed, dtype=dtype, device=device)


def _from_state(spec: ModelSpec, units: list[str] | None, dtype: torch.dtype,
                device: torch.device | str) -> CanonicalModel:
    with torch.device("meta"):
        model = CanonicalModel(spec.cfg, units)
    state = spec.state or {}
    missing = [k for k in model.state_dict() if k not in state]
    if missing:
        raise ValueError(f"in-memory model lacks canonical tensors: {', '.join(missing[:10])}")
    tensors = {k: state[k].to(device=device, dtype=dtype if state[k].is_floating_point() else state[k].dtype)
               for k in model.state_dict()}
    model.load_state_dict(tensors, strict=True, assign=True)
    model.tie_weights()
    return model.eval().requires_grad_(False)


def spec_from_model(model: CanonicalModel, tokenizer: str = "none") -> ModelSpec:
    """A spec that rebuilds (slices of) an already loaded whole model in worker processes."""
    if model.units != model.cfg.unit_names():
        raise ValueError("PipelineEngine needs a whole model, not a slice")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return ModelSpec(name=model.cfg.model_type, cfg=model.cfg, source="state", tokenizer=tokenizer, state=state)


def prepare(spec: ModelSpec) -> None:
    """Do once, before workers start, what every worker would otherwise repeat (build built-in weights)."""
    if spec.source == "builtin":
        from eet_pipe.loading.builtin import builtin_state

        builtin_state(spec.cfg, spec.weights_seed)


def tokenizer_for(spec: ModelSpec) -> Tokenizer | None:
    """The model's tokenizer: from its directory, or the built-in byte tokenizer for presets."""
    if spec.tokenizer == "dir":
        tok = load_tokenizer(spec.path)
        if tok is not None:
            return tok
        return ByteTokenizer() if spec.cfg.vocab_size >= ByteTokenizer.vocab_size else None
    if spec.tokenizer == "byte":
        return ByteTokenizer()
    return None
