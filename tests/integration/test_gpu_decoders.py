"""Mistral (sliding window), Qwen2 (q/k/v bias, per-layer windows) and Qwen3 (per-head q/k norms) on a GPU,
against the CPU fp32 reference (HF, which the CPU tests show equal to ours). Run with `pytest -m cuda`
(`-m multigpu` for the two-GPU pipeline).

The new pieces run through the dispatching ops on CUDA: the q/k norms through `rms_norm` on [B, T, H, D]
rows, the sliding window through the prefill mask and through the cache validity handed to the decode-
attention kernel (`layers.window_valid`), also inside the CUDA graphs of decode steps.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import eet_pipe
from eet_pipe.generation.sequences import pad_prompts
from eet_pipe.models.meta import decode_meta, positions_from_mask, prefill_meta
from tests.hf_models import mistral_dir, qwen2_dir, qwen3_dir  # noqa: F401  (fixtures)

MODELS = ["mistral_dir", "qwen2_dir", "qwen3_dir"]
PROMPTS = [[(7 * i + 3) % 160 + 1 for i in range(24)], [8, 13], [100, 3, 4, 5, 6, 44, 23]]  # past every window
NEW = 24


def _reference(path):
    """CPU fp32 HF: logits of the padded prompts, greedy tokens and each step's logits."""
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    ids, mask = pad_prompts(PROMPTS)
    with torch.no_grad():
        logits = hf(input_ids=ids, attention_mask=mask.long(), position_ids=positions_from_mask(mask)).logits
        out = hf.generate(ids, attention_mask=mask.long(), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                          pad_token_id=0, eos_token_id=None, output_logits=True, return_dict_in_generate=True)
    steps = torch.stack(out.logits, dim=1).float()  # [B, NEW, V]
    return ids, mask, logits, out.sequences[:, ids.shape[1]:], steps


def _decided_prefix(tokens: torch.Tensor, steps: torch.Tensor, tol: float) -> list[int]:
    """Per row, how many leading greedy steps the reference decides by more than `tol` (top-1 minus top-2)."""
    top2 = steps.topk(2, dim=-1).values
    close = (top2[..., 0] - top2[..., 1]) <= tol  # [B, NEW]
    return [int(row.nonzero()[0]) if row.any() else tokens.shape[1] for row in close]


@torch.inference_mode()
def _teacher_forced(lm, ids: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Our logits [B, NEW, V] at each greedy step of the reference, fed the reference's tokens through the KV
    cache (prefill, then one decode step per token, as `generation.generate_loop` addresses the cache)."""
    model, device = lm.model, lm.device
    batch, width = ids.shape
    cache = model.new_cache(batch, width + NEW)
    slots, lengths = torch.arange(batch), mask.sum(-1)
    out = [model(ids.to(device), prefill_meta(mask, slots).to(device), cache)[:, -1]]
    for n in range(NEW - 1):
        meta = decode_meta(slots, torch.full((batch,), width + n), lengths + n, kv_len=width + n + 1)
        out.append(model(tokens[:, n:n + 1].to(device), meta.to(device), cache)[:, -1])
    return torch.stack(out, dim=1).float().cpu()


@pytest.mark.cuda
@pytest.mark.parametrize("fixture", MODELS)
@pytest.mark.parametrize("graphs", [True, False])
def test_fp32_on_cuda_matches_the_cpu_reference(fixture, graphs, request):
    path = request.getfixturevalue(fixture)
    ids, mask, logits, tokens, _ = _reference(path)
    ours = eet_pipe.from_pretrained(str(path), dtype="fp32", device="cuda:0")
    assert ((ours.forward(ids, mask).cpu() - logits)[mask].abs().max().item()) <= 1e-3
    got = ours.generate(PROMPTS, max_new_tokens=NEW, ignore_eos=True, cuda_graphs=graphs)
    assert [r.token_ids for r in got] == tokens.tolist()


@pytest.mark.cuda
@pytest.mark.parametrize("fixture", MODELS)
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_on_cuda_follows_the_cpu_reference(fixture, dtype, request):
    """Prefill logits and every decode step's logits (teacher-forced with the reference's tokens, through the
    cache and the decode-attention kernel) within the compare tool's bounds; greedy tokens identical for every
    step the fp32 reference decides by more than four times the measured error (after a closer call, the two
    may legitimately part: the tiny random models have small margins)."""
    path = request.getfixturevalue(fixture)
    ids, mask, logits, tokens, steps = _reference(path)
    ours = eet_pipe.from_pretrained(str(path), dtype=dtype, device="cuda:0")
    scale = max(1.0, logits[mask].abs().max().item())
    tol = (2e-2 if dtype == "fp16" else 5e-2) * scale
    assert ((ours.forward(ids, mask).float().cpu() - logits)[mask].abs().max().item()) <= tol
    err = (_teacher_forced(ours, ids, mask, tokens) - steps).abs().max().item()
    assert err <= tol
    got = ours.generate(PROMPTS, max_new_tokens=NEW, ignore_eos=True)
    decided = _decided_prefix(tokens, steps, 4 * err)
    for row, (result, n) in enumerate(zip(got, decided, strict=True)):
        assert result.token_ids[:n] == tokens[row, :n].tolist(), f"row {row}, first {n} steps"


@pytest.mark.multigpu
@pytest.mark.parametrize("fixture", MODELS)
def test_two_gpu_pipeline_equals_one_gpu(fixture, request):
    from eet_pipe.runtime import PipelineEngine

    path = request.getfixturevalue(fixture)
    _, _, _, tokens, _ = _reference(path)
    ids, mask = pad_prompts(PROMPTS)
    single = eet_pipe.from_pretrained(str(path), dtype="fp32", device="cuda:0")
    with PipelineEngine(str(path), devices=["cuda:0", "cuda:1"], plan="even", dtype="fp32", timeout=120) as engine:
        out = engine.forward(ids, mask, microbatches=1)
        assert torch.equal(out.cpu()[mask], single.forward(ids, mask).cpu()[mask])
        got = engine.generate(PROMPTS, max_new_tokens=NEW, ignore_eos=True)
    assert [r.token_ids for r in got] == tokens.tolist()
