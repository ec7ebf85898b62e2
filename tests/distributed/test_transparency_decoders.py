"""Transparency for Mistral (sliding window), Qwen2 (q/k/v bias, per-layer windows, tied head) and Qwen3
(per-head q/k norms): pipelined over 2 and 3 CPU stages, bit-identical to one stage, and greedy tokens equal
to HF's. The prompts (up to 11 tokens) and 10 generated tokens run past the tiny models' windows (6 and 5)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from eet_pipe.generation.sequences import pad_prompts
from eet_pipe.runtime.commands import split_rows
from tests.distributed.cases import pipeline_cases
from tests.hf_models import mistral_dir, qwen2_dir, qwen3_dir  # noqa: F401  (fixtures)

PROMPTS = [[5, 17, 33, 9, 41, 3, 77, 12, 5, 6, 90], [8, 13], [100, 3, 4, 5, 6, 44, 23], [9, 9, 1]]

GRID = [  # (model fixture, stages, schedule, virtual)
    ("mistral_dir", 2, "gpipe", 1),
    ("mistral_dir", 3, "gpipe", 1),
    ("qwen2_dir", 2, "interleaved", 2),
    ("qwen2_dir", 3, "gpipe", 1),
    ("qwen3_dir", 2, "gpipe", 1),
    ("qwen3_dir", 3, "gpipe", 1),
]


case = pipeline_cases(GRID)


@pytest.mark.timeout(600)
def test_forward_is_bit_identical(case):
    _, single, engine, _ = case
    ids, mask = pad_prompts(PROMPTS)
    for m in (1, 2):
        out = engine.forward(ids, mask, microbatches=m)
        ref = torch.cat([single.forward(ids[r], mask[r]) for r in split_rows(len(PROMPTS), m)])
        assert out.shape == ref.shape
        assert torch.equal(out[mask], ref[mask]), f"M={m}: max diff {(out - ref)[mask].abs().max()}"


@pytest.mark.timeout(600)
def test_generate_equals_one_stage_and_hf(case):
    path, single, engine, _ = case
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    ids, mask = pad_prompts(PROMPTS)
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=mask.long(), max_new_tokens=10, min_new_tokens=10, do_sample=False,
                          pad_token_id=0, eos_token_id=None)[:, ids.shape[1]:]
    assert [r.token_ids for r in single.generate(PROMPTS, max_new_tokens=10, ignore_eos=True)] == ref.tolist()
    for groups in (1, 2):
        got = engine.generate(PROMPTS, max_new_tokens=10, ignore_eos=True, microbatches=groups)
        assert [r.token_ids for r in got] == ref.tolist(), f"groups={groups}"
