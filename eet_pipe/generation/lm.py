"""`LanguageModel`: a canonical model on one device with `.forward` and `.generate`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from eet_pipe.generation.sequences import GenerationResult, SamplingParams, StepFn, check_prompts, generate_loop
from eet_pipe.loading.presets import ModelSpec, legacy_weights_seed, resolve_model
from eet_pipe.loading.tokenizer import Tokenizer
from eet_pipe.loading.units import load_units, tokenizer_for
from eet_pipe.models.config import ArchConfig
from eet_pipe.models.dtypes import parse_device, parse_dtype
from eet_pipe.models.meta import StepMeta, prefill_meta
from eet_pipe.models.model import CanonicalModel
from eet_pipe.models.quant import resolve_precision
from eet_pipe.ops.cuda_graphs import DEFAULT_BUCKETS, GraphDecoder
from eet_pipe.ops.gemm_tuning import GemmTuning, enable_gemm_tuning, warm_up

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
    """A whole canonical model on one device.

    Args:
        model: the canonical model (optionally int8-quantised by `quantize_model`).
        tokenizer, spec: what `from_pretrained` resolved (optional).
        tune_gemm: measure the GEMM algorithm of every decode shape at start-up (a warm-up pass over the decode
            batch buckets) and keep the choices in a file under `gemm_cache_dir`, so later processes start with
            them (CUDA: `eet_pipe.ops.gemm_select`'s cuBLASLt selection; ROCm: TunableOp; see `gemm_tuning`).
            Where it cannot be on, `self.gemm_tuning.why_off` says why.
        gemm_cache_dir: folder of the tuning results file (default ``~/.cache/eet_pipe/gemm_tuning``).
    """

    def __init__(self, model: CanonicalModel, tokenizer: Tokenizer | None = None, spec: ModelSpec | None = None,
                 tune_gemm: bool = False, gemm_cache_dir: str | Path | None = None):
        self.model, self.tokenizer, self.spec = model, tokenizer, spec
        self.cfg = model.cfg
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.gemm_tuning: GemmTuning | None = None
        self._graphs = GraphDecoder(model)
        if tune_gemm:
            self.gemm_tuning = enable_gemm_tuning(self.device, gemm_cache_dir)
            if self.gemm_tuning.enabled and self.cfg.is_decoder and model.has_head:
                self.warm_up(DEFAULT_BUCKETS)

    def warm_up(self, batch_sizes: Sequence[int] = (1,), prompt_len: int = 32) -> None:
        """Run the model once per shape so GEMM tuning (if on) happens now, not on the first request."""
        warm_up(self.model, self.device, batch_sizes, prompt_len, self.gemm_tuning)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V] (decoders) or hidden states [B, T, H] (encoders) of a padded batch."""
        mask = check_forward_inputs(self.cfg, input_ids, attention_mask)
        meta = prefill_meta(mask, token_types=token_type_ids).to(self.device)
        return self.model(input_ids.to(self.device), meta).contiguous()  # the padded GPU head returns a view

    __call__ = forward

    @torch.inference_mode()
    def generate(self, prompts: Prompts, cuda_graphs: bool | None = None, **sampling: Any) -> list[GenerationResult]:
        """Generate for each prompt (text or ids); keyword arguments are `SamplingParams` fields.

        `cuda_graphs` replays decode steps from CUDA graphs (`eet_pipe.ops.cuda_graphs`); default: on
        for a CUDA model, off on CPU (where True runs the same steps eagerly).
        """
        ids, per_seq = prepare_generation(self.cfg, self.tokenizer, prompts, sampling)
        max_len = max(len(p) for p in ids) + per_seq[0].max_new_tokens
        use_graphs = self.device.type == "cuda" if cuda_graphs is None else bool(cuda_graphs)
        step = self._graph_step(len(ids), max_len) if use_graphs else self._eager_step(len(ids), max_len)
        decode = self.tokenizer.decode if self.tokenizer is not None else None
        return generate_loop(step, ids, per_seq, self.cfg.eos_ids, decode, self.cfg.pad_id)

    def _eager_step(self, batch: int, max_len: int) -> StepFn:
        cache = self.model.new_cache(batch, max_len)

        def step(x: torch.Tensor, meta: StepMeta) -> torch.Tensor:
            return self.model(x.to(self.device), meta.to(self.device), cache)[:, -1]

        return step

    def _graph_step(self, batch: int, max_len: int) -> StepFn:
        graphs = self._graphs.prepare(batch, max_len)

        def step(x: torch.Tensor, meta: StepMeta) -> torch.Tensor:
            if x.shape[1] == 1:
                return graphs(x, meta)
            return self.model(x.to(self.device), meta.to(self.device), graphs.cache)[:, -1]

        step.greedy = graphs.greedy  # greedy decoding: one replay per step (`generation.sequences._greedy_steps`)
        return step


def from_pretrained(model: str, weights: str | None = None, dtype: str | torch.dtype | None = None,
                    device: str = "cpu", weights_seed: int = 0, quantize: str | None = None,
                    tune_gemm: bool = False, seed: int | None = None) -> LanguageModel:
    """Load `model` (checkpoint directory, HF-cache name or preset) on one device.

    Args:
        model, weights, weights_seed: what to load (see `resolve_model`).
        dtype: fp32 / fp16 / bf16 activations and weights, or "int8": int8 weights (as
            quantize="int8-weight") with fp16 activations on CUDA and fp32 on CPU.
        device: "cpu" or "cuda:N".
        quantize: None or "int8-weight" (weight-only int8 for the layers' projections).
        tune_gemm: measure every decode shape's GEMM algorithm at start-up and keep the choices in a file, see
            `LanguageModel`.
        seed: the old spelling of `weights_seed`, accepted with a FutureWarning for one release.
    """
    spec = resolve_model(model, weights, legacy_weights_seed(weights_seed, seed))
    dev = parse_device(device)
    act_dtype, quantize = resolve_precision(dtype, quantize, dev)
    canonical = load_units(spec, None, parse_dtype(act_dtype), dev, quantize=quantize)
    return LanguageModel(canonical, tokenizer_for(spec), spec, tune_gemm=tune_gemm)
