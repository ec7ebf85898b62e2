"""GPU checks (run on a GPU machine with `pytest -m cuda` / `-m multigpu`)."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from eet_pipe.generation.lm import LanguageModel
from eet_pipe.models.meta import prefill_meta
from eet_pipe.weights import from_torch

XL = dict(vocab_size=50257, n_embd=1600, n_layer=48, n_head=25, n_positions=1024)


@pytest.fixture(scope="module")
def xl_models():
    torch.manual_seed(0)
    hf32 = GPT2LMHeadModel(GPT2Config(**XL)).eval().cuda()
    ours32 = from_torch(hf32, device="cuda")
    ours16 = from_torch(hf32, device="cuda", dtype=torch.float16)
    hf16 = GPT2LMHeadModel(GPT2Config(**XL)).eval().cuda().half()
    hf16.load_state_dict(hf32.state_dict())
    yield hf32, hf16, ours32, ours16
    del hf32, hf16, ours32, ours16
    torch.cuda.empty_cache()


@pytest.mark.cuda
@torch.inference_mode()
def test_fp16_error_no_worse_than_hf(xl_models):
    hf32, hf16, ours32, ours16 = xl_models
    ids = torch.randint(0, 50257, (4, 100), device="cuda")
    ref = hf32(ids).logits.float()
    meta = prefill_meta(torch.ones(4, 100, dtype=torch.bool)).to("cuda")
    ours = ours16(ids, meta).float()
    theirs = hf16(ids).logits.float()
    ours_err = (ours - ref).abs().max().item()
    hf_err = (theirs - ref).abs().max().item()
    print(f"fp16 max-abs error vs fp32: eet_pipe {ours_err:.4f}, HF {hf_err:.4f}")
    assert ours_err <= 1.5 * hf_err
    assert (ours32(ids, meta) - ref).abs().max().item() < 5e-3  # fp32 (TF32 off by default)


@pytest.mark.cuda
@torch.inference_mode()
def test_fp16_greedy_agrees_with_hf(xl_models):
    _, hf16, _, ours16 = xl_models
    prompt = torch.randint(0, 50257, (1, 32), device="cuda")
    ref = hf16.generate(prompt, max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=0,
                        eos_token_id=None)[0, 32:].tolist()
    got = LanguageModel(ours16).generate([prompt[0].tolist()], max_new_tokens=64, ignore_eos=True)[0].token_ids
    agree = next((i for i, (a, b) in enumerate(zip(got, ref, strict=True)) if a != b), 64)
    same = sum(a == b for a, b in zip(got, ref, strict=True))
    print(f"greedy agreement: first divergence at step {agree}, {same}/64 equal")
    assert same >= 0.95 * 64 or agree >= 61
