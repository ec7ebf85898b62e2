"""Transparency: the pipelined model computes exactly what the single-process model computes.

Engines are reused across cases (module-scoped) so the grid stays fast on two CPU cores.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from eet_pipe.generation.sequences import pad_prompts
from eet_pipe.runtime.commands import split_rows
from tests.distributed.cases import pipeline_cases

PROMPTS = [[5, 17, 33, 9, 41, 3, 77, 12, 5, 6, 90], [8, 13], [100, 3, 4, 5, 6, 44, 23], [9, 9, 1], [4, 5, 6, 7, 8]]

GRID = [  # (model fixture, stages, schedule, virtual)
    ("gpt2_dir", 1, "gpipe", 1),
    ("gpt2_dir", 2, "gpipe", 1),
    ("gpt2_dir", 2, "interleaved", 2),
    ("gpt2_dir", 3, "sequential", 1),
    ("llama_dir", 2, "interleaved", 2),
    ("llama_dir", 3, "gpipe", 1),
    ("llama_dir", 4, "gpipe", 1),
    ("bert_dir", 2, "gpipe", 1),
    ("bert_dir", 3, "interleaved", 2),
]


case = pipeline_cases(GRID)


@pytest.mark.timeout(600)
def test_forward_is_bit_identical(case):
    """Bit-identical to the single-process model run on the same microbatches (BLAS may pick other
    kernels for another row count, so against the whole batch at once the bound is 1e-5)."""
    path, single, engine, schedule = case
    ids, mask = pad_prompts(PROMPTS)
    whole = single.forward(ids, mask)
    micro = [1] if schedule == "sequential" else [1, 2, 3, 4, 8]
    for m in micro:
        out = engine.forward(ids, mask, microbatches=m)
        ref = torch.cat([single.forward(ids[r], mask[r]) for r in split_rows(len(PROMPTS), m)])
        assert out.shape == ref.shape
        assert torch.equal(out[mask], ref[mask]), f"M={m}: max diff {(out - ref)[mask].abs().max()}"
        assert (out - whole)[mask].abs().max() <= 1e-5


@pytest.mark.timeout(600)
def test_generate_equals_hf(case):
    path, single, engine, _ = case
    if not single.cfg.is_decoder:
        pytest.skip("encoder")
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    ids, mask = pad_prompts(PROMPTS)
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=mask.long(), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                          pad_token_id=0, eos_token_id=None)[:, ids.shape[1]:]
    for groups in (1, 2, 5):
        got = engine.generate(PROMPTS, max_new_tokens=12, ignore_eos=True, microbatches=groups)
        assert [r.token_ids for r in got] == ref.tolist(), f"groups={groups}"
