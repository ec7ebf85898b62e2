"""`LanguageModel`: a canonical model on one device with `.forward` and `.generate`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from eet_pipe.dtypes import parse_device, parse_dtype
from eet_pipe.generation import GenerationResult, SamplingParams, check_prompts, generate_loop
from eet_pipe.loading import load_units, tokenizer_for
from eet_pipe.models.config import ArchConfig
from eet_pipe.models.meta import StepMeta, prefill_meta
from eet_pipe.models.model import CanonicalModel
from eet_pipe.presets import ModelSpec, resolve_model
from eet_pipe.tokenizer import Tokenizer

__all__ = ["LanguageModel", "from_pretrained", "encode_prompts", "check_forward_inputs", "prepare_generation"]

Prompts = str | Sequence[str] | Sequence[Sequence[int]] | torch.Tensor


def encode_prompts(prompts: Prompts, tokenizer: Tokenizer | None) -> list[list[int]]:
    """Text or token ids -> a list of token-id lists."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, torch.Tensor):
        return [row.tolist() for row in (prompts if prompts.dim() == 2 else prompts.view(1, -1))]
    out = []
    for p in prompts:
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError("this model has no tokenizer: pass token ids instead of text")
            out.append(tokenizer.encode(p))
        else:
            out.append([int(t) for t in p])
    return out


def prepare_generation(cfg: ArchConfig, tokenizer: Tokenizer | None, prompts: Prompts,
                       sampling: dict[str, Any]) -> tuple[list[list[int]], list[SamplingParams]]:
    """Validated token-id prompts and per-sequence sampling params (sequence n is seeded seed + n)."""
    if not cfg.is_decoder:
        raise ValueError(f"{cfg.model_type} is an encoder: generate needs a causal language model")
    params = SamplingParams(**sampling)
    ids = encode_prompts(prompts, tokenizer)
    check_prompts(ids, cfg.vocab_size, cfg.max_positions, params.max_new_tokens)
    per_seq = [SamplingParams(**{**vars(params), "seed": None if params.seed is None else params.seed + n})
               for n in range(len(ids))]
    return ids, per_seq


def check_forward_inputs(cfg: ArchConfig, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Validate forward() inputs and return the bool mask [B, T]."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError("input_ids must be an int64 tensor of shape [batch, tokens]")
    if ids.shape[1] > cfg.max_positions:
        raise ValueError(f"input has {ids.shape[1]} tokens > the model's max positions {cfg.max_positions}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= cfg.vocab_size):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise ValueError(f"token id {bad} is outside the vocabulary 0..{cfg.vocab_size - 1}")
    if mask is None:
        return torch.ones(ids.shape, dtype=torch.bool)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {tuple(mask.shape)} != input_ids shape {tuple(ids.shape)}")
    return mask.bool().cpu()


class LanguageModel:
    """A whole canonical model on one device."""

    def __init__(self, model: CanonicalModel, tokenizer: Tokenizer | None = None, spec: ModelSpec | None = None):
        self.model, self.tokenizer, self.spec = model, tokenizer, spec
        self.cfg = model.cfg
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V] (decoders) or hidden states [B, T, H] (encoders) of a padded batch."""
        mask = check_forward_inputs(self.cfg, input_ids, attention_mask)
        meta = prefill_meta(mask, token_types=token_type_ids).to(self.device)
        return self.model(input_ids.to(self.device), meta)

    __call__ = forward

    @torch.inference_mode()
    def generate(self, prompts: Prompts, **sampling: Any) -> list[GenerationResult]:
        """Generate for each prompt (text or ids); keyword arguments are `SamplingParams` fields."""
        ids, per_seq = prepare_generation(self.cfg, self.tokenizer, prompts, sampling)
        max_len = max(len(p) for p in ids) + per_seq[0].max_new_tokens
        cache = self.model.new_cache(len(ids), max_len)

        def step(x: torch.Tensor, meta: StepMeta) -> torch.Tensor:
            return self.model(x.to(self.device), meta.to(self.device), cache)[:, -1]

        decode = self.tokenizer.decode if self.tokenizer is not None else None
        pad = self.cfg.pad_token_id if self.cfg.pad_token_id is not None else 0
        return generate_loop(step, ids, per_seq, self.cfg.eos_ids, decode, pad)


def from_pretrained(model: str, weights: str | None = None, dtype: str | torch.dtype | None = None,
                    device: str = "cpu", seed: int = 0) -> LanguageModel:
    """Load `model` (checkpoint directory, HF-cache name or preset) on one device."""
    spec = resolve_model(model, weights, seed)
    dev = parse_device(device)
    canonical = load_units(spec, None, parse_dtype(dtype), dev)
    return LanguageModel(canonical, tokenizer_for(spec), spec)
